"""The on-disk contract between stages (DESIGN.md §4): what a rollout holds, that it is
reproducible and readable by webdataset, and that damaged, mismatched or foreign inputs, Ctrl-C and
killed runs never leave a partial output behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.artifacts.rollout import ROLLOUT_SCHEMA, check_meta
from stages.rewards import parse_reward_spec
from stages.score import run_score
from stages.support.errors import TempflowError
from tests.conftest import PROMPTS, invoke, make_rollout

FIELDS = ("meta.json", "state.npy", "next.npy", "image.png")
META_FIELDS = ("prompt", "prompt_index", "seed", "group", "step", "branch", "sigma", "sigma_next", "log_prob", "algo")
COMPRESSIBILITY = [parse_reward_spec("jpeg_compressibility")]


# --------------------------------------------------------------------------------------------
# Helpers: read shards with the standard library only, independent of stages.artifacts


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _split_member(name: str) -> tuple[str, str]:
    """``key.field`` -> (key, field), the field being one of the contract's four."""
    for field in FIELDS:
        if name.endswith("." + field):
            return name[: -len(field) - 1], field
    raise AssertionError(f"member {name!r} is not a contract field")


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            assert member.isfile(), member.name
            key, field = _split_member(member.name)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def _read_rollout(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a rollout in shard order: key -> {field: raw bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in _manifest(folder)["shards"]:
        for key, fields in _read_shard(folder / shard["name"]).items():
            assert key not in samples, f"{key} appears in two shards"
            samples[key] = fields
    return samples


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _rollout(policy_dir: Path, out: Path, prompts=PROMPTS[:2], **overrides) -> Path:
    return make_rollout(policy_dir, out, prompts=prompts, **overrides)


def _scored(policy_dir: Path, tmp_path: Path, name: str = "r", **overrides) -> tuple[Path, Path]:
    """A small tempflow rollout and its scores, made through the library."""
    rollout = _rollout(policy_dir, tmp_path / name, **overrides)
    scores = tmp_path / f"{name}.parquet"
    run_score(rollout, COMPRESSIBILITY, scores)
    return rollout, scores


def _partials(out: Path) -> list[Path]:
    """Unfinished outputs beside ``out``: the slots of stages.artifacts (and the old naming scheme)."""
    return sorted((out.parent / ".tempflow-partial").glob("*")) + sorted(out.parent.glob(f".{out.name}.partial-*"))


def _assert_refused(result, out: Path, *words: str) -> str:
    """Exit 1, one non-empty stderr line 'error: ...' naming the problem, no output, no partial."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert not out.exists(), f"{out} was written despite the error"
    assert _partials(out) == [], f"partial siblings left: {_partials(out)}"
    return lines[0]


def _score_cli(rollout: Path, out: Path, *extra):
    return invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", out, *extra)


def _update_cli(policy: Path, rollout: Path, scores: Path, out: Path, *extra):
    return invoke("update", "--policy", policy, "--rollout", rollout, "--rewards", scores, "--out", out,
                  "--beta", 0, *extra)


def _rewrite_parquet(src: Path, dst: Path, edit) -> None:
    """Rewrite a scores file through ``edit(table) -> table``, keeping its file metadata."""
    table = pq.read_table(src)
    metadata = table.schema.metadata
    pq.write_table(edit(table).replace_schema_metadata(metadata), dst)


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _dead_pid(start: int = 999999) -> int:
    pid = start
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


# --------------------------------------------------------------------------------------------
# 1-6: artifact structure


def test_tempflow_branches_share_state_and_differ_in_next(policy_dir, tmp_path):
    """tempflow: the K branches of one (prompt, seed, step) share x_k bytes and differ in x_{k+1}; meta is complete."""
    T, K = 4, 3
    rollout = _rollout(policy_dir, tmp_path / "r", num_steps=T, branches=K)
    manifest = _manifest(rollout)
    samples = _read_rollout(rollout)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for key, fields in samples.items():
        assert "." not in key and key, key
        assert {"meta.json", "state.npy", "next.npy", "image.png"} <= set(fields), (key, sorted(fields))
        meta = json.loads(fields["meta.json"])
        missing = [f for f in META_FIELDS if f not in meta]
        assert not missing, (key, missing)
        assert meta["algo"] == "tempflow"
        assert isinstance(meta["group"], str)
        assert 0 <= meta["step"] <= T - 2, (key, meta["step"])
        assert 0 <= meta["branch"] < K
        assert meta["prompt"] == PROMPTS[meta["prompt_index"]]
        assert meta["sigma"] == pytest.approx(manifest["sigmas"][meta["step"]])
        assert meta["sigma_next"] == pytest.approx(manifest["sigmas"][meta["step"] + 1])
        assert np.isfinite(meta["log_prob"])
        state, nxt = _npy(fields["state.npy"]), _npy(fields["next.npy"])
        assert state.dtype == nxt.dtype == np.float32
        assert list(state.shape) == list(nxt.shape) == manifest["sample_shape"]
        groups[(meta["prompt_index"], meta["seed_index"], meta["step"])].append({"meta": meta, **fields})
    N = 2 * 2  # prompts x seeds
    assert len(groups) == N * (T - 1)
    for where, members in groups.items():
        assert sorted(m["meta"]["branch"] for m in members) == list(range(K)), where
        assert len({m["state.npy"] for m in members}) == 1, f"{where}: branches start from different x_k"
        assert len({m["next.npy"] for m in members}) == K, f"{where}: two branches sampled the same x_(k+1)"
        assert len({m["meta"]["group"] for m in members}) == 1, where
    assert len({members[0]["meta"]["group"] for members in groups.values()}) == len(groups)


def test_flow_grpo_transitions_chain_and_share_one_image(policy_dir, tmp_path):
    """flow-grpo: next.npy of step k is state.npy of step k+1; one image per trajectory, named by the others."""
    T = 4
    rollout = _rollout(policy_dir, tmp_path / "r", algo="flow-grpo", num_steps=T)
    trajectories: dict[tuple, dict[int, tuple[str, dict, dict]]] = defaultdict(dict)
    for key, fields in _read_rollout(rollout).items():
        meta = json.loads(fields["meta.json"])
        assert meta["algo"] == "flow-grpo"
        assert meta["step"] not in trajectories[(meta["prompt_index"], meta["seed_index"])]
        trajectories[(meta["prompt_index"], meta["seed_index"])][meta["step"]] = (key, meta, fields)
    assert len(trajectories) == 2 * 2
    for where, steps in trajectories.items():
        assert sorted(steps) == list(range(T - 1)), where
        for k in range(T - 2):
            assert steps[k][2]["next.npy"] == steps[k + 1][2]["state.npy"], f"{where}: step {k} -> {k + 1} breaks"
        owners = [key for key, _, fields in steps.values() if "image.png" in fields]
        assert len(owners) == 1, f"{where}: {len(owners)} samples carry image.png"
        for key, meta, fields in steps.values():
            if key != owners[0]:
                assert meta.get("image_key") == owners[0], (where, key, meta.get("image_key"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("window", [2, 3])
def test_flow_grpo_fast_writes_only_its_window(policy_dir, tmp_path, seed, window):
    """flow-grpo-fast: each trajectory has exactly `window` consecutive steps, starting in [0, T//2 - window]."""
    T = 8
    rollout = _rollout(policy_dir, tmp_path / "r", prompts=PROMPTS[:1], algo="flow-grpo-fast",
                       num_steps=T, window=window, seed=seed)
    per_traj: dict[tuple, list[int]] = defaultdict(list)
    for fields in _read_rollout(rollout).values():
        meta = json.loads(fields["meta.json"])
        per_traj[(meta["prompt_index"], meta["seed_index"])].append(meta["step"])
    assert len(per_traj) == 2
    for where, steps in per_traj.items():
        steps.sort()
        assert len(steps) == window, (where, steps)
        assert steps == list(range(steps[0], steps[0] + window)), (where, steps)
        assert 0 <= steps[0] <= T // 2 - window, (where, steps)
        assert steps == _manifest(rollout)["trained_steps"]


@pytest.mark.parametrize("algo, T, branch_steps, K", [
    ("tempflow", 4, "all", 2),
    ("tempflow", 5, "all", 3),
    ("tempflow", 5, "1", 2),
    ("tempflow", 6, "0,2", 2),
    ("tempflow", 6, "first:2", 2),
    ("tempflow", 6, "sampled:2", 2),
    ("tempflow", 6, "weighted:3", 2),
    ("tempflow", 6, "spread:2", 2),
    ("flow-grpo", 4, "all", 2),
    ("flow-grpo-fast", 6, "all", 2),
])
def test_manifest_hashes_counts_and_nfe(policy_dir, tmp_path, algo, T, branch_steps, K):
    """The manifest's shard sha256, sample count and NFE match the shards and the documented cost."""
    rollout = _rollout(policy_dir, tmp_path / "r", algo=algo, num_steps=T, branch_steps=branch_steps,
                       branches=K, samples_per_shard=7)
    manifest = _manifest(rollout)
    assert manifest["schema"] == ROLLOUT_SCHEMA == "tempflow.rollout/4"
    listed = [s["name"] for s in manifest["shards"]]
    assert sorted(p.name for p in rollout.glob("*.tar")) == sorted(listed)
    read = 0
    for shard in manifest["shards"]:
        path = rollout / shard["name"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), shard["name"]
        in_shard = len(_read_shard(path))
        assert shard["samples"] == in_shard
        read += in_shard
    assert manifest["samples"] == read == len(_read_rollout(rollout))

    N = len(PROMPTS[:2]) * 2
    if algo == "tempflow":
        if branch_steps.startswith(("sampled:", "weighted:", "spread:")):  # drawn: N distinct steps, the draw recorded
            B = manifest["trained_steps"]
            assert len(B) == len(set(B)) == int(branch_steps.split(":")[1]) and B == sorted(B)
            assert sum(manifest["step_inclusion"]) == pytest.approx(len(B))
        else:
            B = list(range(T - 1)) if branch_steps == "all" else (
                list(range(int(branch_steps[6:]))) if branch_steps.startswith("first:")
                else sorted(int(s) for s in branch_steps.split(",")))
            assert manifest["trained_steps"] == B and manifest["step_inclusion"] is None
        expected = N * (max(B) + 1) + N * K * sum(T - k - 1 for k in B)
        assert read == manifest["decodes"] == N * K * len(B)
    else:
        expected = N * T
        assert manifest["decodes"] == N  # one image per trajectory
    assert manifest["nfe"] == expected


def test_same_config_gives_identical_bytes_other_seed_differs(policy_dir, tmp_path):
    """The same seed and config twice give byte-identical shards and manifest; another seed changes the shards."""
    a = _rollout(policy_dir, tmp_path / "a", seed=5)
    b = _rollout(policy_dir, tmp_path / "b", seed=5)
    files_a, files_b = _snapshot(a), _snapshot(b)
    for files in (files_a, files_b):  # the one file a rerun changes: the wall-clock seconds, beside the manifest
        assert json.loads(files.pop("timing.json"))["seconds"] > 0
    assert sorted(files_a) == sorted(files_b)
    assert "manifest.json" in files_a and len(files_a) > 2
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two identical runs"

    c = _rollout(policy_dir, tmp_path / "c", seed=6)
    files_c = _snapshot(c)
    shards = [n for n in files_a if n.endswith(".tar")]
    assert shards
    for name in shards:
        assert files_c.get(name) != files_a[name], f"{name} is the same under another seed"


@pytest.mark.parametrize("algo", ["tempflow", "flow-grpo"])
def test_the_writer_thread_writes_the_bytes_of_writing_inline(policy_dir, tmp_path, algo):
    """Samples encoded and written on the writer thread (the default) give the same shards and
    manifest, byte for byte, as writing each one on the sampling thread; several shards, images
    stored once per trajectory (flow-grpo) included."""
    inline = _snapshot(_rollout(policy_dir, tmp_path / "inline", algo=algo, background_writes=False, samples_per_shard=3))
    threaded = _snapshot(_rollout(policy_dir, tmp_path / "threaded", algo=algo, samples_per_shard=3))
    for files in (inline, threaded):
        files.pop("timing.json")
    assert sorted(inline) == sorted(threaded) and sum(n.endswith(".tar") for n in inline) > 2
    for name in inline:
        assert inline[name] == threaded[name], f"{name} differs with the writer thread"


def test_an_error_on_the_writer_thread_fails_the_rollout_and_leaves_nothing(policy_dir, tmp_path, monkeypatch):
    """A sample that cannot be encoded (here: its PNG) stops the rollout with that error, raised in the
    caller; the writer thread is gone and no output or partial folder is left."""
    import threading

    import stages.artifacts.rollout

    def broken_png(image):
        raise OSError("disk full while encoding a PNG")

    monkeypatch.setattr(stages.artifacts.rollout, "png_bytes", broken_png)
    with pytest.raises(OSError, match="disk full"):
        _rollout(policy_dir, tmp_path / "r")
    assert not (tmp_path / "r").exists() and _partials(tmp_path / "r") == []
    assert not [t for t in threading.enumerate() if t.name == "tempflow-shard-writer"]


def test_shards_read_by_webdataset(policy_dir, tmp_path):
    """webdataset.WebDataset reads the shards (raw bytes) and finds the same keys and bytes."""
    import webdataset

    rollout = _rollout(policy_dir, tmp_path / "r")
    ours = _read_rollout(rollout)
    urls = [str(rollout / s["name"]) for s in _manifest(rollout)["shards"]]
    theirs = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in theirs] == list(ours)
    for sample in theirs:
        fields = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert fields == ours[sample["__key__"]]


# --------------------------------------------------------------------------------------------
# 7-12: corrupt, mismatched and foreign inputs through the CLI


def test_truncated_shard_is_refused(policy_dir, tmp_path):
    """A shard cut in half: score and update refuse (sha256), writing nothing."""
    rollout, scores = _scored(policy_dir, tmp_path)
    shard = rollout / _manifest(rollout)["shards"][0]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])

    _assert_refused(_score_cli(rollout, tmp_path / "s.parquet"), tmp_path / "s.parquet", "sha256", shard.name)
    _assert_refused(_update_cli(policy_dir, rollout, scores, tmp_path / "new"), tmp_path / "new", "sha256", shard.name)


def test_flipped_byte_is_refused(policy_dir, tmp_path):
    """One byte flipped in a shard (same length): score and update refuse on the sha256."""
    rollout, scores = _scored(policy_dir, tmp_path)
    shard = rollout / _manifest(rollout)["shards"][-1]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))

    _assert_refused(_score_cli(rollout, tmp_path / "s.parquet"), tmp_path / "s.parquet", "sha256", shard.name)
    _assert_refused(_update_cli(policy_dir, rollout, scores, tmp_path / "new"), tmp_path / "new", "sha256")


def test_scores_of_another_rollout_are_refused(policy_dir, tmp_path):
    """Scores of rollout A given with rollout B (another seed): update refuses, naming the mismatch."""
    _, scores_a = _scored(policy_dir, tmp_path, "a", seed=0)
    rollout_b = _rollout(policy_dir, tmp_path / "b", seed=1)
    out = tmp_path / "new"
    line = _assert_refused(_update_cli(policy_dir, rollout_b, scores_a, out), out, "another rollout")
    assert str(rollout_b) in line


@pytest.mark.parametrize("edit, what", [
    (lambda t: t.slice(1), "a dropped row"),
    (lambda t: t.set_column(0, "key", pa.array(["p99999_s000_k000_b00"] + t.column("key").to_pylist()[1:])),
     "a renamed key"),
    (lambda t: pa.concat_tables([t, t.slice(0, 1)]), "a duplicated row"),
])
def test_scores_keys_not_matching_the_rollout_are_refused(policy_dir, tmp_path, edit, what):
    """A scores file rewritten with the same metadata but different keys: update refuses, never joins."""
    rollout, scores = _scored(policy_dir, tmp_path)
    edited = tmp_path / "edited.parquet"
    _rewrite_parquet(scores, edited, edit)
    out = tmp_path / "new"
    line = _assert_refused(_update_cli(policy_dir, rollout, edited, out), out)
    assert "does not match" in line or "duplicate" in line, (what, line)


def test_unedited_rewrite_of_scores_is_accepted(policy_dir, tmp_path):
    """Control for the edits above: a scores file rewritten unchanged, metadata kept, still updates."""
    rollout, scores = _scored(policy_dir, tmp_path)
    copy = tmp_path / "copy.parquet"
    _rewrite_parquet(scores, copy, lambda t: t)
    result = _update_cli(policy_dir, rollout, copy, tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "metrics.json").is_file()


def test_nan_from_a_user_reward_is_refused(policy_dir, tmp_path, monkeypatch):
    """A module:function reward returning NaN: score refuses and writes nothing."""
    (tmp_path / "nan_reward_for_artifact_tests.py").write_text(textwrap.dedent("""
        import numpy as np
        def returns_nan(images, prompts):
            values = np.zeros(len(images))
            values[-1] = np.nan
            return values
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = _rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    result = invoke("score", "--rollout", rollout, "--reward", "nan_reward_for_artifact_tests:returns_nan",
                    "--out", out)
    _assert_refused(result, out, "NaN", "nan_reward_for_artifact_tests:returns_nan")


def test_user_reward_function_named_like_a_float_is_a_function():
    """'module:nan' names the function nan of module, not a NaN weight; numeric tails are weights."""
    from stages.rewards import RewardSpec
    from stages.support.errors import TempflowError

    assert parse_reward_spec("my_rewards:nan") == RewardSpec("my_rewards:nan", 1.0)
    assert parse_reward_spec("my_rewards:inf:0.5") == RewardSpec("my_rewards:inf", 0.5)
    assert parse_reward_spec("jpeg_compressibility:-2") == RewardSpec("jpeg_compressibility", -2.0)
    with pytest.raises(TempflowError, match="finite"):
        parse_reward_spec("jpeg_compressibility:-inf")


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_reward_in_parquet_is_refused(policy_dir, tmp_path, bad):
    """A scores file whose reward column holds inf or NaN (metadata kept): update refuses."""
    rollout, scores = _scored(policy_dir, tmp_path)
    edited = tmp_path / "edited.parquet"

    def poison(table):
        rewards = table.column("reward").to_numpy().copy()
        rewards[3] = bad
        return table.set_column(table.column_names.index("reward"), "reward", pa.array(rewards, type=pa.float64()))

    _rewrite_parquet(scores, edited, poison)
    out = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, edited, out), out, "NaN or infinite")


def test_rollout_of_another_schema_is_refused(policy_dir, tmp_path):
    """A manifest of schema tempflow.rollout/999: score and update refuse, naming the schema."""
    rollout, scores = _scored(policy_dir, tmp_path)
    manifest = _manifest(rollout)
    manifest["schema"] = "tempflow.rollout/999"
    (rollout / "manifest.json").write_text(json.dumps(manifest, indent=2))
    out = tmp_path / "s.parquet"
    _assert_refused(_score_cli(rollout, out), out, "schema", "tempflow.rollout/999")
    new = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, scores, new), new, "schema", "tempflow.rollout/999")


def test_scores_of_another_schema_are_refused(policy_dir, tmp_path):
    """A scores file whose metadata schema is tempflow.scores/999: update refuses, naming the schema."""
    rollout, scores = _scored(policy_dir, tmp_path)
    table = pq.read_table(scores)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    assert meta["schema"] == "tempflow.scores/1"
    meta["schema"] = "tempflow.scores/999"
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(meta)}), scores)
    out = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, scores, out), out, "schema", "tempflow.scores/999")


class _WritesMarker:
    """Unpickling this creates the folder ``path`` (an os-level side effect)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _rebuild_shard_with(rollout: Path, key: str, name: str, payload: bytes) -> str:
    """Insert member ``name`` right after sample ``key``'s members; fix the manifest's sha256."""
    manifest = _manifest(rollout)
    for shard in manifest["shards"]:
        path = rollout / shard["name"]
        with tarfile.open(path, mode="r:") as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        if not any(_split_member(m.name)[0] == key for m, _ in members):
            continue
        last = max(i for i, (m, _) in enumerate(members) if _split_member(m.name)[0] == key)
        extra = tarfile.TarInfo(name)
        extra.size, extra.mtime = len(payload), 0
        members.insert(last + 1, (extra, payload))
        with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (rollout / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return shard["name"]
    raise AssertionError(f"no shard holds {key}")


def test_pickle_member_is_refused_without_unpickling(policy_dir, tmp_path):
    """A shard with a .pth (pickle) member whose hash is made to match: score refuses and never unpickles it."""
    # the payload is live: unpickling a twin of it does create its marker
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_WritesMarker(control)))
    assert control.is_dir()

    marker = tmp_path / "unpickled-marker"
    payload = pickle.dumps({"weights": _WritesMarker(marker)})
    rollout = _rollout(policy_dir, tmp_path / "r")
    _rebuild_shard_with(rollout, "p00000_s000_k000_b00", "p00000_s000_k000_b00.pth", payload)

    out = tmp_path / "s.parquet"
    _assert_refused(_score_cli(rollout, out), out, "refused", ".pth")
    assert not marker.exists(), "the .pth member was unpickled"


def test_pickled_npy_field_is_refused_without_unpickling(policy_dir, tmp_path):
    """A state.npy replaced by an object (pickle) array, hashes fixed: score refuses it from its header
    although it reads no arrays, and so does update with scores made to match; nothing is unpickled."""
    marker = tmp_path / "unpickled-marker"
    rollout = _rollout(policy_dir, tmp_path / "r")
    scores = tmp_path / "r.parquet"
    run_score(rollout, COMPRESSIBILITY, scores)
    key = "p00000_s000_k000_b00"
    # swap the sample's state.npy for a pickled object array
    manifest = _manifest(rollout)
    for shard in manifest["shards"]:
        path = rollout / shard["name"]
        with tarfile.open(path, mode="r:") as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        if not any(m.name == f"{key}.state.npy" for m, _ in members):
            continue
        buf = io.BytesIO()
        evil = np.empty(1, dtype=object)
        evil[0] = _WritesMarker(marker)
        np.save(buf, evil, allow_pickle=True)
        rebuilt = []
        for member, data in members:
            if member.name == f"{key}.state.npy":
                data = buf.getvalue()
                member.size = len(data)
            rebuilt.append((member, data))
        with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in rebuilt:
                tar.addfile(member, io.BytesIO(data))
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (rollout / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(TempflowError, match=f"{key} state.npy: not a plain float32"):
        run_score(rollout, COMPRESSIBILITY, tmp_path / "again.parquet")  # it reads meta and images only
    _rescore_for(scores, rollout)

    out = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, scores, out), out, ".npy", key)
    assert not marker.exists(), "state.npy was unpickled"


def _rescore_for(scores: Path, rollout: Path) -> None:
    """Point a scores file at the rollout's current manifest (as a forger who fixed every hash would)."""
    table = pq.read_table(scores)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    meta["rollout_manifest_sha256"] = hashlib.sha256((rollout / "manifest.json").read_bytes()).hexdigest()
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(meta, sort_keys=True)}), scores)


# --------------------------------------------------------------------------------------------
# 13-14: interrupted and killed runs, existing outputs


def test_interrupted_rollout_leaves_nothing_and_rerun_succeeds(policy_dir, prompts_file, tmp_path, monkeypatch):
    """Ctrl-C after a few samples of a rollout: exit 130, 'interrupted', no output, no partial; a rerun succeeds."""
    from stages.artifacts.shards import ShardWriter

    out = tmp_path / "r"
    args = ("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out,
            "--num-steps", 4, "--branches", 2, "--samples-per-shard", 4)
    real_write, calls = ShardWriter.write, []

    def write_then_interrupt(self, key, fields):
        calls.append(key)
        if len(calls) > 6:  # one shard closed, another half written
            raise KeyboardInterrupt
        return real_write(self, key, fields)

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "write", write_then_interrupt)
        result = invoke(*args)
    assert len(calls) == 7
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert not out.exists() and _partials(out) == []

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert _manifest(out)["samples"] == len(_read_rollout(out)) and _partials(out) == []


@pytest.mark.parametrize("target", ["score_batch", "write_scores"])
def test_interrupted_score_leaves_nothing_and_rerun_succeeds(policy_dir, tmp_path, monkeypatch, target):
    """Ctrl-C in a reward call or while the parquet is being written: no output, no partial; a rerun succeeds."""
    import stages.score

    rollout = _rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    real = getattr(stages.score, target)
    seen = []

    def interrupted(*args, **kwargs):
        seen.append(1)
        if target == "write_scores":
            real(*args, **kwargs)  # the temporary file is complete on disk, then Ctrl-C
            assert _partials(out), "write_scores did not write into a partial sibling"
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(stages.score, target, interrupted)
        result = _score_cli(rollout, out)
    assert seen
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert not out.exists() and _partials(out) == []

    result = _score_cli(rollout, out)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == _manifest(rollout)["samples"]


def test_interrupted_update_leaves_nothing_and_rerun_succeeds(policy_dir, tmp_path, monkeypatch):
    """Ctrl-C while the new policy folder is being written: no output, no partial; a rerun succeeds."""
    import stages.update

    rollout, scores = _scored(policy_dir, tmp_path)
    out = tmp_path / "new"
    real = stages.update.save_optimizer

    def save_then_interrupt(optimizer, names, folder):
        real(optimizer, names, folder)
        assert any(folder.iterdir())  # weights and optimizer state already in the temporary folder
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(stages.update, "save_optimizer", save_then_interrupt)
        result = _update_cli(policy_dir, rollout, scores, out)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert not out.exists() and _partials(out) == []

    result = _update_cli(policy_dir, rollout, scores, out)
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file() and _partials(out) == []


def test_leftovers_of_a_killed_run_are_cleared(policy_dir, prompts_file, tmp_path):
    """Slots nobody holds (any name, any PID in it, even a live one's) are removed by the next stage
    writing beside them, which succeeds; a slot a live process holds is kept."""
    import subprocess
    import sys

    slots = tmp_path / ".tempflow-partial"
    abandoned = [slots / f"{_dead_pid()}-0000abcd", slots / f"{os.getppid()}-1234abcd", slots / "whatever"]
    for slot in abandoned:
        (slot / "new").mkdir(parents=True)
        (slot / "new" / "shard-000000.tar").write_bytes(b"half a shard")
    held = slots / f"{os.getpid()}-held"
    held.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(120)
    """), str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = tmp_path / "r"
        result = invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out, "--num-steps", 3)
        assert result.exit_code == 0, result.output
        assert not any(slot.exists() for slot in abandoned)
        assert held.is_dir(), "the slot of a live process was deleted"
        assert _manifest(out)["samples"] == len(_read_rollout(out))
    finally:
        holder.kill()
        holder.wait()
    scores = tmp_path / "s.parquet"
    result = _score_cli(tmp_path / "r", scores)
    assert result.exit_code == 0, result.output
    assert not slots.exists() and scores.is_file()


@pytest.mark.parametrize("stage", ["rollout", "score", "update"])
def test_existing_out_needs_overwrite(policy_dir, prompts_file, tmp_path, stage):
    """An existing --out is refused without --overwrite (untouched, message names --overwrite); replaced with it."""
    if stage == "rollout":
        out = tmp_path / "r"
        run = lambda *extra: invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out,
                                    "--num-steps", 3, *extra)
    else:
        rollout, scores = _scored(policy_dir, tmp_path, "src")
        if stage == "score":
            out = tmp_path / "s.parquet"
            run = lambda *extra: _score_cli(rollout, out, *extra)
        else:
            out = tmp_path / "new"
            run = lambda *extra: _update_cli(policy_dir, rollout, scores, out, *extra)
    if stage == "score":
        out.write_bytes(b"precious")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    before = _snapshot(out)

    result = run()
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0], result.stderr
    assert _snapshot(out) == before
    assert _partials(out) == []

    result = run("--overwrite")
    assert result.exit_code == 0, result.output
    assert _snapshot(out) != before and _partials(out) == []
    if stage == "score":
        assert pq.read_table(out).num_rows > 0
    else:
        assert not (out / "keep.txt").exists()
        assert (out / ("manifest.json" if stage == "rollout" else "metrics.json")).is_file()


def test_meta_without_required_fields_is_refused(policy_dir, tmp_path):
    """A meta.json that lost a field (hashes fixed): score refuses, naming the field, no traceback."""
    rollout = _rollout(policy_dir, tmp_path / "r")
    manifest = _manifest(rollout)
    path = rollout / manifest["shards"][0]["name"]
    with tarfile.open(path, mode="r:") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    index = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".meta.json"))
    member, data = members[index]
    meta = json.loads(data)
    del meta["step"]
    data = json.dumps(meta).encode()
    member.size = len(data)
    members[index] = (member, data)
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, d in members:
            tar.addfile(m, io.BytesIO(d))
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (rollout / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "s.parquet"
    _assert_refused(_score_cli(rollout, out), out, "lacks step")


def test_out_may_not_replace_cwd_parents_or_inputs(policy_dir, tmp_path, monkeypatch):
    """--out . / a parent / an input is refused even with --overwrite; nothing is deleted."""
    rollout, scores = _scored(policy_dir, tmp_path)
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    monkeypatch.chdir(rollout)
    for out in (".", "..", str(rollout)):
        r = invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", out, "--overwrite")
        assert r.exit_code == 1 and ("working folder" in r.stderr or "input" in r.stderr), r.stderr
    r = _update_cli(policy_dir, rollout, scores, policy_dir, "--overwrite")
    assert r.exit_code == 1 and "input" in r.stderr
    assert keep.read_text() == "precious" and (rollout / "manifest.json").is_file() and (policy_dir / "config.json").is_file()


def test_metrics_path_obeys_overwrite_and_kind(policy_dir, tmp_path):
    """--metrics never replaces an existing folder, and an existing file only with --overwrite."""
    rollout, scores = _scored(policy_dir, tmp_path)
    folder = tmp_path / "metrics"
    (folder / "it01.json").parent.mkdir()
    (folder / "it01.json").write_text("{}")
    r = _update_cli(policy_dir, rollout, scores, tmp_path / "new", "--metrics", folder)
    assert r.exit_code == 1 and "--overwrite" in r.stderr and (folder / "it01.json").is_file()
    r = _update_cli(policy_dir, rollout, scores, tmp_path / "new", "--metrics", folder, "--overwrite")
    assert r.exit_code == 1 and "folder" in r.stderr and (folder / "it01.json").is_file()
    assert not (tmp_path / "new").exists()  # refused before anything was trained or written


def test_edited_manifest_no_longer_matches_its_scores(policy_dir, tmp_path):
    """Scores name the manifest's hash: an update on an edited manifest is refused before any sample is read."""
    rollout, scores = _scored(policy_dir, tmp_path)
    manifest = _manifest(rollout)
    manifest["config"]["batch_size"] += 1  # still a valid manifest, but not the one that was scored
    (rollout / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "new"
    r = _update_cli(policy_dir, rollout, scores, out)
    assert r.exit_code == 1 and not out.exists()
    assert "another rollout" in r.stderr


def _good_meta(rollout: Path) -> tuple[dict, dict]:
    manifest = _manifest(rollout)
    first = next(iter(_read_rollout(rollout).values()))
    return json.loads(first["meta.json"]), manifest


def test_check_meta_refuses_a_step_the_rollout_did_not_train(policy_dir, tmp_path):
    meta, manifest = _good_meta(_rollout(policy_dir, tmp_path / "r", num_steps=4))
    manifest["trained_steps"] = [k for k in manifest["trained_steps"] if k != meta["step"]]
    with pytest.raises(TempflowError, match="not among the manifest's trained steps"):
        check_meta("k", meta, manifest)


@pytest.mark.parametrize("edit, problem", [
    ({"step": 3}, "not a trainable step"),  # T = 4: steps 0..2 are trained, 3 is the last
    ({"step": True}, "not a trainable step"),
    ({"prompt_index": 7}, "does not name its prompt"),
    ({"prompt": "another prompt"}, "does not name its prompt"),
    ({"sigma": 0.123}, "are not step"),
    ({"log_prob": float("nan")}, "not a finite number"),
    ({"log_prob": "0.5"}, "not a finite number"),
    ({"seed": 1.5}, "seed and branch"),
    ({"branch": "0"}, "seed and branch"),
    ({"group": 3}, "seed and branch"),
    ({"algo": "flow-grpo"}, "is not the manifest's"),
    ({"image_key": "a.b"}, "is not a sample key"),
])
def test_check_meta_refuses_each_kind_of_damage(policy_dir, tmp_path, edit, problem):
    """Each branch of check_meta on its own: one field edited in an otherwise valid meta."""
    meta, manifest = _good_meta(_rollout(policy_dir, tmp_path / "r", num_steps=4))
    check_meta("k", meta, manifest)  # the untouched meta passes
    with pytest.raises(TempflowError, match=f"sample k: .*{problem}"):
        check_meta("k", {**meta, **edit}, manifest)
