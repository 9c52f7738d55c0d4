"""Looking at a checkpoint: its LM loss on a dataset (`glm52 eval`) and its text (`glm52 generate`).

Both rebuild the model the way training does (the run config saved in the checkpoint, through
`training.setup.build_model_chunks`) in one process and load the checkpoint's weights with
`checkpoint.load_checkpoint` (any training layout: the checkpoint reshards on load). `eval`
runs the training stack's own evaluation (`training.step.evaluate`: Megatron-Core's
forward-only schedule and the training loss function) over batches of a Megatron-Core
GPTDataset, so its loss is the number the training loop reports as `val` for the same samples.
`generate` runs the plain forward once per new token over the whole sequence: no KV cache
(Megatron-Core's inference engine is not used), which is quadratic in the length and fine for
small models and short texts, not a serving path.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from glm52_train import checkpoint, compat, parallel
from glm52_train.config import ConfigError, ModelConfig
from glm52_train.run_config import DataSource, ParallelConfig, RunConfig, _build


def run_config_of(meta: dict) -> RunConfig:
    """The run config a checkpoint was trained with (keys this version does not know are left
    out); for a weights-only checkpoint (init-weights, import-hf) the defaults around its model."""
    if "run" not in meta:
        if "model" not in meta:
            raise checkpoint.CheckpointError("the checkpoint records neither a run config nor a model config.")
        return RunConfig(model=ModelConfig.from_dict(meta["model"]))
    saved = dict(meta["run"])
    known = {}
    for f in dataclasses.fields(RunConfig):
        value = saved.get(f.name)
        if value is None:
            continue
        if f.name != "model" and isinstance(value, dict) and dataclasses.is_dataclass(f.default_factory()):
            names = {g.name for g in dataclasses.fields(f.default_factory())}
            value = {k: v for k, v in value.items() if k in names}
        known[f.name] = value
    cfg = _build(RunConfig, {k: v for k, v in known.items() if k != "model"}, "")
    cfg.model = ModelConfig.from_dict(saved["model"]) if isinstance(saved.get("model"), dict) else saved["model"]
    return cfg


@dataclass
class Loaded:
    """A checkpoint's model in one process, ready to run: its chunks (one, PP=1), the run config
    it was trained with (with the changes the command asked for), the folder and its iteration."""

    cfg: RunConfig
    chunks: list
    path: Path
    iteration: int

    @property
    def model(self):
        return self.chunks[0]


def load(ckpt: str, **changes) -> Loaded:
    """Build the model of checkpoint `ckpt` (a folder, or a root whose newest is taken) and load
    its weights. `changes` are section -> {field: value} applied to the saved run config (e.g.
    the data to evaluate). It runs in one process (TP=PP=EP=CP=DP=1), refusing torchrun's."""
    from glm52_train.training.setup import build_model_chunks

    if parallel.world_size_from_env() > 1:
        raise ConfigError("eval and generate run in one process: start them directly, not under torchrun.")

    def build(folder: Path):
        meta = checkpoint.verify_checkpoint(folder)
        cfg = run_config_of(meta)
        cfg.parallel = ParallelConfig()
        for section, values in changes.items():
            for key, value in values.items():
                setattr(getattr(cfg, section), key, value)
        parallel.initialize(cfg.parallel, seed=cfg.train.seed)
        chunks, config = build_model_chunks(cfg.model_config(), cfg)
        checkpoint.load_checkpoint(folder, chunks)
        if cfg.use_bf16():
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(config, c) for c in chunks]
        for c in chunks:
            c.eval()
        return Loaded(cfg, chunks, folder, int(meta["iteration"]))

    return checkpoint.load_newest(ckpt, build)[1]


# ---- eval -----------------------------------------------------------------------------------

@dataclass
class EvalResult:
    checkpoint: str
    iteration: int
    data: str
    split: str
    documents: tuple[int, int]  # the evaluated split's documents [first, last)
    batches: int
    micro_batch_size: int
    seq_length: int
    tokens: int  # predicted positions (batches x sequences x sequence length)
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "perplexity": self.perplexity}

    def describe(self) -> str:
        first, last = self.documents
        return (f"loss {self.loss:.4f} | perplexity {self.perplexity:.2f} | {self.batches} batches x "
                f"{self.micro_batch_size} sequences x {self.seq_length} tokens ({self.tokens:,} tokens) | "
                f"{self.checkpoint} (iteration {self.iteration}) on {self.data} (split {self.split}: documents "
                f"{first}-{last - 1})")


def check_split(split: str) -> None:
    """Refuse a --split that is not three non-negative weights, not all zero."""
    try:
        weights = [float(p) for p in split.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0 or not all(map(math.isfinite, weights)):
        raise ConfigError(f"--split {split!r} is not three weights 'train,validation,test' (not all zero), "
                          f"e.g. '0,100,0'.")


def evaluate_checkpoint(ckpt: str, data: str, iters: int = 10, micro_batch_size: int | None = None,
                        split: str = "0,100,0", seq_length: int | None = None,
                        tokenizer: str | None = None) -> EvalResult:
    """The LM loss (token-weighted mean cross-entropy) of checkpoint `ckpt` over `iters` batches
    of the validation part of `split` over dataset `data` (default: every document), in the
    order and with the seed the training loop validates with. The batches are this many
    sequences of the run's sequence length; samples past the end of the part start it again
    (Megatron-Core's epochs)."""
    from glm52_train.data.loader import check_data, dataloader, split_bounds
    from glm52_train.data.prepare import read_dataset_meta
    from glm52_train.data.tokenizer import Tokenizer
    from glm52_train.training.step import evaluate

    if iters < 1:
        raise ConfigError(f"--iters must be at least 1, got {iters}.")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be at least 1, got {micro_batch_size}.")
    if seq_length is not None and seq_length < 1:
        raise ConfigError(f"--seq-length must be at least 1, got {seq_length}.")
    check_split(split)  # before anything is read
    documents = read_dataset_meta(data)["documents"]
    first, last = split_bounds(split, documents)[1]  # the validation part
    if last <= first:
        raise ConfigError(f"--split {split} leaves no document of {data} ({documents} documents) to evaluate on; "
                          f"give its validation part a larger share, e.g. --split 0,100,0 for all of them.")
    with tempfile.TemporaryDirectory(prefix="glm52-eval-") as cache:  # the sample index: nothing left beside the data
        data_changes = {"blend": [DataSource(data, 1.0)], "split": split, "cache_dir": cache}
        if seq_length:
            data_changes["seq_length"] = seq_length
        if tokenizer:
            data_changes["tokenizer"] = tokenizer
        train_changes = {"micro_batch_size": micro_batch_size} if micro_batch_size else {}
        run = load(ckpt, data=data_changes, train=train_changes)
        cfg = run.cfg
        mbs = cfg.train.micro_batch_size
        cfg.train.global_batch_size = mbs
        if cfg.data.seq_length > cfg.model_config().max_position_embeddings:
            raise ConfigError(f"--seq-length {cfg.data.seq_length} is beyond the model's "
                              f"{cfg.model_config().max_position_embeddings} positions.")
        tok = Tokenizer(cfg.data.tokenizer)
        check_data(cfg, cfg.model_config(), tok)
        loss = evaluate(cfg, iter(dataloader(_validation_part(cfg, tok, iters * mbs), 0, mbs)), run.chunks,
                        1, iters)
    return EvalResult(str(run.path), run.iteration, data, split, (first, last), iters, mbs,
                      cfg.data.seq_length, iters * mbs * cfg.data.seq_length, loss)


def _validation_part(cfg: RunConfig, tok, samples: int):
    """The validation part of the run's split, as training builds it (same documents, seed and
    order); the training and test parts are not built."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from glm52_train.data.loader import dataset_config

    config = dataset_config(cfg, tok)
    config.split_matrix = [None, config.split_matrix[1], None]
    return BlendedMegatronDatasetBuilder(GPTDataset, [0, samples, 0], lambda: True, config).build()[1]


# ---- generate -------------------------------------------------------------------------------

@dataclass
class Generated:
    prompt: str
    text: str  # the new text alone
    prompt_tokens: list[int]
    tokens: list[int]  # the new tokens
    stopped: str  # "end-of-document" or "max-new-tokens"
    checkpoint: str
    iteration: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """Greedy (temperature 0: the first largest logit) or sampled from softmax(logits / T),
    restricted to the `top_k` largest logits when top_k > 0."""
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(ckpt: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             seed: int = 1234, tokenizer: str | None = None) -> Generated:
    """Continue `prompt` with checkpoint `ckpt`'s model and the run's tokenizer (`tokenizer`
    overrides it), stopping at the end-of-document token or after `max_new_tokens`.

    Each new token runs the whole sequence through the model again (no KV cache): simple and
    exact, quadratic in the length; the DSA indexer then selects among all positions so far, so
    a sequence shorter than the top-k attends to everything, as in training."""
    from glm52_train.data.tokenizer import Tokenizer

    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}.")
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ConfigError(f"--temperature must be 0 (greedy) or more, got {temperature}.")
    if top_k < 0:
        raise ConfigError(f"--top-k must be 0 (every token) or more, got {top_k}.")
    run = load(ckpt, data={"tokenizer": tokenizer} if tokenizer else {})
    tok = Tokenizer(run.cfg.data.tokenizer)
    model_cfg = run.cfg.model_config()
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model only {model_cfg.vocab_size} "
                          f"embeddings: it is not this model's tokenizer.")
    ids = tok.tokenize(prompt)
    if not ids:
        raise ConfigError("--prompt is empty: give some text to continue.")
    if len(ids) + max_new_tokens > model_cfg.max_position_embeddings:
        raise ConfigError(f"the prompt's {len(ids)} tokens and --max-new-tokens {max_new_tokens} exceed the model's "
                          f"{model_cfg.max_position_embeddings} positions.")
    device = compat.default_device()
    generator = torch.Generator().manual_seed(seed)
    new, stopped = [], "max-new-tokens"
    with torch.no_grad():
        for _ in range(max_new_tokens):
            seq = torch.tensor([ids + new], dtype=torch.long, device=device)
            positions = torch.arange(seq.shape[1], device=device).unsqueeze(0)
            logits = run.model(seq, positions, None)[0, -1]
            token = next_token(logits, temperature, top_k, generator)
            if token == tok.eod:
                stopped = "end-of-document"
                break
            new.append(token)
    return Generated(prompt, tok.detokenize(new), ids, new, stopped, str(run.path), run.iteration)
