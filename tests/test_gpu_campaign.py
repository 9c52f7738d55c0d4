"""The GPU campaign runner (`bench/gpu.py`): every check's CPU path runs here, so that a lent GPU's
minutes go to measuring; the deadline skips or stops a check and keeps what ran before."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runner():
    spec = importlib.util.spec_from_file_location("gpu_campaign", os.path.join(ROOT, "bench", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_check_names_a_file_that_exists_and_writes_into_its_own_folder():
    gpu = _runner()
    names = [c.name for c in gpu.CHECKS]
    assert len(names) == len(set(names))
    for check in gpu.CHECKS:
        for argv in (check.cmd, check.dry_cmd):
            assert argv[0] == "{py}", check.name
            target = argv[1] if argv[1] != "-m" else next(a for a in argv if a.startswith(("tests/", "bench/")))
            assert os.path.exists(os.path.join(ROOT, target)), f"{check.name}: {target} does not exist"
        jsons = [a for a in check.cmd if a.endswith(".json")]
        assert all(a.startswith("{out}/") for a in jsons), f"{check.name} writes its JSON outside {{out}}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The golden corpus ten times over: enough documents for tiny.yaml's 98/2 split to give the
    training check a validation set."""
    from glm52_train.data.prepare import prepare_data

    folder = tmp_path_factory.mktemp("campaign-data")
    lines = open(os.path.join(ROOT, "tests", "data", "golden_corpus.jsonl")).read().splitlines()
    (folder / "corpus.jsonl").write_text("\n".join(lines * 10) + "\n")
    prepare_data([str(folder / "corpus.jsonl")], str(folder / "corpus"),
                 os.path.join(ROOT, "data", "tokenizer", "tokenizer.json"), workers=1)
    return str(folder / "corpus")


@pytest.mark.slow
def test_dry_run_runs_every_check_on_cpu(corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--data", corpus],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "campaign.json").read_text())
    gpu = _runner()
    assert [r["name"] for r in result["checks"]] == [c.name for c in gpu.CHECKS]
    assert all(r["status"] == "ok" for r in result["checks"])
    assert result["machine"]["torch"].startswith("2.")
    ran = {r["name"]: r for r in result["checks"]}
    assert ran["train_step"]["json"]["train_step.json"]["tokens_per_s"] > 0
    assert ran["dsa_bench"]["json"]["dsa_bench.json"]
    step = ran["fp8_step"]["json"]["fp8_step.json"]
    assert step["bf16_tokens_per_s"] > 0 and step["fp8_tokens_per_s"] > 0
    assert all(r["bit_exact"] for r in ran["fp8_quant"]["json"]["fp8_quant.json"]["rows"])
    assert ran["train_step_dense"]["json"]["train_step.json"]["dsa_mode"] == "dense"
    assert ran["train_step_dense"]["json"]["train_step.json"]["tokens_per_s"] > 0
    assert ran["layer_2048_dense_vs_sparse"]["json"]["dense_vs_sparse.json"]["dense_speedup"] > 0
    with tarfile.open(out / "raw.tar.gz") as tar:
        assert "raw/train_step/log.txt" in tar.getnames()
    assert sorted(os.listdir(out)) == ["campaign.json", "campaign.log", "raw.tar.gz"]  # 3 of the 8 files back


def test_deadline_skips_what_cannot_finish_and_stops_what_overruns(tmp_path):
    gpu = _runner()
    campaign = gpu.Campaign(str(tmp_path / "out"), str(tmp_path / "work"), dry_run=False, budget_s=600,
                            py=sys.executable, data=str(tmp_path / "none"))
    campaign.deadline = time.time() + 4  # counted from here, not from the machine's description
    slow = gpu.Check("sleeper", 0, est_s=2, limit_factor=1.0, cmd=["{py}", "-c", "import time; time.sleep(30)"],
                     dry_cmd=[])
    campaign.record(campaign.run(slow))
    late = gpu.Check("late", 0, est_s=60, cmd=["{py}", "-c", "print(1)"], dry_cmd=[])
    campaign.record(campaign.run(late))
    needs_data = gpu.Check("train", 0, est_s=0, cmd=["{py}", "-c", "print(1)", gpu.CORPUS], dry_cmd=[])
    campaign.record(campaign.run(needs_data))
    rows = json.loads((tmp_path / "out" / "campaign.json").read_text())["checks"]
    assert [r["status"] for r in rows] == ["timeout", "skipped", "skipped"]
    assert rows[0]["seconds"] < 10
    assert "needs ~60 s" in rows[1]["reason"] and "no prepared corpus" in rows[2]["reason"]


def test_unknown_check_is_one_sentence():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--only", "kernel_test"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("unknown check(s) kernel_test: the checks are model_test,")
