"""A policy folder's record (DESIGN.md §4): ``config.json`` beside the weights,

    {"schema": "tempflow.policy/1", "kind": "tiny", "model": {...}, "step": 0, "reference": null,
     "identity": "<sha256 of the weights>"}

``kind`` selects the class in :data:`POLICY_KINDS`; ``step`` counts the updates applied; ``reference``
names the policy the KL term is measured against (``null``: the policy is its own reference). Built,
read and validated only here; the weights are written by the policy itself
(:func:`stages.policies.base.save_policy`). A record written before the version key was ``schema``
(``"format": "tempflow.policy/1"``) is read the same.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stages.artifacts.codecs import check_version, is_int, read_json, versioned, write_json
from stages.support.errors import TempflowError

POLICY_SCHEMA = "tempflow.policy/1"
CONFIG_FILE = "config.json"
POLICY_KINDS = {  # kind -> its class, imported when a policy of that kind is loaded
    "tiny": "stages.policies.tiny:TinyPolicy",
    "sd3": "stages.policies.sd3:SD3Policy",
    "flux": "stages.policies.flux:FluxPolicy",
}
_IDENTITY = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class PolicyRecord:
    """The bookkeeping in a policy folder's config.json, beside the weights."""

    kind: str
    model: dict[str, Any]
    step: int = 0
    """Number of GRPO updates applied since ``init``."""
    reference: dict[str, str] | None = None
    """``{"path": ..., "identity": ...}`` of the KL reference policy, the path relative to this
    policy folder; ``None``: this policy itself."""
    identity: str = ""
    """Hash of the weights when saved (recomputed and checked on load)."""


def write_policy_record(folder: Path, record: PolicyRecord) -> None:
    """``folder/config.json`` (the weights are written first, and ``record.identity`` is their hash)."""
    config = versioned(POLICY_SCHEMA, asdict(record))
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_policy_record(path: Path) -> PolicyRecord:
    """The bookkeeping of a policy folder, each field checked: a folder whose config.json was edited
    into another shape is refused, never guessed at."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise TempflowError(f"{path}: not a policy folder (no config.json); create one with `tempflow init`")
    config = read_json(config_path, "a policy config.json written by tempflow")
    check_version(config, POLICY_SCHEMA, config_path, "create the policy with this tempflow (`tempflow init`)")
    if config.get("kind") not in POLICY_KINDS:
        raise TempflowError(f"{config_path}: unknown policy kind {config.get('kind')!r}; known: {', '.join(POLICY_KINDS)}")
    fields = {k: v for k, v in config.items() if k not in ("schema", "format")}
    try:
        record = PolicyRecord(**fields)
    except TypeError as err:
        raise TempflowError(f"{config_path}: unexpected policy fields ({err}); the policy folder is damaged") from None
    problem = _record_problem(record)
    if problem:
        raise TempflowError(f"{config_path}: {problem}; the policy folder is damaged")
    return record


def _record_problem(record: PolicyRecord) -> str | None:
    if not isinstance(record.identity, str) or not _IDENTITY.match(record.identity):
        return f"identity {record.identity!r} is not the sha256 of its weights (every policy folder records one)"
    if not is_int(record.step) or record.step < 0:
        return f"step {record.step!r} is not a count of updates"
    if not isinstance(record.model, dict):
        return "model is not an object"
    ref = record.reference
    if ref is not None and not (isinstance(ref, dict) and isinstance(ref.get("path"), str)
                                and isinstance(ref.get("identity"), str) and _IDENTITY.match(ref["identity"])):
        return f"reference {ref!r} is not {{path, identity}}"
    return None


def record_inputs(record: PolicyRecord) -> tuple[Path, ...]:
    """The folders a policy folder refers to (a real kind's base model), from its record alone."""
    base = record.model.get("base") if isinstance(record.model, dict) else None
    return (Path(base["path"]),) if isinstance(base, dict) and isinstance(base.get("path"), str) else ()


PRETRAIN_SCHEMA = "tempflow.pretrain/1"
PRETRAIN_FILE = "pretrain.json"


def write_pretrain_record(folder: Path, report: dict[str, Any]) -> None:
    """``folder/pretrain.json``: how `tempflow pretrain` made the policy (config, losses, latent scaling)."""
    write_json(Path(folder) / PRETRAIN_FILE, versioned(PRETRAIN_SCHEMA, report))


def read_pretrain_record(folder: Path) -> dict[str, Any] | None:
    """A pretrained policy's ``pretrain.json`` (schema checked), or None when the folder has none."""
    path = Path(folder) / PRETRAIN_FILE
    if not path.is_file():
        return None
    report = read_json(path, "the pretrain.json of `tempflow pretrain`")
    check_version(report, PRETRAIN_SCHEMA, path, "pretrain it again with this tempflow", legacy_unversioned=True)
    return report
