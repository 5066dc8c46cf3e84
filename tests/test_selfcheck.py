"""The self-check: per regime and dtype, the fast path's ULP error against the truth stays within its bound."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck import cli
from gradcheck.ulps import ulp_distance
from gradcheck.dtypes import DTYPE_NAMES, float_format, round_to_format
from gradcheck.oracle import cross_entropy_grad, cross_entropy_grad_bounded
from gradcheck.regimes import OPTION_REGIMES, REGIMES, make_case

ALL = REGIMES + OPTION_REGIMES  # the plain regimes, then the kernel options' rows (softcap, z-loss)
from gradcheck.study import selfcheck
from gradcheck.study.selfcheck import self_check

SEED, CASES = 2, 6


@pytest.fixture(scope="module")
def rows():
    return self_check(seed=SEED, cases=CASES, dtypes=DTYPE_NAMES)


def allowed_ulps(regime: str, dtype: str) -> float:
    """The largest ULP error of the fast path that the oracle's running bound permits on these cases.

    The exact gradient T is within ``bound`` of the oracle's float64 result g (docs/oracle.md). Rounding
    is monotone, so the correctly rounded truth lies between the roundings of g - bound and g + bound
    (each widened by one float64 step for its own rounding), and the fast result is at most as far
    from it as from the farther of those two ends.
    """
    fmt = float_format(dtype)
    allowed = 0.0
    for i in range(CASES):
        z, t, opts = make_case(SEED * 1_000_003 + i, regime, dtype)
        g, bound = cross_entropy_grad_bounded(z, t, **opts)
        fast = cross_entropy_grad(z, t, **opts)
        lo = round_to_format(np.nextafter(g - bound, -np.inf), fmt)
        hi = round_to_format(np.nextafter(g + bound, np.inf), fmt)
        allowed = max(allowed, float(np.max(np.maximum(ulp_distance(fast, lo), ulp_distance(fast, hi)))))
    return allowed


def test_one_row_per_regime_and_dtype_in_order(rows):
    assert [(r.regime, r.dtype) for r in rows] == [(g, d) for d in DTYPE_NAMES for g in ALL]
    assert all(r.cases == CASES and 0 <= r.median_ulp <= r.max_ulp and r.bound_held for r in rows)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_max_ulp_per_regime_is_within_what_the_running_bound_permits(rows, dtype):
    for row in (r for r in rows if r.dtype == dtype):
        assert row.max_ulp <= allowed_ulps(row.regime, dtype), row


def test_on_moderate_float32_logits_the_bound_decides_every_rounding():
    """The bound is far below a float32 ulp there (docs/oracle.md), so the check above demands 0 ULP."""
    assert allowed_ulps("moderate", "float32") == 0


def test_the_command_lists_every_regime_for_every_dtype(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # rich's table keeps every cell whole at this width
    assert cli.main(["selfcheck", "--cases", "2", "--seed", "1", "--dtypes", "float32", "bfloat16"]) == 0
    out = capsys.readouterr().out
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in out.splitlines() if line.startswith("│")]
    assert [(c[0], c[1], c[2], c[5]) for c in cells] == [(g, d, "2", "yes") for d in ("float32", "bfloat16")
                                                         for g in ALL]
    assert "seed 1, 2 cases per regime and dtype" in out and out.rstrip().endswith("within its error bound everywhere")


def test_the_command_exits_1_and_says_so_when_the_bound_fails(capsys, monkeypatch):
    def off_by_one(z, t, **opts):
        g, bound = cross_entropy_grad_bounded(z, t, **opts)
        return g + 1.0, bound  # far outside any bound

    monkeypatch.setattr(selfcheck, "cross_entropy_grad_bounded", off_by_one)
    assert cli.main(["selfcheck", "--cases", "1", "--dtypes", "float64"]) == 1
    out = capsys.readouterr().out
    assert "error bound violated" in out and "yes" not in out
