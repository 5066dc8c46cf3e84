"""The vectors file format: its schema, writing a :class:`~gradcheck.vectors.suite.VectorSuite` as JSON and reading it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gradcheck.errors import InvalidArgument
from gradcheck.report.floats import decode_floats, encode_floats
from gradcheck.report.jsonio import dumps
from gradcheck.vectors.suite import Vector, VectorGroup, VectorSuite

SCHEMA_NAME = "gradcheck-vectors"
SCHEMA_VERSION = "1.1.0"  # 1.1: the kernel groups (lseSquareScale, softcap, gradOutput), optional keys
SCHEMA_FILE = "vectors.schema.json"
HEADER = (
    "Golden vectors for the gradient of softmax cross-entropy with respect to the logits,",
    "with torch.nn.functional.cross_entropy semantics (class-index or probability targets, class weights,",
    "ignore_index, reduction mean/sum/none, label smoothing).",
    "A valid test's loss and grad are the exact values correctly rounded to the dtype (round to nearest,",
    "ties to even, subnormals included). An invalid test repeats a valid test's inputs with the gradient",
    "of a modeled bug (its flag says which); a checker must reject it.",
    "Call grad_fn(logits, targets, **options) with the group's options that differ from their defaults:",
    "weight (the test's, when the group is weighted), ignore_index (when not -100), label_smoothing",
    "(when not 0), reduction (when not 'mean'), lse_square_scale and softcap (when the group has them:",
    "the z-loss and Gemma-2 softcap of Liger-Kernel's cross_entropy), and grad_output (a test's gradOutput,",
    "when it has one: the gradient is then the vector-Jacobian product grad_output * dL/dz).",
)
FLOAT_ENCODING = ("Every float is {dtype, shape, hex, repr}: hex is the IEEE bit pattern (authoritative), "
                  "repr the shortest decimal that rounds back to it; see docs/vectors.md.")


def schema() -> dict[str, Any]:
    """The JSON Schema of the vectors file, shipped in the package."""
    return json.loads((Path(__file__).with_name(SCHEMA_FILE)).read_text())


def _test(test: Vector, weighted: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tcId": test.tc_id,
        "comment": test.comment,
        "flags": list(test.flags),
        "logits": encode_floats(test.logits),
        "targets": test.targets.tolist() if test.targets.ndim == 1 else encode_floats(test.targets),
        "loss": encode_floats(test.loss),
        "grad": encode_floats(test.grad),
        "result": test.result,
    }
    if weighted:
        out["weight"] = encode_floats(test.weight)
    if test.grad_output is not None:
        out["gradOutput"] = encode_floats(test.grad_output)
    return out


def _group_document(g: VectorGroup) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "CrossEntropyGradientTest",
        "dtype": g.dtype,
        "targetKind": g.targets,
        "reduction": g.reduction,
        "labelSmoothing": encode_floats(np.float64(g.label_smoothing)),
        "weighted": g.weighted,
        "ignoreIndex": g.ignore_index,
        "tests": [_test(t, g.weighted) for t in g.tests],
    }
    # the kernel options: present only in the groups that have them (the plain groups read as before)
    if g.lse_square_scale:
        out["lseSquareScale"] = encode_floats(np.float64(g.lse_square_scale))
    if g.softcap is not None:
        out["softcap"] = encode_floats(np.float64(g.softcap))
    return out


def vectors_document(suite: VectorSuite) -> dict[str, Any]:
    """The JSON document of a suite (see docs/vectors.md)."""
    return {
        "schema": SCHEMA_NAME,
        "schemaVersion": SCHEMA_VERSION,
        "algorithm": "softmax-cross-entropy-gradient",
        "generatorVersion": suite.generator,
        "seed": suite.seed,
        "numberOfTests": suite.number_of_tests,
        "header": list(HEADER),
        "floatEncoding": FLOAT_ENCODING,
        "notes": {flag: {"bugType": kind, "description": text} for flag, (kind, text) in suite.notes.items()},
        "testGroups": [_group_document(g) for g in suite.groups],
    }


def render_vectors(suite: VectorSuite) -> str:
    """The vectors file's text: deterministic, byte for byte (sorted keys, fixed float encoding)."""
    return dumps(vectors_document(suite))


def parse_vectors(text: str, *, validate: bool = True) -> VectorSuite:
    """Load a vectors file's text.

    Args:
        text: the JSON text.
        validate: check it against the shipped JSON Schema when ``jsonschema`` is installed.

    Raises:
        InvalidArgument: not JSON, not this schema, or a malformed value (the message says where).
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the vectors file is not JSON: {exc}.") from None
    except RecursionError:
        raise InvalidArgument("the vectors file is nested too deeply to be a vectors file.") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        raise InvalidArgument(f"the vectors file must have schema {SCHEMA_NAME!r}, got {doc.get('schema') if isinstance(doc, dict) else type(doc).__name__!r}.")
    major = str(doc.get("schemaVersion", "")).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise InvalidArgument(f"schemaVersion must be {SCHEMA_VERSION.split('.')[0]}.x, got {doc.get('schemaVersion')!r}.")
    if validate:
        try:
            import jsonschema
        except ImportError:
            jsonschema = None
        if jsonschema is not None:
            try:
                jsonschema.validate(doc, schema())
            except RecursionError:
                raise InvalidArgument("the vectors file is nested too deeply to be a vectors file.") from None
            except jsonschema.ValidationError as exc:
                where = "/".join(str(p) for p in exc.absolute_path)
                raise InvalidArgument(f"the vectors file does not match its schema at {where or '/'}: {exc.message}") from None
    try:
        groups = tuple(_group(g, i) for i, g in enumerate(doc["testGroups"]))
        notes = {k: (v["bugType"], v["description"]) for k, v in doc["notes"].items()}
        suite = VectorSuite(int(doc["seed"]), str(doc["generatorVersion"]), groups, notes)
    except InvalidArgument:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise InvalidArgument(f"malformed vectors file: {exc}") from None
    if suite.number_of_tests != doc["numberOfTests"]:
        raise InvalidArgument(f"numberOfTests is {doc['numberOfTests']}, but the file holds {suite.number_of_tests} tests.")
    return suite


def load_vectors(path: str | Path, *, validate: bool = True) -> VectorSuite:
    """Read and parse a vectors file (see :func:`parse_vectors`).

    Raises:
        InvalidArgument: unreadable or malformed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read the vectors file {str(path)!r}: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the vectors file {str(path)!r} is not UTF-8 text: byte {exc.start} is "
                              f"{exc.object[exc.start:exc.start + 1]!r}.") from None
    return parse_vectors(text, validate=validate)


def _group(g: dict[str, Any], index: int) -> VectorGroup:
    where = f"testGroups[{index}]"
    smoothing = float(decode_floats(g["labelSmoothing"], where=f"{where}.labelSmoothing"))
    zloss = float(decode_floats(g["lseSquareScale"], where=f"{where}.lseSquareScale")) if "lseSquareScale" in g else 0.0
    softcap = float(decode_floats(g["softcap"], where=f"{where}.softcap")) if "softcap" in g else None
    tests = []
    for j, t in enumerate(g["tests"]):
        at = f"{where}.tests[{j}]"
        logits = decode_floats(t["logits"], where=f"{at}.logits")
        targets = (_indices(t["targets"], logits, g["ignoreIndex"], where=f"{at}.targets")
                   if g["targetKind"] == "index" else decode_floats(t["targets"], where=f"{at}.targets"))
        weight = decode_floats(t["weight"], where=f"{at}.weight") if g["weighted"] else None
        flags = tuple(t["flags"])
        bug = flags[0] if t["result"] == "invalid" and flags else None
        upstream = decode_floats(t["gradOutput"], where=f"{at}.gradOutput") if "gradOutput" in t else None
        tests.append(Vector(int(t["tcId"]), str(t["comment"]), flags, logits,
                            targets, weight, decode_floats(t["loss"], where=f"{at}.loss"),
                            decode_floats(t["grad"], where=f"{at}.grad"), str(t["result"]), bug, upstream))
    return VectorGroup(str(g["dtype"]), str(g["targetKind"]), str(g["reduction"]), smoothing, bool(g["weighted"]),
                       g["ignoreIndex"], tuple(tests), zloss, softcap)


def _indices(values: Any, logits: np.ndarray, ignore_index: Any, *, where: str) -> np.ndarray:
    """Class-index targets: one integer per row of ``logits``, each in [0, K) or ``ignore_index``."""
    if logits.ndim != 2:
        raise InvalidArgument(f"{where}: logits must be N x K, got shape {logits.shape}.")
    n, k = logits.shape
    if (not isinstance(values, list) or len(values) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        raise InvalidArgument(f"{where} must be a list of {n} integers (one per row of logits), got {values!r:.80}.")
    bad = [v for v in values if not (0 <= v < k or v == ignore_index)]
    if bad:
        shown = bad[0] if abs(bad[0]) < 10**12 else f"{bad[0]:.6g}"
        raise InvalidArgument(f"{where} must be class indices in [0, {k}) or ignore_index={ignore_index}, got {shown}.")
    return np.array(values, dtype=np.int64)
