"""`glm52`: the command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from glm52_train.config import ConfigError

# torch and Megatron-Core are imported by the commands that use them, never here: `glm52 --help`,
# `info` and `plan` answer without them (tests/test_cli.py::test_light_commands_import_no_torch).


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

    if args.config or args.overrides:
        from glm52_train.run_config import load_run_config

        if args.model:
            raise ConfigError("give --model NAME or --config FILE [key=value ...], not both.")
        model = load_run_config(args.config, list(args.overrides)).model_config()
    elif not args.model:
        raise ConfigError("give --model NAME or --config FILE.")
    else:
        model = get_model_config(args.model)
    info = model_info(model, seq_len=args.seq_len, dsa_mode=args.dsa_mode)
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
                     on_damaged=args.on_damaged, warn=lambda text: print(text, file=sys.stderr),
                     tokenizer=args.tokenizer)
    if done.stale_removed:
        print(f"removed {len(done.stale_removed)} shard(s) of an earlier export from {done.out}")
    if done.dtype != done.saved_dtype:
        print(f"converted the checkpoint's {done.saved_dtype} weights to {done.dtype} (--dtype {args.dtype})")
    if done.tokenizer_note:
        print(f"note: {done.tokenizer_note}", file=sys.stderr)
    tokenizer = f", tokenizer {done.tokenizer}" if done.tokenizer else ""
    print(f"exported iteration {done.iteration} ({done.checkpoint}) -> {done.out} ({done.dtype}{tokenizer})")
    return 0


def cmd_eval(args) -> int:
    from glm52_train.inference import evaluate_checkpoint

    result = evaluate_checkpoint(args.ckpt, args.data, iters=args.iters, micro_batch_size=args.micro_batch_size,
                                 split=args.split, seq_length=args.seq_length, tokenizer=args.tokenizer)
    print(json.dumps(result.to_dict()) if args.json else result.describe())
    return 0


def cmd_generate(args) -> int:
    from glm52_train.inference import generate

    result = generate(args.ckpt, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, tokenizer=args.tokenizer)
    print(json.dumps(result.to_dict()) if args.json else result.prompt + result.text)
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
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
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
    parallel layout, sequence, batch, recomputation, optimizer and gradient dtype the flags may
    override. A setting the config file leaves out takes the same default as the flag would
    (full recomputation, steady-state micro-batches), not the run config's default."""
    import yaml

    from glm52_train.config import get_model_config

    if args.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {args.gpus}: give the number of GPUs to plan for.")
    given = {k: getattr(args, k) for k in ("tp", "pp", "vpp", "ep", "etp", "cp", "layout")}
    q = dict(seq_len=args.seq_len or 4096, micro_batch=args.micro_batch or 1, global_batch=args.global_batch,
             recompute=args.recompute or "full", modules=_modules(args.recompute_modules),
             optimizer=args.optimizer or "adamw", first=args.first_stage_layers, last=args.last_stage_layers,
             grad_dtype=args.grad_dtype or "fp32", deterministic=False, fp8=False,
             indexer_loss="forward")
    if args.config:
        from glm52_train.run_config import load_run_config

        cfg = load_run_config(args.config, [])
        raw = yaml.safe_load(open(args.config).read()) or {}
        written = {sec: set((raw.get(sec) or {}).keys()) for sec in ("train", "data", "parallel", "optimizer")}
        p, t = cfg.parallel, cfg.train
        model = get_model_config(args.model) if args.model else cfg.model_config()
        for k in ("tp", "pp", "vpp", "ep", "etp", "cp"):
            given[k] = given[k] or getattr(p, k)
        given["layout"] = given["layout"] or p.layout
        train = written["train"]
        q.update(seq_len=args.seq_len or cfg.data.seq_length,
                 micro_batch=args.micro_batch or t.micro_batch_size,
                 global_batch=args.global_batch or (t.global_batch_size if "global_batch_size" in train else None),
                 recompute=args.recompute or ((t.recompute or "none") if "recompute" in train else "full"),
                 note="" if args.recompute or "recompute" in train else
                 " (the flag's default: the config leaves train.recompute unset, which trains without)",
                 modules=_modules(args.recompute_modules) if args.recompute_modules else tuple(t.recompute_modules or ()),
                 optimizer=args.optimizer or cfg.optimizer.name,
                 first=q["first"] if q["first"] is not None else p.first_stage_layers,
                 last=q["last"] if q["last"] is not None else p.last_stage_layers, sp=p.sp,
                 grad_dtype=args.grad_dtype or ("fp32" if t.grad_reduce_in_fp32 else "bf16"),
                 deterministic=cfg.dsa.deterministic, fp8=t.fp8 == "blockwise",
                 indexer_loss=cfg.dsa.indexer_loss)
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


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def cmd_plan(args) -> int:
    from glm52_train.plan import (GiB, Layout, check_layout, estimate, format_estimate, format_header, format_ranks,
                                  plan)
    from glm52_train.steptime import load_rates, step_time

    q = _plan_inputs(args)
    rates = load_rates(args.rates)
    model, given = q["model"], q["given"]
    recompute = q["recompute"] + (f" ({', '.join(q['modules'])})" if q["modules"] else "") + q.get("note", "")
    timing = dict(gpu_type=args.gpu_type, rates=rates, grad_dtype=q["grad_dtype"], optimizer=q["optimizer"],
                  dsa_indexer_loss=q["indexer_loss"])
    where = (f"predicted on {args.gpu_type} with {rates['stack']}'s rates"
             f"{' (' + args.rates + ')' if args.rates else ''}")
    if q["explicit"]:
        tp, pp, cp = given["tp"] or 1, given["pp"] or 1, given["cp"] or 1
        if args.gpus % (tp * pp * cp):
            raise ConfigError(f"TP x PP x CP = {tp * pp * cp} does not divide the {_gpus(args.gpus)}.")
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
                       q["modules"], q["optimizer"], grad_dtype=q["grad_dtype"], **stages,
                       dsa_deterministic=q["deterministic"], fp8=q["fp8"],
                       dsa_indexer_loss=q["indexer_loss"])
        st = step_time(model, layout, q["seq_len"], q["micro_batch"], microbatches, q["recompute"], q["modules"],
                       **timing, **stages)
        est.time = st.to_dict(chunks=False)
        if args.json:
            out = est.to_dict(ranks=args.ranks)
            out["total_mib"] = est.total / 2**20
            print(json.dumps(out, indent=2))
        else:
            print(f"{model.name} on {_gpus(args.gpus)} x {args.gpu_mem:g} GiB, sequence {q['seq_len']}, micro-batch "
                  f"{q['micro_batch']}, {microbatches or 'steady-state'} micro-batches per step, recompute "
                  f"{recompute}, optimizer {q['optimizer']}, {q['grad_dtype']} gradients")
            print(format_header())
            print(format_estimate(est))
            if args.ranks:
                print("\n".join(format_ranks(est)))
            print(f"busiest: pipeline rank {est.pp_rank} ({'+'.join(map(str, est.stage_layers))} layers), "
                  f"micro-batches in flight per chunk at its peak: {', '.join(map(str, est.in_flight))}")
            print(f"step time ({where}): {st.step_time_s:.2f} s, {st.tokens_per_s_per_gpu:,.1f} tokens/s per GPU, "
                  f"{st.model_tflops_per_gpu:.1f} model TFLOP/s per GPU, MFU {100 * st.mfu:.1f}%")
            print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in st.breakdown.items()))
            if not est.fits:
                print(f"refused: {layout.describe()}: {est.reason}")
        return 0 if est.fits else 1
    fitting, refused = plan(model, args.gpus, args.gpu_mem, q["seq_len"], q["micro_batch"], q["recompute"],
                            recompute_modules=q["modules"], optimizer=q["optimizer"], global_batch=q["global_batch"],
                            rank_by=args.rank_by, first_stage_layers=q["first"], last_stage_layers=q["last"],
                            timing=timing)
    if args.json:
        print(json.dumps({"rank_by": args.rank_by, "fitting": [e.to_dict() for e in fitting],
                          "refused": [e.to_dict() for e in refused]}, indent=2))
        return 0 if fitting else 1
    print(f"{model.name} on {_gpus(args.gpus)} x {args.gpu_mem:g} GiB, sequence {q['seq_len']}, "
          f"micro-batch {q['micro_batch']}, {q['global_batch'] or 'steady-state'} "
          f"{'samples' if q['global_batch'] else 'micro-batches'} per step, recompute {recompute}, "
          f"optimizer {q['optimizer']}, {q['grad_dtype']} gradients")
    if not fitting and not refused:
        print(f"no layout of {model.name} can use exactly {_gpus(args.gpus)} (none passes the layout rules at "
              f"sequence {q['seq_len']}); try a multiple of 8 GPUs.")
        return 1
    if not fitting:
        print("no layout fits; the smallest need:")
        print("  " + format_header())
        for est in refused:
            print("  " + format_estimate(est))
        return 1
    criterion = (f"fastest first: predicted tokens/s per GPU, {where}" if args.rank_by == "speed"
                 else "least memory per GPU first")
    print(f"layouts that fit ({criterion}):")
    print("  " + format_header(timed=True))
    for est in fitting:
        print("  " + format_estimate(est, timed=True))
    best = fitting[0]
    print(f"recommended: {best.layout.describe()}{best.stage_note()}  ({best.total / GiB:.1f} GiB per GPU, "
          f"{best.time['step_time_s']:.2f} s per step, {best.time['tokens_per_s_per_gpu']:,.1f} tokens/s per GPU)")
    print("  its step: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.time["breakdown"].items()))
    for est in refused:
        print(f"refused: {est.layout.describe()}: {est.reason}")
    return 0


def cmd_config(args) -> int:
    from glm52_train import run_config

    if args.action == "keys":
        print(run_config.format_keys())
        return 0
    cfg = run_config.load_run_config(args.config, list(args.overrides))
    cfg.model_config().validate()
    print(f"# {args.config or 'the defaults'}{' with ' + ' '.join(args.overrides) if args.overrides else ''}: "
          "the config glm52 pretrain runs (checked against the world size when it starts)")
    print(run_config.dump_config(cfg), end="")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if default not in (None, False, argparse.SUPPRESS) and not action.required and action.option_strings:
            text += f" (default: {default})"
        return text


class _KeysHelpFormatter(_HelpFormatter):
    """Keeps the epilog (the table of run-config keys) as written."""

    def _fill_text(self, text, width, indent):
        return text if "\n" in text else super()._fill_text(text, width, indent)


def _subcommand(sub, name: str, summary: str, description: str = "", epilog: str | None = None):
    return sub.add_parser(name, help=summary, description=f"{summary}.{' ' + description if description else ''}",
                          epilog=epilog, formatter_class=_KeysHelpFormatter if epilog else _HelpFormatter)


def _keys_epilog() -> str:
    from glm52_train.run_config import format_keys

    return "run-config keys (give any as key=value; `glm52 config keys` prints this table):\n" + format_keys()


def build_parser() -> argparse.ArgumentParser:
    from glm52_train.config import MODELS

    parser = argparse.ArgumentParser(
        prog="glm52", description="GLM-5.2 pretraining on Megatron-Core. `glm52 COMMAND --help` describes each command.",
        formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = ", ".join(MODELS)

    p = _subcommand(sub, "info", "architecture, parameter counts and FLOPs per token of a model",
                    "The model is a flavor (--model), or a run config's (--config, with model.FIELD=VALUE overrides).")
    p.add_argument("--model", default=None, help=f"a model flavor: {models}")
    p.add_argument("--config", default=None, help="the model of this run config (its model section)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="with --config: overrides, e.g. model.num_layers=6")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length the FLOPs per token are counted at")
    p.add_argument("--dsa-mode", choices=["sparse", "warmup", "dense"], default="sparse",
                   help="the dsa.mode the attention FLOPs are counted for (dense: every visible key, no indexer)")
    p.add_argument("--json", action="store_true", help="print JSON (keys include total_params, active_params)")
    p.set_defaults(func=cmd_info)

    p = _subcommand(sub, "plan", "suggest a parallel layout and estimate its memory per GPU and step time",
                    "Searches TP/PP/VPP/EP/CP/DP (and uneven pipeline stages) for the GPUs given, ranking the "
                    "layouts that fit by predicted tokens/s per GPU, or checks one layout given with --tp/--pp/...")
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
    p.add_argument("--grad-dtype", choices=["fp32", "bf16"], default=None,
                   help="gradient buffers (unset: fp32, or bf16 where the config sets train.grad_reduce_in_fp32: "
                        "false)")
    p.add_argument("--gpu-type", choices=["h100", "h200", "b200", "gb200"], default="h100",
                   help="the device whose peak rates the step-time model uses (configs/rates/devices.yaml)")
    p.add_argument("--rates", default=None, metavar="FILE",
                   help="the stack's achieved rates (unset: this stack's, configs/rates/glm52_train.yaml; "
                        "Megatron-Bridge's: configs/rates/megatron-bridge.yaml)")
    p.add_argument("--rank-by", choices=["speed", "memory"], default="speed",
                   help="order of the layouts that fit: predicted tokens/s per GPU, or memory per GPU")
    p.add_argument("--first-stage-layers", type=int, default=None,
                   help="decoder layers on the first pipeline stage (uneven split; unset: searched when the "
                        "layers do not split evenly)")
    p.add_argument("--last-stage-layers", type=int, default=None,
                   help="decoder layers on the last pipeline stage (as --first-stage-layers)")
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
                    "Any run-config key can be overridden as section.key=value, before or after the options; "
                    "`glm52 config show --config FILE key=value ...` prints the config a run would use.",
                    epilog=_keys_epilog())
    p.add_argument("--config", required=True, help="a run config YAML, e.g. configs/tiny.yaml")
    p.add_argument("--resume", default=None,
                   help="auto (the newest good checkpoint of this run; another run configuration's is refused), "
                        "none (start over; refused where checkpoints are, unless --overwrite), or a checkpoint path "
                        "(resumed even if another configuration saved it) (unset: checkpoint.resume)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from these weights with a fresh optimizer, schedule and data position")
    p.add_argument("--check-config", action="store_true",
                   help="check the config, its tokenizer and data for WORLD_SIZE processes, then exit "
                        "(launch/torchrun.sh runs this once before torchrun)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: move an earlier run's checkpoints and metrics in this run's folders "
                        "aside (to DIR.old-N) instead of refusing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.iters=50")
    p.set_defaults(func=cmd_pretrain)

    p = _subcommand(sub, "config", "list the run-config keys, or print the config a run would use",
                    "`glm52 config keys`: every key with its type, default and meaning; `glm52 config show --config "
                    "FILE [key=value ...]`: the effective config as YAML.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               help="keys (every run-config key) or show (the effective config)")
    keys = actions.add_parser("keys", help="every run-config key with its type, default and meaning",
                              description="Every run-config key with its type, default and meaning.")
    keys.set_defaults(func=cmd_config)
    show = actions.add_parser("show", help="the effective config of --config with key=value overrides, as YAML",
                              description="The effective config of --config with key=value overrides, as YAML.",
                              formatter_class=_HelpFormatter)
    show.add_argument("--config", default=None, help="a run config YAML (unset: the defaults)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.iters=50")
    show.set_defaults(func=cmd_config)

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
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                   help="dtype of the written tensors (unset: the checkpoint's own, e.g. fp32 for CPU training)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer files to write beside the weights (unset: the run's data.tokenizer)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GB")
    p.add_argument("--on-damaged", choices=["stop", "fallback"], default="stop",
                   help="when the newest checkpoint of --ckpt is damaged: stop, or export the newest good one "
                        "after a warning")
    p.set_defaults(func=cmd_export_hf)

    p = _subcommand(sub, "eval", "LM loss and perplexity of a checkpoint on an indexed dataset",
                    "The model is the one the checkpoint's run config describes; the batches are read as "
                    "the training loop reads its validation data.")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, or a root holding 'latest'")
    p.add_argument("--data", required=True, metavar="PREFIX", help="a dataset made by prepare-data (PREFIX.bin/.idx)")
    p.add_argument("--iters", type=int, default=10, help="batches to evaluate")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per batch (unset: the run's train.micro_batch_size)")
    p.add_argument("--split", default="0,100,0",
                   help="evaluate the validation part of this train,validation,test split of PREFIX's documents "
                        "(the run's data.split, e.g. 98,2,0, gives the documents it validated on)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (unset: the run's data.seq_length)")
    p.add_argument("--tokenizer", default=None, help="the dataset's tokenizer (unset: the run's data.tokenizer)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (keys include loss, perplexity)")
    p.set_defaults(func=cmd_eval)

    p = _subcommand(sub, "generate", "continue a prompt with a checkpoint's model (greedy or sampled)",
                    "Prints the prompt and its continuation; stops at the end-of-document token.")
    p.add_argument("--ckpt", required=True, help="a checkpoint folder, or a root holding 'latest'")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to add")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the most likely token); above 0: sampled")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0: all)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--tokenizer", default=None, help="a tokenizers JSON file (unset: the run's data.tokenizer)")
    p.add_argument("--json", action="store_true", help="print JSON (prompt, text, prompt_tokens, tokens, stopped)")
    p.set_defaults(func=cmd_generate)

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


def _dashed_key(argv: list[str]) -> str | None:
    """`--train.iters 10` (or `--train.iters=10`) to a command taking run-config overrides: the
    sentence pointing at `train.iters=10`, or None. No option of glm52 has a dot in its name."""
    if not argv or argv[0] not in ("pretrain", "config", "info"):
        return None
    for i, arg in enumerate(argv):
        if arg == "--":
            return None
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key, _, value = arg[2:].partition("=")
            if not value:
                following = argv[i + 1] if i + 1 < len(argv) else ""
                value = following if following and not following.startswith("-") and "=" not in following else "VALUE"
            return f"unrecognized argument {arg}: run-config keys are given as key=value, without dashes: {key}={value}"
    return None


def _user_error(error: Exception) -> bool:
    """A bad config or an unusable checkpoint: one sentence, not a traceback. CheckpointError can
    only come from glm52_train.checkpoint, so its module is looked up only once it is loaded."""
    checkpoint = sys.modules.get("glm52_train.checkpoint")
    return isinstance(error, ConfigError) or (checkpoint is not None and isinstance(error, checkpoint.CheckpointError))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # anywhere: while the parser is built, during imports, or while a command works
        label = f"glm52 {command}" if command and command.replace("-", "").isalpha() else "glm52"
        print(f"{label}: interrupted (Ctrl-C).", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        # the reader went away (`glm52 info | head`): what it read is what it wanted; send what is
        # still buffered nowhere, so that the interpreter's exit does not fail on it again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process stopped by SIGPIPE


def _main(argv: list[str]) -> int:
    _quiet()
    parser = build_parser()
    dotted = _dashed_key(argv)
    if dotted:
        return _error(argv[0], dotted)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes positionals only before or after all options: `pretrain --resume X a=1`
        # leaves the overrides after the options over. Every other extra is an error.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except Exception as e:
        if not _user_error(e):
            raise
        return _error(args.command, e)
    except BaseException as e:  # a stop signal in setup (KeyboardInterrupt goes on to main)
        from glm52_train.training.stop import SetupStopped

        if not isinstance(e, SetupStopped):
            raise
        print(e.sentence(), file=sys.stderr, flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
