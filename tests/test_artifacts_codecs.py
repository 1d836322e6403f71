"""The file formats artifacts are made of (stages.artifacts.codecs): the one version key, strict JSON,
the headers of .npy arrays and PNG images checked before any data is read, safetensors metadata in
one order."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stages.artifacts.codecs import (
    check_version,
    decode_npy,
    decode_png,
    loads_json,
    npy_bytes,
    npy_header,
    png_bytes,
    png_header,
    sort_safetensors_metadata,
    version_of,
    versioned,
)
from stages.support.errors import TempflowError


def test_one_version_key_and_the_legacy_one_is_read():
    assert versioned("tempflow.x/2", {"format": "tempflow.x/1", "a": 1}) == {"schema": "tempflow.x/2", "a": 1}
    assert version_of({"schema": "tempflow.x/1"}) == version_of({"format": "tempflow.x/1"}) == "tempflow.x/1"
    assert version_of({"a": 1}) is None and version_of([1]) is None
    check_version({"format": "tempflow.x/1"}, "tempflow.x/1", "f.json", "fix")  # an older file: still read


def test_another_version_is_refused_naming_the_version_found():
    with pytest.raises(TempflowError, match=r"^f.json: schema 'tempflow.x/9', this tempflow reads 'tempflow.x/1'; redo it$"):
        check_version({"schema": "tempflow.x/9"}, "tempflow.x/1", "f.json", "redo it")
    with pytest.raises(TempflowError, match="schema 'no version'"):
        check_version({"a": 1}, "tempflow.x/1", "f.json", "redo it")
    with pytest.raises(TempflowError, match="schema 'tempflow.x/1 and format tempflow.x/9'"):  # two claims
        check_version({"schema": "tempflow.x/1", "format": "tempflow.x/9"}, "tempflow.x/1", "f.json", "redo it")


def test_an_unversioned_record_is_read_only_where_its_kind_once_carried_none():
    check_version({"a": 1}, "tempflow.x/1", "f.json", "fix", legacy_unversioned=True)
    with pytest.raises(TempflowError):
        check_version({"schema": "tempflow.y/1"}, "tempflow.x/1", "f.json", "fix", legacy_unversioned=True)
    with pytest.raises(TempflowError):
        check_version([], "tempflow.x/1", "f.json", "fix", legacy_unversioned=True)


def test_strict_json_refuses_what_python_would_take():
    for text in ("NaN", "[Infinity]", "1e999"):
        with pytest.raises(ValueError):
            loads_json(text)
    assert loads_json('{"a": [1, 2.5]}') == {"a": [1, 2.5]}


def test_an_npy_header_is_checked_before_its_data():
    data = npy_bytes(np.zeros((2, 3), np.float32))
    assert npy_header(data[:128], "x", (2, 3), size=len(data))[0] == (2, 3)  # the header alone suffices
    with pytest.raises(TempflowError, match=r"shape \(2, 3\), the rollout's states are \(3, 2\)"):
        npy_header(data, "x", (3, 2))
    with pytest.raises(TempflowError, match="holds 20 bytes for a"):
        npy_header(data[:-4], "x", (2, 3), size=len(data) - 4)
    with pytest.raises(TempflowError, match="dtype float64"):
        decode_npy(npy_bytes(np.zeros((2, 3), np.float64)), "x", (2, 3))
    assert decode_npy(npy_bytes(np.ones((2, 3), np.float16)), "x", (2, 3)).dtype == np.float32  # widened losslessly


def _png_of(mode: str, side: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "1"])
def test_a_png_of_another_colour_mode_is_refused_from_its_header(mode):
    with pytest.raises(TempflowError, match="not 8-bit RGB"):
        png_header(_png_of(mode), "x")
    with pytest.raises(TempflowError, match="not 8-bit RGB"):
        decode_png(_png_of(mode), "x")


def test_a_png_of_another_size_than_the_rollouts_is_refused():
    image = np.zeros((4, 4, 3), np.uint8)
    assert decode_png(png_bytes(image), "x", side=4).shape == (4, 4, 3)
    with pytest.raises(TempflowError, match="is 4x4, the rollout's images are 8x8"):
        png_header(png_bytes(image), "x", side=8)


def test_safetensors_metadata_is_put_in_one_order_and_the_tensors_kept(tmp_path):
    """The library writes metadata keys in an order that varies between processes; sorted, two files
    of the same tensors and metadata are the same bytes."""
    import json
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata={"zeta": "1", "alpha": "{\"x\": 2}", "mid": "m"})
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    unsorted = json.loads(raw[8:8 + size])
    shuffled = {"__metadata__": dict(reversed(sorted(unsorted["__metadata__"].items()))),
                **{k: v for k, v in unsorted.items() if k != "__metadata__"}}
    header = json.dumps(shuffled, separators=(",", ":")).encode().ljust(size, b" ")
    path.write_bytes(raw[:8] + header + raw[8 + size:])  # the order another process could have written
    sort_safetensors_metadata(path)
    fixed = path.read_bytes()
    assert len(fixed) == len(raw) and fixed[8 + size:] == raw[8 + size:]
    assert list(json.loads(fixed[8:8 + size])["__metadata__"]) == ["alpha", "mid", "zeta"]
    assert all(torch.equal(load_file(path)[k], tensors[k]) for k in tensors)
    sort_safetensors_metadata(path)  # already in order: untouched
    assert path.read_bytes() == fixed
