"""The command line a new user meets: --help of every subcommand, one sentence per common
mistake (exit status 2), the run header, the FLOP rate on a CPU and Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from glm52_train.cli import build_parser
from glm52_train.cli import main as glm52
from tests.train_helpers import ROOT, env, tiny_run_config


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_has_a_description_and_its_default(name, capsys):
    sub = _subcommands()[name]
    assert sub.description and len(sub.description) > 20
    with pytest.raises(SystemExit):
        glm52([name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 8, f"{name} {action.dest} has no description"
        if action.option_strings and action.default not in (None, False) and not action.required:
            assert f"(default: {action.default})" in text, f"{name} {action.dest}"


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("overrides, sentence", [
    (["optimizer.lr=-1"], "optimizer.lr must be a positive number, got -1.0."),
    (["optimizer.lr=nan"], "optimizer.lr must be a positive number, got nan."),
    (["train.iters=-5"], "train.iters must be a positive whole number, got -5."),
    (["train.iters=10.5"], "train.iters must be a whole number, got 10.5."),
    (["--resume", "none", "train.iters=10.5"], "train.iters must be a whole number, got 10.5."),
    (["train.iters=3", "--resume", "none", "optimizer.lr=-1"], "optimizer.lr must be a positive number, got -1.0."),
])
def test_bad_run_options_are_one_sentence(overrides, sentence, capsys):
    assert glm52(["pretrain", "--config", str(ROOT / "configs" / "tiny.yaml"), *overrides]) == 2
    assert _errors(capsys.readouterr().err) == [f"glm52 pretrain: error: {sentence}"]


def test_unknown_options_still_refused(capsys):
    with pytest.raises(SystemExit) as code:
        glm52(["pretrain", "--config", "configs/tiny.yaml", "--resume", "none", "--bogus"])
    assert code.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_model_too_large_for_this_machine_is_refused_up_front(tmp_path, capsys):
    """No GPU: glm52-744b cannot fit any machine's memory; refused before building anything."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the host-memory check applies on machines without a GPU")
    args = ["pretrain", "--config", str(ROOT / "configs" / "tiny.yaml"), "model=glm52-744b",
            "data.seq_length=4096", "checkpoint.enable=false", "train.micro_batch_size=1"]
    assert glm52(args) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith("glm52 pretrain: error: model 'glm52-744b' needs about ")
    assert "GiB per process on this machine without a GPU" in line and "glm52 plan's estimate" in line
    assert "GiB is available; train it on GPUs (glm52 plan --model glm52-744b)" in line


def test_flop_rate_reads_as_a_number_on_a_cpu():
    from glm52_train.training.logs import _flops_rate

    assert _flops_rate(0.0173) == "17.3 GFLOP/s"
    assert _flops_rate(412.04) == "412.0 TFLOP/s"


@pytest.mark.slow
def test_header_then_ctrl_c_saves_and_stops_in_one_line(golden_data, tmp_path):
    """The header comes before the first step; Ctrl-C finishes the step, saves and exits 0 with
    one line (no traceback); a resumed run starts from that checkpoint."""
    cfg = tiny_run_config(tmp_path, golden_data, train={"iters": 50}, logging={"wandb": "disabled"})
    proc = subprocess.Popen([sys.executable, "-m", "glm52_train.cli", "pretrain", "--config", str(cfg)],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C: finishing this step, saving, then stopping (Ctrl-C again stops at once, without saving)" in err
    lines = out.splitlines()
    header = [line.split()[0] for line in lines[1:7]]
    assert header == ["model", "layout", "data", "per", "saves", "metrics"], lines[:8]
    assert lines[1].startswith("model     tiny: 3.12M parameters") and "fp32 on cpu" in lines[1]
    assert lines[4].startswith("per step  256 tokens (global batch 4 x 64), 50 steps")
    assert "GFLOP/s" in out and "0.0 TFLOP/s" not in out
    stop = [line for line in lines if line.startswith("signal 2: saved at step ")]
    assert len(stop) == 1
    step = int(stop[0].split()[5].rstrip(","))
    assert 1 <= step < 50 and (tmp_path / "ckpt" / f"iter_{step:07d}").is_dir()


def test_ctrl_c_before_training_is_one_line(tmp_path):
    """Ctrl-C while a command works (here: before the first step of a run) is one line, exit 130."""
    script = ("import os, signal, threading, sys; from glm52_train.cli import main; "
              "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start(); "
              "sys.exit(main(['plan', '--model', 'glm52-744b', '--gpus', '4096', '--seq-len', '131072']))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0:
        pytest.skip("the plan finished before the interrupt")
    assert proc.returncode == 130 and _errors(proc.stderr)[-1] == "glm52 plan: interrupted (Ctrl-C)."
    assert "Traceback" not in proc.stderr


def test_ctrl_c_while_the_parser_is_built_is_one_line():
    """Ctrl-C before the command runs (here: while argparse is set up, which reads every run-config
    key) is the same one line, not a traceback."""
    script = ("import os, signal, sys; import glm52_train.cli as cli; build = cli.build_parser\n"
              "def interrupted():\n    os.kill(os.getpid(), signal.SIGINT)\n    return build()\n"
              "cli.build_parser = interrupted\nsys.exit(cli.main(['plan', '--gpus', '8']))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "glm52 plan: interrupted (Ctrl-C).", proc.stderr


@pytest.mark.slow
def test_torchrun_config_error_is_printed_once_last_with_status_2(golden_data, tmp_path):
    """Two processes under launch/torchrun.sh refuse the same bad option: one sentence, after
    torchrun's own report, and exit status 2."""
    from tests.launch_helpers import kill_tree, launch, run_config, tail

    cfg = run_config(tmp_path, golden_data)
    log = tmp_path / "launcher.log"
    proc = launch("--nproc-per-node", "2", "--config", str(cfg), "train.iters=-5", log=log,
                  extra_env={"PYTHON": sys.executable})
    try:
        assert proc.wait(timeout=300) == 2, tail(log)
    finally:
        kill_tree(proc)
    text = log.read_text()
    sentence = "glm52 pretrain: error: train.iters must be a positive whole number, got -5."
    assert text.count(sentence) == 1 and text.rstrip().splitlines()[-1] == sentence, tail(log)


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["info", "--model", "glm52-744b"],
                                  ["plan", "--model", "tiny", "--gpus", "8"],
                                  ["plan", "--config", "configs/tiny.yaml", "--gpus", "1"]])
def test_light_commands_import_no_torch(argv):
    """`glm52 --help`, `info` and `plan` answer in well under 2 s because they import neither torch
    nor Megatron-Core (checked by what the process imported, not by a clock)."""
    script = ("import sys; from glm52_train.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
              "heavy = sorted(m for m in ('torch', 'megatron', 'megatron.core', 'transformers') if m in sys.modules)\n"
              "print('HEAVY', heavy, code)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] in ("HEAVY [] 0", "HEAVY [] 1"), proc.stdout[-500:] + proc.stderr[-2000:]


def test_pretrain_help_lists_every_run_config_key_with_type_default_and_meaning(capsys):
    from glm52_train.run_config import config_keys

    with pytest.raises(SystemExit):
        glm52(["pretrain", "--help"])
    help_text = capsys.readouterr().out
    rows = {line.split()[0]: line for line in help_text.splitlines() if line.startswith("  ") and line.split()}
    keys = config_keys()
    assert len(keys) > 100 and all(k.help for k in keys), [k.name for k in keys if not k.help]
    for key in keys:
        assert key.name in rows, key.name
        assert rows[key.name].split(None, 1)[1].startswith(key.type) and key.help in rows[key.name], rows[key.name]
    assert rows["train.iters"].split() == ["train.iters", "int", "1000", "optimizer", "steps", "of", "the", "whole",
                                           "run"]
    assert rows["train.precision"].split()[1:3] == ["auto|bf16|fp32", "auto"]
    assert rows["model.num_layers"].split()[1:3] == ["int", "78"]
    assert glm52(["config", "keys"]) == 0
    table = capsys.readouterr().out
    assert table.strip() in help_text


def test_config_show_prints_the_config_a_run_uses(tmp_path, capsys):
    import yaml

    from glm52_train.run_config import load_run_config

    args = ["--config", "configs/tiny.yaml", "train.iters=7", "model.num_layers=6", "model.index_pattern=FSFSFS"]
    assert glm52(["config", "show", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# configs/tiny.yaml with train.iters=7 model.num_layers=6 model.index_pattern=FSFSFS: ")
    shown = yaml.safe_load(out)
    assert shown["train"]["iters"] == 7 and shown["optimizer"]["lr"] == 3e-3  # tiny.yaml's own lr
    assert shown["model"]["name"] == "tiny+num_layers=6,index_pattern=FSFSFS" and shown["model"]["num_layers"] == 6
    again = tmp_path / "shown.yaml"
    again.write_text(out)
    assert load_run_config(str(again)).to_dict() == load_run_config(args[1], args[2:]).to_dict()


@pytest.mark.parametrize("override, sentence", [
    ("trian.iters=10", "unknown key trian.iters (did you mean train.iters?)"),
    ("train.itres=10", "unknown key train.itres (did you mean train.iters?)"),
    ("optimzer.lr=1e-3", "unknown key optimzer.lr (did you mean optimizer.lr?)"),
    ("model.num_layerz=6", "unknown key model.num_layerz (did you mean model.num_layers?)"),
    ("zzz=1", "unknown key zzz"),
])
def test_a_misspelt_key_says_did_you_mean(override, sentence, capsys):
    assert glm52(["pretrain", "--config", "configs/tiny.yaml", override]) == 2
    assert _errors(capsys.readouterr().err) == [
        f"glm52 pretrain: error: {sentence}; `glm52 config keys` lists every key."]


@pytest.mark.parametrize("argv, meant", [
    (["pretrain", "--config", "configs/tiny.yaml", "--train.iters", "10"], "train.iters=10"),
    (["pretrain", "--config", "configs/tiny.yaml", "--optimizer.lr=1e-3", "train.iters=3"], "optimizer.lr=1e-3"),
    (["config", "show", "--config", "configs/tiny.yaml", "--train.iters"], "train.iters=VALUE"),
])
def test_a_dashed_key_points_at_key_value(argv, meant, capsys):
    assert glm52(argv) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith(f"glm52 {argv[0]}: error: unrecognized argument --") and line.endswith(
        f"run-config keys are given as key=value, without dashes: {meant}")


def test_a_reader_that_stops_early_gets_no_traceback():
    """`glm52 config keys | head -1`: the pipe closes before the command has written; it stops
    quietly with SIGPIPE's status (141), no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "glm52_train.cli", "config", "keys"], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: the first write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""
