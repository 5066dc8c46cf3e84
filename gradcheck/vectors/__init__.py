"""The golden vectors: seeded edge cases with their certified loss and gradient, modeled bugs, and the checker.

One idea per module: :mod:`~gradcheck.vectors.suite` (the data types and tables, and the numbers that
shape the inputs), :mod:`~gradcheck.vectors.bugs` (the modeled bugs), :mod:`~gradcheck.vectors.build`
(inputs and the suite), :mod:`~gradcheck.vectors.check` (an implementation against a suite),
:mod:`~gradcheck.vectors.file` (the file format: schema, writing, reading).
"""

from __future__ import annotations

from gradcheck.vectors.bugs import BUGS, certified_softmax
from gradcheck.vectors.build import DEFAULT_SEED, build_group, build_suite
from gradcheck.vectors.check import VectorCheck, VectorOutcome, check_vectors
from gradcheck.vectors.file import SCHEMA_NAME, SCHEMA_VERSION, load_vectors, parse_vectors, render_vectors
from gradcheck.vectors.suite import GROUPS, KINDS, NOTES, GroupSpec, Vector, VectorGroup, VectorSuite

__all__ = ["BUGS", "DEFAULT_SEED", "GROUPS", "KINDS", "NOTES", "SCHEMA_NAME", "SCHEMA_VERSION", "GroupSpec",
           "Vector", "VectorCheck", "VectorGroup", "VectorOutcome", "VectorSuite", "build_group", "build_suite",
           "certified_softmax", "check_vectors", "load_vectors", "parse_vectors", "render_vectors"]
