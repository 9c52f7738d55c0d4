"""Long-context training on CPU: context parallelism for DSA, packed documents, YaRN, recipes,
and the continual-training path from a Hugging Face checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from glm52_train.cli import main as glm52
from tests.conftest import GOLDEN_CORPUS, TOKENIZER
from tests.test_parallel import torchrun
from tests.train_helpers import ROOT, assert_same_curve, curve, init_weights, metrics, pretrain, tiny_run_config

pytestmark = pytest.mark.slow


# ---- packed documents ----------------------------------------------------------------------

def test_packed_documents_match_each_document_alone(single_process):
    """A packed sample of three documents gives every token the logits it gets when its
    document runs alone: attention, the DSA indexer and top-k never cross documents."""
    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model
    from glm52_train.run_config import load_run_config

    cfg = get_model_config("tiny")
    assert cfg.index_topk < 40  # every document is longer than top-k: selection is exercised
    lengths = [40, 52, 36]
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in lengths]
    packed = build_model(cfg, load_run_config(None, ["data.packed=true"])).eval()
    alone = build_model(cfg).eval()
    alone.load_state_dict(packed.state_dict())
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        together = packed(ids, pos, None)[0]
        start = 0
        for doc in docs:
            single = alone(doc.unsqueeze(0), torch.arange(len(doc)).unsqueeze(0), None)[0]
            assert torch.allclose(together[start : start + len(doc)], single, atol=1e-5), start
            start += len(doc)
    # and a model that ignored document boundaries would differ
    with torch.no_grad():
        unpacked = alone(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[0]
    assert not torch.allclose(together[lengths[0] :], unpacked[lengths[0] :], atol=1e-3)


# ---- context parallelism --------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Many short documents (the golden corpus cut at blank lines), so that 64-token samples
    hold several documents."""
    from glm52_train.data.prepare import prepare_data

    tmp = tmp_path_factory.mktemp("short-docs")
    src = tmp / "short.jsonl"
    with open(src, "w") as f:
        for line in open(GOLDEN_CORPUS):
            for para in json.loads(line)["text"].split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para}) + "\n")
    prefix = str(tmp / "short")
    prepare_data([str(src)], prefix, TOKENIZER, workers=1)
    return prefix


@pytest.fixture(scope="module")
def cp_init(tmp_path_factory):
    return init_weights(tmp_path_factory.mktemp("cp-init") / "init")


def _run_config(tmp: Path, data: str, init: Path, mode: str, packed: bool):
    return tiny_run_config(
        tmp, data,
        data={"packed": packed},
        train={"iters": 3, "eval_interval": 100, "micro_batch_size": 1},
        dsa={"mode": mode},
        checkpoint={"interval": 1000, "init_from": str(init)},
        logging={"wandb": "disabled"},
    )


CP_CASES = {
    # name: (processes, mode, packed, extra overrides)
    "cp2_sparse": (2, "sparse", False, []),
    "cp2_sparse_dq_pass_kl": (2, "sparse", False, ["dsa.indexer_loss=dq_pass"]),  # the KL from the backward
    "cp2_dense_packed": (2, "dense", True, []),
    "cp2_sparse_packed": (2, "sparse", True, []),
    "cp2_warmup_packed": (2, "warmup", True, []),
    "cp2_x_tp2_sparse": (4, "sparse", False, ["parallel.tp=2", "parallel.sp=true"]),
    "cp2_x_tp2_warmup_packed": (4, "warmup", True, ["parallel.tp=2", "parallel.sp=true"]),
}
_REFERENCES: dict = {}


@pytest.mark.parametrize("case", list(CP_CASES))
def test_context_parallel_matches_one_process(case, short_docs, cp_init, tmp_path):
    nproc, mode, packed, extra = CP_CASES[case]
    if (mode, packed) not in _REFERENCES:
        ref = tmp_path / "reference"
        ref.mkdir()
        pretrain(_run_config(ref, short_docs, cp_init, mode, packed))
        _REFERENCES[(mode, packed)] = curve(ref / "run")
    reference = _REFERENCES[(mode, packed)]
    run = tmp_path / "cp"
    run.mkdir()
    torchrun(nproc, _run_config(run, short_docs, cp_init, mode, packed), "parallel.cp=2", *extra,
             port=29600 + 7 * list(CP_CASES).index(case))
    assert sorted(reference) == [1, 2, 3]
    assert_same_curve(curve(run / "run"), reference)


# ---- from Hugging Face, longer, with CP, and back ----------------------------------------------

def test_import_continue_longer_with_cp2_export_verify(short_docs, tmp_path):
    """Import a tiny HF checkpoint, continue training it at a longer sequence with CP2 (weights
    only: fresh optimizer and schedule), export, and verify the export against transformers."""
    from tests.hf_helpers import hf_config, make_hf_model, mtp_tensors, save_hf_folder

    cfg = hf_config(vocab_size=8192, max_position_embeddings=512, index_topk=16,
                    indexer_types=["full", "shared", "full", "shared"])
    hf_dir = save_hf_folder(make_hf_model(cfg, seed=11), tmp_path / "hf", extra=mtp_tensors(cfg, seed=11))
    assert glm52(["import-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "imported")]) == 0
    # the imported architecture, as a model section of the run config
    imported = json.loads(next((tmp_path / "imported").glob("iter_*/glm52.json")).read_text())["model"]
    run_cfg = tiny_run_config(
        tmp_path, short_docs, model=imported,
        data={"seq_length": 128, "packed": True},
        train={"iters": 3, "eval_interval": 100, "micro_batch_size": 1},
        checkpoint={"interval": 1000},
        logging={"wandb": "disabled"},
    )
    torchrun(2, run_cfg, "parallel.cp=2", f"--init-from={tmp_path / 'imported'}", port=29690)
    steps = [m for m in metrics(tmp_path / "run") if m.get("loss") is not None]
    assert [m["step"] for m in steps] == [1, 2, 3]
    out = tmp_path / "exported"
    assert glm52(["export-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "float32"]) == 0
    assert glm52(["verify-hf", "--hf", str(out), "--seq-len", "96"]) == 0


# ---- positions and recipes ---------------------------------------------------------------------

def test_yarn_rope_matches_transformers(tmp_path):
    """RoPE extension with YaRN, past the original context: same logits as transformers."""
    from tests.hf_helpers import hf_config, make_hf_model, save_hf_folder

    rope = {"rope_type": "yarn", "rope_theta": 8.0e6, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    # 16 indexer heads: a key whose ReLU zeroes every head (an exact score tie, broken
    # arbitrarily by torch.topk in the reference) is then rare enough not to reach the top-k edge
    config = hf_config(rope_parameters=rope, max_position_embeddings=128, index_n_heads=16)
    hf_dir = save_hf_folder(make_hf_model(config, seed=4), tmp_path / "hf")
    assert glm52(["verify-hf", "--hf", str(hf_dir), "--seq-len", "96"]) == 0


@pytest.mark.parametrize("recipe", sorted(Path(ROOT, "configs", "long_context").glob("*.yaml")))
def test_recipes_are_valid_at_their_planned_size(recipe):
    from glm52_train.plan import Layout, estimate
    from glm52_train.run_config import load_run_config

    gpus = int(re.search(r"--gpus (\d+)", recipe.read_text()).group(1))
    cfg = load_run_config(str(recipe)).validate(gpus)
    p = cfg.parallel
    layout = Layout(tp=p.tp, pp=p.pp, ep=p.ep, cp=p.cp, dp=gpus // (p.tp * p.pp * p.cp), sp=p.sp)
    est = estimate(cfg.model_config(), layout, cfg.data.seq_length, 80.0, recompute=True)
    assert est.fits, est.reason
