"""A validated cross-entropy case: logits, targets and options, checked once for every entry point.

Semantics are those of ``torch.nn.functional.cross_entropy``:

* logits are ``(K,)``, ``(N, K)``, or any ``(..., K, ...)`` with ``class_axis`` naming the class axis:
  1 for torch's ``(N, C, d1, ..., dk)``, -1 for the LLM layout ``(B, T, V)``. ``class_axis=None`` (the
  default) is the last axis of ``(K,)`` and ``(N, K)``, where both agree; 3-D and larger logits must
  name it (never guessed: docs/ARCHITECTURE.md, "Layouts"). Each case is kept as ``(rows, K)``;
* targets are class indices of the logits' shape without the class axis (``(N,)`` for ``(N, K)``;
  integers; ``ignore_index`` marks rows to skip) or class probabilities of the logits' shape (any
  nonnegative finite values, not necessarily summing to one);
* label smoothing replaces the targets by ``(1 - eps) * t + eps / K`` (for index targets ``t`` is
  one-hot);
* row n contributes ``l_n = -sum_c w_c t_nc log p_nc`` (``w = 1`` without weights; weights may be
  negative, as torch allows);
* ``reduction="mean"`` divides the sum by ``sum_n w_{y_n}`` over non-ignored rows for index
  targets, and by N for probability targets; ``"sum"`` does not divide; ``"none"`` keeps the
  per-row losses (and its gradient is the gradient of their sum).

So the gradient is ``dL/dz_ni = r_n (p_ni S_n - w_i t_ni) / D`` with ``S_n = sum_c w_c t_nc``,
``r_n`` zero for ignored rows, and ``D`` the divisor above.

The kernel options (Liger-Kernel's convention; torch has neither, docs/oracle.md "Kernel options"):

* ``softcap`` c: every logit becomes ``z' = c tanh(z / c)`` first (``-inf`` becomes ``-c``, so it is
  no longer masked), and everything above is computed on ``z'``;
* ``lse_square_scale`` lambda: each counted row adds ``lambda * lse(z'_n)^2``, unweighted, divided
  under "mean" by the number of counted rows (N for probability targets), not by D;
* ``grad_output`` g: the gradient is the vector-Jacobian product ``g * dL/dz`` (g a number for
  "mean"/"sum", one per row for "none"; ignored rows stay 0).
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from gradcheck.dtypes import DTYPE_NAMES, FloatFormat, float_format, is_supported_float
from gradcheck.errors import InvalidArgument
from gradcheck.options import CASE, DEFAULT_IGNORE_INDEX, REDUCTIONS

__all__ = ["DEFAULT_IGNORE_INDEX", "REDUCTIONS", "Case", "Layout", "Problem", "as_array", "check_logit_values", "layout_of",
           "make_problem", "validate_logits"]


@dataclass(frozen=True)
class Layout:
    """Where the classes are in the caller's logits, and how results go back there.

    Problem keeps every case as ``(rows, K)``: the class axis moved last and the other axes
    flattened, in C order, to rows. Two layouts are real (docs/ARCHITECTURE.md, "Layouts"): torch's
    own, ``(N, C, d1, ..., dk)`` with the classes on axis 1 (``class_axis=1``), and the LLM layout
    ``(B, T, V)`` with the classes last (``class_axis=-1``). ``(K,)`` and ``(N, K)`` have the classes
    last under both.

    Attributes:
        shape: the caller's logits shape.
        class_axis: the class axis as the caller gave it (None: implied, for 1-D and 2-D logits).
    """

    shape: tuple[int, ...]
    class_axis: int | None = None

    @property
    def axis(self) -> int:
        """The class axis, nonnegative."""
        return len(self.shape) - 1 if self.class_axis is None else self.class_axis % len(self.shape)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The caller's shape without the class axis: the shape of index targets and of per-row results."""
        return self.shape[:self.axis] + self.shape[self.axis + 1:]

    @property
    def plain(self) -> bool:
        """``(K,)`` or ``(N, K)`` with the classes last: the rows are the caller's own."""
        return len(self.shape) <= 2 and self.axis == len(self.shape) - 1

    def rows(self, x: np.ndarray) -> np.ndarray:
        """An array of the caller's logits shape as ``(rows, K)`` (a view where numpy can)."""
        return np.moveaxis(x, self.axis, -1).reshape(-1, self.shape[self.axis])

    def restore(self, x: np.ndarray, *, classes: bool = True) -> np.ndarray:
        """A result of the rows back in the caller's layout.

        ``()`` stays; ``(N,)`` becomes the batch shape; ``(N, K)`` the logits' shape (the class axis
        put back). With ``classes=False`` only the row axis is unflattened, so ``(N, K, K)`` Hessian
        blocks become ``(*batch_shape, K, K)``.
        """
        x = np.asarray(x)
        if x.ndim == 0:
            return x
        out = x.reshape(self.batch_shape + x.shape[1:])
        if classes and x.ndim == 2:
            out = np.moveaxis(out, len(self.batch_shape), self.axis)
        return out

    def index(self, where: tuple[int, ...]) -> tuple[int, ...]:
        """An index into the rows, ``(row,)`` or ``(row, class)``, as an index into the caller's arrays."""
        batch = tuple(int(i) for i in np.unravel_index(where[0], self.batch_shape)) if self.batch_shape else ()
        if len(where) == 1:
            return batch
        return batch[:self.axis] + (int(where[1]),) + batch[self.axis:]


@dataclass(frozen=True, eq=False)
class Problem:
    """A validated cross-entropy case. Build it with :func:`make_problem`.

    Attributes:
        logits: ``(N, K)`` read-only array in the checked dtype (a copy of the caller's).
        targets: ``(N,)`` int64 class indices, or ``(N, K)`` float64 probabilities (read-only).
        weight: ``(K,)`` float64 class weights, or None.
        ignore_index: rows whose index target equals it are skipped.
        reduction: "mean", "sum" or "none".
        label_smoothing: eps in [0, 1].
        format: the float format of the logits (the checked dtype), fixed once here.
        layout: the caller's logits shape and class axis (:class:`Layout`); results go back to it
            through :meth:`restore_shape`.
        lse_square_scale: the z-loss factor lambda >= 0 (0: no z-loss).
        softcap: c > 0, or None (no softcapping).
        grad_output: the upstream gradient as float64 (read-only): shape ``()`` for "mean"/"sum",
            ``(N,)`` for "none"; None means ones.
    """

    logits: np.ndarray
    targets: np.ndarray
    weight: np.ndarray | None
    ignore_index: int
    reduction: str
    label_smoothing: float
    format: FloatFormat
    layout: Layout | None = None
    lse_square_scale: float = 0.0
    softcap: float | None = None
    grad_output: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.logits.shape[0]

    @property
    def k(self) -> int:
        return self.logits.shape[1]

    @property
    def index_targets(self) -> bool:
        return self.targets.ndim == 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The caller's logits shape (``(K,)`` for a single vector)."""
        return self.logits.shape if self.layout is None else self.layout.shape

    @property
    def vector(self) -> bool:
        """The logits were given as one row of shape ``(K,)``."""
        return len(self.shape) == 1

    @property
    def caller_layout(self) -> Layout:
        return Layout(self.logits.shape) if self.layout is None else self.layout

    def weights(self) -> np.ndarray:
        """Class weights as float64, ones when none were given."""
        return np.ones(self.k) if self.weight is None else self.weight

    def active_rows(self) -> np.ndarray:
        """Boolean ``(N,)``: rows that count (not ignored)."""
        if self.index_targets:
            return self.targets != self.ignore_index
        return np.ones(self.n, dtype=bool)

    def dense_targets(self, dtype: Any = np.float64, *, rows: slice | None = None) -> np.ndarray:
        """``(N, K)`` targets after one-hot expansion and label smoothing, in ``dtype``.

        Ignored rows are all zero. Smoothing is rounded here (four roundings, see docs/oracle.md);
        the certified truth uses :meth:`exact_target` instead. ``rows``: a block of rows ``lo:hi``
        alone, ``dense_targets(dtype)[lo:hi]`` by the same operations, without the whole array
        (the blocked tolerance, docs/tolerance.md "Evaluation by row blocks").
        """
        rows = slice(0, self.n) if rows is None else rows
        targets, active = self.targets[rows], self.active_rows()[rows]
        if self.index_targets:
            t = np.zeros((active.size, self.k), dtype=dtype)
            live = np.flatnonzero(active)
            t[live, targets[live]] = 1
        else:
            t = np.array(targets, dtype=dtype)
        if self.label_smoothing:
            one, eps = np.dtype(dtype).type(1), np.dtype(dtype).type(self.label_smoothing)
            t = (one - eps) * t + eps / self.k
            t[~active] = 0.0
        return t

    def exact_target(self, n: int, c: int) -> Fraction:
        """The smoothed target t_nc as an exact rational."""
        if self.index_targets:
            if self.targets[n] == self.ignore_index:
                return Fraction(0)
            base = Fraction(1 if self.targets[n] == c else 0)
        else:
            base = Fraction(float(self.targets[n, c]))
        eps = Fraction(self.label_smoothing)
        return (1 - eps) * base + eps / self.k if eps else base

    def exact_weight(self, c: int) -> Fraction:
        return Fraction(1) if self.weight is None else Fraction(float(self.weight[c]))

    def exact_divisor(self) -> Fraction:
        """D as an exact rational: sum of target weights (mean, index), N (mean, probs), or 1."""
        if self.reduction != "mean":
            return Fraction(1)
        if not self.index_targets:
            return Fraction(self.n)
        classes, counts = np.unique(self.targets[self.active_rows()], return_counts=True)
        if self.weight is None:
            return Fraction(int(counts.sum()))
        return sum((int(n) * self.exact_weight(int(c)) for c, n in zip(classes, counts)), Fraction(0))

    def divisor(self, dtype: Any = np.float64) -> Any:
        """D (see :meth:`exact_divisor`) summed in ``dtype``: at most N - 1 roundings."""
        kind = np.dtype(dtype).type
        if self.reduction != "mean":
            return kind(1)
        if not self.index_targets:
            return kind(self.n)
        active = self.targets[self.active_rows()]
        return kind(np.sum(self.weights()[active].astype(dtype)))

    def upstream(self) -> np.ndarray:
        """``(N,)`` float64: the upstream gradient of each row's loss (ones when none was given).

        For "mean"/"sum" every row gets the one scalar; ignored rows keep theirs (their gradient is 0
        whatever it is).
        """
        if self.grad_output is None:
            return np.ones(self.n)
        return np.broadcast_to(self.grad_output, (self.n,)).astype(np.float64)

    def exact_upstream(self, n: int) -> Fraction:
        """The upstream gradient of row n as an exact rational."""
        return Fraction(float(self.upstream()[n]))

    def zloss_divisor(self) -> int:
        """The z-loss divisor: the number of counted rows under "mean" (N for probability targets), else 1."""
        if self.reduction != "mean":
            return 1
        return int(np.count_nonzero(self.active_rows()))

    def grad_output_for(self, dtype: Any) -> Any:
        """The upstream gradient as a ``grad_fn`` gets it (``grad_output=``): a numpy scalar of ``dtype``
        for "mean"/"sum", an ``(N,)`` array for "none" (a scalar for one vector of logits); None if unset."""
        if self.grad_output is None:
            return None
        g = np.asarray(self.grad_output).astype(dtype)
        return g[()] if g.ndim == 0 else self.restore_shape(g)

    def options(self) -> dict[str, Any]:
        """The options that differ from their defaults, as passed to a ``grad_fn``.

        ``grad_output`` is not among them: it is passed only to a ``grad_fn`` that takes it
        (see :meth:`grad_output_for`)."""
        out: dict[str, Any] = {}
        if self.weight is not None:
            out["weight"] = self.weight.astype(self.logits.dtype)
        if self.index_targets and self.ignore_index != DEFAULT_IGNORE_INDEX:
            out["ignore_index"] = self.ignore_index
        if self.label_smoothing:
            out["label_smoothing"] = self.label_smoothing
        if self.reduction != "mean":
            out["reduction"] = self.reduction
        if self.lse_square_scale:
            out["lse_square_scale"] = self.lse_square_scale
        if self.softcap is not None:
            out["softcap"] = self.softcap
        if self.layout is not None and not self.layout.plain:
            out["class_axis"] = self.layout.class_axis
        return out

    def restore_shape(self, rows: np.ndarray, *, classes: bool = True) -> np.ndarray:
        """An ``(N, ...)`` result in the caller's layout (:meth:`Layout.restore`): the row axis dropped
        for one vector, unflattened to the batch shape and the class axis put back for N-D logits."""
        return self.caller_layout.restore(rows, classes=classes)


def make_problem(logits: Any, targets: Any, *, copy: bool = True, check_values: bool = True, **options: Any) -> Problem:
    """Validate a case once; every public entry point calls this.

    Args:
        logits: ``(K,)`` or ``(N, K)`` floats (float64, float32, float16, bfloat16), ``-inf`` for a
            masked class.
        targets: ``(N,)`` class indices or ``(N, K)`` probabilities.
        copy: False keeps a read-only view of the logits instead of a copy, for callers that do not
            keep the Problem beyond the call (the oracle functions).
        check_values: False leaves the check of the logits' values (NaN, +inf, a row of all -inf:
            a pass over the whole input) to the caller, which must call :func:`check_logit_values` on the
            Problem before it relies on them, or prove them another way (the oracle's one-hot path:
            every row maximum it computes anyway is finite exactly when the row is valid). The errors
            are the same, in the same order: when another argument is wrong too, the logits' value
            error is raised first, as when they are checked here.
        **options: the case options of :data:`gradcheck.options.CASE` (``weight``, ``ignore_index``,
            ``reduction``, ``label_smoothing``, ``lse_square_scale``, ``softcap``, ``grad_output``),
            each checked by its one rule there.

    Raises:
        InvalidArgument: naming the argument, the expected and the given value.
    """
    o = CASE.validate(options, where="make_problem()")
    layout = _layout(logits, o["class_axis"])
    masked_ok = o["softcap"] is not None
    z = validate_logits(logits, ndims=None, axis=layout.axis, copy=copy, all_masked_ok=masked_ok, values=check_values)
    try:
        return _make_problem(z, targets, layout, o)
    except InvalidArgument:
        if not check_values:  # the logits' value error comes first, as when they are checked above
            _check_values(z, layout.axis, masked_ok)
        raise


def check_logit_values(problem: Problem) -> None:
    """The value check of the logits that ``make_problem(..., check_values=False)`` left out.

    Raises:
        InvalidArgument: NaN or +inf, or a row of all -inf without softcapping, with the message and
            the index (in the caller's layout) that :func:`make_problem` would have given.
    """
    layout = problem.caller_layout
    _check_values(problem.restore_shape(problem.logits), layout.axis, problem.softcap is not None)


def _make_problem(z: np.ndarray, targets: Any, layout: Layout, o: dict[str, Any]) -> Problem:
    """The rest of :func:`make_problem` once the logits' shape and dtype are checked."""
    if not layout.plain:
        z = layout.rows(z)  # a copy when the class axis is not last (moveaxis, then reshape)
        z.setflags(write=False)
    elif z.ndim == 1:
        z = z[None, :]
    n, k = z.shape
    t = _check_targets(targets, layout, o["ignore_index"])
    w = _check_weight(o["weight"], k)
    t.setflags(write=False)
    if w is not None:
        w.setflags(write=False)
    g = _check_grad_output(o["grad_output"], o["reduction"], layout)
    problem = Problem(z, t, w, o["ignore_index"], o["reduction"], o["label_smoothing"], float_format(z.dtype),
                      None if layout.shape == z.shape else layout, o["lse_square_scale"], o["softcap"], g)
    if problem.index_targets:
        _check_active(problem)
    return problem


@dataclass(frozen=True, eq=False)
class Case:
    """One input for a ``grad_fn``: a validated :class:`Problem`, the regime it came from, its features.

    Build it with :meth:`make` (which validates, so a Case is always valid). The arrays are the
    problem's in the caller's layout, as a ``grad_fn`` gets them: the logits in their dtype (of the
    layout's shape, e.g. ``(B, T, V)``), the targets of its batch shape (or of the logits' shape), the
    weight in the logits' dtype.

    Attributes:
        problem: the validated case; it carries its float format (``problem.format``).
        regime: the regime the case came from (see :mod:`gradcheck.regimes`).
        tags: further features of the case (``"soft"``, ``"unnormalized"``, ``"ignored rows"``, ...).
    """

    problem: Problem
    regime: str = "moderate"
    tags: tuple[str, ...] = ()

    @classmethod
    def make(cls, logits: Any, targets: Any, *, regime: str = "moderate", tags: tuple[str, ...] = (),
             **options: Any) -> Case:
        """Validate and wrap; options as for :func:`make_problem`.

        Raises:
            InvalidArgument: as :func:`make_problem`.
        """
        return cls(make_problem(logits, targets, **options), regime, tuple(tags))

    @property
    def logits(self) -> np.ndarray:
        """The logits in the caller's layout (the problem's ``(N, K)`` rows for 2-D logits)."""
        p = self.problem
        return p.logits if p.layout is None else p.restore_shape(p.logits)

    @property
    def targets(self) -> np.ndarray:
        """Class indices (int64), or probabilities in the logits' dtype (exactly the values given),
        in the caller's layout."""
        p = self.problem
        t = p.targets if p.index_targets else p.targets.astype(p.logits.dtype)
        return t if p.layout is None else p.restore_shape(t)

    @property
    def class_axis(self) -> int | None:
        return None if self.problem.layout is None else self.problem.layout.class_axis

    @property
    def weight(self) -> np.ndarray | None:
        w = self.problem.weight
        return None if w is None else w.astype(self.problem.logits.dtype)

    @property
    def ignore_index(self) -> int:
        return self.problem.ignore_index

    @property
    def reduction(self) -> str:
        return self.problem.reduction

    @property
    def label_smoothing(self) -> float:
        return self.problem.label_smoothing

    @property
    def lse_square_scale(self) -> float:
        return self.problem.lse_square_scale

    @property
    def softcap(self) -> float | None:
        return self.problem.softcap

    @property
    def grad_output(self) -> Any:
        """The upstream gradient in the logits' dtype, as a ``grad_fn`` gets it (None: not exercised)."""
        return self.problem.grad_output_for(self.problem.logits.dtype)

    @property
    def format(self) -> FloatFormat:
        return self.problem.format

    @property
    def dtype(self) -> str:
        return self.problem.format.name

    def options(self) -> dict[str, Any]:
        """The non-default options, as passed to a ``grad_fn`` (a fresh dict and weight array each call)."""
        return self.problem.options()

    def replace(self, **changes: Any) -> Case:
        """A validated copy with some of logits, targets and the case options changed.

        Raises:
            InvalidArgument: the changed case is not valid.
        """
        values: dict[str, Any] = {"logits": self.logits, "targets": self.targets, "weight": self.problem.weight,
                                  "ignore_index": self.ignore_index, "reduction": self.reduction,
                                  "label_smoothing": self.label_smoothing,
                                  "lse_square_scale": self.lse_square_scale, "softcap": self.softcap,
                                  "grad_output": self._grad_output64(), "class_axis": self.class_axis}
        values.update(changes)
        if values["weight"] is not None:  # exact in float64 (a bfloat16 array is converted the same way)
            values["weight"] = np.asarray(values["weight"]).astype(np.float64)
        return Case.make(values.pop("logits"), values.pop("targets"), regime=self.regime, tags=self.tags, **values)

    def _grad_output64(self) -> np.ndarray | None:
        g = self.problem.grad_output
        return g if g is None or g.ndim == 0 else self.problem.restore_shape(g)

    def __repr__(self) -> str:
        return (
            f"Case(regime={self.regime!r}, shape={self.logits.shape}, dtype={self.dtype}, "
            f"targets={'index' if self.targets.ndim == 1 else 'probs'}, tags={self.tags})"
        )


def _describe(x: np.ndarray) -> str:
    return f"array of shape {x.shape} and dtype {x.dtype}"


def as_array(value: Any, *, copy: bool) -> np.ndarray:
    """The one conversion of an input array: numpy, torch (CPU or not, ``requires_grad``, bfloat16),
    JAX, or any array-like, to numpy with its dtype.

    Duck typed (torch is looked up in ``sys.modules``, never imported): a torch tensor is detached and
    moved to the CPU, and a torch bfloat16 tensor becomes an ml_dtypes bfloat16 array exactly (through
    float32), so numpy's ``__array__`` (whose ``copy`` keyword torch does not take) is never used on it.
    A JAX array converts through its own ``__array__``.

    Args:
        value: the array.
        copy: True for a private copy; False may return a view of the caller's memory.

    Raises:
        TypeError, ValueError: from numpy, for something that is not array-like (the callers name it).
    """
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        torch = sys.modules["torch"]
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.float().numpy().astype(float_format("bfloat16").dtype)  # exact; a fresh array
        arr = tensor.resolve_conj().resolve_neg().numpy()
        return arr.copy() if copy else arr
    return np.array(value, copy=True) if copy else np.asarray(value)


def validate_logits(
    logits: Any, *, ndims: tuple[int, ...] | None = (1, 2), axis: int = -1, copy: bool = True,
    all_masked_ok: bool = False, values: bool = True,
) -> np.ndarray:
    """Check float logits and return a read-only private copy (or, ``copy=False``, a read-only view).

    Args:
        logits: array-like of float64, float32, float16 or bfloat16 (numpy, torch, JAX: :func:`as_array`).
        ndims: accepted numbers of dimensions (None: any).
        axis: the class axis; every slice along it needs a finite entry.
        copy: False for callers that drop the result before returning (the oracle functions); the
            view is read-only, so nothing can write through it to the caller's array.
        all_masked_ok: a slice of all -inf is valid (under softcapping -inf maps to -c, a finite value).
        values: False skips the check of the values (NaN, +inf, a slice of all -inf): for
            ``make_problem(..., check_values=False)`` alone.

    Raises:
        InvalidArgument: non-float dtype, wrong rank (or 0-D), empty, NaN or +inf, a slice of all
            -inf, or an axis that is not an integer in range.
    """
    if isinstance(axis, (bool, np.bool_)) or not hasattr(axis, "__index__"):
        raise InvalidArgument(f"axis must be an integer, got {axis!r}.")
    axis = operator.index(axis)
    try:
        z = as_array(logits, copy=copy)
        z = z if copy else z.view()
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"logits must be an array of floats, got {type(logits).__name__} ({exc}).") from None
    if not is_supported_float(z.dtype):
        kind = "complex" if z.dtype.kind == "c" else str(z.dtype)
        raise InvalidArgument(
            f"logits must be a floating-point array ({', '.join(DTYPE_NAMES)}), got {kind} "
            f"({_describe(z)}). Convert first, e.g. logits.astype(np.float64)."
        )
    if z.ndim == 0:
        raise InvalidArgument(f"logits must have at least one dimension, got shape {z.shape}.")
    if ndims is not None and z.ndim not in ndims:
        shapes = " or ".join({1: "(K,)", 2: "(N, K)"}.get(d, f"{d}-D") for d in ndims)
        raise InvalidArgument(f"logits must have shape {shapes}, got shape {z.shape}.")
    if z.size == 0:
        raise InvalidArgument(f"logits must have at least one row and one class, got shape {z.shape}.")
    if z.ndim and not -z.ndim <= axis < z.ndim:
        raise InvalidArgument(f"axis must be in [-{z.ndim}, {z.ndim}), got {axis}.")
    z.setflags(write=False)
    if values:
        _check_values(z, axis, all_masked_ok)
    return z


def _check_values(z: np.ndarray, axis: int, all_masked_ok: bool) -> None:
    """NaN, +inf and (unless ``all_masked_ok``) a slice of all -inf along ``axis`` are errors."""
    # a sum is finite only if every term is (NaN and +-inf propagate; a finite overflow only sends the
    # check to the elementwise test below): one reduction instead of a boolean array of the input
    if z.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(z, axis=None)):
                return
    if np.isfinite(z).all():
        return
    z64 = z if z.dtype == np.float64 else z.astype(np.float64)
    bad = np.isnan(z64) | (z64 == np.inf)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidArgument(
            f"logits must be finite or -inf (a masked class), got {float(z64[where])!r} at index {where}."
        )
    if z.ndim and not all_masked_ok:
        dead = np.all(np.isneginf(z64), axis=axis)
        if dead.any():
            where = tuple(int(i) for i in np.argwhere(np.atleast_1d(dead))[0])
            raise InvalidArgument(
                f"logits must have at least one finite entry per row, got all -inf at row {where}."
            )


def _layout(logits: Any, class_axis: int | None) -> Layout:
    try:
        shape = tuple(int(s) for s in (logits.shape if hasattr(logits, "shape") else np.shape(logits)))
    except (TypeError, ValueError):  # not array-like: validate_logits names it
        return Layout(())
    return layout_of(shape, class_axis)


def layout_of(shape: tuple[int, ...], class_axis: int | None) -> Layout:
    """The layout of logits of ``shape``: its class axis, which 3-D and larger logits must name (never guessed).

    Raises:
        InvalidArgument: no class_axis for 3-D or more, or one out of range.
    """
    if class_axis is None:
        if len(shape) >= 3:
            raise InvalidArgument(
                f"logits of shape {shape} need class_axis: pass class_axis=1 for torch's layout (N, C, d1, ..., dk), "
                f"targets of shape (N, d1, ..., dk), or class_axis=-1 for the LLM layout (B, T, V), targets of "
                f"shape (B, T). It is not guessed: both are real and the targets' shape cannot always tell them apart."
            )
        return Layout(shape)
    if len(shape) == 0 or not -len(shape) <= class_axis < len(shape):
        raise InvalidArgument(
            f"class_axis must be in [-{max(len(shape), 1)}, {max(len(shape), 1)}) for logits of shape {shape}, "
            f"got {class_axis}."
        )
    return Layout(shape, class_axis)


def _check_targets(targets: Any, layout: Layout, ignore_index: int) -> np.ndarray:
    try:
        t = as_array(targets, copy=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"targets must be an array, got {type(targets).__name__} ({exc}).") from None
    k = layout.shape[layout.axis]
    index_shape, prob_shape = layout.batch_shape, layout.shape
    if t.shape == index_shape and t.dtype.kind in "iu":
        t = t.astype(np.int64).reshape(-1)
        bad = (t != ignore_index) & ((t < 0) | (t >= k))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            where = f"row {row}" if len(index_shape) <= 1 else f"index {layout.index((row,))}"
            raise InvalidArgument(
                f"targets must be class indices in [0, {k}) or ignore_index={ignore_index}, "
                f"got {int(t[row])} at {where}."
            )
        return t
    if t.shape == prob_shape and (is_supported_float(t.dtype)):
        if ignore_index != DEFAULT_IGNORE_INDEX:
            raise InvalidArgument(
                f"ignore_index applies to class-index targets only, got ignore_index={ignore_index} "
                f"with probability targets of shape {t.shape}. Drop ignore_index, or zero the rows."
            )
        t = t.astype(np.float64)
        bad = ~np.isfinite(t) | (t < 0)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidArgument(
                f"probability targets must be finite and nonnegative, got {float(t[where])!r} at index {where}."
            )
        return np.ascontiguousarray(layout.rows(t))
    if t.shape == index_shape:
        raise InvalidArgument(
            f"class-index targets must be integers, got {_describe(t)}. Use targets.astype(np.int64)."
        )
    if t.shape == prob_shape:
        raise InvalidArgument(
            f"probability targets must be floating point ({', '.join(DTYPE_NAMES)}), got {_describe(t)}."
        )
    raise InvalidArgument(
        f"targets must be class indices of shape {index_shape} or probabilities of shape "
        f"{prob_shape} to match logits, got {_describe(t)}."
    )


def _check_weight(weight: Any, k: int) -> np.ndarray | None:
    if weight is None:
        return None
    try:
        w = as_array(weight, copy=True)
    except (TypeError, ValueError):
        raise InvalidArgument(f"weight must be an array of {k} floats, got {type(weight).__name__}.") from None
    if w.shape != (k,):
        raise InvalidArgument(f"weight must have shape ({k},), one per class, got shape {w.shape}.")
    if not (w.dtype.kind in "iu" or is_supported_float(w.dtype)):  # bfloat16's kind is "V"
        raise InvalidArgument(f"weight must be real numbers, got dtype {w.dtype}.")
    w = w.astype(np.float64)
    bad = ~np.isfinite(w)  # negative weights are torch's too (a mean whose divisor is 0 is refused later)
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(f"weight must be finite, got {float(w[c])!r} for class {c}.")
    return w


def _check_grad_output(grad_output: Any, reduction: str, layout: Layout) -> np.ndarray | None:
    if grad_output is None:
        return None
    shape = layout.batch_shape if reduction == "none" else ()
    n = int(np.prod(shape))
    expected = (f"{n} numbers, shape {shape}, one per row for reduction='none'" if shape
                else f"one number for reduction={reduction!r}" if reduction != "none"
                else "one number for one vector of logits")
    try:
        g = as_array(grad_output, copy=True)
    except (TypeError, ValueError):
        raise InvalidArgument(f"grad_output must be {expected}, got {type(grad_output).__name__}.") from None
    if g.dtype == bool or not (g.dtype.kind in "iu" or is_supported_float(g.dtype)):
        raise InvalidArgument(f"grad_output must be real numbers ({expected}), got dtype {g.dtype}.")
    if g.shape != shape and not (shape == () and g.shape == (1,)):
        raise InvalidArgument(f"grad_output must be {expected}, got shape {g.shape}.")
    g = g.astype(np.float64).reshape(shape)
    bad = ~np.isfinite(g)
    if bad.any():
        first = int(np.flatnonzero(np.atleast_1d(bad))[0])
        where = (f" for row {first}" if len(shape) == 1 else f" at index {layout.index((first,))}") if shape else ""
        raise InvalidArgument(f"grad_output must be finite, got {float(np.atleast_1d(g)[np.atleast_1d(bad)][0])!r}{where}.")
    g = g.reshape(-1) if shape else g  # one per row of the (N, K) problem
    g.setflags(write=False)
    return g


def _check_active(problem: Problem) -> None:
    if problem.reduction != "mean":
        return
    if not problem.active_rows().any():
        raise InvalidArgument(
            f"reduction='mean' needs at least one row whose target is not ignore_index="
            f"{problem.ignore_index}, got {problem.n} ignored rows (the mean would be 0/0). "
            "Use reduction='sum', or keep a row."
        )
    with np.errstate(over="ignore"):  # a divisor beyond float64's range is valid (the oracle rescales it)
        zero = problem.divisor() == 0.0
    if zero and problem.exact_divisor() == 0:
        raise InvalidArgument(
            "reduction='mean' divides by the sum of the target classes' weights, got 0 "
            "(every counted row's class has weight 0)."
        )

