"""Checkpoints you can trust: content checksums checked while reading, no silent fallback, a model
that does not match, non-finite weights, a disk that fills during a save, asynchronous saves equal
to synchronous ones, and export-hf's output folder. In one process on the tiny model (the
end-to-end runs are in tests/test_checkpoint_runs.py)."""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import signal
import stat

import pytest
import torch

from glm52_train import checkpoint
from glm52_train.cli import main as glm52
from glm52_train.config import get_model_config


@pytest.fixture
def tiny(single_process):
    from glm52_train.model.build import build_model

    return build_model(get_model_config("tiny"))


def _save(root, iteration, model, **kw):
    return checkpoint.save_checkpoint(root, iteration, [model],
                                      meta={"kind": "weights", "model": get_model_config("tiny").to_dict()}, **kw)


def _flip_a_byte(folder) -> str:
    """Flip one bit in the middle of the largest data file (same size): returns its name."""
    data = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    return data.name


def _dcp_tensors(folder) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / (folder.name + ".pt")
    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)


def test_flipped_byte_is_named_and_fallback_is_loud(tiny, tmp_path, capsys):
    """A bit flipped in a data file (size unchanged) of the newest checkpoint: loading stops with
    one sentence naming the file and the iteration (export-hf exits 2 with it), or, when falling
    back is allowed, says which checkpoint is damaged and which one it uses instead."""
    root = tmp_path / "ckpt"
    _save(root, 1, tiny)
    newest = _save(root, 2, tiny)
    manifest = checkpoint.read_meta(newest)["files"]
    assert all(len(info["xxh3_64"]) == 16 for info in manifest.values()), manifest
    name = _flip_a_byte(newest)
    checkpoint.verify_checkpoint(newest)  # sizes agree: only the content check can see it

    load = lambda f: checkpoint.load_checkpoint(f, [tiny])  # noqa: E731
    with pytest.raises(checkpoint.CheckpointDamaged) as err:
        checkpoint.load_newest(root, load)
    assert str(err.value).startswith(f"checkpoint {newest} (iteration 2) is damaged: {name} does not match its "
                                     f"checksum (xxh3_64 ")
    assert "An older checkpoint exists (iter_0000001)" in str(err.value) and "\n" not in str(err.value)

    warnings = []
    used, _ = checkpoint.load_newest(root, load, "fallback", warnings.append)
    assert used.name == "iter_0000001"
    assert len(warnings) == 1 and warnings[0].startswith(f"WARNING: checkpoint {newest} (iteration 2) is damaged: {name}")
    assert warnings[0].endswith(f"Falling back to the previous checkpoint, {root / 'iter_0000001'} (on_damaged=fallback).")

    capsys.readouterr()
    assert glm52(["export-hf", "--ckpt", str(root), "--out", str(tmp_path / "hf")]) == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text.startswith(f"glm52 export-hf: error: checkpoint {newest} (iteration 2) is damaged: {name}")
    assert not (tmp_path / "hf").exists()
    assert glm52(["export-hf", "--ckpt", str(root), "--out", str(tmp_path / "hf"), "--on-damaged", "fallback"]) == 0
    out = capsys.readouterr()
    assert "WARNING: checkpoint" in out.err and "Falling back" in out.err
    assert f"exported iteration 1 ({root / 'iter_0000001'})" in out.out


def test_export_hf_shards_are_readable_and_replace_earlier_ones(tiny, tmp_path, capsys):
    root = tmp_path / "ckpt"
    _save(root, 3, tiny)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00009.safetensors").write_bytes(b"an earlier export")
    (out / "part-00003-00000.safetensors").write_bytes(b"a crashed export")
    old_umask = os.umask(0o022)
    try:
        assert glm52(["export-hf", "--ckpt", str(root), "--out", str(out), "--max-shard-gb", "0.004"]) == 0
    finally:
        os.umask(old_umask)
    text = capsys.readouterr().out
    assert "removed 2 shard(s) of an earlier export" in text and "exported iteration 3" in text
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    for s in shards:
        assert stat.S_IMODE((out / s).stat().st_mode) == 0o644, s


def test_model_that_does_not_match_is_one_sentence(tiny, tmp_path):
    from glm52_train.model.build import build_model

    folder = _save(tmp_path / "ckpt", 1, tiny)
    other = build_model(dataclasses.replace(get_model_config("tiny"), dense_ffn_size=256))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_checkpoint(folder, [other])
    assert str(err.value) == (f"checkpoint {folder} (iteration 1) does not match the model: "
                              "decoder.layers.0.mlp.linear_fc2.weight is [128, 320] in the checkpoint and "
                              "[128, 256] in the model.")


def test_non_finite_weights_are_refused_naming_the_tensor(tiny, tmp_path):
    with torch.no_grad():
        tiny.decoder.layers[1].mlp.router.weight[0, :3] = float("nan")
    folder = _save(tmp_path / "ckpt", 5, tiny)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_checkpoint(folder, [tiny])
    assert str(err.value) == (f"checkpoint {folder} (iteration 5) holds non-finite weights: "
                              "decoder.layers.1.mlp.router.weight has 3 of 1024 values NaN or infinite; "
                              "refusing to start from it (pick an earlier checkpoint).")


def test_disk_full_during_a_save_keeps_the_last_good_checkpoint(tiny, tmp_path):
    """The file system refuses the writes: here through the kernel's per-process file size limit
    (RLIMIT_FSIZE, what `ulimit -f` sets, with SIGXFSZ ignored so write() fails with EFBIG), which
    stops a real write in the middle as a full disk would; ENOSPC and EDQUOT take the same path
    with their own words ("the disk is full")."""
    root = tmp_path / "ckpt"
    good = _save(root, 4, tiny)
    limit = 1 << 20  # the tiny model's data files are ~7 MB each
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        with pytest.raises(checkpoint.CheckpointError) as err:
            _save(root, 8, tiny)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    text = str(err.value)
    assert text.startswith(f"a file size limit (ulimit -f) was reached: saving checkpoint iteration 8 in {root} failed "
                           "(File too large); it needs about "), text
    needed = float(re.search(r"it needs about ([\d.]+) MiB", text).group(1))
    written = sum(info["size"] for info in checkpoint.read_meta(good)["files"].values()) / 2**20
    assert abs(needed - written) < 0.05 * written, (needed, written)
    assert text.endswith("are free there. The partial save was removed and the last good checkpoint, "
                         "iter_0000004, is kept."), text
    assert (root / "latest").read_text().strip() == "iter_0000004"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "latest"]
    checkpoint.load_checkpoint(good, [tiny])


def test_asynchronous_save_equals_synchronous_save(tiny, tmp_path):
    """The same state saved both ways: the same tensors, both committed with checksums; the
    asynchronous one is written by a forked process and committed when the queue finalizes it,
    and the state changed after scheduling does not reach it (the fork is a snapshot)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    sync = _save(tmp_path / "sync", 1, tiny)
    queue = AsyncCallsQueue(persistent=False)
    committed = []
    folder = _save(tmp_path / "async", 1, tiny, async_queue=queue, on_commit=committed.append)
    weight = tiny.embedding.word_embeddings.weight
    saved_value = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # training goes on while the write is in flight
    assert not (tmp_path / "async" / "latest").exists() or committed
    queue.maybe_finalize_async_calls(blocking=True)
    assert committed == [folder] and (tmp_path / "async" / "latest").read_text().strip() == "iter_0000001"
    a, b = _dcp_tensors(sync), _dcp_tensors(folder)
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(b["embedding.word_embeddings.weight"], saved_value)
    assert set(checkpoint.read_meta(folder)["files"]) == set(checkpoint.read_meta(sync)["files"])
    with torch.no_grad():
        weight.zero_()
    checkpoint.load_checkpoint(folder, [tiny])
    assert torch.equal(weight, saved_value)
