"""The model on a GPU: the latent DSA path on the Triton kernels against the per-head PyTorch
path, and a short bf16 training run of proxy-h100. Skipped without CUDA; run by
bench/gpu_model_check.sh, results in docs/benchmarks.md."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_kernel_path_matches_reference_on_gpu(single_process):
    from glm52_train.config import get_model_config
    from glm52_train.model.build import RuntimeOptions, build_model

    cfg = get_model_config("tiny").replace(kv_lora_rank=64, qk_rope_dim=16)
    ref = build_model(cfg, RuntimeOptions(dsa_backend="torch", cpu_init=False)).cuda().eval()
    fast = build_model(cfg, RuntimeOptions(dsa_backend="kernels", cpu_init=False)).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    pos = torch.arange(512, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        a, b = ref(ids, pos, None), fast(ids, pos, None)
    assert torch.isfinite(b).all()
    assert ((a - b).norm() / a.norm()).item() < 2e-3
