"""One set of layout rules for `glm52 pretrain` and `glm52 plan`; run options checked when read."""

from __future__ import annotations

import pytest

from glm52_train.config import ConfigError, get_model_config
from glm52_train.layout import Layout, layout_problems
from glm52_train.plan import check_layout
from glm52_train.run_config import load_run_config

TINY = get_model_config("tiny")  # 4 heads, 4 layers, 8 experts


@pytest.mark.parametrize("layout, seq, phrase", [
    (Layout(tp=3, dp=1, sp=True), 96, "TP3 does not divide the 4 attention heads"),
    (Layout(ep=3, dp=3), 64, "EP3 does not divide the 8 experts"),
    (Layout(ep=4, dp=2), 64, "EP x ETP = 4 x 1 does not divide the 2 ranks of a pipeline stage"),
    (Layout(tp=2, dp=1), 64, "needs sequence parallelism"),
    (Layout(sp=True), 64, "sequence parallelism needs TP > 1"),
    (Layout(pp=3), 64, "4 layers do not split evenly into PP x VPP = 3 chunks"),
    (Layout(pp=2, vpp=4), 64, "4 layers cannot fill PP x VPP = 8 pipeline chunks"),
    (Layout(cp=4, dp=1), 36, "not divisible by 2 x CP = 8"),
    (Layout(), 10**6, "exceeds the model's"),
])
def test_each_rule_is_one_sentence(layout, seq, phrase):
    problems = layout_problems(TINY, layout, seq)
    assert problems and phrase in problems[0] and "\n" not in problems[0], problems


def test_uneven_pipeline_follows_megatron_core():
    assert layout_problems(TINY, Layout(pp=3), 64, first_stage_layers=2) == []  # 2 | 1 | 1
    assert "middle layers" in layout_problems(TINY, Layout(pp=3), 64, first_stage_layers=1)[0]  # 1 | 3 over 2
    assert "VPP" in layout_problems(TINY, Layout(pp=2, vpp=2), 64, first_stage_layers=1)[0]
    assert layout_problems(TINY, Layout(pp=2, vpp=2), 64, microbatches=1)[0].startswith("the interleaved")


def test_run_config_and_plan_give_the_same_sentence(tmp_path):
    """The same layout, refused by `glm52 pretrain`'s validation and by `glm52 plan` alike."""
    data = tmp_path / "d"
    cfg = load_run_config(None, [f"data.blend=[{{path: {data}}}]", "data.seq_length=64", "parallel.pp=3",
                                 "train.global_batch_size=2", "train.micro_batch_size=1"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=6)
    why = check_layout(TINY, cfg.layout(6), 6, 64)
    assert why and why in str(err.value)


@pytest.mark.parametrize("override, phrase", [
    ("train.precision=fp16", "train.precision must be one of auto, bf16, fp32, got 'fp16'"),
    ("dsa.backend=kernels", "dsa.backend must be one of auto, torch, triton, got 'kernels'"),
    ("train.recompute=block", "train.recompute must be one of full, selective, got 'block'"),
    ("optimizer.schedule=step", "optimizer.schedule must be one of cosine, wsd, linear, constant"),
])
def test_enumerations_are_checked_when_read(override, phrase):
    with pytest.raises(ConfigError, match=phrase):
        load_run_config(None, [override])
    assert load_run_config(None, ["train.recompute=null"]).train.recompute is None


def test_model_flavors_are_frozen_copies():
    a, b = get_model_config("glm52-744b"), get_model_config("glm52-744b")
    assert a == b
    with pytest.raises(Exception):
        a.num_layers = 3  # frozen
    if a.rope_scaling is not None:
        assert a.rope_scaling is not b.rope_scaling
