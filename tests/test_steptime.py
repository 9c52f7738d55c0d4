"""`glm52 plan`'s step-time model (glm52_train/steptime.py): the pipeline replay against the
closed form of 1F1B, the breakdown adding up, the published Megatron-Bridge runs and this
stack's measured proxy-h100 step, and the search ranked by predicted speed, run as a user
types it."""

from __future__ import annotations

import json

import pytest

from glm52_train.cli import main as glm52
from glm52_train.config import get_model_config
from glm52_train.layout import Layout
from glm52_train.steptime import RATES_DIR, load_rates, replay_pipeline, step_time

GLM = get_model_config("glm52-744b")
BRIDGE = str(RATES_DIR / "megatron-bridge.yaml")
BRIDGE_LAYOUT = "Etttttt|" + "tttttttt|" * 8 + "tttt|ttttmL"
# Megatron-Bridge's verification card for GLM-5.2 (examples/model_verification_cards/glm5-2/card.yaml,
# pretrain items; docs/benchmarks.md): the commands that model them, and the published step times
H100_RUN = ["plan", "--model", "glm52-744b", "--gpus", "352", "--seq-len", "2048", "--global-batch", "1024",
            "--pp", "11", "--ep", "32", "--layout", BRIDGE_LAYOUT, "--recompute", "full", "--grad-dtype", "bf16",
            "--gpu-type", "h100", "--rates", BRIDGE, "--json"]
GB200_RUN = ["plan", "--model", "glm52-744b", "--gpus", "192", "--seq-len", "4096", "--global-batch", "1024",
             "--pp", "6", "--ep", "32", "--first-stage-layers", "14", "--last-stage-layers", "16",
             "--recompute", "full", "--grad-dtype", "bf16", "--gpu-type", "gb200", "--gpu-mem", "186",
             "--rates", BRIDGE, "--json"]
PUBLISHED = {"h100": 31.205, "gb200": 64.787}
# this stack's proxy-h100 step on one H100 (docs/benchmarks.md, docs/gpu_runs/2026-11-27-h100/train_step.json)
PROXY_RUN = ["plan", "--config", "configs/proxy_h100.yaml", "--gpus", "1", "--recompute", "none", "--json"]
PROXY_TOKENS_PER_S = 13247
PROXY_DEVICE_S = 2.353  # the profile's device time per step (steps 16-18), without host gaps


def _run(capsys, argv) -> dict:
    assert glm52(argv) == 0
    return json.loads(capsys.readouterr().out)["time"]


@pytest.mark.parametrize("pp, microbatches", [(4, 8), (11, 32), (3, 3)])
def test_replay_of_1f1b_equals_its_closed_form(pp, microbatches):
    """Equal stages, no transfer time: 1F1B takes (m + pp - 1) x (f + b)."""
    f, b = 1.0, 2.0
    makespan, busy = replay_pipeline(pp, 1, microbatches, [[f]] * pp, [[b]] * pp, 0.0)
    assert makespan == pytest.approx((microbatches + pp - 1) * (f + b))
    assert busy == [pytest.approx(microbatches * (f + b))] * pp


def test_interleaving_shrinks_the_bubble():
    """The same work split into 2 chunks per rank: the bubble falls to about 1/VPP."""
    pp, m, f, b = 4, 16, 1.0, 2.0
    one, _ = replay_pipeline(pp, 1, m, [[f]] * pp, [[b]] * pp, 0.0)
    two, _ = replay_pipeline(pp, 2, m, [[f / 2, f / 2]] * pp, [[b / 2, b / 2]] * pp, 0.0)
    work = m * (f + b)
    assert (two - work) == pytest.approx((one - work) / 2, rel=0.25) and two < one


def test_breakdown_adds_up_and_names_the_flop_formula(capsys):
    t = _run(capsys, H100_RUN)
    assert sum(t["breakdown"].values()) == pytest.approx(t["step_time_s"])
    assert set(t["breakdown"]) == {"compute", "recompute", "bubble", "ep_comm", "tp_comm", "cp_comm", "dp_comm",
                                   "optimizer"}
    tokens = 1024 * 2048 / t["step_time_s"] / 352
    assert t["tokens_per_s_per_gpu"] == pytest.approx(tokens)
    from glm52_train.model.info import model_info

    flops = model_info(GLM, 2048).train_flops_per_token
    assert t["model_tflops_per_gpu"] == pytest.approx(tokens * flops / 1e12)
    assert t["mfu"] == pytest.approx(t["model_tflops_per_gpu"] / 989.4)


def test_published_runs_take_longer_than_the_model_predicts(capsys):
    """The model counts the work and the bytes at achieved rates, without host overhead or expert
    imbalance: it must not predict a published run slower than it ran. (How far below, and why,
    is in docs/benchmarks.md.)"""
    for gpu, argv in (("h100", H100_RUN), ("gb200", GB200_RUN)):
        t = _run(capsys, argv)
        assert t["step_time_s"] < PUBLISHED[gpu], gpu
        assert t["stack"] == "megatron-bridge" and t["gpu_type"] == gpu


@pytest.mark.xfail(strict=True, reason="issue 23's criterion is not met: the model predicts 0.29x and 0.21x of "
                   "the published step times (docs/benchmarks.md: host-bound, deterministic, untuned runs)")
def test_published_runs_within_25_percent(capsys):
    for gpu, argv in (("h100", H100_RUN), ("gb200", GB200_RUN)):
        assert _run(capsys, argv)["step_time_s"] / PUBLISHED[gpu] == pytest.approx(1.0, abs=0.25), gpu


def test_proxy_h100_device_time_within_15_percent(capsys):
    """This stack's own rates against its own measured step (none of them measured on that run:
    kernel benchmarks and GEMM sweeps): the device time within 15%, tokens/s within 25% (the
    model has no host gaps; the run's wall time is 5% over its device time)."""
    t = _run(capsys, PROXY_RUN)
    assert t["stack"] == "glm52_train"
    assert t["step_time_s"] / PROXY_DEVICE_S == pytest.approx(1.0, abs=0.15)
    assert t["tokens_per_s_per_gpu"] / PROXY_TOKENS_PER_S == pytest.approx(1.0, abs=0.25)


@pytest.mark.xfail(strict=True, reason="issue 23's criterion is not met: 1.21x of the measured tokens/s "
                   "(docs/benchmarks.md)")
def test_proxy_h100_tokens_per_s_within_15_percent(capsys):
    assert _run(capsys, PROXY_RUN)["tokens_per_s_per_gpu"] / PROXY_TOKENS_PER_S == pytest.approx(1.0, abs=0.15)


def test_this_stack_on_the_bridge_layout_is_slower_than_bridge():
    """Same 352 H100s and layout: our NCCL all-to-all (no DeepEP dedup), Triton DSA at 2K,
    SequentialMLP and unfused memory-bound work predict a slower step than Bridge's rates."""
    lay = Layout(pp=11, ep=32, dp=32, pipeline=BRIDGE_LAYOUT)
    ours = step_time(GLM, lay, 2048, 1, 32, "full", grad_dtype="bf16")
    bridge = step_time(GLM, lay, 2048, 1, 32, "full", grad_dtype="bf16", rates=load_rates(BRIDGE))
    assert ours.step_time_s > bridge.step_time_s
    assert ours.breakdown["ep_comm"] > bridge.breakdown["ep_comm"]


def test_bf16_gradients_halve_the_buffers_and_the_fp32_copy_is_a_maximum(capsys):
    base = [a for a in H100_RUN if a not in ("--rates", BRIDGE)]
    fp32 = base[:base.index("--grad-dtype")] + base[base.index("--grad-dtype") + 2:]
    assert glm52(fp32) == 0
    a = json.loads(capsys.readouterr().out)
    assert glm52(base) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["gradients"] == pytest.approx(a["gradients"] / 2) and b["grad_dtype"] == "bf16"
    assert a["grad_copy"] == 0
    # the fp32 shard copy (4 bytes per sharded parameter: AdamW's 12 / 3) beyond the activation peak
    held = b["activations"] + b["dsa_buffers"] + b["logits"]
    assert b["grad_copy"] == pytest.approx(max(0.0, b["optimizer"] / 3 - held)) and b["grad_copy"] > 0
    parts = sum(b[k] for k in ("weights", "gradients", "optimizer", "activations", "dsa_buffers", "logits",
                               "grad_copy", "slack", "fixed"))
    assert parts == pytest.approx(b["total"])


def test_dsa_column_counts_under_full_recomputation(capsys):
    assert glm52(["plan", "--model", "glm52-744b", "--gpus", "1024", "--seq-len", "1048576", "--tp", "4", "--pp", "2",
                  "--ep", "64", "--cp", "128", "--json"]) in (0, 1)
    est = json.loads(capsys.readouterr().out)
    assert est["recompute"] == "full" and est["dsa_buffers"] > 0.1 * 2**30


def test_config_takes_the_flags_defaults_and_one_gpu_reads_right(capsys):
    """configs/proxy_h100.yaml sets no train.recompute: the plan uses the flag's default (full)
    and says so; it sets global_batch_size 8, which the plan uses."""
    assert glm52(["plan", "--config", "configs/proxy_h100.yaml", "--gpus", "1"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "on 1 GPU x" in head and "recompute full (the flag's default" in head and "8 micro-batches" in head


def test_bad_rates_file_is_one_sentence(capsys, tmp_path):
    assert glm52(H100_RUN[:-3] + ["--rates", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("gemm: {rows: [1]}\n")
    assert glm52(H100_RUN[:-3] + ["--rates", str(bad)]) == 2
    assert "section 'gemm' lacks efficiency" in capsys.readouterr().err


def test_search_ranks_the_fitting_layouts_fastest_first(capsys):
    """The done-criterion's command: layouts that fit, fastest first, with predicted step times;
    uneven and deep pipelines are among those searched."""
    argv = ["plan", "--model", "glm52-744b", "--gpus", "1024", "--seq-len", "131072", "--gpu-type", "h100"]
    assert glm52(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "fastest first: predicted tokens/s per GPU, predicted on h100" in out[1]
    assert "step s" in out[2] and "tok/s/GPU" in out[2]
    rows = [line for line in out if line.startswith("  TP")]
    speeds = [float(r.split()[-2]) for r in rows]
    assert len(rows) >= 3 and speeds == sorted(speeds, reverse=True)
    assert all(float(r.split()[-3]) > 0 for r in rows)  # a step time per row
    assert any(line.startswith("  its step: compute") and "bubble" in line for line in out)
    assert glm52(argv + ["--json"]) == 0
    fitting = json.loads(capsys.readouterr().out)["fitting"]
    assert any(e["layout"]["pp"] >= 8 and e["first_stage_layers"] is not None for e in fitting)
    assert [round(e["time"]["tokens_per_s_per_gpu"], 1) for e in fitting] == speeds


def test_fewer_heads_per_rank_run_the_sparse_attention_at_the_tables_head_factor():
    """TP8 leaves 8 of the 64 heads per rank: the sparse attention kernels do an eighth of the
    FLOPs at a quarter of the 64-head rate (configs/rates/glm52_train.yaml head_factor), so the
    rank spends half the TP1 time in them; a table without head factors (Bridge's) keeps the rate."""
    from glm52_train.steptime import _layer_cost, _Rates

    ours, plain = load_rates(), load_rates(BRIDGE)
    assert dict(zip(ours["attention"]["heads_per_rank"], ours["attention"]["head_factor"]))[8] == 0.25
    layer = next(i for i, c in enumerate(GLM.layer_index_pattern) if c == "F" and GLM.is_moe_layer(i))

    def attention_s(rates, tp):
        R = _Rates({**rates, "memory": {**rates["memory"], "passes": 0}}, "h100")  # kernels only
        cost = _layer_cost(GLM, layer, Layout(tp=tp, ep=8, sp=tp > 1), 32768, 32768, R, 1)
        no_dsa = _layer_cost(GLM.replace(index_topk=1), layer,
                             Layout(tp=tp, ep=8, sp=tp > 1), 32768, 32768, R, 1)
        return cost["fwd"] - no_dsa["fwd"]

    assert attention_s(ours, 8) / attention_s(ours, 1) == pytest.approx(0.5, rel=0.02)
    assert attention_s(plain, 8) / attention_s(plain, 1) == pytest.approx(0.125, rel=0.02)


def test_the_kl_from_the_dq_pass_costs_its_indexer_work_only():
    """dsa.indexer_loss=dq_pass: the KL drops its target's 2 x 64 x 576 FLOPs per selected pair
    (keeping the indexer's 4 x 2 x 32 x 128), nothing else of the layer changes; under TP the
    head sums' all-reduce comes in instead of the queries' all-gather."""
    from glm52_train.steptime import _layer_cost, _Rates, attended_keys

    layer = next(i for i, c in enumerate(GLM.layer_index_pattern) if c == "F" and GLM.is_moe_layer(i))

    def cost(tp, from_probs):
        R = _Rates(load_rates(), "h100")
        R.kl_from_probs = from_probs
        return _layer_cost(GLM, layer, Layout(tp=tp, ep=8, sp=tp > 1), 32768, 32768, R, 1), R

    (fwd_path, R), (dq, _) = cost(1, False), cost(1, True)
    pairs = 32768 * attended_keys(32768, GLM.index_topk)[1]
    target = R.attention("indexer_kl", 2 * GLM.num_heads * (GLM.kv_lora_rank + GLM.qk_rope_dim) * pairs, 32768)
    assert fwd_path["bwd"] - dq["bwd"] == pytest.approx(target, rel=1e-9)
    assert fwd_path["fwd"] == dq["fwd"] and fwd_path["tp"] == dq["tp"]
    (tp_fwd, _), (tp_dq, _) = cost(2, False), cost(2, True)
    assert tp_fwd["bwd"] - tp_dq["bwd"] < target  # the all-reduce of the sums is paid back


def test_plan_takes_the_indexer_loss_from_the_config(capsys, tmp_path):
    import yaml

    raw = yaml.safe_load(open("configs/proxy_h100.yaml"))
    raw["dsa"]["indexer_loss"] = "dq_pass"
    cfg = tmp_path / "proxy_dq_pass.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    base = _run(capsys, PROXY_RUN)
    dq = _run(capsys, ["plan", "--config", str(cfg), *PROXY_RUN[3:]])
    assert dq["step_time_s"] < base["step_time_s"]
