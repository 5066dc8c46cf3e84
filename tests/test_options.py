"""The one option spec: one rule per option, the same through every entry point."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

import gradcheck as gc
from gradcheck import cli
from gradcheck.dtypes import DTYPE_NAMES
from gradcheck.errors import InvalidArgument
from gradcheck.estimators import gradient
from gradcheck.options import CASE, GENERATE, VERIFY, Option
from gradcheck.problem import Case, make_problem
from gradcheck.strategies import cases

Z = np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]])
T = np.array([2, 0])

CASE_ENTRIES = {
    "make_problem": lambda **o: make_problem(Z, T, **o),
    "Case.make": lambda **o: Case.make(Z, T, **o),
    "cross_entropy": lambda **o: gc.cross_entropy(Z, T, **o),
    "cross_entropy_grad": lambda **o: gc.cross_entropy_grad(Z, T, **o),
    "cross_entropy_grad_bounded": lambda **o: gc.cross_entropy_grad_bounded(Z, T, **o),
    "cross_entropy_hessian": lambda **o: gc.cross_entropy_hessian(Z, T, **o),
    "exact_grad": lambda **o: gc.exact_grad(Z, T, **o),
    "exact_loss": lambda **o: gc.exact_loss(Z, T, **o),
    "gradient": lambda **o: gradient(Z, T, method="closed_form", **o),
}


def _oracle(logits, targets, **options):
    return gc.cross_entropy_grad(logits, targets, **options)


VERIFY_ENTRIES = {
    "verify": lambda **o: gc.verify(_oracle, max_examples=2, seed=0, **o),
    "assert_gradient": lambda **o: gc.assert_gradient(_oracle, max_examples=2, seed=0, **o),
    "cases": lambda **o: cases(**o),
}


@pytest.mark.parametrize("entry", CASE_ENTRIES, ids=str)
@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), np.array(0.25), 0.25, 1, np.int64(0)],
                         ids=repr)
def test_numpy_and_python_numbers_are_the_same_number_everywhere(entry, value):
    CASE_ENTRIES[entry](label_smoothing=value)


@pytest.mark.parametrize("entry", [*CASE_ENTRIES, *VERIFY_ENTRIES], ids=str)
@pytest.mark.parametrize("value", [True, np.True_, "0.1", None, float("nan"), 1.5], ids=repr)
def test_bools_strings_and_nonfinite_are_not_numbers_anywhere(entry, value):
    call = CASE_ENTRIES.get(entry) or VERIFY_ENTRIES[entry]
    with pytest.raises(InvalidArgument, match=r"label_smoothing must be a number in \[0, 1\], got "):
        call(label_smoothing=value)


@pytest.mark.parametrize("entry", CASE_ENTRIES, ids=str)
@pytest.mark.parametrize("value", [True, 1.0, "1"], ids=repr)
def test_integer_options_refuse_bools_and_floats(entry, value):
    with pytest.raises(InvalidArgument, match=r"ignore_index must be an integer, got "):
        CASE_ENTRIES[entry](ignore_index=value)


def test_integer_options_take_numpy_integers():
    assert make_problem(Z, T, ignore_index=np.int32(0)).ignore_index == 0
    assert type(make_problem(Z, T, ignore_index=np.int32(0)).ignore_index) is int
    assert gc.verify(_oracle, max_examples=np.int64(3), seed=np.uint8(1)).examples == 3


@pytest.mark.parametrize("entry", [*VERIFY_ENTRIES], ids=str)
def test_flags_take_numpy_bools_only(entry):
    VERIFY_ENTRIES[entry](weighted=np.True_)
    with pytest.raises(InvalidArgument, match=r"weighted must be True or False, got 1"):
        VERIFY_ENTRIES[entry](weighted=1)


@pytest.mark.parametrize("entry", [e for e in [*CASE_ENTRIES, *VERIFY_ENTRIES] if e != "gradient"], ids=str)
def test_an_unknown_option_is_named_with_the_known_ones(entry):  # gradient() passes the rest to its method
    call = CASE_ENTRIES.get(entry) or VERIFY_ENTRIES[entry]
    with pytest.raises(InvalidArgument, match=r"unknown option 'smoothing'; its .* are .*label_smoothing"):
        call(smoothing=0.1)


def test_verify_passes_the_canonical_value_to_grad_fn():
    seen = []

    def grad(logits, targets, **options):
        seen.append(options)
        return _oracle(logits, targets, **options)

    result = gc.verify(grad, label_smoothing=np.float32(0.25), reduction="sum", max_examples=2, seed=0)
    assert result.passed
    assert all(type(o["label_smoothing"]) is float and o["label_smoothing"] == 0.25 for o in seen)
    assert result.arguments == {"reduction": "sum", "label_smoothing": 0.25, "max_examples": 2}


def test_the_tables_share_one_definition_per_option():
    assert CASE["reduction"] is VERIFY["reduction"] and CASE["label_smoothing"] is VERIFY["label_smoothing"]
    assert list(GENERATE) == [n for n in VERIFY if n not in ("precision", "inplace", "max_examples", "seed", "timeout")]
    assert VERIFY["dtype"].choices == DTYPE_NAMES
    assert all(o.help and o.name == name for table in (CASE, VERIFY) for name, o in table.items())


@pytest.mark.parametrize("name", [n for n, o in VERIFY.items() if o.parse is not None])
def test_text_goes_through_the_same_rule(name):
    option: Option = VERIFY[name]
    samples = {"dtype": ("bfloat16", "bfloat16"), "targets": ("probs", "probs"), "reduction": ("sum", "sum"),
               "label_smoothing": ("0.5", 0.5), "lse_square_scale": ("1e-4", 1e-4), "softcap": ("30", 30.0), "ignore_index": ("-1", -1), "max_examples": ("7", 7),
               "seed": ("3", 3), "timeout": ("2.5", 2.5), "precision": ("exact", "exact"), "inplace": ("allowed", "allowed"), "max_shape": ("8,32", (8, 32)), "regimes": ("ties,huge", ("ties", "huge")),
               "shapes": ("8x128256,2x1024x32000", ((8, 128256), (2, 1024, 32000))), "class_axis": ("-1", -1)}
    text, value = samples[name]
    assert option.from_text(text) == value
    with pytest.raises(InvalidArgument, match=f"^{name} must be"):
        option.from_text("nonsense")


def test_the_cli_flags_are_the_verify_options():
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {o.dest for o in sub.choices["verify"]._actions} - {"help", "function", "vectors", "json", "junit_xml", "linear"}
    assert flags == set(VERIFY)


def test_a_bad_flag_value_gets_the_api_message_and_exit_2():
    run = subprocess.run([sys.executable, "-m", "gradcheck", "verify", "x:y", "--label-smoothing", "2"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2
    assert "argument --label-smoothing: label_smoothing must be a number in [0, 1], got 2.0." in run.stderr
