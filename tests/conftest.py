"""Shared test settings: a deterministic Hypothesis profile and the optional-torch helper."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "gradcheck",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("gradcheck")


def require_torch():
    """Import torch or skip: torch is an optional extra (pip install -e '.[torch]')."""
    return pytest.importorskip("torch", reason="torch is not installed (optional extra: pip install -e '.[torch]')")
