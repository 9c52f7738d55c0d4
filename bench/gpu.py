"""The GPU campaign: every pending GPU check in one call of a lent machine, by priority, inside
one deadline.

    python3 bench/gpu.py --budget 480                 # on the GPU machine (device tool), OUT set
    python3 bench/gpu.py --dry-run                    # here: every check's CPU path at toy size
    python3 bench/gpu.py --list                       # the checks, in the order they run
    python3 bench/gpu.py --only kernel_tests,dsa_bench --budget 300

GPU time comes by chance and in 15-minute lots, so a call must only measure. Each row of
`CHECKS` is one named check: the command run on the GPU at full size (`cmd`) and the same code
path on the CPU at toy size (`dry_cmd`: Triton's interpreter, the models' `tiny`, smoke modes),
which `--dry-run` runs and `tests/test_gpu_campaign.py` checks. Checks run in the table's order
(priority first); one that would not finish inside what is left of the budget is skipped and
recorded as such. Each runs in its own folder under `--work` with its output in `log.txt`; its
`{out}` argument is that folder, where it writes its JSON.

What comes back from the device machine is limited (8 files from $OUT), so after every check the
runner rewrites three files under $OUT (a call cut short keeps what it measured):
- `campaign.json`: the device and versions (once), and per check its status, seconds, exit
  code and every JSON file it wrote, inlined;
- `campaign.log`: each check's command and the tail of its output;
- `raw.tar.gz`: every check's folder as it is (logs, JSON, profiler tables), for
  `docs/gpu_runs/<date>-<device>/`.

The device machine has torch, Triton and transformers but no Megatron-Core: carry its cp312
wheel in `.whl/`, which the runner installs into /tmp/site, and the prepared corpus (`make
data`) for the training checks. `docs/benchmarks.md` ("GPU campaign") gives the device call.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL = 4000  # characters of each check's output kept in campaign.log


@dataclasses.dataclass(frozen=True)
class Check:
    """One GPU check. `cmd` and `dry_cmd` are argv lists; `{py}` is the Python interpreter,
    `{out}` the check's own folder and `{data}` the prepared corpus's prefix (`--data`).
    `est_s` is what it takes on an H100/H200 (measured where it ran before); the runner gives
    it at most `limit_factor` times that."""

    name: str
    issue: int
    est_s: int
    cmd: list
    dry_cmd: list
    what: str = ""
    env: dict = dataclasses.field(default_factory=dict)
    dry_env: dict = dataclasses.field(default_factory=dict)
    limit_factor: float = 1.5


INTERP = {"TRITON_INTERPRET": "1"}
PYTEST = ["{py}", "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
CORPUS = "data.blend=[{path: {data}, weight: 1.0}]"

# In priority order: open facts first, then measurements of landed work, then the longer sweeps.
CHECKS: list[Check] = [
    Check("model_test", 27, 40,
          [*PYTEST, "-m", "gpu", "tests/test_gpu_model.py", "--timeout", "120"],
          [*PYTEST, "--collect-only", "tests/test_gpu_model.py"],
          what="tiny's logits on the kernel path vs the PyTorch path, fp32 (Triton's default fp32 dot: TF32)"),
    Check("model_test_ieee", 27, 40,
          [*PYTEST, "-m", "gpu", "tests/test_gpu_model.py", "--timeout", "120"],
          [*PYTEST, "--collect-only", "tests/test_gpu_model.py"],
          env={"TRITON_F32_DEFAULT": "ieee"}, dry_env={"TRITON_F32_DEFAULT": "ieee"},
          what="the same with IEEE fp32 dots in Triton: passes if TF32 was the cause"),
    Check("kernel_tests", 15, 220,  # 150 s measured before the no-atomics and KL-from-probs tests
          [*PYTEST, "-m", "gpu", "tests/test_dsa_kernels.py", "--timeout", "90", "--durations=8"],
          [*PYTEST, "--collect-only", "-m", "gpu", "tests/test_dsa_kernels.py"],
          what="every DSA kernel (both backwards, the KL from the dq pass's probabilities) against its float64 "
               "reference at the built-in shapes"),
    Check("kernel_tests_heads", 27, 90,
          [*PYTEST, "-m", "gpu", "tests/test_dsa_kernels.py", "--timeout", "90",
           "--dsa-case", "seq=8192,heads=16,topk=2048", "--dsa-case", "seq=8192,heads=8,topk=2048"],
          [*PYTEST, "--collect-only", "-m", "gpu", "tests/test_dsa_kernels.py",
           "--dsa-case", "seq=8192,heads=16,topk=2048", "--dsa-case", "seq=8192,heads=8,topk=2048"],
          what="the kernels at 16 and 8 heads per rank (TP4, TP8)"),
    Check("train_step", 16, 110,
          ["{py}", "bench/train_step.py", "--json", "{out}/train_step.json", CORPUS,
           "logging.run_dir={out}/run", "logging.profile_at=16", "logging.profile_steps=3"],
          ["{py}", "bench/train_step.py", "--smoke", "--json", "{out}/train_step.json", CORPUS,
           "logging.run_dir={out}/run"],
          what="proxy-h100 at 4K, bf16: tokens/s, MFU, peak memory vs glm52 plan, profile"),
    Check("train_step_dense", 24, 110,
          ["{py}", "bench/train_step.py", "--json", "{out}/train_step.json", CORPUS, "dsa.mode=dense",
           "logging.run_dir={out}/run", "logging.profile_at=16", "logging.profile_steps=3"],
          ["{py}", "bench/train_step.py", "--smoke", "--json", "{out}/train_step.json", CORPUS, "dsa.mode=dense",
           "train.iters=4", "logging.profile_at=3", "logging.profile_steps=1", "logging.run_dir={out}/run"],
          what="proxy-h100 at 4K in dsa.mode=dense (per-head MLA through SDPA): MFU against the sparse step's"),
    Check("layer_2048_dense_vs_sparse", 24, 60,
          ["{py}", "bench/long_context_layer.py", "--dense-vs-sparse", "2048", "--json", "{out}/dense_vs_sparse.json"],
          ["{py}", "bench/long_context_layer.py", "--smoke", "--dense-vs-sparse", "2048",
           "--json", "{out}/dense_vs_sparse.json"],
          what="one full-width layer at seq 2048, top-2048: the dense path vs the sparse kernels"),
    Check("dsa_bench", 15, 170,
          ["{py}", "bench/dsa.py", "--seqs", "4096,16384,32768,65536,131072", "--json", "{out}/dsa_bench.json"],
          ["{py}", "bench/dsa.py", "--cpu-smoke", "--json", "{out}/dsa_bench.json"],
          what="indexer, sparse MLA fwd/bwd (atomic and without atomics), indexer KL, a DSA layer vs cuDNN dense, 4K-128K"),
    Check("dsa_bench_heads", 25, 150,
          ["{py}", "bench/dsa.py", "--seqs", "32768,131072", "--heads", "64,32,16,8", "--skip", "dense,mcore",
           "--only", "sparse attn,KL", "--json", "{out}/dsa_heads.json"],
          ["{py}", "bench/dsa.py", "--cpu-smoke", "--heads", "8", "--skip", "dense,mcore", "--only", "sparse attn fwd",
           "--json", "{out}/dsa_heads.json"],
          what="sparse MLA fwd, both backwards and the KL at 64/32/16/8 heads per rank (TP1..TP8), 32K and 128K"),
    Check("dsa_bench_window", 25, 150,
          ["{py}", "bench/dsa.py", "--seqs", "32768,131072", "--selection", "window", "--skip", "dense,mcore",
           "--only", "sparse attn fwd,sparse attn bwd", "--json", "{out}/dsa_window.json"],
          ["{py}", "bench/dsa.py", "--cpu-smoke", "--selection", "window", "--skip", "dense,mcore", "--only",
           "sparse attn fwd", "--json", "{out}/dsa_window.json"],
          what="sparse MLA fwd and backwards on window top-k (neighbours share rows: the most L2 reuse) against "
               "dsa_bench's scattered selections, with each wave's working set"),
    Check("long_context_layer", 27, 90,
          ["{py}", "bench/long_context_layer.py", "--layer", "dense", "--json", "{out}/long_context.json"],
          ["{py}", "bench/long_context_layer.py", "--smoke", "--layer", "dense", "--json", "{out}/long_context.json"],
          what="the longest sequence one full-width DSA layer trains at on this GPU's memory"),
    Check("fp8_gemm", 13, 90,
          ["{py}", "bench/fp8_gemm.py", "--json", "{out}/fp8_gemm.json"],
          ["{py}", "bench/fp8_gemm.py", "--dry-run", "--json", "{out}/fp8_gemm.json"],
          what="blockwise FP8 GEMMs vs bf16 at GLM-5.2's dense and expert shapes"),
    Check("fp8_quant", 26, 40,
          ["{py}", "bench/fp8_quant.py", "--json", "{out}/fp8_quant.json"],
          ["{py}", "bench/fp8_quant.py", "--dry-run", "--json", "{out}/fp8_quant.json"],
          what="the fused FP8 quantisation kernel's GB/s (target 2 TB/s) vs torch ops, bit-exact check"),
    Check("fp8_step", 26, 240,
          ["{py}", "bench/fp8_step.py", "--json", "{out}/fp8_step.json", CORPUS, "train.iters=12"],
          ["{py}", "bench/fp8_step.py", "--smoke", "--json", "{out}/fp8_step.json", CORPUS, "train.iters=2",
           "logging.profile_at=null"],
          what="proxy-h100 training step, bf16 then FP8 blockwise in one call: tokens/s of each (target 1.15x)"),
    Check("stage_memory", 17, 120,
          ["{py}", "bench/stage_memory.py", "--json", "{out}/stage_memory.json"],
          ["{py}", "bench/stage_memory.py", "--smoke", "--json", "{out}/stage_memory.json"],
          what="what one PP11 stage of full-width GLM-5.2 keeps per micro-batch vs glm52 plan"),
    Check("dsa_sweep", 15, 60,
          ["{py}", "bench/dsa.py", "--seqs", "", "--sweep", "32768", "--json", "{out}/dsa_sweep.json"],
          ["{py}", "bench/dsa.py", "--cpu-smoke", "--seqs", "", "--sweep", "24", "--json", "{out}/dsa_sweep.json"],
          what="alternative kernel configurations at 32K"),
]


def by_name() -> dict[str, Check]:
    return {c.name: c for c in CHECKS}


def fill(argv: list, py: str, out: str, data: str) -> list[str]:
    return [str(a).replace("{py}", py).replace("{out}", out).replace("{data}", data) for a in argv]


# ---------------------------------------------------------------------------------------------
# the machine


def install_megatron(py: str, log: list) -> dict:
    """Megatron-Core from a carried wheel (`.whl/`) when the image has none: pip's --target
    folder goes on PYTHONPATH for every check."""
    env: dict = {}
    probe = subprocess.run([py, "-c", "import megatron.core"], capture_output=True)
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if probe.returncode != 0 and wheels:
        proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *wheels],
                              capture_output=True, text=True)
        log.append(f"pip install {len(wheels)} wheel(s): exit {proc.returncode}\n{proc.stderr[-1000:]}")
        env["PYTHONPATH"] = "/tmp/site"
    return env


def describe_machine(py: str, env: dict) -> dict:
    """The device and versions, recorded once per campaign."""
    script = ("import json, platform, torch\n"
              "d = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)\n"
              "try:\n import triton; d['triton'] = triton.__version__\nexcept Exception as e: d['triton'] = repr(e)\n"
              "try:\n import megatron.core as m; d['megatron_core'] = m.__version__\nexcept Exception as e: d['megatron_core'] = repr(e)\n"
              "try:\n import transformers; d['transformers'] = transformers.__version__\nexcept Exception as e: d['transformers'] = repr(e)\n"
              "if torch.cuda.is_available():\n p = torch.cuda.get_device_properties(0)\n"
              " d.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,\n"
              "          capability='%d.%d' % (p.major, p.minor))\n"
              "else:\n d['device'] = 'cpu'\n"
              "print(json.dumps(d))\n")
    proc = subprocess.run([py, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    info = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    info.update(host=platform.node(), cpus=os.cpu_count(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return info


# ---------------------------------------------------------------------------------------------
# the campaign


class Campaign:
    """Runs checks into `work`, and after each rewrites campaign.json, campaign.log and raw.tar.gz
    under `out`."""

    def __init__(self, out: str, work: str, dry_run: bool, budget_s: float, py: str, data: str):
        self.out, self.work, self.dry_run, self.py, self.data = out, work, dry_run, py, data
        self.deadline = time.time() + budget_s
        os.makedirs(out, exist_ok=True)
        os.makedirs(work, exist_ok=True)
        self.log: list[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        extra = {} if dry_run else install_megatron(py, self.log)
        paths = [ROOT, *filter(None, [extra.get("PYTHONPATH"), os.environ.get("PYTHONPATH")])]
        self.env["PYTHONPATH"] = os.pathsep.join(paths)
        self.result = {"dry_run": dry_run, "budget_s": budget_s, "machine": describe_machine(py, self.env),
                       "checks": []}
        self.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, check: Check) -> dict:
        folder = os.path.join(self.work, check.name)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        template = check.dry_cmd if self.dry_run else check.cmd
        argv = fill(template, self.py, folder, self.data)
        row = {"name": check.name, "issue": check.issue, "what": check.what, "command": " ".join(argv[1:]),
               "env": check.dry_env if self.dry_run else check.env}
        if any("{data}" in str(a) for a in template) and not os.path.exists(self.data + ".bin"):
            row.update(status="skipped", reason=f"no prepared corpus at {self.data}.bin (make data, and carry data/cache)")
            return row
        limit = check.est_s * check.limit_factor
        if not self.dry_run and self.left() < min(limit, check.est_s):
            row.update(status="skipped", reason=f"{self.left():.0f} s left, needs ~{check.est_s} s")
            return row
        timeout = max(1.0, min(limit, self.left())) if not self.dry_run else None
        env = dict(self.env, **(check.dry_env if self.dry_run else check.env))
        start = time.time()
        with open(os.path.join(folder, "log.txt"), "w") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            # its own process group: a check's children (a pretrain under bench/train_step.py)
            # are stopped with it
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                row.update(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                row.update(status="timeout", returncode=None)
        row["seconds"] = round(time.time() - start, 1)
        row["json"] = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            try:
                with open(path) as f:
                    row["json"][os.path.basename(path)] = json.load(f)
            except (OSError, ValueError) as e:
                row["json"][os.path.basename(path)] = {"unreadable": str(e)}
        return row

    def record(self, row: dict) -> None:
        self.result["checks"].append(row)
        tail = ""
        path = os.path.join(self.work, row["name"], "log.txt")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                tail = f.read()[-TAIL:]
        self.log.append(f"== {row['name']} (issue {row['issue']}): {row['status']}"
                        f" in {row.get('seconds', 0)} s{'; ' + row['reason'] if 'reason' in row else ''}\n{tail}")
        self.flush()

    def flush(self) -> None:
        self.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        _write_atomic(os.path.join(self.out, "campaign.json"), json.dumps(self.result, indent=1, default=str))
        _write_atomic(os.path.join(self.out, "campaign.log"), "\n".join(self.log) + "\n")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(self.work, arcname="raw")
        _write_atomic(os.path.join(self.out, "raw.tar.gz"), buf.getvalue())


def _write_atomic(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every check's CPU path at toy size (no GPU needed)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole campaign (GPU runs)")
    ap.add_argument("--only", default="", help="comma list of check names (in the table's order)")
    ap.add_argument("--skip", default="", help="comma list of check names to leave out")
    ap.add_argument("--list", action="store_true", help="print the checks in order and exit")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_campaign_out"),
                    help="where campaign.json, campaign.log and raw.tar.gz go (default $OUT)")
    ap.add_argument("--work", default=None, help="the checks' own folders (default a temporary folder)")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "cache", "stdlib"),
                    help="the prepared corpus for the training checks (default data/cache/stdlib, from make data)")
    args = ap.parse_args(argv)

    names = by_name()
    unknown = [n for n in filter(None, (args.only + "," + args.skip).split(",")) if n not in names]
    if unknown:
        print(f"unknown check(s) {', '.join(unknown)}: the checks are {', '.join(names)}.", file=sys.stderr)
        return 2
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))
    chosen = [c for c in CHECKS if (not only or c.name in only) and c.name not in skip]
    if args.list:
        total = 0
        for c in chosen:
            total += c.est_s
            print(f"{c.name:<22} issue {c.issue:<3} ~{c.est_s:>4} s  (cumulative {total:>5} s)  {c.what}")
        return 0
    if not args.dry_run:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        if probe.stdout.strip() != "True":
            print("bench/gpu.py needs a CUDA GPU; --dry-run runs every check's CPU path here.", file=sys.stderr)
            return 2
    work = args.work or os.path.join("/tmp", f"glm52_gpu_campaign_{os.getpid()}")
    campaign = Campaign(args.out, work, args.dry_run, args.budget, sys.executable, os.path.abspath(args.data))
    print(json.dumps(campaign.result["machine"]), flush=True)
    failed = 0
    for check in chosen:
        row = campaign.run(check)
        campaign.record(row)
        failed += row["status"] not in ("ok", "skipped")
        print(f"{check.name:<22} {row['status']:<8} {row.get('seconds', 0):>7} s  {row.get('reason', '')}", flush=True)
    print(f"wrote {args.out}/campaign.json, campaign.log, raw.tar.gz ({len(chosen)} checks, {failed} not ok)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
