"""The file formats every artifact is made of, each read with its checks: strict JSON, ``.npy``
arrays (header first, never unpickled), PNG images (header first), safetensors, sha256; and the one
version key every artifact carries (:data:`VERSION_KEY`).

Nothing here knows which artifact it serves; the schema modules beside it say what a file must hold.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from stages.support.errors import TempflowError

# PIL and safetensors are imported inside the functions that use them, for start-up time.

VERSION_KEY = "schema"
"""The key that names an artifact's schema and version (``"tempflow.rollout/4"``) in every file
tempflow writes: JSON files, parquet metadata, checkpoint state."""
LEGACY_VERSION_KEY = "format"
"""The key some artifacts used before :data:`VERSION_KEY` was the only one (policy ``config.json``,
checkpoints); still read."""


def version_of(record: Any) -> str | None:
    """The schema an artifact's record names, under :data:`VERSION_KEY` or the legacy key; None when
    it names none (files written before they carried one, or not tempflow's)."""
    if not isinstance(record, dict):
        return None
    if VERSION_KEY in record and LEGACY_VERSION_KEY in record:  # two claims: neither is taken
        return f"{record[VERSION_KEY]} and {LEGACY_VERSION_KEY} {record[LEGACY_VERSION_KEY]}"
    found = record.get(VERSION_KEY, record.get(LEGACY_VERSION_KEY))
    return found if isinstance(found, str) else None


def check_version(record: Any, expected: str, where: Path | str, fix: str, legacy_unversioned: bool = False) -> None:
    """Refuse a record of another schema, in one line naming the version found and ``fix``. With
    ``legacy_unversioned``, a record that names no version is taken as this one (written before
    artifacts of its kind carried a version)."""
    found = version_of(record)
    if found == expected or (legacy_unversioned and found is None and isinstance(record, dict)
                             and VERSION_KEY not in record and LEGACY_VERSION_KEY not in record):
        return
    shown = found if found is not None else ("no version" if isinstance(record, dict) else type(record).__name__)
    raise TempflowError(f"{where}: schema {shown!r}, this tempflow reads {expected!r}; {fix}")


def versioned(schema: str, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its schema under :data:`VERSION_KEY` (and without the legacy key)."""
    return {VERSION_KEY: schema, **{k: v for k, v in record.items() if k not in (VERSION_KEY, LEGACY_VERSION_KEY)}}


# --------------------------------------------------------------------------------------------
# Values


def is_int(value: Any) -> bool:
    """A JSON integer (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number (``True`` is not one); strict JSON (:func:`loads_json`) never yields NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# JSON


def write_json(path: Path, obj: Any) -> None:
    """Sorted keys, indented, no NaN: the same object always gives the same bytes."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def loads_json(data: bytes | str) -> Any:
    """Strict JSON: UTF-8, and no ``NaN``/``Infinity`` or numbers that overflow to them (which
    Python's json accepts by default)."""
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)


def read_json(path: Path, what: str) -> Any:
    """A JSON file read strictly, or one line naming it and ``what`` was expected there."""
    if not path.is_file():
        raise TempflowError(f"{path}: no such file; expected {what}")
    try:
        return loads_json(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise TempflowError(f"{path}: not valid JSON ({err}); expected {what}") from None


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold an object."""
    record = read_json(path, what)
    if not isinstance(record, dict):
        raise TempflowError(f"{path}: is not a JSON object; expected {what}; {fix}")
    return record


# --------------------------------------------------------------------------------------------
# Hashes and safetensors


def sha256_handle(handle: Any) -> str:
    """sha256 of an open binary file, read from its start."""
    digest = hashlib.sha256()
    handle.seek(0)
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_handle(f)


def load_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of a safetensors file (CPU), or one line naming the file when it is unreadable."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise TempflowError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError for any malformed file
        raise TempflowError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys in order. The library writes
    them in an order that changes from process to process; sorted, the same tensors and metadata make
    the same bytes. A header this function would not write back exactly as it read is left alone."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw, object_pairs_hook=dict)
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or list(metadata) == sorted(metadata):
            return
        if _compact(header) != raw.rstrip(b" "):
            return  # not the compact form the library writes: nothing to reorder safely
        header["__metadata__"] = dict(sorted(metadata.items()))
        f.seek(8)
        f.write(_compact(header).ljust(size, b" "))


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------------------------
# Arrays (.npy)

NPY_HEADER_BYTES = 4096
"""An ``.npy`` header (magic, length, dict) fits in this many bytes for any shape tempflow writes."""


def npy_bytes(array: np.ndarray) -> bytes:
    """float arrays as ``.npy`` (bf16 and half are widened to float32, losslessly)."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "f" and array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_header(data: bytes, where: str, shape: tuple[int, ...] | None = None,
               size: int | None = None) -> tuple[tuple[int, ...], int]:
    """The shape of a plain float32 ``.npy`` array and where its data starts, from its header alone
    (no allocation, no pickle). ``shape``: the shape it must have; ``size``: the bytes the whole
    file has (checked against the header when given, so a header suffices to check a member)."""
    damaged = f"{where}: not a plain float32 .npy array"
    try:
        buf = io.BytesIO(data)
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"npy format version {version}")
        found, fortran, dtype = read_header[version](buf)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise TempflowError(f"{damaged} ({err}); the rollout is damaged") from None
    if dtype != np.dtype("<f4") or fortran:
        raise TempflowError(f"{damaged} (dtype {dtype}{', Fortran order' if fortran else ''}); the rollout is damaged")
    if shape is not None and tuple(found) != tuple(shape):
        raise TempflowError(f"{where}: shape {tuple(found)}, the rollout's states are {tuple(shape)}; the rollout is damaged")
    start = buf.tell()
    count = int(np.prod(found, dtype=np.int64))
    if size is not None and size - start != 4 * count:
        raise TempflowError(f"{where}: holds {size - start} bytes for a {tuple(found)} float32 array; the rollout is damaged")
    return tuple(found), start


def decode_npy(data: bytes, where: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A float32 array of ``shape`` with finite values, from ``.npy`` bytes; the header is read first,
    so an array that claims another shape (or terabytes) is refused before anything is allocated."""
    found, start = npy_header(data, where, shape, size=len(data))
    array = np.frombuffer(memoryview(data)[start:], dtype="<f4").reshape(found)
    if not np.isfinite(array).all():
        raise TempflowError(f"{where}: holds NaN or infinite values; the rollout is damaged")
    return array


# --------------------------------------------------------------------------------------------
# Images (PNG)

MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image a rollout may carry; a PNG whose header claims more is refused before decoding."""
PNG_HEADER_BYTES = 33
"""The PNG signature and its IHDR chunk: size, bit depth and colour type."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RGB, _EIGHT_BITS = 2, 8


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``(H, W, 3)`` as PNG (deterministic bytes for equal pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_header(data: bytes, where: str, side: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of an 8-bit RGB PNG from its IHDR chunk, before any pixel is decoded; a
    PNG of another colour mode or bit depth, of more than :data:`MAX_IMAGE_PIXELS`, or (given
    ``side``) not ``side`` x ``side`` is refused: what a reward reads must be what the policy drew."""
    if len(data) < PNG_HEADER_BYTES or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise TempflowError(f"{where}: image.png is not a readable PNG (no PNG signature and IHDR); the rollout is damaged")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if (depth, colour) != (_EIGHT_BITS, _RGB):
        raise TempflowError(f"{where}: image.png is not 8-bit RGB (bit depth {depth}, colour type {colour}); a policy "
                            "draws RGB images only: the rollout is damaged")
    if width * height > MAX_IMAGE_PIXELS:
        raise TempflowError(f"{where}: image.png claims {width}x{height} pixels, more than any policy "
                            f"draws ({MAX_IMAGE_PIXELS} at most); the rollout is damaged")
    if side is not None and (width, height) != (side, side):
        raise TempflowError(f"{where}: image.png is {width}x{height}, the rollout's images are {side}x{side}; "
                            "the rollout is damaged")
    return width, height


def decode_png(data: bytes, where: str, side: int | None = None) -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` array; the header (:func:`png_header`) is checked before any pixel
    is decoded."""
    from PIL import Image, UnidentifiedImageError

    png_header(data, where, side)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.mode != "RGB":
                raise ValueError(f"mode {img.mode}")
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise TempflowError(f"{where}: image.png is not a readable PNG ({err}); the rollout is damaged") from None
