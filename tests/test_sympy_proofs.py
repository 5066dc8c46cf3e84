"""Tests of the SymPy proofs: the decision, the kernel kinds, the cache and the time bound."""

from __future__ import annotations

import json
import time

import pytest
import sympy as sp

from gradcheck.errors import InvalidArgument
from gradcheck.estimators.sympy_proofs import DEFAULT_KINDS, _is_zero, cache_dir, prove, prove_all


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADCHECK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("k_max", [pytest.param(4), pytest.param(8, marks=pytest.mark.slow)])
def test_every_identity_is_proved_and_then_cached(private_cache, k_max):
    first = prove_all(k_max)
    assert len(first) == k_max * len(DEFAULT_KINDS)
    assert all(p.proved and not p.cached for p in first), [p for p in first if not p.proved]
    files = sorted((private_cache / "sympy_proofs").glob("*.json"))
    assert len(files) == len(first)
    assert json.loads(files[0].read_text())["status"] == "proved"
    start = time.perf_counter()
    second = prove_all(k_max)
    assert all(p.proved and p.cached for p in second)
    assert [p.seconds for p in second] == [p.seconds for p in first]  # the recorded proof times
    assert time.perf_counter() - start < sum(p.seconds for p in first)


def test_cache_dir_follows_the_environment(private_cache):
    assert cache_dir() == private_cache


def test_the_decision_refutes_a_wrong_closed_form():
    z = sp.symbols("z0:3", real=True)
    w = sp.symbols("w0:3", positive=True)
    total = sum(sp.exp(x) for x in z)
    loss = -sum(w[c] * sp.log(sp.exp(z[c]) / total) for c in range(3))
    p0 = sp.exp(z[0]) / total
    assert _is_zero(sp.diff(loss, z[0]) - (p0 * sum(w) - w[0]), z)
    assert not _is_zero(sp.diff(loss, z[0]) - (p0 - w[0]), z)  # forgets the weights
    assert not _is_zero(sp.diff(p0, z[1]) - p0 * sp.exp(z[1]) / total, z)  # wrong sign


def test_a_proof_is_time_bounded_and_a_timeout_is_not_cached(private_cache):
    result = prove("gradient", 8, timeout=0.0)
    assert result.status == "timeout" and not result.proved
    assert not (private_cache / "sympy_proofs").exists()


def test_bad_arguments_are_named():
    with pytest.raises(InvalidArgument, match="kind must be one of .*got 'hessian'"):
        prove("hessian", 2)
    with pytest.raises(InvalidArgument, match="k must be an integer >= 1, got 0"):
        prove("gradient", 0)


@pytest.mark.parametrize("corrupt", [b"[]", b"null", b"{", b"\xff\xfe garbage", b'{"status": "proved", "seconds": null}',
                                     b'{"status": "bogus", "seconds": 1.0}', b'{"status": "proved"}',
                                     b'{"status": "proved", "seconds": -1}', b"[" * 100_000, "folder"])
def test_a_corrupt_cache_entry_is_recomputed_and_overwritten(private_cache, corrupt):
    prove("gradient", 1)
    (entry,) = (private_cache / "sympy_proofs").glob("gradient_k1_*.json")
    entry.unlink()
    if corrupt == "folder":
        (entry / "inside").mkdir(parents=True)
    else:
        entry.write_bytes(corrupt)
    redone = prove("gradient", 1)
    assert redone.proved and not redone.cached
    assert json.loads(entry.read_text())["status"] == "proved"  # overwritten with a good entry
    assert prove("gradient", 1).cached
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary file left


# ---- the kernel options (issue 12) ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kernel_gradient", "kernel_jacobian"])
def test_the_kernel_identities_are_proved_for_k_1_to_6(kind):
    proofs = [prove(kind, k) for k in range(1, 7)]
    assert all(p.proved and not p.cached for p in proofs), [p for p in proofs if not p.proved]
    assert all(p.seconds > 0 for p in proofs)
    assert "tanh" in proofs[0].statement


def test_the_kernel_hessian_is_proved():
    # K = 1..3 here (about 12 s); K = 4..6 take 18-29 s each (docs/methods.md): `gradcheck prove`
    proofs = [prove("kernel_hessian", k) for k in range(1, 4)]
    assert all(p.proved for p in proofs), [p for p in proofs if not p.proved]


def _claim(k, i, *, zloss=None, chain=None):
    from gradcheck.estimators.sympy_proofs import kernel_parts

    kp = kernel_parts(k)
    ce = (kp.p[i] * kp.s - kp.w[i] * kp.y[i]) / kp.d
    z_term = 2 * kp.lam * kp.lse * (kp.p[i] if zloss is None else zloss(kp, i)) / kp.dz
    factor = kp.chi[i] if chain is None else chain(kp, i)
    return kp, sp.diff(kp.loss, kp.z[i]) - kp.g * (ce + z_term) * factor


@pytest.mark.parametrize("slip", ["z-loss 2 lambda lse (p - eps/K)", "softcap x tanh(x/c)", "no chain factor",
                                  "z-loss over D", "upstream factor dropped"])
def test_a_wrong_kernel_closed_form_is_refuted(slip):
    from gradcheck.estimators.sympy_proofs import decide

    k = 3
    _, right = _claim(k, 1)
    assert decide(right, k) == "proved"
    if slip.startswith("z-loss 2"):
        kp, wrong = _claim(k, 1, zloss=lambda kp, i: kp.p[i] - kp.eps / k)
    elif slip.startswith("softcap"):
        kp, wrong = _claim(k, 1, chain=lambda kp, i: sp.tanh(kp.z[i] / kp.c)
                           + kp.z[i] / kp.c * (1 - sp.tanh(kp.z[i] / kp.c) ** 2))
    elif slip == "no chain factor":
        kp, wrong = _claim(k, 1, chain=lambda kp, i: sp.Integer(1))
    elif slip == "z-loss over D":
        kp, wrong = _claim(k, 1, zloss=lambda kp, i: kp.p[i] * kp.dz / kp.d)
    else:
        kp, wrong = _claim(k, 1, chain=lambda kp, i: kp.chi[i] / kp.g)
    assert decide(wrong, k) == "failed"


def test_the_softcap_bug_as_a_loss_is_refuted_too():
    """unsloth-zoo #593 as the kernel computes it: the loss on x tanh(x / c) against the closed form of c tanh(x / c)."""
    from gradcheck.estimators.sympy_proofs import decide, kernel_parts

    k = 2
    kp = kernel_parts(k)
    bad_loss = kp.loss.xreplace({kp.c * sp.tanh(zj / kp.c): zj * sp.tanh(zj / kp.c) for zj in kp.z})
    assert bad_loss != kp.loss
    assert decide(sp.diff(bad_loss, kp.z[0]) - kp.zgrad(0) * kp.chi[0], k) == "failed"


def test_kernel_proofs_are_cached_and_time_bounded(private_cache):
    first = prove("kernel_gradient", 2)
    again = prove("kernel_gradient", 2)
    assert again.cached and again.seconds == first.seconds
    assert prove("kernel_hessian", 4, timeout=0.0).status == "timeout"


def test_gradcheck_prove_runs_the_kernel_kinds(capsys):
    from gradcheck import cli

    assert cli.main(["prove", "--max-classes", "2", "--kinds", "kernel_gradient", "kernel_jacobian"]) == 0
    out = capsys.readouterr().out
    assert out.count("[ proved]") == 4 and "(1 - tanh^2(z_i / c))" in out
