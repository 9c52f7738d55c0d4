"""Parameter counts: the analytic formulas against a meta-device build of our model and against
transformers' own GLM-5.2 config."""

import json
import re

import pytest
import torch

from glm52_train.cli import main as glm52
from glm52_train.config import MODELS, get_model_config
from glm52_train.model.build import build_model
from glm52_train.run_config import load_run_config
from glm52_train.model.info import model_info

GLM52_TOTAL = 743_377_000_704


def _meta_counts(model_cfg):
    with torch.device("meta"):
        model = build_model(model_cfg, load_run_config(None, ["train.precision=bf16"]), init=False)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert next(model.parameters()).device.type == "meta"
    return total - mtp, mtp


def test_glm52_744b_count_is_the_published_one(capsys):
    assert glm52(["info", "--model", "glm52-744b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == GLM52_TOTAL
    assert info["indexer_layers"] == 21 and info["shared_index_layers"] == 57
    assert info["dense_layers"] == 3 and info["moe_layers"] == 75
    assert round(info["active_params"] / 1e9, 1) == 40.3
    assert info["mtp_params"] > 0


def test_transformers_counts_the_same_total():
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    with torch.device("meta"):
        ref = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(index_topk_freq=4, index_skip_topk_offset=3))
    assert sum(p.numel() for p in ref.parameters()) == GLM52_TOTAL
    pattern = "".join("F" if t == "full" else "S" for t in ref.config.indexer_types)
    assert pattern == get_model_config("glm52-744b").layer_index_pattern


@pytest.mark.parametrize("name", ["tiny", "proxy-h100", "glm52-744b"])
def test_meta_build_matches_formula(name, single_process):
    cfg = MODELS[name]
    total, mtp = _meta_counts(cfg)
    info = model_info(cfg)
    assert total == info.total_params
    assert mtp == info.mtp_params


def test_flops_count_sparse_attention_honestly():
    cfg = get_model_config("glm52-744b")
    short, long = model_info(cfg, seq_len=2048), model_info(cfg, seq_len=131072)
    # under top-k every query attends to all keys; beyond it, attention per token is flat
    # while the indexer's dense scoring keeps growing with the context
    assert short.flops_breakdown["attention_fwd"] < long.flops_breakdown["attention_fwd"]
    assert long.flops_breakdown["attention_fwd"] < 2 * model_info(cfg, 8192).flops_breakdown["attention_fwd"]
    assert long.flops_breakdown["indexer_fwd"] > 30 * short.flops_breakdown["indexer_fwd"]
    assert long.dense_attention_fwd_equivalent > 10 * long.flops_breakdown["attention_fwd"]


def test_flops_per_dsa_mode(capsys):
    """`glm52 info --dsa-mode`: dense attends to every visible key with no indexer work; the
    warm-up adds the indexer KL over those keys; sparse training at sequence <= top-k is the
    dense path (no top-k scoring pass), beyond it sparse attention plus the indexer's scoring."""
    def info(*args):
        assert glm52(["info", "--model", "glm52-744b", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    cfg = get_model_config("glm52-744b")
    m = cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_layers
    for seq in (2048, 32768):
        dense, warmup, sparse = (info("--seq-len", str(seq), "--dsa-mode", mode) for mode in ("dense", "warmup", "sparse"))
        assert dense["dsa_mode"] == "dense" and sparse["dsa_mode"] == "sparse"
        db, wb, sb = dense["flops_breakdown"], warmup["flops_breakdown"], sparse["flops_breakdown"]
        assert db["attention_fwd"] == pytest.approx(2 * m * (seq + 1) / 2)  # every visible key
        assert db["indexer_fwd"] == dense["train_flops_breakdown"]["indexer_loss_fwd_bwd"] == 0
        assert wb["attention_fwd"] == db["attention_fwd"] and wb["indexer_fwd"] == 0
        assert warmup["train_flops_breakdown"]["indexer_loss_fwd_bwd"] > 0
        assert warmup["train_flops_per_token"] > dense["train_flops_per_token"]
        if seq <= cfg.index_topk:  # the dense shortcut: sparse training costs what the warm-up does
            assert sparse["train_flops_per_token"] == warmup["train_flops_per_token"]
        else:
            assert sb["indexer_fwd"] > 0 and sb["attention_fwd"] < db["attention_fwd"]


def test_unknown_model_is_one_sentence(capsys):
    assert glm52(["info", "--model", "glm99"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'glm99'" in err and err.count("\n") == 1


def test_info_prints_the_architecture_and_flop_rows_that_add_up(capsys):
    """`glm52 info` shows what the counts come from, and each FLOP total is the sum of its rows."""
    assert glm52(["info", "--model", "tiny", "--seq-len", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    for row in ("layers             4: 1 dense + 3 MoE  [DMMM]", "hidden size        128, vocabulary 8,192",
                "attention          MLA, 4 heads", "DSA                top-32 keys per query; indexer 4 heads x 32",
                "IndexShare         2 full + 2 shared  [FSFS]", "MoE                8 routed experts, top-2, + 1 shared",
                "MTP                1 layer(s) over 1 step(s)"):
        assert row in text, row

    def mflops(line):  # the number before the unit: "    3 x MTP forward   7.48 M"
        return float(re.search(r"\s([\d.,]+) M(\s|$)", line).group(1))

    for total in ("  forward ", "  train "):
        at = next(i for i, line in enumerate(lines) if line.startswith(total))
        rows = [mflops(line) for line in lines[at + 1:] if line.startswith("    ")][:4 if "train" in total else 3]
        assert abs(sum(rows) - mflops(lines[at])) <= 0.01 * len(rows), (total, rows, lines[at])

    assert glm52(["info", "--model", "glm52-744b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sum(info["flops_breakdown"].values()) == pytest.approx(info["forward_flops_per_token"], rel=1e-12)
    assert sum(info["train_flops_breakdown"].values()) == pytest.approx(info["train_flops_per_token"], rel=1e-12)
    assert info["architecture"]["index_topk"] == 2048 and info["architecture"]["moe_topk"] == 8


def test_info_names_a_modified_model(capsys):
    args = ["info", "--config", "configs/tiny.yaml", "model.num_layers=6", "model.index_pattern=FSFSFS"]
    assert glm52(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("model              tiny+num_layers=6,index_pattern=FSFSFS\n")
    assert "layers             6: 1 dense + 5 MoE  [DMMMMM]" in out
