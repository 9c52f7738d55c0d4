"""Data preparation: text -> .bin/.idx round trip, blends, and one clear error per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glm52_train.cli import main as glm52
from glm52_train.config import ConfigError, get_model_config
from glm52_train.data.prepare import prepare_data, read_dataset_meta
from glm52_train.data.tokenizer import Tokenizer
from tests.conftest import TOKENIZER


def _docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_round_trip_json_parquet_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "", "import os  # ünïcode\n"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": ["x = [1, 2, 3]\n", "y = {'k': None}\n"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("while True:\n    break\n")
    prefix = str(tmp_path / "out" / "ds")
    assert glm52(["prepare-data", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"),
                  str(tmp_path / "c.txt"), "--output-prefix", prefix, "--tokenizer", TOKENIZER,
                  "--workers", "2"]) == 0
    tok = Tokenizer(TOKENIZER)
    expected = [tok.tokenize(t) + [tok.eod] for t in texts if t]
    expected += [tok.tokenize(t) + [tok.eod] for t in ["x = [1, 2, 3]\n", "y = {'k': None}\n"]]
    expected += [tok.tokenize("while True:\n    break\n") + [tok.eod]]
    assert _docs(prefix) == expected
    meta = read_dataset_meta(prefix)
    assert meta["documents"] == 6 and meta["tokens"] == sum(map(len, expected))
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["dtype"] == "uint16"
    assert tok.detokenize(expected[0][:-1]) == texts[0]


def _single_token_corpus(path: Path, text: str, docs: int) -> Path:
    path.write_text("".join(json.dumps({"text": text * 50}) + "\n" for _ in range(docs)))
    return path


def test_blend_weights_are_honoured(tmp_path, single_process):
    from glm52_train.data.loader import build_datasets
    from glm52_train.run_config import DataSource, RunConfig

    tok = Tokenizer(TOKENIZER)
    prefixes = []
    for name, text in (("a", "alpha "), ("b", "beta ")):
        src = _single_token_corpus(tmp_path / f"{name}.jsonl", text, 40)
        prefixes.append(str(tmp_path / name))
        prepare_data([str(src)], prefixes[-1], TOKENIZER, workers=1)
    vocab = {name: set(sum(_docs(prefix), [])) - {tok.eod} for name, prefix in zip("ab", prefixes)}
    common = vocab["a"] & vocab["b"]  # e.g. the space token
    vocab = {name: ids - common for name, ids in vocab.items()}
    assert vocab["a"] and vocab["b"]
    marker = {t: name for name, ids in vocab.items() for t in ids}
    cfg = RunConfig()
    cfg.data.blend = [DataSource(prefixes[0], 0.8), DataSource(prefixes[1], 0.2)]
    cfg.data.seq_length = 32
    cfg.data.split = "100,0,0"
    cfg.data.cache_dir = str(tmp_path / "cache")
    train, _ = build_datasets(cfg, tok, 1000, 0)
    counts = {"a": 0, "b": 0}
    for i in range(1000):
        tokens = set(train[i]["tokens"].tolist())
        source = {marker[t] for t in tokens if t in marker}
        assert len(source) == 1
        counts[source.pop()] += 1
    assert abs(counts["a"] / 1000 - 0.8) < 0.02
    # deterministic: the same config gives the same order
    again, _ = build_datasets(cfg, tok, 1000, 0)
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 1000, 97))


@pytest.fixture
def small_dataset(tmp_path):
    src = _single_token_corpus(tmp_path / "s.jsonl", "some text here ", 20)
    prefix = str(tmp_path / "s")
    prepare_data([str(src)], prefix, TOKENIZER, workers=1)
    return prefix


def test_truncated_bin_is_one_sentence(small_dataset):
    bin_file = Path(small_dataset + ".bin")
    bin_file.write_bytes(bin_file.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="truncated or from different runs") as err:
        read_dataset_meta(small_dataset)
    assert "\n" not in str(err.value)


def test_corrupt_idx_is_one_sentence(small_dataset):
    Path(small_dataset + ".idx").write_bytes(b"not an index at all" * 10)
    with pytest.raises(ConfigError, match=r"\.idx is truncated or corrupt"):
        read_dataset_meta(small_dataset)


def test_missing_files_and_tokenizer_mismatch(small_dataset, tmp_path):
    from glm52_train.data.loader import check_data
    from glm52_train.data.tokenizer import train_bpe
    from glm52_train.run_config import DataSource, RunConfig

    cfg = RunConfig()
    cfg.data.blend = [DataSource(small_dataset)]
    model = get_model_config("tiny")
    check_data(cfg, model, Tokenizer(TOKENIZER))  # the matching tokenizer passes

    other = train_bpe(["another tokenizer entirely " * 20], 300, tmp_path / "other" / "tokenizer.json")
    with pytest.raises(ConfigError, match="was tokenized with"):
        check_data(cfg, model, Tokenizer(other))
    with pytest.raises(ConfigError, match="only 4096 embeddings"):
        check_data(cfg, model.replace(vocab_size=4096), Tokenizer(TOKENIZER))
    cfg.data.blend = [DataSource(str(tmp_path / "nope"))]
    with pytest.raises(ConfigError, match="nope.bin is missing"):
        check_data(cfg, model, Tokenizer(TOKENIZER))


def test_bad_inputs_are_one_sentence(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("a,b\n")
    assert glm52(["prepare-data", "--input", str(tmp_path / "x.csv"), "--output-prefix",
                  str(tmp_path / "o"), "--tokenizer", TOKENIZER]) == 2
    assert "unsupported file type '.csv'" in capsys.readouterr().err
    (tmp_path / "y.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    assert glm52(["prepare-data", "--input", str(tmp_path / "y.jsonl"), "--output-prefix",
                  str(tmp_path / "o"), "--tokenizer", TOKENIZER]) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("glm52 ")]
    assert len(errors) == 1 and "no 'text' field (fields: content)" in errors[0]


def _stderr_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("glm52 ")]


def test_bad_rows_are_counted_reported_and_refused_past_a_share(tmp_path, capsys):
    rows = [{"text": "def f(): pass\n"}, {"text": 5}, {"other": 1}, {"text": None},
            {"text": ["not", "text"]}, {"text": "x = 1\n"}]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "out" / "ds"
    args = ["prepare-data", "--input", str(src), "--output-prefix", str(prefix), "--tokenizer", TOKENIZER,
            "--workers", "1"]
    assert glm52(args) == 2  # 4 of 6 bad, over the default share of 0.01
    errors = _stderr_errors(capsys.readouterr().err)
    assert errors == [f"glm52 prepare-data: error: 4 of 6 rows of {src} without a string 'text' (rows 2, 3, "
                      "4, 5): more than --max-bad-share 0.01 of the rows; fix the input, pass the right "
                      "--text-key, or raise --max-bad-share."]
    assert not (tmp_path / "out").exists() or sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf-datasets-cache"]

    assert glm52(args + ["--max-bad-share", "0.7"]) == 0
    err = capsys.readouterr().err
    assert f"skipped 4 of 6 rows of {src} without a string 'text' (rows 2, 3, 4, 5)" in err
    tok = Tokenizer(TOKENIZER)
    assert _docs(str(prefix)) == [tok.tokenize(t) + [tok.eod] for t in ("def f(): pass\n", "x = 1\n")]
    assert json.loads(Path(f"{prefix}.json").read_text())["skipped_rows"] == 4
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_token_ids_beyond_the_vocabulary_in_the_bin_are_refused(small_dataset):
    """The sidecar says the ids fit; the .bin says otherwise: the .bin wins, at open time."""
    from glm52_train.data.loader import check_data
    from glm52_train.run_config import DataSource, RunConfig

    bin_file = Path(small_dataset + ".bin")
    data = bytearray(bin_file.read_bytes())
    data[20:22] = np.array([9000], dtype=np.uint16).tobytes()  # tiny has 8192 embeddings
    bin_file.write_bytes(bytes(data))
    cfg = RunConfig()
    cfg.data.blend = [DataSource(small_dataset)]
    with pytest.raises(ConfigError) as err:
        check_data(cfg, get_model_config("tiny"), Tokenizer(TOKENIZER))
    assert str(err.value) == (f"dataset {small_dataset} holds token id 9000 in its .bin, beyond model 'tiny''s "
                              "8192 embeddings (ids 0-8191).")


def test_embedded_corpus_is_written_under_the_output_prefix_only(tmp_path, capsys):
    """`--embedded` writes its intermediate file as PREFIX.embedded.jsonl, not into the package;
    a failure leaves no .bin.tmp behind. (A missing --text-key fails right after reading the
    corpus, before the minutes of tokenizing.)"""
    import glm52_train

    package_data = Path(glm52_train.__file__).resolve().parents[1] / "data"
    before = {p: p.stat().st_mtime_ns for p in package_data.rglob("*") if p.is_file() and "cache" not in p.parts}
    cache = package_data / "cache"
    cache_before = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    prefix = tmp_path / "mine" / "corpus"
    assert glm52(["prepare-data", "--embedded", "--output-prefix", str(prefix), "--tokenizer", TOKENIZER,
                  "--text-key", "body", "--workers", "1"]) == 2
    errors = _stderr_errors(capsys.readouterr().err)
    assert len(errors) == 1 and "no 'body' field (fields: text, path)" in errors[0]
    written = Path(f"{prefix}.embedded.jsonl")
    from glm52_train.data.embedded import stdlib_files

    assert len(written.read_text().splitlines()) == len(stdlib_files())
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["corpus.embedded.jsonl", "hf-datasets-cache"]
    after = {p: p.stat().st_mtime_ns for p in package_data.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert after == before
    assert (sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []) == cache_before


@pytest.fixture
def twenty_documents(tmp_path):
    """The first 20 documents of the golden corpus: data.split "98,2,0" leaves validation none."""
    from tests.conftest import GOLDEN_CORPUS

    src = tmp_path / "twenty.jsonl"
    src.write_text("".join(Path(GOLDEN_CORPUS).read_text().splitlines(keepends=True)[:20]))
    prefix = str(tmp_path / "twenty")
    prepare_data([str(src)], prefix, TOKENIZER, workers=1)
    return prefix


def test_a_split_without_training_documents_is_one_sentence(twenty_documents):
    from glm52_train.data.loader import split_documents
    from glm52_train.run_config import DataSource, RunConfig
    from glm52_train.training.setup import check_training_data

    assert split_documents("98,2,0", 20) == [20, 0, 0] and split_documents("90,10,0", 20) == [18, 2, 0]
    cfg = RunConfig()
    cfg.data.blend = [DataSource(twenty_documents)]
    cfg.data.split = "1,99,0"
    with pytest.raises(ConfigError) as err:
        check_training_data(cfg, get_model_config("tiny"), Tokenizer(TOKENIZER))
    assert str(err.value) == f"data.split '1,99,0' leaves dataset {twenty_documents} (20 documents) no training documents."
    cfg.data.split = "0,1,0"
    with pytest.raises(ConfigError, match=r"the training share above 0"):
        check_training_data(cfg, get_model_config("tiny"), Tokenizer(TOKENIZER))


@pytest.mark.slow
def test_an_empty_validation_split_is_skipped_saying_so_not_a_hang(twenty_documents, tmp_path):
    """20 documents under data.split "98,2,0": Megatron-Core would loop forever building the
    empty validation split; the run says validation is skipped and trains."""
    from tests.train_helpers import metrics, pretrain, tiny_run_config

    cfg = tiny_run_config(tmp_path, twenty_documents, data={"split": "98,2,0"},
                          train={"iters": 2, "eval_interval": 1}, optimizer={"warmup_iters": None},
                          logging={"wandb": "disabled"}, checkpoint={"enable": False})
    proc = pretrain(cfg, timeout=180)
    note = (f"validation skipped: data.split '98,2,0' leaves no validation documents in {twenty_documents} "
            f"(20 documents); a larger validation share (e.g. data.split=90,10,0) gives some.")
    assert note in proc.stdout.splitlines()
    logged = metrics(tmp_path / "run")
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    assert not any("val_loss" in m for m in logged)


def test_an_existing_dataset_is_refused_without_overwrite(tmp_path, monkeypatch, capsys):
    """prepare-data never replaces a dataset unasked: the output prefix given, or the default
    one (data/cache/stdlib, the corpus `make train` trains on), is refused in one sentence with
    its files untouched; --overwrite replaces it."""
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "def f(x):\n    return x\n"}) + "\n")
    prefix = str(tmp_path / "out" / "ds")
    args = ["prepare-data", "--input", str(src), "--output-prefix", prefix, "--tokenizer", TOKENIZER, "--workers", "1"]
    assert glm52(args) == 0
    capsys.readouterr()
    before = {s: Path(prefix + s).read_bytes() for s in (".bin", ".idx", ".json")}
    assert glm52(args) == 2
    assert _stderr_errors(capsys.readouterr().err) == [
        f"glm52 prepare-data: error: {prefix} already holds a dataset ({prefix}.bin, .idx, .json); pass "
        "--overwrite to replace it, or give another --output-prefix."]
    assert {s: Path(prefix + s).read_bytes() for s in before} == before
    src.write_text(json.dumps({"text": "import os\n"}) + "\n")
    assert glm52(args + ["--overwrite"]) == 0
    assert _docs(prefix) == [Tokenizer(TOKENIZER).tokenize("import os\n") + [Tokenizer(TOKENIZER).eod]]

    monkeypatch.chdir(tmp_path)  # a checkout whose embedded corpus exists
    (tmp_path / "data" / "cache").mkdir(parents=True)
    for suffix in (".bin", ".idx", ".json"):
        (tmp_path / "data" / "cache" / f"stdlib{suffix}").write_text("mine")
    assert glm52(["prepare-data", "--embedded"]) == 2
    assert _stderr_errors(capsys.readouterr().err) == [
        "glm52 prepare-data: error: data/cache/stdlib (the default --output-prefix) already holds a dataset "
        "(data/cache/stdlib.bin, .idx, .json); pass --overwrite to replace it, or give another --output-prefix."]
    assert sorted(p.name for p in (tmp_path / "data" / "cache").iterdir()) == ["stdlib.bin", "stdlib.idx", "stdlib.json"]
    assert all(p.read_text() == "mine" for p in (tmp_path / "data" / "cache").iterdir())


def test_make_data_builds_a_missing_corpus_and_leaves_an_existing_one(tmp_path):
    """The Makefile's `data` target: on a fresh clone it runs prepare-data (with --overwrite:
    make only gets there when the corpus is missing or older than the tokenizer); when the
    corpus exists, nothing (make's own check of the target file)."""
    import os
    import shutil
    import subprocess
    import time

    from tests.train_helpers import ROOT

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    shutil.copy(TOKENIZER, tmp_path / "data" / "tokenizer" / "tokenizer.json")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to("/bin/true")
    time.sleep(0.01)
    (tmp_path / ".venv" / ".installed").touch()  # set up

    # as a user types it, not as a sub-make of `make test` (which would print its directories)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def make(*args):
        return subprocess.run(["make", *args, "data"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)

    dry = make("-n")
    assert dry.returncode == 0 and dry.stdout.splitlines() == [
        ".venv/bin/glm52 prepare-data --embedded --output-prefix data/cache/stdlib --overwrite"]
    (tmp_path / "data" / "cache").mkdir()
    for suffix in (".bin", ".idx", ".json"):
        (tmp_path / "data" / "cache" / f"stdlib{suffix}").write_text("made")
    assert make("-q").returncode == 0  # up to date: `make data` runs nothing
    os.utime(tmp_path / ".venv" / ".installed")  # a later `make setup` does not re-tokenize either
    assert make("-q").returncode == 0
