"""The cross-method study behind ``gradcheck report``, and the oracle's self-check.

Every registered method against the certified truth on seeded cases per regime and dtype, on local
processes or a Dask cluster, results in grid order. ``model`` holds the records, ``run`` runs the cases
and the study, ``executors`` are where tasks run, ``summary`` folds cases into cells, and
``selfcheck`` (imported on its own: ``gradcheck.study.selfcheck``) checks the fast oracle against the truth.
"""

from __future__ import annotations

from gradcheck.study.model import (
    DEFAULT_EXAMPLES,
    DEFAULT_SEED,
    PROOF_CLASSES,
    SHAPES,
    CaseResult,
    Cell,
    MethodInfo,
    Outcome,
    ProofRow,
    Study,
    StudyConfig,
    WorstCase,
)
from gradcheck.study.run import CHUNK, run_case, run_proofs, run_study, task_count
from gradcheck.study.summary import summarize, totals

__all__ = [
    "CHUNK", "DEFAULT_EXAMPLES", "DEFAULT_SEED", "PROOF_CLASSES", "SHAPES",
    "CaseResult", "Cell", "MethodInfo", "Outcome", "ProofRow", "Study", "StudyConfig", "WorstCase",
    "run_case", "run_proofs", "run_study", "summarize", "task_count", "totals",
]
