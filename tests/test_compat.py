"""Each CPU/TE workaround in glm52_train.compat, exercised through the Megatron-Core code that
needs it."""

import threading

import pytest
import torch

from glm52_train import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only workarounds")


def test_current_device_is_the_cpu_for_megatron_call_sites(single_process):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    assert torch.cuda.current_device() == torch.device("cpu")
    MTPLossLoggingHelper.tracker.clear()
    MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(2.0), 0, 1)  # device=current_device()
    assert MTPLossLoggingHelper.tracker["values"].tolist() == [2.0]


def test_host_streams_run_the_alltoall_dispatcher(single_process):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model

    model = build_model(get_model_config("tiny"))
    dispatcher = model.decoder.layers[1].mlp.token_dispatcher
    assert isinstance(dispatcher, MoEAlltoAllTokenDispatcher)
    assert isinstance(MoEAlltoAllTokenDispatcher.cuda_dtoh_stream, compat._HostStream)
    ids = torch.randint(0, 100, (1, 16))
    out = model(ids, torch.arange(16).unsqueeze(0), None, labels=ids)  # dispatch + D2H + sync
    assert torch.isfinite(out).all()


def test_rng_tracker_forks_reproducible_streams(single_process):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7)
    tracker = get_cuda_rng_tracker()
    assert type(tracker).__name__ == "HostRNGStatesTracker"
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the outer stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)  # and is reproducible from the seed


def test_router_gemm_and_mla_take_the_torch_paths():
    compat.apply()
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None
    assert multi_latent_attention.HAVE_TE is False
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    assert torch.allclose(out, x @ w.t())


def test_checkpoint_save_does_not_fork_while_threads_run(tmp_path, single_process):
    import os

    from glm52_train import checkpoint
    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model

    stop = threading.Event()
    busy = threading.Thread(target=lambda: stop.wait(60), daemon=True)
    busy.start()
    model = build_model(get_model_config("tiny"))
    pid = os.getpid()
    forks = []
    os.register_at_fork(before=lambda: forks.append(pid) if os.getpid() == pid else None)
    path = checkpoint.save_checkpoint(tmp_path, 1, [model], meta={})
    stop.set()
    assert not forks
    assert checkpoint.verify_checkpoint(path)["iteration"] == 1
