"""The rollout (DESIGN.md §4): ``manifest.json``, webdataset shards of samples, the prompts'
embeddings once, and ``timing.json``. Built, read and validated only here.

One sample is one trained transition ``x_k -> x_{k+1}``, stored by what is unique to it:

* ``meta.json``: where it sits (prompt, seed, group, step, branch, sigmas), the sampler's log-prob,
  and how ``x_{k+1}`` was drawn: ``x_{k+1} = mean + std * noise``, the noise a standard normal of
  the seed ``noise_seed`` (:func:`~stages.support.seeds.seeded_normal`), ``next_sha256`` the digest of
  ``x_{k+1}``'s float32 bytes, which every read of it checks;
* ``state.npy`` (``x_k``) and ``mean.npy`` (the SDE step's mean, a function of ``x_k`` alone), held by
  one sample of the branches that share ``x_k`` (its meta says how many others name it in
  ``state_refs``); the others carry neither and name it in ``state_key``. It comes first in shard order;
* ``image.png``: the final image (samples that share one name it in ``image_key``).

The ``K`` branches of one ``x_k`` thus store ``x_k`` and the mean once, instead of ``x_k`` and
``x_{k+1}`` ``K`` times each. A :class:`Rollout` holds its shards open, so a stage trains on exactly
the bytes whose sha256 it checked, and checks every sample at least at the header level (arrays of
the manifest's shape and size, 8-bit RGB images of its resolution, the state links) whether or not
the stage reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts.codecs import (
    MAX_IMAGE_PIXELS,
    NPY_HEADER_BYTES,
    PNG_HEADER_BYTES,
    check_version,
    decode_npy,
    decode_png,
    is_int,
    is_number,
    loads_json,
    npy_bytes,
    npy_header,
    png_bytes,
    png_header,
    sha256_file,
    sha256_handle,
    short,
    versioned,
    write_json,
)
from stages.artifacts.rollout_config import RolloutConfig
from stages.artifacts.shards import KEY, HashingReader, ShardSample, ShardWriter, allow_open_files, iter_shard
from stages.flow import inclusion_probabilities
from stages.support.dtypes import DTYPES
from stages.support.errors import TempflowError
from stages.support.seeds import seeded_normal

# safetensors is imported where the embeddings are written or read, for start-up time.

ROLLOUT_SCHEMA = "tempflow.rollout/5"
# 2: prompt embeddings, sampling settings and dtype; 3: trained_steps (was branch_steps) and their
# step_inclusion chances, decodes; 4: step_spread, the drawing weights of --branch-steps spread:N;
# 5: x_k and the SDE mean once per branch group (state_key, state_refs), x_{k+1} from its noise seed
# (noise_seed, std, next_sha256) instead of next.npy
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
"""Each prompt's conditioning once (``prompt.NAME``, one row per manifest prompt) and the negative
prompt's (``negative.NAME``, one row) when guidance uses one; float32."""
TIMING_FILE = "timing.json"
"""A rollout's wall time, ``{"seconds": S}`` (sampling and writing), beside the manifest and not in it, so
that a rerun of the same config gives the same manifest bytes. Nothing checks or hashes it."""
SAMPLE_FIELDS = ("meta.json", "state.npy", "mean.npy", "image.png")
STATE_FIELDS = ("state.npy", "mean.npy")
"""What the sample holding a branch group's ``x_k`` carries (and the others do not)."""
META_FIELDS = ("prompt", "prompt_index", "seed", "group", "step", "branch", "sigma", "sigma_next", "log_prob", "algo",
               "noise_seed", "std", "next_sha256")
MANIFEST_FIELDS = ("shards", "samples", "config", "policy", "nfe", "prompts", "sigmas", "sample_shape", "sampling",
                   "embeddings", "dtype", "trained_steps", "step_inclusion", "step_spread", "decodes")
HEAD_BYTES = {"state.npy": NPY_HEADER_BYTES, "mean.npy": NPY_HEADER_BYTES, "image.png": PNG_HEADER_BYTES}
"""What is read of a field a stage does not use: enough for its header, which is checked all the same."""
MAX_STATE_ELEMENTS = 1 << 26
"""Largest state a rollout may declare (64M float32 values, 256 MiB per array)."""
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.tar$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def seed_group(prompt_index: int, seed: int, step: int) -> str:
    """The advantage group of the branches that share one ``x_k``: (prompt, seed, step)."""
    return f"p{prompt_index}-s{seed}-k{step}"


# --------------------------------------------------------------------------------------------
# Writing


def shard_writer(folder: Path, per_shard: int, prefix: str = "shard") -> ShardWriter:
    """A writer of rollout samples into ``folder``'s shards."""
    return ShardWriter(folder, per_shard, SAMPLE_FIELDS, prefix)


def sample_fields(meta: dict[str, Any], state: tuple[np.ndarray, np.ndarray] | None,
                  image: np.ndarray | None) -> dict[str, bytes]:
    """One sample's members: its meta; ``x_k`` and the SDE mean as float32 ``.npy`` when it holds its
    group's state (``None``: ``meta`` names the sample that does in ``state_key``); its final image as
    PNG when it holds one (``None``: ``meta`` names the sample that does in ``image_key``)."""
    fields = {"meta.json": json.dumps(meta, sort_keys=True).encode()}
    if state is not None:
        fields["state.npy"], fields["mean.npy"] = npy_bytes(state[0]), npy_bytes(state[1])
    if image is not None:
        fields["image.png"] = png_bytes(image)
    return fields


def next_state(mean: np.ndarray, std: float, noise_seed: int) -> np.ndarray:
    """``x_{k+1} = mean + std * noise``, the noise drawn from ``noise_seed`` as the rollout drew it,
    in float32 with the SDE step's own operations (:func:`~stages.flow.sde_step`), so bit for bit."""
    noise = seeded_normal(tuple(mean.shape), [noise_seed])[0]
    return mean + (torch.tensor(std, dtype=torch.float32) * noise).numpy()  # float32 adds round alike in both


def state_digest(array: np.ndarray) -> str:
    """sha256 of a state's float32 bytes (C order), as ``next_sha256`` records ``x_{k+1}``."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest, with its schema, once every shard and the embeddings are written."""
    write_json(folder / MANIFEST, versioned(ROLLOUT_SCHEMA, manifest))


def write_embeddings(folder: Path, cond: dict[str, Any], negative: dict[str, Any] | None) -> dict[str, str]:
    """Store the rollout's conditioning once (float32 safetensors); returns the manifest's entry."""
    from safetensors.torch import save_file

    tensors = {f"prompt.{name}": t.float().contiguous() for name, t in cond.items()}
    tensors.update({f"negative.{name}": t.float().contiguous() for name, t in (negative or {}).items()})
    save_file(tensors, folder / EMBEDDINGS)
    return {"file": EMBEDDINGS, "sha256": sha256_file(folder / EMBEDDINGS)}


def write_timing(folder: Path, seconds: float) -> None:
    write_json(Path(folder) / TIMING_FILE, {"seconds": seconds})


def read_rollout_seconds(folder: Path) -> float | None:
    """The seconds a rollout took; None when it has no readable record (older rollouts)."""
    path = Path(folder) / TIMING_FILE
    try:
        seconds = loads_json(path.read_bytes()).get("seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(seconds) if is_number(seconds) else None


# --------------------------------------------------------------------------------------------
# The manifest


def check_manifest(manifest: Any, where: Path) -> dict[str, Any]:
    """The manifest's fields, each of the type and range the stages rely on; one line naming the
    first that is not. Its config is validated by :class:`~stages.artifacts.rollout_config.RolloutConfig` itself, the
    way `tempflow rollout` validates its options."""
    check_version(manifest, ROLLOUT_SCHEMA, where, "re-run `tempflow rollout` with this version")

    def bad(field: str, expected: str) -> TempflowError:
        return TempflowError(f"{where}: {field} {short(manifest.get(field))} is not {expected}; the manifest is damaged")

    for key in MANIFEST_FIELDS:
        if key not in manifest:
            raise TempflowError(f"{where}: missing {key!r}; the manifest is damaged")
    if not is_int(manifest["samples"]) or manifest["samples"] < 1:
        raise bad("samples", "a count of at least 1 (a rollout always holds samples)")
    for count in ("nfe", "decodes"):
        if not is_int(manifest[count]) or manifest[count] < 0:
            raise bad(count, "a count")
    if not isinstance(manifest["policy"], dict) or not isinstance(manifest["policy"].get("identity"), str):
        raise bad("policy", "{identity, ...}")
    prompts = manifest["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompts", "a non-empty list of strings")
    shape = manifest["sample_shape"]
    if (not isinstance(shape, list) or not shape or not all(is_int(n) and n > 0 for n in shape)
            or math.prod(shape) > MAX_STATE_ELEMENTS):
        raise bad("sample_shape", f"a list of positive sizes with at most {MAX_STATE_ELEMENTS} elements")
    config = manifest_config(manifest["config"], where)
    sigmas = manifest["sigmas"]
    if (not isinstance(sigmas, list) or len(sigmas) != config.num_steps + 1 or not all(is_number(s) for s in sigmas)
            or sigmas[0] != 1.0 or sigmas[-1] != 0.0 or any(a <= b for a, b in zip(sigmas, sigmas[1:]))):
        raise bad("sigmas", f"{config.num_steps + 1} numbers falling from 1 to 0")
    _check_shard_list(manifest["shards"], manifest["samples"], where)
    _check_sampling(manifest, bad)
    _check_steps(manifest, config, bad)
    return manifest


def manifest_config(config: Any, where: Path) -> RolloutConfig:
    """The rollout's config, validated by :class:`~stages.artifacts.rollout_config.RolloutConfig` (its one validation)."""
    if not isinstance(config, dict):
        raise TempflowError(f"{where}: config is not an object; the manifest is damaged")
    missing = [f.name for f in dataclasses.fields(RolloutConfig) if f.name not in config]
    if missing:
        raise TempflowError(f"{where}: config lacks {', '.join(missing)}; the manifest is damaged")
    try:
        return RolloutConfig(**config)
    except TypeError as err:
        raise TempflowError(f"{where}: config does not fit this tempflow's rollout options ({err}); "
                            "the manifest is damaged") from None
    except TempflowError as err:
        raise TempflowError(f"{where}: config is invalid ({err}); the manifest is damaged") from None


def _check_steps(manifest: dict[str, Any], config: RolloutConfig, bad: Any) -> None:
    """``trained_steps``: distinct ascending steps of ``0..T-2``; ``step_inclusion``: for a tempflow
    rollout that drew its steps (``sampled:N``, ``weighted:N``, ``spread:N``) one chance in ``(0, 1]``
    per step of ``0..T-2``, summing to the number of trained steps, every certain step among them; else
    null. ``step_spread``: the weights a ``spread:N`` draw used, one per step, from which its chances
    follow; null otherwise, and when no spread was measured yet or every measured one was 0 (the
    chances are then the noise-aware ones)."""
    steps, pi, num_steps = manifest["trained_steps"], manifest["step_inclusion"], config.num_steps
    if not (isinstance(steps, list) and steps and all(is_int(k) for k in steps)
            and steps == sorted(set(steps)) and 0 <= steps[0] and steps[-1] <= num_steps - 2):
        raise bad("trained_steps", f"distinct ascending steps within 0..{num_steps - 2}")
    _check_spread(manifest, config, bad)
    if not config.draws_steps:
        if pi is not None:
            raise bad("step_inclusion", f"null (--branch-steps {config.branch_steps} draws nothing)")
        return
    if not (isinstance(pi, list) and len(pi) == num_steps - 1 and all(is_number(p) and 0 < p <= 1 for p in pi)
            and abs(sum(pi) - len(steps)) < 1e-6 and all(k in steps for k, p in enumerate(pi) if p == 1)):
        raise bad("step_inclusion", f"{num_steps - 1} chances in (0, 1] summing to the {len(steps)} trained steps, "
                                    "each certain step among them")
    if manifest["step_spread"] is not None:
        made = inclusion_probabilities(manifest["step_spread"], len(steps))
        if any(abs(a - b) > 1e-9 for a, b in zip(made, pi)):
            raise bad("step_inclusion", "the chances its step_spread weights give")


def _check_spread(manifest: dict[str, Any], config: RolloutConfig, bad: Any) -> None:
    """``step_spread``: null, or under ``spread:N`` one drawing weight > 0 per step of ``0..T-2``."""
    spread, n = manifest["step_spread"], config.num_steps - 1
    if spread is not None and not (config.draws_by_spread and isinstance(spread, list) and len(spread) == n
                                   and all(is_number(s) and s > 0 for s in spread)):
        raise bad("step_spread", f"null or, under spread:N, {n} drawing weights > 0")


def _check_sampling(manifest: dict[str, Any], bad: Any) -> None:
    """The settings the update must sample with again: resolution, guidance, negative prompt, dtype,
    and the embeddings file's hash."""
    sampling = manifest["sampling"]
    if not (isinstance(sampling, dict) and set(sampling) == {"resolution", "guidance_scale", "negative_prompt"}
            and is_int(sampling["resolution"]) and 0 < sampling["resolution"] ** 2 <= MAX_IMAGE_PIXELS
            and (sampling["guidance_scale"] is None or is_number(sampling["guidance_scale"]))
            and (sampling["negative_prompt"] is None or isinstance(sampling["negative_prompt"], str))):
        raise bad("sampling", "{resolution, guidance_scale, negative_prompt}")
    if manifest["dtype"] not in DTYPES:
        raise bad("dtype", f"one of {', '.join(DTYPES)}")
    embeddings = manifest["embeddings"]
    if not (isinstance(embeddings, dict) and embeddings.get("file") == EMBEDDINGS
            and isinstance(embeddings.get("sha256"), str) and _SHA256.match(embeddings["sha256"])):
        raise bad("embeddings", f"{{file: {EMBEDDINGS}, sha256}}")


def _check_shard_list(shards: Any, samples: int, where: Path) -> None:
    if not isinstance(shards, list):
        raise TempflowError(f"{where}: shards is not a list; the manifest is damaged")
    names = set()
    for shard in shards:
        ok = (isinstance(shard, dict) and isinstance(shard.get("name"), str) and _SHARD_NAME.match(shard["name"])
              and isinstance(shard.get("sha256"), str) and _SHA256.match(shard["sha256"])
              and is_int(shard.get("samples")) and shard["samples"] >= 0 and shard["name"] not in names)
        if not ok:
            raise TempflowError(f"{where}: shard entry {short(shard)} is not a distinct {{name, sha256, samples}}; "
                                "the manifest is damaged")
        names.add(shard["name"])
    if sum(s["samples"] for s in shards) != samples:
        raise TempflowError(f"{where}: the shards hold {sum(s['samples'] for s in shards)} samples, "
                            f"the manifest says {samples}; the manifest is damaged")


# --------------------------------------------------------------------------------------------
# Samples


class Sample:
    """One rollout sample as read from a shard, decoded on demand against its manifest: the state's
    shape, the image's side. ``holder`` is the sample whose ``state.npy`` and ``mean.npy`` it uses
    (itself, or the one its ``state_key`` names), linked by :meth:`Rollout.samples`."""

    def __init__(self, raw: ShardSample, shape: tuple[int, ...], side: int) -> None:
        self.key, self.where, self.fields = raw.key, raw.where, raw.fields
        self.present = raw.present
        self._raw, self.shape, self.side = raw, shape, side
        self.holder: Sample = self

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        """The sample's meta.json, parsed and checked once (the reader links it, the update reads it again)."""
        try:
            meta = loads_json(self.fields["meta.json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise TempflowError(f"{self.where} sample {self.key}: meta.json is not valid JSON ({err})") from None
        missing = [f for f in META_FIELDS if f not in meta] if isinstance(meta, dict) else list(META_FIELDS)
        if missing:
            raise TempflowError(f"{self.where} sample {self.key}: meta.json lacks {', '.join(missing)}; the rollout is damaged")
        return meta

    def _array(self, name: str) -> np.ndarray:
        holder = self.holder
        if name not in holder.fields:
            raise TempflowError(f"{self.where} sample {self.key}: {name} was not read (ask Rollout.samples for it)")
        return decode_npy(holder.fields[name], f"{holder.where} sample {holder.key} {name}", self.shape)

    def state(self) -> np.ndarray:
        """``x_k``, the state the transition starts from (float32, the manifest's shape, finite)."""
        return self._array("state.npy")

    def next(self) -> np.ndarray:
        """``x_{k+1}``, the sampled next state: its group's mean plus ``std`` times the noise of
        ``noise_seed``, checked against ``next_sha256``."""
        meta = self.meta
        seed, std, digest = meta["noise_seed"], meta["std"], meta["next_sha256"]
        if not (is_int(seed) and 0 <= seed < 2**63 and is_number(std) and math.isfinite(std) and std > 0
                and isinstance(digest, str) and _SHA256.match(digest)):
            raise TempflowError(f"{self.where} sample {self.key}: noise_seed, std and next_sha256 must be a seed, a "
                                "positive number and a sha256; the rollout is damaged")
        nxt = next_state(self._array("mean.npy"), std, seed)
        if state_digest(nxt) != digest:
            raise TempflowError(f"{self.where} sample {self.key}: x_(k+1) made from its mean, std and noise seed does "
                                "not match next_sha256 (the sample was edited, or this torch draws other noise than "
                                "the one that wrote it); re-run `tempflow rollout`")
        return nxt

    def image(self) -> np.ndarray:
        return decode_png(self.fields["image.png"], f"{self.where} sample {self.key}", self.side)

    def check_headers(self) -> None:
        """Every field's header, read or not: arrays of the manifest's shape and byte count, an 8-bit
        RGB image of its resolution."""
        raw = self._raw
        for name in STATE_FIELDS:
            if name in raw.sizes:
                data = raw.fields.get(name, raw.heads.get(name, b""))
                npy_header(data, f"{self.where} sample {self.key} {name}", self.shape, size=raw.sizes[name])
        if "image.png" in raw.sizes:
            png_header(raw.fields.get("image.png", raw.heads.get("image.png", b"")), f"{self.where} sample {self.key}",
                       self.side)


def check_meta(key: str, meta: dict[str, Any], manifest: dict[str, Any]) -> None:
    """A sample's meta must describe a trainable transition of this manifest's schedule and prompts."""
    sigmas, prompts = manifest["sigmas"], manifest["prompts"]
    step, index, log_prob = meta["step"], meta["prompt_index"], meta["log_prob"]
    problem = None
    if not is_int(step) or not 0 <= step <= len(sigmas) - 3:
        problem = f"step {step!r} is not a trainable step 0..{len(sigmas) - 3}"
    elif not is_int(index) or not 0 <= index < len(prompts) or prompts[index] != meta["prompt"]:
        problem = f"prompt_index {index!r} does not name its prompt in the manifest"
    elif (meta["sigma"], meta["sigma_next"]) != (sigmas[step], sigmas[step + 1]):
        problem = f"sigmas {meta['sigma']}, {meta['sigma_next']} are not step {step}'s of the manifest"
    elif not is_number(log_prob) or not math.isfinite(log_prob):
        problem = f"log_prob {log_prob!r} is not a finite number"
    elif not is_int(meta["seed"]) or not is_int(meta["branch"]) or not isinstance(meta["group"], str):
        problem = "seed and branch must be integers and group a string"
    elif step not in manifest["trained_steps"]:
        problem = f"step {step} is not among the manifest's trained steps {manifest['trained_steps']}"
    elif meta["algo"] != manifest["config"]["algo"]:
        problem = f"algo {meta['algo']!r} is not the manifest's {manifest['config']['algo']!r}"
    elif "image_key" in meta and not (isinstance(meta["image_key"], str) and KEY.match(meta["image_key"])):
        problem = f"image_key {meta['image_key']!r} is not a sample key"
    elif not is_int(meta["noise_seed"]) or not is_number(meta["std"]) or not isinstance(meta["next_sha256"], str):
        problem = "noise_seed must be an integer, std a number and next_sha256 a string"
    if problem:
        raise TempflowError(f"sample {key}: {problem}; the rollout is damaged or mixed with another one")


def _max_member_size(field: str, shape: tuple[int, ...]) -> int:
    """Bytes a sample field may take, checked before it is read: an array of the rollout's shape
    plus its header, a PNG no larger than :data:`MAX_IMAGE_PIXELS` could need, a small meta.json."""
    if field.endswith(".npy"):
        return 4 * math.prod(shape) + NPY_HEADER_BYTES
    if field == "image.png":
        return 4 * MAX_IMAGE_PIXELS + (1 << 20)
    return 1 << 20


class StateLinks:
    """Links each sample to the sample holding its branch group's state, in shard order: a holder
    (``state.npy`` and ``mean.npy``, ``state_refs`` = how many later samples name it) is kept until
    that many samples named it in ``state_key``, then dropped, so memory holds only the groups whose
    branches are still to come."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Any]] = {}  # holder key -> [holder, samples still to name it]

    def link(self, sample: Sample) -> None:
        meta, where = sample.meta, f"{sample.where}: sample {sample.key}"
        carried = [f for f in STATE_FIELDS if f in sample.present]
        if "state_key" in meta:
            key = meta["state_key"]
            if carried or "state_refs" in meta:
                raise TempflowError(f"{where} names state_key and also carries {', '.join(carried) or 'state_refs'}; "
                                    "the rollout is damaged")
            entry = self.waiting.get(key) if isinstance(key, str) else None
            if entry is None:
                raise TempflowError(f"{where}: state_key {short(key)} names no earlier sample holding a state that "
                                    "is still to be shared; the rollout is damaged")
            sample.holder = entry[0]
            entry[1] -= 1
            if entry[1] == 0:
                del self.waiting[key]
            return
        missing = [f for f in STATE_FIELDS if f not in carried]
        if missing:
            raise TempflowError(f"{where} lacks {', '.join(missing)} and names no state_key; the rollout is damaged")
        refs = meta.get("state_refs")
        if not is_int(refs) or refs < 0:
            raise TempflowError(f"{where}: state_refs {short(refs)} is not a count; the rollout is damaged")
        if refs:
            self.waiting[sample.key] = [sample, refs]

    def finish(self, folder: Path) -> None:
        """Every holder was named as often as it said."""
        if self.waiting:
            key, (_, left) = next(iter(self.waiting.items()))
            raise TempflowError(f"{folder}: sample {key} says {left} more samples share its state than name it in "
                                "state_key; the rollout is damaged")


# --------------------------------------------------------------------------------------------
# Reading


class Rollout:
    """A rollout opened for reading: the manifest as read (and its hash), every shard opened once
    and checked against its sha256. Every later read goes through the same open files and is hashed
    again, so a stage reads exactly the bytes it verified, even while ``rollout --overwrite``
    replaces the folder, or stops when a shard changed in place. Use as a context manager."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TempflowError(f"{self.folder}: no such rollout folder; create one with `tempflow rollout --out {self.folder}`")
        path = self.folder / MANIFEST
        if not path.is_file():
            raise TempflowError(f"{path}: no such file; expected a rollout manifest written by `tempflow rollout`")
        raw = path.read_bytes()
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            manifest = loads_json(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise TempflowError(f"{path}: not valid JSON ({err}); expected a rollout manifest") from None
        self.manifest = check_manifest(manifest, path)
        self.shape = tuple(self.manifest["sample_shape"])
        self.side = self.manifest["sampling"]["resolution"]
        self._files: list[Any] = []
        try:
            self._open_shards()
        except BaseException:
            self.close()
            raise

    def _open_shards(self) -> None:
        allow_open_files(len(self.manifest["shards"]) + 64)
        for shard in self.manifest["shards"]:
            path = self.folder / shard["name"]
            if not path.is_file():
                raise TempflowError(f"{path}: listed in the manifest but missing; the rollout is incomplete")
            handle = open(path, "rb")
            self._files.append(handle)
            if sha256_handle(handle) != shard["sha256"]:
                raise TempflowError(f"{path}: sha256 does not match the manifest (truncated, modified, or the rollout "
                                    "was being replaced); re-run `tempflow rollout` or wait until it is done")

    def samples(self, fields: Iterable[str] | None = None) -> Iterator[Sample]:
        """Every sample, shard by shard, in the order written; memory holds one sample at a time, and
        the states of the branch groups whose other branches are still to come. Each is checked to
        carry its meta and its state or a link to an earlier one (:class:`StateLinks`), and every
        field's header is checked (:meth:`Sample.check_headers`); ``fields`` (with ``meta.json``
        always) are read whole, the others only that far."""
        wanted = tuple({"meta.json", *(SAMPLE_FIELDS if fields is None else fields)})
        seen: set[str] = set()
        links = StateLinks()
        for shard, handle in zip(self.manifest["shards"], self._files):
            handle.seek(0)
            reader = HashingReader(handle)
            for raw in iter_shard(reader, shard["name"], SAMPLE_FIELDS, wanted, HEAD_BYTES,
                                  lambda field: _max_member_size(field, self.shape)):
                sample = Sample(raw, self.shape, self.side)
                if "meta.json" not in sample.present:
                    raise TempflowError(f"{sample.where}: sample {sample.key} lacks meta.json; the rollout is damaged")
                if sample.key in seen:
                    raise TempflowError(f"{sample.where}: sample {sample.key} also appears in an earlier shard; the rollout is damaged")
                seen.add(sample.key)
                sample.check_headers()
                links.link(sample)
                yield sample
            if reader.finish() != shard["sha256"]:
                raise TempflowError(f"{self.folder / shard['name']}: changed while it was being read; "
                                    "nothing was written, run the stage again once the rollout is complete")
        if len(seen) != self.manifest["samples"]:
            raise TempflowError(f"{self.folder}: manifest lists {self.manifest['samples']} samples, shards hold {len(seen)}")
        links.finish(self.folder)

    def embeddings(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The stored conditioning: one row per prompt, and the negative prompt's (or None), read
        from bytes checked against the manifest's sha256, each tensor checked in shape and finite."""
        from safetensors.torch import load as load_bytes

        path = self.folder / EMBEDDINGS
        if not path.is_file():
            raise TempflowError(f"{path}: listed in the manifest but missing; the rollout is incomplete")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["embeddings"]["sha256"]:
            raise TempflowError(f"{path}: sha256 does not match the manifest; the rollout is damaged")
        tensors = load_bytes(data)
        cond = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("prompt.")}
        negative = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("negative.")}
        rows = len(self.manifest["prompts"])
        for name, t in tensors.items():
            expected = 1 if name.startswith("negative.") else rows
            if (not name.startswith(("prompt.", "negative.")) or not t.is_floating_point() or t.ndim < 1
                    or t.shape[0] != expected or not bool(t.isfinite().all())):
                raise TempflowError(f"{path}: tensor {name} is not {expected} finite float rows; the rollout is damaged")
        if not cond:
            raise TempflowError(f"{path}: no prompt embeddings; the rollout is damaged")
        return cond, negative or None

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []

    def __enter__(self) -> Rollout:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
