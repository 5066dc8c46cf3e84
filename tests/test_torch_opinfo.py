"""torch's own OpInfo sample inputs for nn.functional.cross_entropy: all accepted, all agreeing with torch.

The samples (torch 2.13.0, ``torch.testing._internal.common_methods_invocations.op_db``, its
``sample_inputs_cross_entropy``) cover torch's whole input domain in float64: class-index and probability
targets, the (N, C, d1, ..., dk) layout up to k = 3 (``class_axis=1``), every reduction, class weights drawn
from [-9, 9] (so negative ones), and ignore_index. Our loss and gradient (the oracle, and the certified truth
for the gradient) must agree with torch's loss and autograd gradient to 1e-10.

torch's internal test utilities import ``expecttest`` (a test-only dependency of torch's own suite that
torch does not install); where it is missing a stand-in module with its two names is registered.
"""

from __future__ import annotations

import sys
import types
import unittest

import numpy as np
import pytest

import gradcheck as gc

torch = pytest.importorskip("torch")
try:
    import expecttest  # noqa: F401
except ImportError:  # only TestCase and ACCEPT are used at import time by torch.testing._internal.common_utils
    stand_in = types.ModuleType("expecttest")
    stand_in.TestCase = unittest.TestCase
    stand_in.ACCEPT = False
    sys.modules["expecttest"] = stand_in
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

OP = next(op for op in op_db if op.name == "nn.functional.cross_entropy")
SAMPLES = list(OP.sample_inputs("cpu", torch.float64, requires_grad=True))
AGREEMENT = 1e-10  # the brief's figure: far above float64 rounding, far below any wrong formula


def _ours(sample):
    logits = sample.input.detach().numpy()
    targets = sample.args[0].detach().numpy()
    options = {k: (v.detach().numpy() if torch.is_tensor(v) else v) for k, v in sample.kwargs.items()}
    if logits.ndim >= 3:
        options["class_axis"] = 1  # torch's layout (N, C, d1, ..., dk)
    return logits, targets, options


def test_there_are_21_samples():
    assert len(SAMPLES) == 21
    assert sum(s.input.ndim >= 3 for s in SAMPLES) == 6
    assert sum("weight" in s.kwargs and bool((s.kwargs["weight"] < 0).any()) for s in SAMPLES) == 6


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_sample_agrees_with_torch(index):
    sample = SAMPLES[index]
    logits = sample.input.detach().clone().requires_grad_(True)
    loss = OP.op(logits, *sample.args, **sample.kwargs)
    loss.sum().backward()  # reduction="none": the gradient of the sum of the row losses, as ours
    z, t, options = _ours(sample)
    np.testing.assert_allclose(gc.cross_entropy(z, t, **options), loss.detach().numpy(), rtol=AGREEMENT, atol=AGREEMENT)
    expected = logits.grad.numpy()
    np.testing.assert_allclose(gc.cross_entropy_grad(z, t, **options), expected, rtol=AGREEMENT, atol=AGREEMENT)
    np.testing.assert_allclose(gc.exact_grad(z, t, **options), expected, rtol=AGREEMENT, atol=AGREEMENT)
