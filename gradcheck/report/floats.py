"""The float encoding of the JSON files: each value as its IEEE bit pattern in hex plus a shortest decimal.

An encoded array is ``{"dtype": "float32", "shape": [2, 3], "hex": [[...], [...]], "repr": [[...], [...]]}``
(nested lists follow the shape; a 0-d value is a bare string). ``hex`` is authoritative: the bit
pattern as lowercase hexadecimal, zero-padded to the format's width (16, 8, 4, 4 digits for float64,
float32, float16, bfloat16), no prefix, so signed zeros, subnormals and infinities round-trip exactly.
``repr`` is for readers: the shortest decimal that gives the same value back when parsed as float64
and rounded once to the dtype (``"-0.0"``, ``"inf"``, ``"nan"`` for those). NaN is written as the
format's canonical quiet NaN (positive, top fraction bit set). See docs/vectors.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradcheck.dtypes import bit_pattern, float_format, round_to_format

WIDTH = {"float64": 16, "float32": 8, "float16": 4, "bfloat16": 4}
CANONICAL_NAN = {"float64": 0x7FF8000000000000, "float32": 0x7FC00000, "float16": 0x7E00, "bfloat16": 0x7FC0}


def _bits(x: np.ndarray) -> np.ndarray:
    fmt = float_format(x.dtype)
    bits = bit_pattern(x).astype(np.uint64)
    return np.where(np.isnan(x.astype(np.float64)), np.uint64(CANONICAL_NAN[fmt.name]), bits)


def shortest_reprs(x: np.ndarray) -> list[str]:
    """Shortest decimal strings of a flat array's values (see the module docstring)."""
    fmt = float_format(x.dtype)
    v = x.astype(np.float64).ravel()
    if fmt.name == "float64":
        return [repr(float(e)) for e in v]
    target = _bits(x).ravel()
    out: list[str | None] = [None] * v.size
    for i, e in enumerate(v):
        if not np.isfinite(e):
            out[i] = repr(float(e))
    for digits in range(1, 18):
        todo = [i for i, s in enumerate(out) if s is None]
        if not todo:
            break
        texts = [f"{v[i]:.{digits}g}" for i in todo]
        parsed = np.array([float(t) for t in texts])
        back = _bits(round_to_format(parsed, fmt))
        for i, t, p, b in zip(todo, texts, parsed, back):
            if b == target[i]:
                out[i] = repr(float(p))
    return [s if s is not None else repr(float(e)) for s, e in zip(out, v)]


def encode_floats(x: Any) -> dict[str, Any]:
    """Encode a float array of float64, float32, float16 or bfloat16 (any shape, 0-d included)."""
    x = np.asarray(x)
    fmt = float_format(x.dtype)
    width = WIDTH[fmt.name]
    hexes = [f"{int(b):0{width}x}" for b in _bits(x).ravel()]
    reprs = shortest_reprs(x)
    return {"dtype": fmt.name, "shape": list(x.shape), "hex": _nest(hexes, x.shape), "repr": _nest(reprs, x.shape)}


def _nest(flat: list[str], shape: tuple[int, ...]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _flatten(nested: Any, shape: list[int], where: str) -> list[Any]:
    if not shape:
        if isinstance(nested, list):
            raise ValueError(f"{where}: expected a scalar, got a list")
        return [nested]
    if not isinstance(nested, list) or len(nested) != shape[0]:
        raise ValueError(f"{where}: expected a list of {shape[0]}, got {nested!r:.60}")
    return [e for item in nested for e in _flatten(item, shape[1:], where)]


def decode_floats(obj: Any, *, where: str = "value") -> np.ndarray:
    """Decode :func:`encode_floats` output; the hex is authoritative, the repr must agree with it.

    Raises:
        ValueError: malformed, or a repr that does not match its hex (naming ``where``).
    """
    if not isinstance(obj, dict) or not {"dtype", "shape", "hex", "repr"} <= set(obj):
        raise ValueError(f"{where}: expected an encoded float array with dtype, shape, hex and repr")
    fmt = float_format(obj["dtype"], argument=f"{where}.dtype")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"{where}.shape: expected a list of sizes, got {shape!r}")
    hexes = _flatten(obj["hex"], shape, f"{where}.hex")
    reprs = _flatten(obj["repr"], shape, f"{where}.repr")
    width = WIDTH[fmt.name]
    try:
        ints = [int(h, 16) for h in hexes if isinstance(h, str) and len(h) == width]
    except ValueError:
        ints = []
    if len(ints) != len(hexes):
        raise ValueError(f"{where}.hex: expected {width}-digit hexadecimal strings")
    x = np.array(ints, dtype=fmt.int_dtype).view(fmt.dtype).reshape(shape)
    parsed = np.array([float(r) if isinstance(r, str) else np.nan for r in reprs]).reshape(shape)
    mine = round_to_format(parsed, fmt)
    same = (_bits(mine) == _bits(x)) | (np.isnan(parsed) & np.isnan(x.astype(np.float64)))
    if not np.all(same):
        i = int(np.flatnonzero(~same.ravel())[0])
        raise ValueError(f"{where}: repr {reprs[i]!r} does not match hex {hexes[i]!r} (element {i})")
    return x
