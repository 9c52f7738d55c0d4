"""`glm52 eval`, `glm52 generate` and what `glm52 export-hf` writes besides the weights.

A 3-step tiny run (its own process, as users run it) leaves a checkpoint and a validation loss:
`eval` on the same samples must give that loss; `generate` must be deterministic when greedy and
pick transformers' argmax on the exported folder; the export keeps the fp32 training weights and
writes a tokenizer AutoTokenizer loads. A random transformers model (O(1) logits, so greedy
decoding moves between tokens) checks generate's loop token by token against transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from glm52_train.cli import main as glm52
from tests.hf_helpers import hf_config, make_hf_model, save_hf_folder
from tests.train_helpers import ROOT, metrics, pretrain, tiny_run_config

TOKENIZER = str(ROOT / "data" / "tokenizer" / "tokenizer.json")
PROMPT = "import os\nfrom pathlib import Path\n"


@pytest.fixture(scope="module")
def trained(golden_data, tmp_path_factory):
    """A 3-step tiny run validated at its last step: (run folder, its validation loss)."""
    tmp = tmp_path_factory.mktemp("trained")
    pretrain(tiny_run_config(tmp, golden_data, train={"iters": 3, "eval_interval": 3, "eval_iters": 1}))
    val = [m["val_loss"] for m in metrics(tmp / "run") if "val_loss" in m]
    assert len(val) == 1
    return tmp, val[0]


def _json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert glm52(argv) == 0
    return json.loads(capsys.readouterr().out)


def _greedy_reference(model, prompt_ids: list[int], steps: int, eos: int | None = None) -> list[int]:
    """transformers' greedy continuation, recomputing the whole sequence each token."""
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if token == eos:
                break
            seq.append(token)
    return seq[len(prompt_ids):]


@pytest.mark.slow
def test_eval_generate_and_export_of_a_trained_checkpoint(trained, golden_data, tmp_path, capsys):
    run, val_loss = trained
    ckpt = str(run / "ckpt")
    # the run validated on 1 batch of 4 sequences of the validation part of split 90,10,0
    for mbs, iters in ((2, 2), (4, 1)):
        got = _json(capsys, ["eval", "--ckpt", ckpt, "--data", golden_data, "--split", "90,10,0",
                             "--iters", str(iters), "--micro-batch-size", str(mbs), "--json"])
        assert got["loss"] == pytest.approx(val_loss, rel=1e-6, abs=0)
        assert got["perplexity"] == pytest.approx(torch.tensor(val_loss).exp().item(), rel=1e-6)
        assert got["iteration"] == 3 and got["tokens"] == 4 * 64 and got["documents"] == [22, 24]
    everything = _json(capsys, ["eval", "--ckpt", ckpt, "--data", golden_data, "--iters", "2", "--json"])
    assert everything["documents"] == [0, 24] and everything["loss"] != pytest.approx(val_loss, rel=1e-4)
    # 98,2,0 leaves none of the 24 documents for validation: one sentence, not Megatron-Core's endless loop
    assert glm52(["eval", "--ckpt", ckpt, "--data", golden_data, "--split", "98,2,0"]) == 2
    assert capsys.readouterr().err.startswith("glm52 eval: error: --split 98,2,0 leaves no document of ")
    assert glm52(["eval", "--ckpt", ckpt, "--data", golden_data, "--iters", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("loss ") and "| perplexity " in line and "(iteration 3)" in line

    greedy = ["generate", "--ckpt", ckpt, "--prompt", PROMPT, "--max-new-tokens", "40", "--json"]
    first, second = _json(capsys, greedy), _json(capsys, greedy)
    assert first == second and len(first["tokens"]) == 40 and first["stopped"] == "max-new-tokens"
    assert glm52(greedy[:-1]) == 0
    assert capsys.readouterr().out == PROMPT + first["text"] + "\n"

    out = tmp_path / "hf"
    assert glm52(["export-hf", "--ckpt", ckpt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "converted" not in printed and "(float32, tokenizer " in printed
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    from transformers import AutoTokenizer

    from glm52_train.hf.interop import load_reference

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(PROMPT)["input_ids"] == first["prompt_tokens"]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id == 0 and config["pad_token_id"] == 1
    assert config["bos_token_id"] is None and tokenizer.bos_token_id is None  # it has none
    reference, _ = load_reference(str(out), num_layers=4)
    assert _greedy_reference(reference, first["prompt_tokens"], 40, eos=0) == first["tokens"]

    assert glm52(["export-hf", "--ckpt", ckpt, "--out", str(tmp_path / "hf16"), "--dtype", "bf16"]) == 0
    assert "converted the checkpoint's float32 weights to bfloat16 (--dtype bf16)" in capsys.readouterr().out
    with safe_open(str(tmp_path / "hf16" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_generate_follows_transformers_token_by_token(tmp_path, capsys):
    """A random model imported from transformers: greedy generation from a 5-token prompt (DSA
    top-k 8 above it) to 17 tokens (top-k below) is transformers' argmax at every length;
    sampling is repeatable by seed, and top-k 1 sampling is greedy."""
    config = hf_config(vocab_size=8192, index_topk=8, index_n_heads=16,
                       indexer_types=["full", "shared", "full", "shared"])
    model = make_hf_model(config, seed=3)
    save_hf_folder(model, tmp_path / "hf")
    assert glm52(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    base = ["generate", "--ckpt", str(tmp_path / "ckpt"), "--tokenizer", TOKENIZER, "--max-new-tokens", "12",
            "--json", "--prompt"]
    prompt = "def f(x):"
    greedy = _json(capsys, base + [prompt])
    assert len(greedy["prompt_tokens"]) == 5 and len(greedy["tokens"]) == 12
    assert len(set(greedy["tokens"])) > 3  # a real walk through the vocabulary, not one repeated token
    assert greedy["tokens"] == _greedy_reference(model, greedy["prompt_tokens"], 12)

    sampled = lambda *extra: _json(capsys, base + [prompt, "--temperature", "1.0", *extra])["tokens"]  # noqa: E731
    assert sampled("--top-k", "1") == greedy["tokens"]
    one = sampled("--seed", "7")
    assert sampled("--seed", "7") == one and sampled("--seed", "8") != one


@pytest.mark.parametrize("argv, sentence", [
    (["eval", "--ckpt", "{tmp}/none", "--data", "{tmp}/none"], "dataset {tmp}/none: {tmp}/none.bin is missing"),
    (["eval", "--ckpt", "{tmp}/none", "--data", "{tmp}/none", "--split", "98,2"],
     "--split '98,2' is not three weights 'train,validation,test' (not all zero), e.g. '0,100,0'."),
    (["generate", "--ckpt", "{tmp}/none", "--prompt", "x"], "no complete checkpoint found under {tmp}/none."),
    (["generate", "--ckpt", "{tmp}/none", "--prompt", "x", "--temperature", "-1"],
     "--temperature must be 0 (greedy) or more, got -1.0."),
    (["export-hf", "--ckpt", "{tmp}/none", "--out", "{tmp}/hf"], "no complete checkpoint found under {tmp}/none."),
])
def test_bad_paths_are_one_sentence(argv, sentence, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert glm52(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"glm52 {argv[0]}: error: {sentence.format(tmp=tmp_path)}")
    assert not (tmp_path / "hf").exists()
