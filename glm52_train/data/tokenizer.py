"""HF `tokenizers` tokenizers, from a local tokenizer.json, in the form Megatron-Core's datasets
expect (`vocab_size`, `eod`, `pad`, `unique_identifiers`)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

from glm52_train.config import ConfigError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    def __init__(self, path: str | Path, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            raise ConfigError(f"tokenizer file {self.path} does not exist.")
        try:
            self.hf = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise ConfigError(f"{self.path} is not a tokenizers JSON file ({e}).") from None
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.eod = self._special(eod_token, EOD_CANDIDATES, "end-of-document")
        self.pad = self._special(None, PAD_CANDIDATES, "padding", required=False)
        if self.pad is None:
            self.pad = -1  # Megatron-Core's "no pad token" value
        self.unique_identifiers = OrderedDict(
            [("class", "glm52_train.Tokenizer"), ("sha256", self.sha256), ("eod", self.eod)]
        )

    def _special(self, explicit, candidates, what, required=True):
        for token in ([explicit] if explicit else list(candidates)):
            token_id = self.hf.token_to_id(token)
            if token_id is not None:
                return token_id
        if required:
            raise ConfigError(
                f"tokenizer {self.path} has no {what} token (looked for {', '.join(candidates)}); "
                "pass --eod-token."
            )
        return None

    def tokenize(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts, vocab_size: int, out_path: str | Path) -> Path:
    """Train a byte-level BPE on an iterator of texts and save tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
