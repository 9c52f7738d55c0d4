"""GLM-5's recipe on tiny, as the README writes it: dense pretraining, then the DSA warm-up
(`--init-from` the dense stage), then sparse training (`--init-from` the warm-up), a few steps
each. The dense stage does no indexer work and leaves the indexer weights as initialised; the
warm-up trains the indexers only; sparse training trains everything."""

from __future__ import annotations

import pytest
import torch

from tests.test_readme import readme_commands, run_readme_command, workspace  # noqa: F401 (fixture)
from tests.train_helpers import metrics

pytestmark = pytest.mark.slow


def _weights(root):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (folder,) = [p for p in root.glob("iter_*") if p.is_dir()]
    out = root / "weights.pt"
    dcp_to_torch_save(str(folder), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k
            and k.split(".")[0] in ("embedding", "decoder", "mtp", "output_layer")}


def test_dense_warmup_sparse_chain_runs_as_written(workspace):  # noqa: F811
    commands = [c for c in readme_commands() if "configs/stages/" in c]
    assert [c.split("configs/stages/")[1].split()[0] for c in commands] == \
        ["1_dense.yaml", "2_dsa_warmup.yaml", "3_sparse.yaml"]
    assert "--init-from checkpoints/stages/dense" in commands[1]
    assert "--init-from checkpoints/stages/warmup" in commands[2]
    stages = ("dense", "warmup", "sparse")
    weights = {}
    for command, stage in zip(commands, stages):
        run_readme_command(f"{command} train.log_interval=1", workspace)
        steps = [m for m in metrics(workspace / "runs" / "stages" / stage) if m.get("loss") is not None]
        assert [m["step"] for m in steps] == [1, 2]
        kl = [m.get("indexer_kl") for m in steps]
        assert all(k is None for k in kl) if stage == "dense" else all(k is not None and k > 0 for k in kl)
        weights[stage] = _weights(workspace / "checkpoints" / "stages" / stage)
    names = set(weights["dense"])
    indexer = {n for n in names if ".indexer." in n}
    assert indexer and names == set(weights["warmup"]) == set(weights["sparse"])

    def changed(a, b, subset):
        return {n for n in subset if not torch.equal(weights[a][n], weights[b][n])}

    assert changed("dense", "warmup", names - indexer) == set()  # the warm-up trains the indexers only
    assert changed("dense", "warmup", indexer) == indexer
    assert changed("warmup", "sparse", names) - indexer  # sparse training trains the model
