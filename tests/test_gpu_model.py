"""The model on a GPU: its DSA on the Triton kernels against the same model on the PyTorch
references. Skipped without CUDA; run by bench/gpu.py (checks model_test, model_test_ieee), results in
docs/benchmarks.md."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_kernel_path_matches_reference_on_gpu(single_process):
    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model
    from glm52_train.run_config import load_run_config

    cfg = get_model_config("tiny").replace(kv_lora_rank=64, qk_rope_dim=16)
    # fp32 on both paths: in bf16 (the run config's default on a GPU) the two paths round
    # differently at every layer and the bound below would measure bf16, not the kernels
    ref = build_model(cfg, load_run_config(None, ["dsa.backend=torch", "train.precision=fp32"]),
                      cpu_init=False).cuda().eval()
    fast = build_model(cfg, load_run_config(None, ["dsa.backend=triton", "train.precision=fp32"]),
                       cpu_init=False).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    pos = torch.arange(512, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        a, b = ref(ids, pos, None), fast(ids, pos, None)
    assert torch.isfinite(b).all()
    assert ((a - b).norm() / a.norm()).item() < 2e-3
