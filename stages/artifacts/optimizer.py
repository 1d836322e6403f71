"""A policy's optimizer state, written by `tempflow update` beside the weights it trained:
``optimizer.safetensors`` (AdamW's moments, by parameter name) and ``optimizer.json`` (schema,
optimizer type, parameter names, hyper-parameters). Never pickled; built, read and validated only
here. An ``optimizer.json`` written before it carried a schema is read as this one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from stages.artifacts.codecs import check_version, load_safetensors, read_json, versioned, write_json
from stages.support.errors import TempflowError

# safetensors' writer is imported where the state is written, for start-up time.

OPTIMIZER_SCHEMA = "tempflow.optimizer/1"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


def save_optimizer(optimizer: torch.optim.Optimizer, names: list[str], folder: Path) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{names[i]}/{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
    save_file(tensors, folder / OPTIMIZER_TENSORS)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    write_json(folder / OPTIMIZER_JSON, versioned(OPTIMIZER_SCHEMA, {"type": type(optimizer).__name__, "params": names,
                                                                   "param_groups": groups}))


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], folder: Path) -> bool:
    """Restore AdamW moments saved by a previous update; False when the folder has none. Every
    tensor is checked against its parameter (name, shape, finite values) before it is used."""
    if not ((folder / OPTIMIZER_JSON).exists() or (folder / OPTIMIZER_TENSORS).exists()):
        return False
    damaged = f"{folder}: optimizer state is damaged; restore the policy folder or delete {OPTIMIZER_JSON} to start AdamW afresh"
    try:
        info = read_json(folder / OPTIMIZER_JSON, "the optimizer state written by `tempflow update`")
        tensors = load_safetensors(folder / OPTIMIZER_TENSORS)
    except TempflowError as err:
        raise TempflowError(f"{damaged} ({err})") from None
    check_version(info, OPTIMIZER_SCHEMA, folder / OPTIMIZER_JSON, f"delete {OPTIMIZER_JSON} to start AdamW afresh",
                  legacy_unversioned=True)
    if not isinstance(info, dict) or info.get("params") != names:
        raise TempflowError(f"{folder}: optimizer state does not match the model's parameters; the policy folder is damaged")
    params = dict(zip(names, (p for group in optimizer.param_groups for p in group["params"])))
    state: dict[int, dict[str, Tensor]] = {}
    for flat, value in tensors.items():
        name, _, slot = flat.rpartition("/")
        if name not in params or slot not in ("step", "exp_avg", "exp_avg_sq"):
            raise TempflowError(f"{damaged} ({flat} names no moment of a parameter)")
        expected = () if slot == "step" else tuple(params[name].shape)
        if tuple(value.shape) != expected:
            raise TempflowError(f"{damaged} ({flat}: {tuple(value.shape)} does not fit the parameter)")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise TempflowError(f"{damaged} ({flat} holds non-finite or non-float values)")
        state.setdefault(names.index(name), {})[slot] = value
    incomplete = [names[i] for i, slots in state.items() if set(slots) != {"step", "exp_avg", "exp_avg_sq"}]
    if incomplete:
        raise TempflowError(f"{damaged} ({incomplete[0]} lacks some of step, exp_avg, exp_avg_sq)")
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return True
