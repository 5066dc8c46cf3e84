"""report.json: the study as a versioned JSON document; environment and timing kept apart from results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from gradcheck.report.floats import encode_floats
from gradcheck.report.jsonio import dumps
from gradcheck.study import Cell, Study, WorstCase
from gradcheck.vectors import VectorSuite

SCHEMA_NAME = "gradcheck-report"
SCHEMA_VERSION = "1.1.0"  # 1.1: the kernel options' rows (optionRegimes, optionResults), the vectors' kernel groups
SCHEMA_FILE = "report.schema.json"
PACKAGES = ("numpy", "jax", "jaxlib", "sympy", "mpmath", "hypothesis", "ml_dtypes", "matplotlib", "jinja2",
            "rich", "dask", "distributed")
# Keys whose values depend on the machine or the clock; everything else is a function of the seed,
# the configuration and the platform's floating-point libraries (docs in report.schema.json).
VOLATILE_KEYS = ("environment", "timing")


def schema() -> dict[str, Any]:
    """The JSON Schema of report.json, shipped in the package."""
    return json.loads(Path(__file__).with_name(SCHEMA_FILE).read_text())


# The settings that pin the floating-point environment of `make report` (Makefile, README "Reproducing
# the report"): numpy's SIMD dispatch and XLA's instruction set decide the last bits of exp and log.
FLOAT_ENVIRONMENT = ("NPY_DISABLE_CPU_FEATURES", "XLA_FLAGS")


def simd() -> dict[str, Any]:
    """The SIMD extensions numpy dispatches to here, and the settings that restrict them."""
    try:  # numpy's own record (np.show_runtime prints it); private, so absent names give None
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

        used: list[str] | None = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    except ImportError:
        used = None
    return {"numpyDispatch": used, "settings": {k: os.environ.get(k) for k in FLOAT_ENVIRONMENT}}


def environment(workers: str) -> dict[str, Any]:
    """Python, the platform, the SIMD in use and the numerical packages' versions (from metadata)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpuCount": os.cpu_count(),
        "executor": workers,
        "simd": simd(),
        "packages": versions,
    }


def _worst(w: WorstCase | None) -> dict[str, Any] | None:
    if w is None:
        return None
    options: dict[str, Any] = {}
    for key, value in w.options.items():
        name = {"label_smoothing": "labelSmoothing", "ignore_index": "ignoreIndex",
                "lse_square_scale": "lseSquareScale"}.get(key, key)
        options[name] = encode_floats(np.asarray(value, dtype=np.float64)) if key == "weight" else value
    return {
        "seed": w.seed,
        "regime": w.regime,
        "dtype": w.dtype,
        "logits": encode_floats(w.logits),
        "targets": w.targets.tolist() if w.targets.ndim == 1 else encode_floats(w.targets),
        "options": options,
        "index": list(w.index),
        "expected": encode_floats(np.asarray(w.expected, dtype=w.logits.dtype)),
        "got": encode_floats(np.asarray(w.got, dtype=w.logits.dtype)),
        "ulps": w.ulps,
        "errorEstimate": encode_floats(np.float64(w.error)),
    }


def _cell(c: Cell, *, worst: bool = True) -> dict[str, Any]:
    out = {
        "method": c.method, "regime": c.regime, "dtype": c.dtype, "cases": c.cases, "usable": c.usable,
        "unsupported": c.unsupported, "nonFinite": c.non_finite, "maxUlp": c.max_ulp, "medianUlp": c.median_ulp,
        "withinEstimate": c.within_share,
    }
    if worst:
        out["worstCase"] = _worst(c.worst)
    return out


def vector_summary(suite: VectorSuite, file_name: str, sha256: str) -> dict[str, Any]:
    """What report.json says about the vectors file (counts per group, and its digest)."""
    groups = []
    for g in suite.groups:
        group = {
            "dtype": g.dtype, "targetKind": g.targets, "reduction": g.reduction, "labelSmoothing": g.label_smoothing,
            "weighted": g.weighted, "ignoreIndex": g.ignore_index,
            "valid": sum(t.result == "valid" for t in g.tests), "invalid": sum(t.result == "invalid" for t in g.tests),
        }
        if g.kernel:  # the kernel groups only: the plain groups' entries read as before
            group.update(lseSquareScale=g.lse_square_scale, softcap=g.softcap,
                         upstream=any(t.grad_output is not None for t in g.tests))
        groups.append(group)
    return {
        "file": file_name, "sha256": sha256, "seed": suite.seed, "numberOfTests": suite.number_of_tests,
        "valid": sum(g["valid"] for g in groups), "invalid": sum(g["invalid"] for g in groups), "groups": groups,
    }


def report_document(study: Study, vectors: dict[str, Any] | None, *, timing: dict[str, Any],
                    started: _dt.datetime | None = None) -> dict[str, Any]:
    """The report.json document."""
    from gradcheck import __version__

    config = study.config
    timing = {
        "startedAt": (started or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="seconds"),
        "studySeconds": round(study.seconds, 3),
        "methodSeconds": {k: round(v, 3) for k, v in study.method_seconds.items()},
        "proofSeconds": {f"{p.kind}/K={p.k}": round(p.seconds, 3) for p in study.proofs},
        "proofsCached": sum(p.cached for p in study.proofs),
        **timing,
    }
    return {
        "schema": SCHEMA_NAME,
        "schemaVersion": SCHEMA_VERSION,
        "gradcheckVersion": __version__,
        "seed": config.seed,
        "config": {
            "examples": config.examples, "dtypes": list(config.dtypes), "regimes": list(config.regimes),
            "methods": [m.name for m in study.methods], "shapes": [list(s) for s in config.shapes],
            "proofClasses": config.proof_classes, "optionRegimes": list(config.option_regimes),
            "optionShapes": [list(s) for s in config.option_shapes],
            "caseSeed": "make_case(seed * 1000003 + i, regime, dtype, n=N, k=K), (N, K) = shapes[i % len(shapes)] "
                        "(optionShapes for the option regimes)",
        },
        "methods": [{"name": m.name, "summary": m.summary, "errorKind": "bound" if m.bound else "estimate"}
                    for m in study.methods],
        "results": [_cell(c) for c in study.cells],
        "totals": [_cell(c, worst=False) for c in study.totals],
        "optionResults": [_cell(c) for c in study.option_cells],
        "proofs": [{"kind": p.kind, "k": p.k, "status": p.status, "statement": p.statement} for p in study.proofs],
        "vectors": vectors,
        "environment": environment(study.workers),
        "timing": timing,
    }


def render_report_json(document: dict[str, Any]) -> str:
    return dumps(document)


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """The document without its environment- and timing-dependent keys (what CI compares)."""
    return {k: v for k, v in document.items() if k not in VOLATILE_KEYS}
