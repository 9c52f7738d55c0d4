"""Each item of glm52_train.compat, shown through the Megatron-Core code it works around: the
check fails (or computes the wrong thing) with the item taken out, and passes with it in. An
item that does not apply on this machine is skipped."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import types
import warnings

import pytest
import torch

from glm52_train import compat
from glm52_train.compat.platform import HostStream
from glm52_train.config import get_model_config
from tests.train_helpers import ROOT, env

CUDA_ERRORS = (AssertionError, RuntimeError)  # what torch raises for CUDA calls without CUDA


def needs(name: str) -> None:
    if name not in {i.name for i in compat.installed()}:
        pytest.skip(f"compatibility item {name} does not apply on this machine")


def tiny_config(*overrides):
    from glm52_train.model.build import transformer_config
    from glm52_train.run_config import load_run_config

    return transformer_config(get_model_config("tiny"), load_run_config(None, list(overrides)))


# ---- the registry ------------------------------------------------------------------------------

def test_every_item_has_its_own_test():
    tests = {name for name in globals() if name.startswith("test_item_")}
    expected = {f"test_item_{i.number:02d}_{i.name}" for i in compat.ITEMS}
    assert tests == expected
    assert len({i.number for i in compat.ITEMS}) == len({i.name for i in compat.ITEMS}) == len(compat.ITEMS)


def test_apply_installs_what_applies_here_once(single_process):
    expected = [i for i in compat.ITEMS if compat.applies(i)]
    assert compat.installed() == expected
    compat.apply()
    assert compat.installed() == expected
    assert all(str(i) in compat.describe() for i in expected)
    if not torch.cuda.is_available():
        assert compat.installed() == list(compat.ITEMS)  # on the CPU, every one


def test_another_megatron_version_warns_naming_the_items(single_process, monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    monkeypatch.setattr(compat, "_applied", False)
    with pytest.warns(compat.VersionWarning) as record:
        compat.apply()
    assert len(record) == 1
    message = str(record[0].message)
    assert "megatron-core 0.17.0" in message and compat.PINNED in message
    assert all(f"{i.number} {i.name}" in message for i in compat.ITEMS)
    assert compat.check_version("0.16.1") == []


def test_the_pinned_version_does_not_warn(single_process):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.megatron_version() == compat.PINNED
        assert compat.check_version() == []


def test_the_cli_does_not_silence_the_version_warning():
    from glm52_train.cli import _quiet

    with warnings.catch_warnings(record=True) as record:
        _quiet()  # ignores Megatron-Core's warnings about TE and Apex, and so every message with "te"
        compat.check_version("0.17.0")
    assert [w.category for w in record] == [compat.VersionWarning]


# ---- platform shims: no CUDA -------------------------------------------------------------------

def test_item_01_cuda_current_device(single_process):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    needs("cuda_current_device")
    MTPLossLoggingHelper.tracker.clear()
    with compat.removed("cuda_current_device"), pytest.raises(CUDA_ERRORS):
        MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(2.0), 0, 1)  # device=current_device()
    MTPLossLoggingHelper.tracker.clear()
    MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(2.0), 0, 1)
    assert MTPLossLoggingHelper.tracker["values"].tolist() == [2.0]
    MTPLossLoggingHelper.tracker.clear()


def test_item_02_host_streams(single_process, monkeypatch):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    needs("host_streams")
    config = tiny_config()
    experts, k = config.num_moe_experts, config.moe_router_topk
    monkeypatch.setattr(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None)
    with compat.removed("host_streams"), pytest.raises(CUDA_ERRORS):
        MoEAlltoAllTokenDispatcher(experts, list(range(experts)), config, get_default_pg_collection())
    dispatcher = MoEAlltoAllTokenDispatcher(experts, list(range(experts)), config, get_default_pg_collection())
    assert isinstance(MoEAlltoAllTokenDispatcher.cuda_dtoh_stream, HostStream)

    hidden = torch.randn(5, config.hidden_size)
    chosen = torch.rand(5, experts).topk(k, dim=1).indices
    routing_map = torch.zeros(5, experts, dtype=torch.bool).scatter_(1, chosen, True)
    permuted, probs = dispatcher.dispatch_preprocess(hidden, routing_map, routing_map.float())  # D2H on the side stream
    received, probs = dispatcher.token_dispatch(permuted, probs)
    expert_input, tokens_per_expert, _ = dispatcher.dispatch_postprocess(received, probs)  # waits for its event
    assert tokens_per_expert.tolist() == routing_map.sum(0).tolist()
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(expert_input)))
    assert torch.allclose(out, hidden * k)  # every token back, once per expert it went to


def test_item_03_host_rng_tracker(single_process):
    from megatron.core.tensor_parallel import random as mrandom

    needs("host_rng_tracker")
    try:
        with compat.removed("host_rng_tracker"):
            mrandom.initialize_rng_tracker(force_reset=True)
            with pytest.raises(CUDA_ERRORS):
                mrandom.model_parallel_cuda_manual_seed(7)  # stores the CUDA generator's state
    finally:
        mrandom.initialize_rng_tracker(force_reset=True)
    mrandom.model_parallel_cuda_manual_seed(7)
    tracker = mrandom.get_cuda_rng_tracker()
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the outer stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    mrandom.model_parallel_cuda_manual_seed(7)
    with mrandom.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)  # and is reproducible from the seed
    mrandom.model_parallel_cuda_manual_seed(1234)


def test_item_06_cuda_tensor_factories(single_process):
    from megatron.core.optimizer import clip_grads

    needs("cuda_tensor_factories")
    grads = [torch.ones(4), torch.ones(5)]
    with compat.removed("cuda_tensor_factories"), pytest.raises(CUDA_ERRORS):
        clip_grads.get_grad_norm_fp32(grads)  # torch.zeros(1, device='cuda')
    assert clip_grads.get_grad_norm_fp32(grads) == pytest.approx(3.0)
    with compat.removed("cuda_tensor_factories"), pytest.raises(CUDA_ERRORS):
        torch.ones(2).cuda()
    assert torch.ones(2).cuda().device.type == "cpu"


def toy_training():
    """A two-parameter Megatron-Core module in DDP with the distributed optimizer (torch AdamW
    here), and its LR schedule: what the optimizer-state items need, in a second."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    class Toy(MegatronModule):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.b(self.a(x))

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True, bucket_size=None)
    model = DistributedDataParallel(config, ddp, Toy(config))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=1e-2, max_lr=1e-2, min_lr=1e-2, lr_warmup_steps=0, lr_decay_steps=10,
        lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant",
    )
    return model, optimizer, scheduler


def train_step(model, optimizer) -> None:
    model.zero_grad_buffer()
    optimizer.zero_grad()
    model(torch.arange(8.0, device=compat.default_device()).reshape(2, 4)).pow(2).sum().backward()
    model.finish_grad_sync()
    assert optimizer.step()[0]


def adam_states(optimizer) -> list[dict]:
    (sub,) = optimizer.chained_optimizers
    return list(sub.optimizer.state.values())


def test_item_08_cuda_type_names(single_process):
    needs("cuda_type_names")
    with compat.removed("cuda_type_names"), pytest.raises(TypeError, match="torch.cuda.FloatTensor"):
        toy_training()  # the distributed optimizer sorts parameters by param.type()
    model, optimizer, _ = toy_training()
    train_step(model, optimizer)


def test_item_12_host_split_sizes(two_ranks):
    for rank in two_ranks:
        result = rank["host_split_sizes"]
        assert "all_to_all_single" in (result["without"]["error"] or ""), result  # tensor split sizes
        assert result["with"] == {"error": None, "value": True}, result


def test_item_13_uneven_gloo_all_gather(two_ranks):
    for rank in two_ranks:
        result = rank["uneven_gloo_all_gather"]
        assert "ProcessGroupGloo::allgather" in (result["without"]["error"] or ""), result
        assert result["with"] == {"error": None, "value": True}, result


_FUSED = ("import {first}; from megatron.core.fusions import fused_bias_swiglu as f; "
          "from glm52_train.compat.early import is_compiled; print(is_compiled(f.bias_swiglu))")


def test_item_16_eager_fusions_on_host():
    """Megatron-Core alone wraps its fusions in torch.compile at import; imported after
    glm52_train (as every process here does), the same functions are plain."""
    compat.apply()
    needs("eager_fusions_on_host")

    def fused_compiled(first: str) -> str:
        proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _FUSED.format(first=first)],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()[0]

    assert fused_compiled("megatron.core") == "True"  # upstream: torch.compile
    assert fused_compiled("glm52_train") == "False"
    from megatron.core import jit

    assert jit.jit_fuser is jit.noop_decorator


def test_uneven_reduce_scatter_on_gloo_needs_no_item(two_ranks):
    """Megatron-Core's uneven reduce-scatter (expert tensor parallelism's other half) works on
    gloo as it is; were that to change, this fails before the layout tests do."""
    for rank in two_ranks:
        assert rank["uneven_reduce_scatter"] == {"error": None, "value": True}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """tests/compat_ranks.py in two processes (gloo): what each rank saw without and with items
    12, 13 and 14."""
    if torch.cuda.is_available():
        pytest.skip("two processes on gloo: the CPU checks")
    out = tmp_path_factory.mktemp("compat-ranks")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "compat_ranks.py"), str(out)], cwd=ROOT,
            env=env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


# ---- upstream fixes ----------------------------------------------------------------------------

def test_item_04_router_gemm_symbol(single_process):
    from megatron.core.transformer.moe import moe_utils

    needs("router_gemm_symbol")
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    with compat.removed("router_gemm_symbol"), pytest.raises(NameError, match="te_general_gemm"):
        moe_utils.router_gating_linear(x, w, None, torch.float32)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    assert torch.allclose(out, x @ w.t())


def test_item_05_mla_have_te(single_process):
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention
    from megatron.core.transformer.spec_utils import build_module

    from glm52_train.model.spec import glm52_layer_spec

    needs("mla_have_te")
    config = tiny_config()
    spec = glm52_layer_spec(config, moe=False, use_te=False)
    with compat.removed("mla_have_te"), pytest.raises(TypeError, match="isinstance"):
        build_module(spec, config=config, layer_number=1)  # isinstance(linear_proj, <mock TELinear>)
    layer = build_module(spec, config=config, layer_number=1)
    assert isinstance(layer.self_attention, MLASelfAttention)


class ProcessStart(Exception):
    pass


def test_item_07_in_process_checkpoint_writer(single_process, tmp_path, monkeypatch):
    """Upstream starts a spawn Manager and forks a writer per file at every save (which
    deadlocked here with threads running); with the item no process is started."""
    import os

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from glm52_train import checkpoint

    needs("in_process_checkpoint_writer")
    contexts = []

    def get_context(method):
        contexts.append(method)
        raise ProcessStart(method)

    monkeypatch.setattr(filesystem_async, "mp", types.SimpleNamespace(get_context=get_context))
    model, _, _ = toy_training()
    with compat.removed("in_process_checkpoint_writer"), pytest.raises(checkpoint.CheckpointError) as failed:
        checkpoint.save_checkpoint(tmp_path / "without", 1, [model], meta={})
    assert isinstance(failed.value.__cause__, ProcessStart)  # a failed save is one sentence, caused by it
    assert contexts

    contexts.clear()
    stop = threading.Event()
    busy = threading.Thread(target=lambda: stop.wait(60), daemon=True)
    busy.start()
    pid, forks = os.getpid(), []
    os.register_at_fork(before=lambda: forks.append(pid) if os.getpid() == pid else None)
    path = checkpoint.save_checkpoint(tmp_path / "with", 1, [model], meta={})
    stop.set()
    assert not contexts and not forks
    assert checkpoint.verify_checkpoint(path)["iteration"] == 1


def test_item_09_fresh_adam_state(single_process):
    needs("fresh_adam_state")
    _, optimizer, _ = toy_training()
    (sub,) = optimizer.chained_optimizers
    with compat.removed("fresh_adam_state"), pytest.raises(AssertionError):
        sub.state_dict()  # asserts one common 'step' over a state that does not exist yet
    assert sub.state_dict()["optimizer"]["param_groups"][0]["step"] == 0.0
    for state in adam_states(optimizer):
        assert float(state["step"]) == 0.0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def saved_training(tmp_path):
    from glm52_train.run_config import RunConfig
    from glm52_train.training.state import TrainState, save_training_checkpoint

    model, optimizer, scheduler = toy_training()
    train_step(model, optimizer)
    path = save_training_checkpoint(tmp_path, TrainState(1, 2), [model], optimizer, scheduler, RunConfig().to_dict())
    return path, adam_states(optimizer)


def test_item_10_checkpoint_keys_only(single_process, tmp_path):
    from glm52_train.training.state import load_training_checkpoint

    needs("checkpoint_keys_only")
    path, saved = saved_training(tmp_path)
    model, optimizer, scheduler = toy_training()
    with compat.removed("checkpoint_keys_only"), pytest.raises(KeyError, match="step"):
        load_training_checkpoint(path, [model], optimizer, scheduler)  # copies the live 'step' too
    model, optimizer, scheduler = toy_training()
    assert load_training_checkpoint(path, [model], optimizer, scheduler).iteration == 1
    for before, after in zip(saved, adam_states(optimizer)):
        assert torch.equal(before["exp_avg"], after["exp_avg"]) and torch.equal(before["exp_avg_sq"], after["exp_avg_sq"])
        assert float(after["step"]) == 1.0


def test_item_11_fp64_grad_norm(single_process):
    from megatron.core.optimizer import clip_grads

    needs("fp64_grad_norm")
    grad = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).to(compat.default_device())
    exact = grad.double().norm().item()

    def whole_and_sharded():
        return clip_grads.get_grad_norm_fp32([grad]), clip_grads.get_grad_norm_fp32(list(grad.chunk(3)))

    with compat.removed("fp64_grad_norm"):
        whole, sharded = whole_and_sharded()
    assert abs(whole - sharded) > 1e-6 * exact  # the fp32 norm depends on how the tensor is cut
    whole, sharded = whole_and_sharded()
    assert whole == pytest.approx(exact, rel=2e-7) and sharded == pytest.approx(exact, rel=2e-7)


def test_item_14_aux_loss_token_count(single_process):
    """A micro-batch of two copies of a sequence has the same sequence aux loss as the sequence
    alone, over twice the tokens: before the per-token division its gradient is twice as large.
    (The tensor-parallel half of the item: the next test.)"""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    config = tiny_config("moe.aux_loss_coeff=1e-2")
    assert config.moe_router_load_balancing_type == "seq_aux_loss" and config.calculate_per_token_loss
    device = compat.default_device()
    router = TopKRouter(config, get_default_pg_collection()).to(device)
    one = torch.randn(8, 1, config.hidden_size, generator=torch.Generator().manual_seed(3)).to(device)

    def aux_grad(x):
        router.weight.grad = None
        probs, _ = router(x)
        (probs * 0).sum().backward()
        return router.weight.grad.clone()

    def ratio():
        alone, twice = aux_grad(one), aux_grad(torch.cat([one, one], dim=1))
        return float((twice * alone).sum() / (alone * alone).sum())

    with compat.removed("aux_loss_token_count"):
        assert ratio() == pytest.approx(1.0, rel=1e-5)  # divided by the micro-batch size
    assert ratio() == pytest.approx(2.0, rel=1e-5)


def test_aux_loss_token_count_over_tensor_parallel(two_ranks):
    """Item 14 with the tokens split over TP=2 (sequence parallel): the router gradient summed
    over the group equals the one from all the tokens in one process."""
    for rank in two_ranks:
        result = rank["aux_loss_token_count"]
        assert result["without"]["value"] == pytest.approx(0.5, rel=1e-5), result  # the local count
        assert result["with"]["value"] == pytest.approx(1.0, rel=1e-5), result


def test_item_15_untied_adam_steps(single_process, tmp_path):
    from glm52_train.training.state import load_training_checkpoint

    needs("untied_adam_steps")
    path, _ = saved_training(tmp_path)

    def resume_and_step(model, optimizer, scheduler) -> list[float]:
        load_training_checkpoint(path, [model], optimizer, scheduler)
        train_step(model, optimizer)
        return [float(s["step"]) for s in adam_states(optimizer)]

    with compat.removed("untied_adam_steps"):
        tied = resume_and_step(*toy_training())
    assert tied == [3.0, 3.0]  # one shared step, incremented once per parameter
    assert resume_and_step(*toy_training()) == [2.0, 2.0]
