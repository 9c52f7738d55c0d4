"""The README's examples run as written. Every command of every ```bash block is either run
here, in a scratch copy of the checkout's layout (its placeholder inputs such as
`corpus/*.jsonl` or `HF_DIR` made real), at reduced iterations, or listed below with why a CPU
test cannot run it. A new example fails this test until it is one or the other."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TOKENIZER
from tests.train_helpers import ROOT, env

README = ROOT / "README.md"

# Appended to every training command, and only these: they shorten the run (fewer steps, shorter
# sequences, one evaluation batch, no W&B files; later overrides win) and change nothing the
# command means: no schedule, warm-up, split or batch of its own. On
# the small shared dataset (24 documents) tiny.yaml's 2% validation share is empty: the run says
# it skips validation, as a user's would.
SHORT = "train.iters=2 data.seq_length=64 train.eval_iters=1 logging.wandb=disabled"
# `make train` takes its overrides in ARGS: the README's own `make train ARGS="train.iters=20"`
# (a run shorter than tiny.yaml's 250-step schedule, its warm-up a fraction of it).
MAKE_SHORT = 'ARGS="train.iters=20 data.seq_length=64 train.eval_iters=1 logging.wandb=disabled"'

NOT_RUN = {  # command prefix -> why no CPU test runs it
    "make test": "the whole suite (CI)",
    "launch/torchrun.sh --config configs/my_run.yaml": "one process per GPU of a GPU node",
    "NODE_RANK=$i launch/torchrun.sh --nnodes 4": "needs 4 nodes (tests/test_launch.py joins two network namespaces)",
    "sbatch ": "needs Slurm (tests/test_fault_tolerance.py runs launch/slurm.sbatch on a one-node cluster)",
    "GLM52_PROCS_PER_NODE=2 sbatch": "needs Slurm (as above)",
    ".venv/bin/torchrun --nproc-per-node 8": "8 GPUs",
    ".venv/bin/torchrun --nnodes 4": "4 nodes x 8 processes",
    ".venv/bin/torchrun ...": "the long-context stages need GPUs",
    ".venv/bin/glm52 pretrain --config configs/stages/": "the GLM-5 stage chain: tests/test_stages.py runs it as written",
    ".venv/bin/glm52 import-hf --hf /ckpts/GLM-5.2": "the released 744B checkpoint",
    ".venv/bin/glm52 export-hf --ckpt checkpoints/glm52-lc-32k": "the 32K stage's checkpoint",
}


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks: continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def _runnable(command: str) -> bool:
    return not any(command.startswith(prefix) for prefix in NOT_RUN)


def _fast(command: str) -> bool:
    """Single-process and quick: all but the torchrun and checkpoint-chain examples."""
    return "--dry-run" in command or ("torchrun.sh --nproc-per-node" not in command and "HF_DIR" not in command
                                      and "my_run" not in command and "hf-export" not in command)


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands()
    assert len(commands) > 10
    used = {p for p in NOT_RUN if any(c.startswith(p) for c in commands)}
    assert used == set(NOT_RUN), f"excuses for commands no longer in the README: {set(NOT_RUN) - used}"
    for c in commands:
        assert not c.startswith("glm52 ") and " glm52 " not in c.replace("&& ", ""), \
            f"write .venv/bin/glm52 (not on PATH after make train): {c}"
    # the YAML example is a valid data section
    from glm52_train.run_config import DataConfig, _build

    (block,) = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    data = _build(DataConfig, yaml.safe_load(block)["data"], "data")
    assert [s.weight for s in data.blend] == [0.7, 0.3]


@pytest.fixture
def workspace(tmp_path, golden_data):
    """The checkout as the README's reader has it after `make train`: configs, launch, the
    tokenizer, `data/cache/stdlib` (here the session's small golden dataset) and .venv/bin/glm52;
    plus the placeholders the examples name (corpus/*.jsonl, more/*.parquet, path/to/tokenizer.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws = tmp_path / "checkout"
    for name in ("configs", "launch", "glm52_train", "Makefile", "pyproject.toml"):
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).symlink_to(ROOT / name)
    (ws / "data" / "cache").mkdir(parents=True)
    (ws / "data" / "tokenizer").symlink_to(ROOT / "data" / "tokenizer")
    for suffix in (".bin", ".idx", ".json"):
        (ws / "data" / "cache" / f"stdlib{suffix}").symlink_to(golden_data + suffix)
    bin_dir = ws / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # scripts, not links: a link to a virtual environment's python loses that environment
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "glm52").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m glm52_train.cli "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "glm52").chmod(0o755)
    (ws / ".venv" / ".installed").touch()  # `make setup` done (newer than pyproject.toml)
    (ws / "corpus").mkdir()
    (ws / "corpus" / "a.jsonl").write_text('{"text": "def f(x):\\n    return x\\n"}\n{"text": "import os\\n"}\n')
    (ws / "more").mkdir()
    pq.write_table(pa.table({"text": ["class A:\n    pass\n"]}), ws / "more" / "b.parquet")
    (ws / "path" / "to").mkdir(parents=True)
    shutil.copy(TOKENIZER, ws / "path" / "to" / "tokenizer.json")
    return ws


def run_readme_command(command: str, ws: Path) -> subprocess.CompletedProcess:
    if command.startswith("make train"):
        command = f"{command} {MAKE_SHORT}"
    elif "pretrain" in command or "launch/torchrun.sh" in command and "--dry-run" not in command:
        command = f"{command} {SHORT}"
    extra = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-c", command], cwd=ws, env=env(extra), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_readme_cpu_examples_run_as_written(workspace):
    """In the README's order: `make train` (with the README's ARGS="train.iters=20": tiny.yaml's
    run, its warm-up shortened with it; the corpus exists, so make builds none; the shared
    dataset's empty validation split is skipped, saying so), prepare-data on the example's own
    paths, pretrain on configs/tiny.yaml, eval and generate of make train's checkpoint, info, the
    dry run."""
    ran = []
    for command in filter(lambda c: _runnable(c) and _fast(c), readme_commands()):
        proc = run_readme_command(command, workspace)
        ran.append(command.split()[1])
        if command.startswith("make train"):
            assert "prepare-data" not in proc.stdout
            assert "20 steps, warm-up 1 steps (8% of 20, optimizer.warmup_fraction)" in proc.stdout
            assert ("validation skipped: data.split '98,2,0' leaves no validation documents in data/cache/stdlib"
                    in proc.stdout)
            assert (workspace / "checkpoints" / "tiny" / "latest").read_text().strip() == "iter_0000020"
    assert ran[0] == "train" and "prepare-data" in ran and "pretrain" in ran and "info" in ran and "--dry-run" in ran
    assert (workspace / "data" / "cache" / "mycorpus.bin").is_file()
    assert (workspace / "checkpoints" / "tiny-lr1e-3" / "latest").is_file()  # logging.name names the run


@pytest.mark.slow
def test_readme_torchrun_and_checkpoint_examples_run_as_written(workspace):
    """launch/torchrun.sh on 2 CPU processes; import-hf -> pretrain --init-from -> export-hf ->
    verify-hf, with HF_DIR a tiny HF folder and configs/my_run.yaml a copy of tiny's."""
    commands = [c for c in readme_commands() if _runnable(c) and not _fast(c) and not c.startswith("make ")]
    assert any("torchrun.sh --nproc-per-node 2" in c for c in commands) and any("verify-hf" in c for c in commands)
    (workspace / "configs").unlink()
    (workspace / "configs").mkdir()
    for f in (ROOT / "configs").glob("*.yaml"):
        (workspace / "configs" / f.name).symlink_to(f)
    my_run = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    my_run["checkpoint"]["dir"], my_run["logging"]["run_dir"] = "checkpoints/my_run", "runs/my_run"
    (workspace / "configs" / "my_run.yaml").write_text(yaml.safe_dump(my_run))
    run_readme_command(".venv/bin/glm52 init-weights --model tiny --out hf-source", workspace)
    run_readme_command(".venv/bin/glm52 export-hf --ckpt hf-source --out HF_DIR", workspace)
    for command in commands:
        proc = run_readme_command(command, workspace)
        if "verify-hf" in command:
            assert proc.stdout.startswith("PASS: ")
