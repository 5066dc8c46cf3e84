"""The one regime catalogue: every generator draws the regimes it lists, with the catalogue's numbers."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck import strategies, vectors
from gradcheck.dtypes import DTYPE_NAMES, float_format
from gradcheck.errors import InvalidArgument
from gradcheck.options import VERIFY
from gradcheck.problem import make_problem
from gradcheck.regimes import BY_NAME, CATALOGUE, GAP, HUGE, OPTION_REGIMES, REGIMES, drawn_by, make_case, param
from gradcheck.study import StudyConfig
from gradcheck.vectors import suite


def test_names_are_unique_and_every_regime_says_what_it_exercises():
    names = [r.name for r in CATALOGUE]
    assert len(names) == len(set(names)) == len(BY_NAME)
    assert all(r.exercises and r.drawn_by <= {"verify", "study", "vectors"} and r.drawn_by for r in CATALOGUE)


def test_each_generator_draws_exactly_its_regimes():
    assert strategies.REGIMES == drawn_by("verify")
    # (helper vectors) the study's plain regimes, then the kernel options' own rows
    assert REGIMES + OPTION_REGIMES == StudyConfig().regimes + StudyConfig().option_regimes == drawn_by("study")
    assert set(vectors.KINDS) == set(drawn_by("vectors"))


def test_generators_share_the_catalogues_numbers():
    assert strategies.GAP is GAP is param("large_gap", "gap")  # once 12 in the study, 20 in verify for float16
    assert strategies.HUGE is HUGE
    assert suite.GAP is param("large_gap", "vector_gap") and suite.ZERO_GAP is param("signed_zero", "zero_gap")
    assert strategies.MANY_CLASSES_TILE == param("many_classes", "tile") == 64


@pytest.mark.parametrize("name,key", [("large_gap", "gap"), ("large_gap", "vector_gap"), ("huge", "huge"),
                                      ("signed_zero", "zero_gap")])
def test_per_dtype_parameters_cover_every_dtype_and_fit_it(name, key):
    values = param(name, key)
    assert set(values) == set(DTYPE_NAMES)
    assert all(0 < v < float_format(d).max for d, v in values.items())


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("regime", REGIMES)
def test_make_case_gives_valid_cases_exact_in_the_dtype(regime, dtype):
    for seed in range(5):
        logits, targets, options = make_case(seed, regime, dtype)
        assert logits.dtype == float_format(dtype).dtype
        if targets.dtype.kind == "f":
            assert targets.dtype == logits.dtype
        make_problem(logits, targets, **options)  # valid: finite or -inf, targets in range


def test_large_gap_reaches_the_catalogues_gap():
    gaps = []
    for seed in range(40):
        z = make_case(seed, "large_gap", "float16")[0].astype(np.float64)
        gaps.append(float(np.max(z.max(axis=1) - z.min(axis=1))))
    assert 0.5 * GAP["float16"] < max(gaps) <= GAP["float16"] + 3.0


def test_unknown_regimes_are_named():
    with pytest.raises(InvalidArgument, match=r"regime must be one of \('moderate'"):
        make_case(0, "gentle")
    with pytest.raises(InvalidArgument, match=r"regimes must be a non-empty subset of \('moderate'.*'masked', "
                       r"'saturated', 'large_lse'\)"):
        VERIFY["regimes"].validate(("gentle",))
