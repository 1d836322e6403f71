"""A recommender model folder (`tempflow rec pretrain` / `rec train`): ``model.safetensors`` (the
transformer's weights), ``config.json`` (schema, item count, model config, how it was trained) and
``metrics.json`` (the training's losses and validation metrics); and the JSON file `rec eval`
writes. Built, read and validated only here; the model itself is :mod:`stages.recsys.model`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from stages.artifacts.codecs import check_version, is_int, load_safetensors, read_json, versioned, write_json
from stages.support.errors import TempflowError

# safetensors' writer is imported where a model is written, for start-up time.

REC_MODEL_SCHEMA = "tempflow.recsys.model/1"
REC_METRICS_SCHEMA = "tempflow.recsys.metrics/2"
REC_EVAL_SCHEMA = "tempflow.recsys.eval/2"
# 2: metrics over all targets beside click and purchase, the protocol, every target's rank; a
# training's validation score per epoch and its selected_epoch
MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"


def write_rec_model(out: Path, weights: dict[str, Tensor], n_items: int, model: dict[str, Any],
                    record: dict[str, Any], metrics: dict[str, Any]) -> None:
    """A new model folder ``out``: its weights, its config (``model``: the architecture's config,
    ``record``: how it was trained) and its training's metrics."""
    from safetensors.torch import save_file

    out.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / MODEL_FILE))
    config = {"schema": REC_MODEL_SCHEMA, "n_items": n_items, "model": model, **record}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    write_json(out / METRICS_FILE, versioned(REC_METRICS_SCHEMA, metrics))


def read_rec_model(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A model folder's config (schema checked; ``n_items`` a count, ``model`` an object) and weights."""
    path = Path(folder) / CONFIG_FILE
    record = read_json(path, "the config.json of a `tempflow rec` model")
    check_version(record, REC_MODEL_SCHEMA, path, "give a model folder of `tempflow rec pretrain` or `rec train`")
    if not (is_int(record.get("n_items")) and record["n_items"] >= 1 and isinstance(record.get("model"), dict)):
        raise TempflowError(f"{path}: n_items is not a count or model is not an object; the model folder is damaged")
    return record, load_safetensors(Path(folder) / MODEL_FILE)


def write_rec_eval(path: Path, metrics: dict[str, Any]) -> None:
    """The metrics `tempflow rec eval` writes, with their schema."""
    write_json(path, versioned(REC_EVAL_SCHEMA, metrics))
