"""`glm52`: the command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from glm52_train.checkpoint import CheckpointError
from glm52_train.config import ConfigError


def _quiet() -> None:
    # Megatron-Core warns at import about missing Apex/TE on every CPU run; say it once in the
    # README instead of on every command. A Megatron-Core other than the pinned one still warns.
    from glm52_train.compat import VersionWarning

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("default", category=VersionWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_info(args) -> int:
    from glm52_train.config import get_model_config
    from glm52_train.model.info import format_info, model_info

    info = model_info(get_model_config(args.model), seq_len=args.seq_len)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
    return 0


def cmd_import_hf(args) -> int:
    from glm52_train.hf.interop import import_hf

    out = import_hf(args.hf, args.out)
    print(f"imported {args.hf} -> {out}")
    return 0


def cmd_export_hf(args) -> int:
    from glm52_train.hf.interop import export_hf

    done = export_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                     on_damaged=args.on_damaged, warn=lambda text: print(text, file=sys.stderr))
    if done.stale_removed:
        print(f"removed {len(done.stale_removed)} shard(s) of an earlier export from {done.out}")
    print(f"exported iteration {done.iteration} ({done.checkpoint}) -> {done.out}")
    return 0


def cmd_verify_hf(args) -> int:
    from glm52_train.hf.interop import describe, dump, verify_hf

    result = verify_hf(args.hf, seq_len=args.seq_len, batch=args.batch, tolerance=args.tolerance)
    print(dump(result) if args.json else describe(result))
    return 0 if result.ok else 1


PREPARE_DEFAULT_PREFIX = "data/cache/stdlib"  # the embedded corpus `make train` trains on


def cmd_prepare_data(args) -> int:
    from glm52_train.data.prepare import prepare_data, refuse_existing

    inputs = list(args.input or [])
    if not inputs and not args.embedded:
        raise ConfigError("give --input files or --embedded.")
    if not args.overwrite:  # before anything is written, the embedded corpus included
        refuse_existing(args.output_prefix, default=args.output_prefix == PREPARE_DEFAULT_PREFIX)
    if not 0 <= args.max_bad_share <= 1:
        raise ConfigError(f"--max-bad-share must be between 0 and 1, got {args.max_bad_share:g}.")
    if args.embedded:
        from glm52_train.data.embedded import write_corpus

        # Beside the output, never inside the package: the user chose where files go.
        inputs.append(str(write_corpus(f"{args.output_prefix}.embedded.jsonl")))
    meta = prepare_data(
        inputs, args.output_prefix, args.tokenizer, text_key=args.text_key, workers=args.workers,
        eod_token=args.eod_token, min_tokens=args.min_tokens, max_bad_share=args.max_bad_share,
        overwrite=args.overwrite,
    )
    for note in meta["skipped_rows_notes"]:
        print(f"skipped {note}", file=sys.stderr)
    print(f"wrote {args.output_prefix}.bin/.idx: {meta['documents']:,} documents, "
          f"{meta['tokens']:,} tokens ({meta['seconds']} s)")
    return 0


def cmd_pretrain(args) -> int:
    from glm52_train.training.stop import StopSignals

    if not args.check_config:  # first: a stop signal during the imports is not lost
        signals = StopSignals()
        try:
            return _pretrain(args, signals)
        finally:
            signals.close()
    return _pretrain(args, None)


def _pretrain(args, signals) -> int:
    from glm52_train.run_config import load_run_config
    from glm52_train.training import faults
    from glm52_train.training.loop import pretrain

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.init_from is not None:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    cfg = load_run_config(args.config, overrides)
    if args.check_config:
        from glm52_train.training.setup import check_run

        world = check_run(cfg)
        print(f"{args.config}: the run config, its tokenizer and data check out for {world} "
              f"process{'es' if world > 1 else ''}.")
        return 0
    with faults.name_hung_ranks(cfg.train.collective_timeout_minutes):
        return pretrain(cfg, signals)


def cmd_init_weights(args) -> int:
    from glm52_train import checkpoint, parallel
    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model

    model_cfg = get_model_config(args.model)
    parallel.initialize(seed=args.seed)
    model = build_model(model_cfg)
    out = checkpoint.save_checkpoint(
        args.out, 0, [model], meta={"kind": "weights", "model": model_cfg.to_dict(), "seed": args.seed}
    )
    print(f"initialised {args.model} (seed {args.seed}) -> {out}")
    return 0


def _plan_inputs(args) -> dict:
    """What `glm52 plan` evaluates: the command line, or a run config (`--config`) whose model,
    parallel layout, sequence, batch, recomputation and optimizer the flags may override."""
    from glm52_train.config import get_model_config

    if args.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {args.gpus}: give the number of GPUs to plan for.")
    given = {k: getattr(args, k) for k in ("tp", "pp", "vpp", "ep", "etp", "cp", "layout")}
    q = dict(seq_len=args.seq_len or 4096, micro_batch=args.micro_batch or 1, global_batch=args.global_batch,
             recompute=args.recompute or "full", modules=_modules(args.recompute_modules),
             optimizer=args.optimizer or "adamw", first=None, last=None)
    if args.config:
        from glm52_train.run_config import load_run_config

        cfg = load_run_config(args.config, [])
        p, t = cfg.parallel, cfg.train
        model = get_model_config(args.model) if args.model else cfg.model_config()
        for k in ("tp", "pp", "vpp", "ep", "etp", "cp"):
            given[k] = given[k] or getattr(p, k)
        given["layout"] = given["layout"] or p.layout
        q.update(seq_len=args.seq_len or cfg.data.seq_length, micro_batch=args.micro_batch or t.micro_batch_size,
                 global_batch=args.global_batch or t.global_batch_size,
                 recompute=args.recompute or t.recompute or "none",
                 modules=_modules(args.recompute_modules) if args.recompute_modules else tuple(t.recompute_modules or ()),
                 optimizer=args.optimizer or cfg.optimizer.name,
                 first=p.first_stage_layers, last=p.last_stage_layers, sp=p.sp)
        if q["recompute"] != "selective":
            q["modules"] = ()
    elif not args.model:
        raise ConfigError("give --model NAME or --config FILE.")
    else:
        model = get_model_config(args.model)
    if q["recompute"] == "selective" and not q["modules"]:
        q["modules"] = ("mla_up_proj",)
    q["model"], q["given"] = model, given
    q["explicit"] = any(given[k] is not None for k in ("tp", "pp", "ep", "cp", "layout")) or bool(args.config)
    return q


def _modules(text) -> tuple:
    return tuple(x for x in (text or "").replace(" ", "").split(",") if x)


def cmd_plan(args) -> int:
    from glm52_train.plan import (GiB, Layout, check_layout, estimate, format_estimate, format_header, format_ranks,
                                  plan)

    q = _plan_inputs(args)
    model, given = q["model"], q["given"]
    recompute = q["recompute"] + (f" ({', '.join(q['modules'])})" if q["modules"] else "")
    if q["explicit"]:
        tp, pp, cp = given["tp"] or 1, given["pp"] or 1, given["cp"] or 1
        if args.gpus % (tp * pp * cp):
            raise ConfigError(f"TP x PP x CP = {tp * pp * cp} does not divide the {args.gpus} GPUs.")
        dp = args.gpus // (tp * pp * cp)
        vpp = given["vpp"] or 1
        if given["layout"] and not given["vpp"]:
            from glm52_train.layout import parse_pipeline

            try:
                vpp = parse_pipeline(model, given["layout"], pp).virtual_pipeline_model_parallel_size
            except ValueError as e:
                raise ConfigError(str(e)) from None
        layout = Layout(tp=tp, pp=pp, vpp=vpp, ep=given["ep"] or 1, etp=given["etp"] or 1, cp=cp, dp=dp,
                        sp=q.get("sp", tp > 1), pipeline=given["layout"])
        stages = dict(first_stage_layers=q["first"], last_stage_layers=q["last"])
        why = check_layout(model, layout, args.gpus, q["seq_len"], **stages)
        microbatches = None
        if q["global_batch"] is not None:
            if q["global_batch"] % (q["micro_batch"] * dp):
                why = why or (f"the global batch {q['global_batch']} is not a multiple of micro-batch x DP = "
                              f"{q['micro_batch']} x {dp}.")
            else:
                microbatches = q["global_batch"] // (q["micro_batch"] * dp)
        if why:
            print(f"refused: {layout.describe()}: {why}")
            return 1
        est = estimate(model, layout, q["seq_len"], args.gpu_mem, q["micro_batch"], microbatches, q["recompute"],
                       q["modules"], q["optimizer"], **stages)
        if args.json:
            out = est.to_dict(ranks=args.ranks)
            out["total_mib"] = est.total / 2**20
            print(json.dumps(out, indent=2))
        else:
            print(f"{model.name} on {args.gpus} GPUs x {args.gpu_mem:g} GiB, sequence {q['seq_len']}, micro-batch "
                  f"{q['micro_batch']}, {microbatches or 'steady-state'} micro-batches per step, recompute "
                  f"{recompute}, optimizer {q['optimizer']}")
            print(format_header())
            print(format_estimate(est))
            if args.ranks:
                print("\n".join(format_ranks(est)))
            print(f"busiest: pipeline rank {est.pp_rank} ({'+'.join(map(str, est.stage_layers))} layers), "
                  f"micro-batches in flight per chunk at its peak: {', '.join(map(str, est.in_flight))}")
            if not est.fits:
                print(f"refused: {layout.describe()}: {est.reason}")
        return 0 if est.fits else 1
    fitting, refused = plan(model, args.gpus, args.gpu_mem, q["seq_len"], q["micro_batch"], q["recompute"],
                            recompute_modules=q["modules"], optimizer=q["optimizer"], global_batch=q["global_batch"])
    if args.json:
        print(json.dumps({"fitting": [e.to_dict() for e in fitting],
                          "refused": [e.to_dict() for e in refused]}, indent=2))
        return 0 if fitting else 1
    print(f"{model.name} on {args.gpus} GPUs x {args.gpu_mem:g} GiB, sequence {q['seq_len']}, "
          f"micro-batch {q['micro_batch']}, recompute {recompute}, optimizer {q['optimizer']}")
    if not fitting and not refused:
        print(f"no layout of {model.name} can use exactly {args.gpus} GPUs (none passes the layout rules at "
              f"sequence {q['seq_len']}); try a multiple of 8 GPUs.")
        return 1
    if not fitting:
        print("no layout fits; the smallest need:")
        print("  " + format_header())
        for est in refused:
            print("  " + format_estimate(est))
        return 1
    print("suggested (best first):")
    print("  " + format_header())
    for est in fitting:
        print("  " + format_estimate(est))
    best = fitting[0]
    print(f"recommended: {best.layout.describe()}  ({best.total / GiB:.1f} GiB per GPU)")
    for est in refused:
        print(f"refused: {est.layout.describe()}: {est.reason}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if default not in (None, False, argparse.SUPPRESS) and not action.required and action.option_strings:
            text += f" (default: {default})"
        return text


def _subcommand(sub, name: str, summary: str, description: str = ""):
    return sub.add_parser(name, help=summary, description=f"{summary}.{' ' + description if description else ''}",
                          formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from glm52_train.config import MODELS

    parser = argparse.ArgumentParser(
        prog="glm52", description="GLM-5.2 pretraining on Megatron-Core. `glm52 COMMAND --help` describes each command.",
        formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = ", ".join(MODELS)

    p = _subcommand(sub, "info", "parameter counts, FLOPs per token and layer layout of a model")
    p.add_argument("--model", required=True, help=f"a model flavor: {models}")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length the FLOPs per token are counted at")
    p.add_argument("--json", action="store_true", help="print JSON (keys include total_params, active_params)")
    p.set_defaults(func=cmd_info)

    p = _subcommand(sub, "plan", "suggest a parallel layout and estimate the memory per GPU",
                    "Searches TP/PP/VPP/EP/CP/DP for the GPUs given, or checks one layout given with --tp/--pp/...")
    p.add_argument("--model", default=None, help=f"a model flavor: {models} (or take it from --config)")
    p.add_argument("--config", default=None,
                   help="plan this run config (model, parallel layout, batch, recompute, optimizer); flags override it")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU, GiB")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (unset: 4096, or the config's)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (unset: 1)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="samples per step: sets the micro-batches per step (unset: enough for the steady state)")
    p.add_argument("--recompute", choices=["full", "none", "selective"], default=None,
                   help="activation recomputation (unset: full, or the config's)")
    p.add_argument("--recompute-modules", default=None,
                   help="comma-separated Megatron-Core modules for --recompute selective: mla_up_proj, mlp, moe, "
                        "shared_experts (unset: mla_up_proj)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="optimizer state to count (unset: adamw, or the config's optimizer.name)")
    p.add_argument("--layout", default=None,
                   help="Megatron-Core pipeline_model_parallel_layout, e.g. 'Ett|tt|ttmL' (E embedding, t layer, "
                        "m MTP, L loss)")
    for name in ("tp", "pp", "vpp", "ep", "etp", "cp"):
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"evaluate this {name.upper()} instead of searching (unset: search)")
    p.add_argument("--ranks", action="store_true",
                   help="with a layout given: also every pipeline rank's memory, not only the busiest's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = _subcommand(sub, "prepare-data", "raw text -> Megatron-Core indexed dataset (PREFIX.bin/.idx/.json)",
                    "Each document ends with the end-of-document token; rows without a usable text are "
                    "counted, reported and skipped.")
    p.add_argument("--input", nargs="+", metavar="PATH", help="json/jsonl/parquet/txt files, folders or globs")
    p.add_argument("--embedded", action="store_true",
                   help="add the embedded corpus (the Python standard library's sources), written as "
                        "PREFIX.embedded.jsonl beside the output")
    p.add_argument("--output-prefix", default=PREPARE_DEFAULT_PREFIX, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.json (and caches beside them)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already at PREFIX (without it, an existing one is refused)")
    p.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json", help="a tokenizers JSON file or its folder")
    p.add_argument("--text-key", default="text", help="the field holding each document's text (json/parquet)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (unset: the cores, at most 8)")
    p.add_argument("--eod-token", default=None,
                   help="the end-of-document token (unset: the first of <|endoftext|>, </s>, <eos>, <|end_of_text|>)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="leave out documents shorter than this (long-document mixtures)")
    p.add_argument("--max-bad-share", type=float, default=0.01,
                   help="refuse the input when more than this share of its rows has no text or a non-string text")
    p.set_defaults(func=cmd_prepare_data)

    p = _subcommand(sub, "pretrain", "train from a YAML run config with key=value overrides",
                    "Any run-config key can be overridden as section.key=value, before or after the options.")
    p.add_argument("--config", required=True, help="a run config YAML, e.g. configs/tiny.yaml")
    p.add_argument("--resume", default=None,
                   help="auto (the newest good checkpoint), none, or a checkpoint path (unset: checkpoint.resume)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from these weights with a fresh optimizer, schedule and data position")
    p.add_argument("--check-config", action="store_true",
                   help="check the config, its tokenizer and data for WORLD_SIZE processes, then exit "
                        "(launch/torchrun.sh runs this once before torchrun)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.iters=50")
    p.set_defaults(func=cmd_pretrain)

    p = _subcommand(sub, "init-weights", "initialise a model once, as a weights checkpoint",
                    "Runs under any parallel layout can start from it (pretrain --init-from).")
    p.add_argument("--model", required=True, help=f"a model flavor: {models}")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=1234, help="initialisation seed")
    p.set_defaults(func=cmd_init_weights)

    p = _subcommand(sub, "import-hf", "HF glm_moe_dsa folder -> checkpoint (weights only)",
                    "Runs under torchrun too: each process converts a share of the tensors.")
    p.add_argument("--hf", required=True, help="a HF folder: config.json and safetensors shards")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=cmd_import_hf)

    p = _subcommand(sub, "export-hf", "checkpoint -> HF glm_moe_dsa folder",
                    "Runs under torchrun too: each process converts a share of the tensors.")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, or a root holding 'latest'")
    p.add_argument("--out", required=True, help="HF folder to write (config.json, safetensors shards, index)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="dtype of the written tensors")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GB")
    p.add_argument("--on-damaged", choices=["stop", "fallback"], default="stop",
                   help="when the newest checkpoint of --ckpt is damaged: stop, or export the newest good one "
                        "after a warning")
    p.set_defaults(func=cmd_export_hf)

    p = _subcommand(sub, "verify-hf", "compare our logits with transformers' on a HF folder",
                    "Exit status 0 when they agree within the tolerance, 1 when not.")
    p.add_argument("--hf", required=True, help="a HF glm_moe_dsa folder")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=2, help="random sequences compared")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |difference| / largest |logit|")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_verify_hf)
    return parser


def _error(command: str, error: Exception) -> int:
    """One sentence, exit status 2. Under launch/torchrun.sh (GLM52_ERROR_FILE set) every process
    would print the same sentence before torchrun's own report: the sentence goes to that file
    instead, and the launcher prints it once, last."""
    sentence = f"glm52 {command}: error: {error}"
    error_file = os.environ.get("GLM52_ERROR_FILE")
    if error_file:
        with open(error_file, "a") as f:  # one short append per process: lines do not interleave
            f.write(sentence.replace("\n", " ") + "\n")
    else:
        print(sentence, file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        _quiet()
    except KeyboardInterrupt:
        print("glm52: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        return 130
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes positionals only before or after all options: `pretrain --resume X a=1`
        # leaves the overrides after the options over. Every other extra is an error.
        if args.command == "pretrain" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        return _error(args.command, e)
    except KeyboardInterrupt:
        print(f"glm52 {args.command}: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        return 130
    except BaseException as e:
        from glm52_train.training.stop import SetupStopped

        if not isinstance(e, SetupStopped):
            raise
        print(e.sentence(), file=sys.stderr, flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
