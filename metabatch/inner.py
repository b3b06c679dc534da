"""Differentiable inner-loop optimizers: pure `(init, update)` pairs over pytrees.

An `Optimizer` has the shape of an optax `GradientTransformation`: a
NamedTuple of two pure functions,

* `init(params) -> state`: the optimizer state for a pytree of parameters;
* `update(grads, state, params=None) -> (updates, state)`: the updates to add to
  the parameters (`apply_updates`) and the next state.

Nothing is mutated and no `.grad` is read: everything is a tensor expression
of its inputs, so the inner loop of [metabatch.maml.meta_loss][] differentiates
through it (second-order MAML through momentum or Adam), `torch.func.vmap`
maps it over tasks, and `torch.compile` traces it. States are NamedTuples
rebuilt at every step; their `count` is a Python int (the number of updates
taken), so bias corrections and per-step rates are ordinary Python numbers.

A `None` leaf in `grads` (a parameter that is not adapted, e.g. by
`maml`'s `mask`) gets a `None` update and keeps no state, as
`torch.optim` skips parameters whose `.grad` is `None`.

Rules:

* `sgd`: `φ ← φ − lr·g` (the rule of MAML and, with a pytree `lr`, Meta-SGD);
* `momentum`: `torch.optim.SGD(momentum=μ, nesterov=...)`'s update;
* `adam`: `torch.optim.Adam`'s (and optax's) update, `lr·m̂/(√v̂ + eps)`;
* `lslr`: SGD with a learned rate per parameter tensor and per inner step (MAML++).

Learning rates are numbers, 0-d tensors, or pytrees like the parameters (one rate per
leaf, broadcastable to it). Tensors that require grad receive the meta-gradient:
build the optimizer where those tensors are in scope (inside the function that
`torch.func.grad` differentiates, when you use it).

Adam at a zero second moment: `√v` has an infinite derivative at `v = 0`, and
an inner gradient entry that is exactly 0 (a dead ReLU unit; ~40 % of an MLP's
first inner gradient can be) gives `v = 0` there and `0 · ∞ = NaN` in the
meta-gradient. `adam` uses a square root whose derivative at 0 is 0 —
a subgradient of `√((1-β₂)·g²) ∝ |g|` at `g = 0` — so the meta-gradient stays
finite; where `v > 0` it is the ordinary derivative. higher's differentiable Adam
does the same (it masks the gradient into `v` where `v == 0`).

Example:
    >>> import torch
    >>> from metabatch import inner
    >>> opt = inner.momentum(0.1, momentum=0.9)
    >>> params = {"w": torch.tensor([1.0, -2.0])}
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     grads = {"w": 2 * params["w"]}                  # d/dw of |w|^2
    ...     updates, state = opt.update(grads, state, params)
    ...     params = inner.apply_updates(params, updates)
    >>> params["w"], state.count
    (tensor([ 0.4600, -0.9200]), 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from . import _validate
from .typing import PyTree, Rate

__all__ = ["AdamState", "MomentumState", "Optimizer", "SgdState", "adam", "apply_updates", "lslr",
           "lslr_rates", "momentum", "sgd"]


class Optimizer(NamedTuple):
    """An inner-loop update rule: two pure functions (optax's `GradientTransformation` shape).

    Attributes:
        init: `init(params) -> state`.
        update: `update(grads, state, params=None) -> (updates, state)`; add the updates
            to the parameters with `apply_updates`.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]


class SgdState(NamedTuple):
    """State of `sgd` and `lslr`.

    Attributes:
        count: updates taken so far (a Python int).
    """

    count: int  # type: ignore[assignment]  # optax's field name; it shadows tuple.count


class MomentumState(NamedTuple):
    """State of `momentum`.

    Attributes:
        count: updates taken so far (a Python int).
        trace: the momentum buffer, a pytree like the parameters (`None` before the first
            update and for leaves that are not updated).
    """

    count: int  # type: ignore[assignment]  # optax's field name; it shadows tuple.count
    trace: PyTree


class AdamState(NamedTuple):
    """State of `adam`.

    Attributes:
        count: updates taken so far (a Python int); the bias corrections use it.
        mu: the first moment, a pytree like the parameters.
        nu: the second moment, a pytree like the parameters.
    """

    count: int  # type: ignore[assignment]  # optax's field name; it shadows tuple.count
    mu: PyTree
    nu: PyTree


# ------------------------------------------------------------------------------ helpers


def _tree_map(fn, tree, *rests):
    return optree.tree_map(fn, tree, *rests, none_is_leaf=True)


def _rates_like(lr, grads, fn: str) -> list:
    """One rate per leaf of `grads` (`None` leaves included): broadcast a scalar or match a pytree.

    A pytree `lr` matches `grads` by structure, or else by path: every leaf with a gradient needs
    a rate at the same path, and leaves without one (`None`) need none, so that a dict of rates
    may leave out parameters that are never updated.
    """
    g_paths, g_leaves, g_spec = optree.tree_flatten_with_path(grads, none_is_leaf=True)
    if _is_scalar(lr):
        return [lr] * len(g_leaves)
    r_paths, r_leaves, r_spec = optree.tree_flatten_with_path(lr, none_is_leaf=True)
    if r_spec == g_spec:
        return r_leaves
    by_path = dict(zip(r_paths, r_leaves, strict=True))
    missing = [p for p, g in zip(g_paths, g_leaves, strict=True) if g is not None and p not in by_path]
    if missing:
        raise TypeError(f"{fn}(): lr must be a number, a 0-d tensor, or a pytree with the structure of params "
                        f"(one rate per parameter); no rate for {['.'.join(map(str, p)) for p in missing]}."
                        f"\n  params: {g_spec}\n  lr:     {r_spec}")
    return [by_path.get(p) for p in g_paths]


def _is_scalar(lr) -> bool:
    return isinstance(lr, float) or (isinstance(lr, torch.Tensor) and lr.dim() == 0)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """`√v` with derivative 0 (not ∞) at `v == 0`; composable with every `torch.func` transform."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """`params + updates` leaf by leaf; a `None` update leaves its parameter as it is (the same tensor).

    Args:
        params: a pytree of tensors.
        updates: a pytree like `params` (`None` where nothing changes), from an optimizer's `update`.

    Returns:
        A pytree like `params`.

    Examples:
        >>> import torch
        >>> from metabatch import inner
        >>> inner.apply_updates({"a": torch.tensor(1.0), "b": torch.tensor(2.0)},
        ...                     {"a": torch.tensor(0.5), "b": None})
        {'a': tensor(1.5000), 'b': tensor(2.)}
    """
    return _tree_map(lambda p, u: p if u is None else p + u, params, updates)


# ------------------------------------------------------------------------------- rules


def sgd(lr: Rate) -> Optimizer:
    """Plain gradient descent, `φ ← φ − lr · g`: MAML's inner rule (and Meta-SGD's with a pytree `lr`).

    Args:
        lr: a number, a 0-d tensor, or a pytree like the parameters (per-parameter rates, Meta-SGD);
            tensors may require grad.

    Returns:
        An [Optimizer][metabatch.inner.Optimizer] with state [SgdState][metabatch.inner.SgdState].

    Raises:
        ValueError: `lr` (or a concrete tensor leaf of it) is not finite.
        TypeError: `lr` is not a number, a tensor or a pytree of them; (in `update`) its structure
            differs from the parameters'.

    Examples:
        >>> import torch
        >>> from metabatch import inner
        >>> opt = inner.sgd(0.5)
        >>> updates, state = opt.update({"w": torch.tensor(2.0)}, opt.init({"w": torch.tensor(1.0)}))
        >>> updates, state
        ({'w': tensor(-1.)}, SgdState(count=1))
    """
    lr = _validate.rate(lr, "lr", "sgd")

    def init(params):
        return SgdState(0)

    def update(grads, state, params=None):
        rates = _rates_like(lr, grads, "sgd")
        leaves, spec = optree.tree_flatten(grads, none_is_leaf=True)
        out = [None if g is None else -r * g for g, r in zip(leaves, rates, strict=True)]
        return optree.tree_unflatten(spec, out), SgdState(state.count + 1)

    return Optimizer(init, update)


def momentum(lr: Rate, momentum: float = 0.9, nesterov: bool = False) -> Optimizer:
    """Heavy-ball momentum, `torch.optim.SGD(lr, momentum=μ, nesterov=...)`'s update (no dampening).

    `b ← μ·b + g` (`b = g` at the first step), then `φ ← φ − lr·b`, or with
    `nesterov`, `φ ← φ − lr·(g + μ·b)`. Same as optax's `sgd(lr, momentum, nesterov)`.

    Args:
        lr: a number, a 0-d tensor, or a pytree like the parameters; tensors may require grad.
        momentum: the momentum factor μ ≥ 0.
        nesterov: Nesterov momentum.

    Returns:
        An [Optimizer][metabatch.inner.Optimizer] with state [MomentumState][metabatch.inner.MomentumState].

    Raises:
        ValueError: a non-finite `lr`, a negative or non-finite `momentum`.
        TypeError: arguments of the wrong type.

    Examples:
        >>> import torch
        >>> from metabatch import inner
        >>> opt = inner.momentum(1.0, momentum=0.5)
        >>> p = {"w": torch.tensor(0.0)}
        >>> state = opt.init(p)
        >>> for _ in range(2):
        ...     u, state = opt.update({"w": torch.tensor(1.0)}, state, p)
        ...     p = inner.apply_updates(p, u)
        >>> p["w"]                      # -1 (b = 1), then -1.5 (b = 0.5 + 1)
        tensor(-2.5000)
    """
    lr = _validate.rate(lr, "lr", "momentum")
    mu = _validate.number(momentum, "momentum", "momentum", low=0.0)
    nesterov = _validate.flag(nesterov, "nesterov", "momentum")

    def init(params):
        return MomentumState(0, _tree_map(lambda p: None, params))

    def update(grads, state, params=None):
        rates = _rates_like(lr, grads, "momentum")
        leaves, spec = optree.tree_flatten(grads, none_is_leaf=True)
        first = state.count == 0
        traces = optree.tree_leaves(state.trace, none_is_leaf=True) if not first else [None] * len(leaves)
        if len(traces) != len(leaves):
            raise ValueError(f"momentum(): the state holds {len(traces)} leaves, the gradients {len(leaves)}; "
                             f"init the state with the same parameters.")
        out, new = [], []
        for g, b, r in zip(leaves, traces, rates, strict=True):
            if g is None:
                out.append(None)
                new.append(None)
                continue
            b = g if b is None else mu * b + g
            new.append(b)
            out.append(-r * (g + mu * b if nesterov else b))
        return (optree.tree_unflatten(spec, out),
                MomentumState(state.count + 1, optree.tree_unflatten(spec, new)))

    return Optimizer(init, update)


def adam(lr: Rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam, `torch.optim.Adam`'s documented update (and optax's): `φ ← φ − lr · m̂ / (√v̂ + eps)`.

    `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`
    at step `t = 1, 2, ...`. The square root has derivative 0 at `v = 0` (see the module
    docstring), so dead units do not turn the meta-gradient into NaN.

    higher 0.2.1's differentiable Adam (torch 1.0's form) computes
    `lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + eps)`: the same only with its `eps` replaced at every step
    by `eps·√(1−β₂ᵗ)`.

    Args:
        lr: a number, a 0-d tensor, or a pytree like the parameters; tensors may require grad.
        b1: β₁ in [0, 1).
        b2: β₂ in [0, 1).
        eps: added to `√v̂`; > 0 (at 0, a gradient entry that is exactly 0 gives 0/0 = NaN).

    Returns:
        An [Optimizer][metabatch.inner.Optimizer] with state [AdamState][metabatch.inner.AdamState].

    Raises:
        ValueError: a non-finite `lr`; `b1`, `b2` outside [0, 1); an `eps` that is not > 0.
        TypeError: arguments of the wrong type.

    Examples:
        >>> import torch
        >>> from metabatch import inner
        >>> opt = inner.adam(0.1)
        >>> p = {"w": torch.tensor([1.0, -3.0])}
        >>> u, state = opt.update({"w": torch.tensor([0.5, -2.0])}, opt.init(p), p)
        >>> u["w"]                      # the first step moves every entry by lr against its gradient's sign
        tensor([-0.1000,  0.1000])
    """
    lr = _validate.rate(lr, "lr", "adam")
    b1 = _validate.number(b1, "b1", "adam", low=0.0)
    b2 = _validate.number(b2, "b2", "adam", low=0.0)
    for name, value in (("b1", b1), ("b2", b2)):
        if value >= 1:
            raise ValueError(f"adam(): {name} must be < 1, got {value!r}.")
    eps = _validate.number(eps, "eps", "adam", low=0.0)
    if eps == 0:
        raise ValueError(f"adam(): eps must be > 0, got {eps!r}: a gradient entry that is exactly 0 (a dead ReLU "
                         f"unit) makes m = v = 0 there and its update 0/0 = NaN; keep a small eps such as the "
                         f"default eps=1e-8.")

    def init(params):
        none = _tree_map(lambda p: None, params)
        return AdamState(0, none, none)

    def update(grads, state, params=None):
        rates = _rates_like(lr, grads, "adam")
        leaves, spec = optree.tree_flatten(grads, none_is_leaf=True)
        t = state.count + 1
        if state.count == 0:
            mus = nus = [None] * len(leaves)
        else:
            mus = optree.tree_leaves(state.mu, none_is_leaf=True)
            nus = optree.tree_leaves(state.nu, none_is_leaf=True)
        if len(mus) != len(leaves):
            raise ValueError(f"adam(): the state holds {len(mus)} leaves, the gradients {len(leaves)}; "
                             f"init the state with the same parameters.")
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out, new_mu, new_nu = [], [], []
        for g, m, v, r in zip(leaves, mus, nus, rates, strict=True):
            if g is None:
                out.append(None)
                new_mu.append(None)
                new_nu.append(None)
                continue
            m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
            v = (1 - b2) * (g * g) if v is None else b2 * v + (1 - b2) * (g * g)
            new_mu.append(m)
            new_nu.append(v)
            out.append(-r * (m / bc1) / (_sqrt(v) / math.sqrt(bc2) + eps))
        return (optree.tree_unflatten(spec, out),
                AdamState(t, optree.tree_unflatten(spec, new_mu), optree.tree_unflatten(spec, new_nu)))

    return Optimizer(init, update)


def lslr(rates: PyTree) -> Optimizer:
    """SGD with a learned rate per parameter tensor and per inner step (LSLR, MAML++).

    At inner step `s` (0, 1, ...), leaf `k` moves by `−rates[k][s] · g`; steps past the
    last rate reuse it (`rates[k][-1]`), so evaluation may take more steps than training.
    Make the rates with [lslr_rates][metabatch.inner.lslr_rates] and give them to the outer
    optimizer.

    Args:
        rates: a pytree like the parameters whose leaves have a leading step dimension: shape
            `[S]` (one rate per tensor and step, as in MAML++) or `[S, *param.shape]` (one per
            entry and step).

    Returns:
        An [Optimizer][metabatch.inner.Optimizer] with state [SgdState][metabatch.inner.SgdState].

    Raises:
        TypeError: a leaf is not a tensor with at least one dimension; (in `update`) the structure
            differs from the parameters'.
        ValueError: a leaf has no steps, or NaN or infinite entries.

    Examples:
        >>> import torch
        >>> from metabatch import inner
        >>> opt = inner.lslr({"w": torch.tensor([0.5, 0.25])})
        >>> p = {"w": torch.tensor(0.0)}
        >>> state = opt.init(p)
        >>> for _ in range(3):
        ...     u, state = opt.update({"w": torch.tensor(1.0)}, state, p)
        ...     p = inner.apply_updates(p, u)
        >>> p["w"]                      # -0.5, then -0.25 twice
        tensor(-1.)
    """
    paths, leaves, _ = optree.tree_flatten_with_path(rates)
    if not leaves:
        raise TypeError(f"lslr(): rates must be a pytree of tensors like the parameters, got {rates!r}.")
    for path, leaf in zip(paths, leaves, strict=True):
        where = "rates" + "".join(f"[{k!r}]" for k in path)
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            raise TypeError(f"lslr(): {where} must be a tensor with a leading step dimension ([steps] or "
                            f"[steps, *param.shape]), got {type(leaf).__name__}"
                            f"{tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else ''}; "
                            f"make them with metabatch.inner.lslr_rates(params, steps, lr).")
        if leaf.shape[0] == 0:
            raise ValueError(f"lslr(): {where} has no steps (shape {tuple(leaf.shape)}).")
        _validate.rate(leaf, where, "lslr")

    def init(params):
        return SgdState(0)

    def update(grads, state, params=None):
        per_leaf = _rates_like(rates, grads, "lslr")
        g_leaves, g_spec = optree.tree_flatten(grads, none_is_leaf=True)
        step = state.count
        out = [None if g is None else -r[min(step, r.shape[0] - 1)] * g
               for g, r in zip(g_leaves, per_leaf, strict=True)]
        return optree.tree_unflatten(g_spec, out), SgdState(state.count + 1)

    return Optimizer(init, update)


def lslr_rates(params: PyTree, steps: int, lr: float, *, per_entry: bool = False) -> PyTree:
    """Initial LSLR rates for [lslr][metabatch.inner.lslr]: new leaf tensors filled with `lr`, requiring grad.

    Args:
        params: the parameters (a pytree of tensors); their dtypes and devices are used.
        steps: inner steps S (the leading dimension of every rate).
        lr: the initial rate.
        per_entry: one rate per parameter entry and step (`[S, *shape]`) instead of one per
            tensor and step (`[S]`, MAML++).

    Returns:
        A pytree like `params`; pass its leaves to the outer optimizer.

    Raises:
        TypeError, ValueError: for a bad `steps` or `lr`.

    Examples:
        >>> import torch
        >>> from metabatch import inner
        >>> rates = inner.lslr_rates({"w": torch.zeros(3, 2)}, steps=5, lr=0.4)
        >>> rates["w"].shape, rates["w"].requires_grad
        (torch.Size([5]), True)
    """
    steps = _validate.integer(steps, "steps", "lslr_rates", low=1)
    lr = _validate.number(lr, "lr", "lslr_rates")
    per_entry = _validate.flag(per_entry, "per_entry", "lslr_rates")

    def make(p):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"lslr_rates(): every leaf of params must be a tensor, got {type(p).__name__}.")
        shape = (steps, *p.shape) if per_entry else (steps,)
        dtype = p.dtype if p.is_floating_point() else torch.get_default_dtype()
        return torch.full(shape, lr, dtype=dtype, device=p.device, requires_grad=True)

    return optree.tree_map(make, params)
