"""Bytes per token that each decoder layer (and the MTP layer) of `tiny` saves for backward,
counted with saved-tensor hooks during one forward on the DSA kernels (run by
tests/test_plan.py with TRITON_INTERPRET=1). Prints one JSON line: {recompute modules: {layer:
bytes per token}, "full": {"decoder": bytes per token of the whole decoder under full
recomputation}}. Parameters are not activations and are left out; a storage saved by
several operations counts once, for the layer that saved it first; a storage freed by an
output-discarding checkpoint counts at its size when the forward ends (0)."""

from __future__ import annotations

import json
import warnings

import torch

warnings.filterwarnings("ignore")


def _tiny(recompute: str | None, modules=()):
    """(config, model, storage pointers of its parameters): `tiny` on the DSA kernels under
    `recompute` (None, "selective" with `modules`, "full")."""
    from glm52_train import parallel
    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model
    from glm52_train.run_config import RunConfig

    m = get_model_config("tiny")
    run = RunConfig()
    run.dsa.backend = "triton"
    run.train.recompute = recompute
    if modules:
        run.train.recompute_modules = modules
    parallel.initialize(seed=1)
    model = build_model(m, run)
    return m, model, {p.untyped_storage().data_ptr() for p in model.parameters()}


def _forward(m, model, pack, batch: int, seq: int):
    """One training forward (loss with labels) with `pack` as the saved-tensor hook."""
    tokens = torch.randint(0, m.vocab_size, (batch, seq))
    position = torch.arange(seq).expand(batch, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return model(tokens, position, None, labels=tokens, loss_mask=torch.ones(batch, seq))


def measure(modules: list[str], batch: int, seq: int) -> dict:
    m, model, params = _tiny("selective" if modules else None, modules)
    current, saved = [None], {}

    def pack(t):
        if current[0] is not None and t.untyped_storage().data_ptr() not in params:
            saved.setdefault(current[0], []).append(t)
        return t

    def enter(key):
        return lambda module, args: current.__setitem__(0, key)

    def leave(module, args, output):
        current[0] = None

    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(enter(str(i)))
        layer.register_forward_hook(leave)
    layer = model.mtp.layers[0]  # the whole MTP layer: its norms, projection, decoder layer, final norm
    layer.register_forward_pre_hook(enter("None"))
    layer.register_forward_hook(leave)
    out = _forward(m, model, pack, batch, seq)
    seen, result = set(), {"batch": batch}
    for key in ["0", "1", "2", "3", "None"]:
        total = 0
        for t in saved.get(key, []):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        result[key] = total / (batch * seq)
    del out
    return result


def measure_full(batch: int, seq: int) -> dict:
    """Bytes per token the decoder layers of `tiny` save under full recomputation (Megatron-Core's
    uniform recompute, one layer per unit): each layer's checkpoint keeps its inputs."""
    m, model, params = _tiny("full")
    inside, saved = [False], {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params:
            saved.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    # from the decoder's start to its final norm (which the planner counts with the loss): the
    # checkpoints save their inputs after their layers' own hooks have run
    model.decoder.register_forward_pre_hook(lambda module, args: inside.__setitem__(0, True))
    model.decoder.final_layernorm.register_forward_pre_hook(lambda module, args: inside.__setitem__(0, False))
    _forward(m, model, pack, batch, seq)
    return {"batch": batch, "decoder": sum(saved.values()) / (batch * seq)}


if __name__ == "__main__":
    from glm52_train.kernels import api

    api.enable_interpreter()
    result = {",".join(mods): measure(mods, batch=1, seq=48) for mods in ([], ["mla_up_proj"])}
    result["full"] = measure_full(batch=1, seq=48)
    print(json.dumps(result))
