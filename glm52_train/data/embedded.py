"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs Python has them, so `make train` needs no network and no dataset
download. The tokenizer trained on them (byte-level BPE, 8192 tokens) is committed at
`data/tokenizer/tokenizer.json`; `python -m glm52_train.data.embedded --retrain-tokenizer`
rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tokenizer" / "tokenizer.json"
VOCAB_SIZE = 8192


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without its test suites, in a stable order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
    return sorted(
        p for p in lib.rglob("*.py") if not (set(p.relative_to(lib).parts[:-1]) & skip)
    )


def iter_texts():
    for path in stdlib_files():
        yield path.read_bytes().decode("utf-8", errors="replace")


def write_corpus(out: str | Path) -> Path:
    """Write the corpus to the file `out` as JSON lines ({"text", "path"} per source file).
    `glm52 prepare-data --embedded` writes it beside its output (PREFIX.embedded.jsonl)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for path in stdlib_files():
            text = path.read_bytes().decode("utf-8", errors="replace")
            f.write(json.dumps({"text": text, "path": str(path.relative_to(lib))}) + "\n")
    tmp.replace(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--retrain-tokenizer", action="store_true")
    args = parser.parse_args(argv)
    if args.retrain_tokenizer:
        from glm52_train.data.tokenizer import train_bpe

        print(f"training a {VOCAB_SIZE}-token byte-level BPE on {len(stdlib_files())} files")
        print(train_bpe(iter_texts(), VOCAB_SIZE, TOKENIZER))


if __name__ == "__main__":
    main()
