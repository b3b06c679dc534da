"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, 2019): the meta-gradient through the inner optimum.

iMAML adapts each task by solving the proximal problem

    φ*(θ) = argmin_φ  L_support(φ) + λ/2 · ‖φ − θ‖²

(approximately, with `steps` first-order inner steps from `φ = θ`) and differentiates the query
loss through the optimum, not through the steps: by the implicit function theorem

    d L_query(φ*) / dθ = (I + H/λ)⁻¹ ∇L_query(φ*),   H = ∇² L_support(φ*),

and [meta_grad][metabatch.imaml.meta_grad] solves that linear system with `cg_steps` iterations
of conjugate gradient on Hessian-vector products (double backward at `φ*`), vmapped over tasks.
No graph of the inner loop is kept, so memory does not grow with `steps` (MAML's grows
linearly: `benchmarks/imaml_memory.py`). The system is positive definite while `H`'s eigenvalues
stay above `−λ`; a larger `λ` keeps `φ*` closer to `θ` and conditions it better.

Example:
    >>> import torch
    >>> from metabatch import imaml
    >>> loss_fn = lambda p, y: ((p["w"] - y) ** 2).sum()          # one task: pull w towards y
    >>> params = {"w": torch.nn.Parameter(torch.zeros(()))}
    >>> ys = torch.tensor([[1.0], [3.0]])                          # 2 tasks
    >>> out = imaml.meta_grad(loss_fn, params, ys, ys, lam=2.0, steps=50, lr=0.1)
    >>> round(out.grads["w"].item(), 4)                           # (I + 2/λ)⁻¹ · 2(φ* − y), averaged
    -1.0
    >>> params["w"].grad = out.grads["w"]                          # then any torch.optim step
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from . import _taskbatch as _batch
from . import _validate
from . import batching as _batching
from . import inner as _inner
from . import maml as _maml
from . import random as _random
from .typing import LossFn, PyTree, Rate

__all__ = ["MetaGrad", "conjugate_gradient", "meta_grad"]


class MetaGrad(NamedTuple):
    """What [meta_grad][metabatch.imaml.meta_grad] returns.

    Attributes:
        loss: the mean query loss at the inner solutions, a detached scalar.
        grads: the implicit meta-gradient, a pytree like `params` of detached tensors: assign it
            to the parameters' `.grad` and step any `torch.optim` optimizer.
        per_task_loss: each task's query loss, shape `[T]`.
    """

    loss: torch.Tensor
    grads: PyTree
    per_task_loss: torch.Tensor


def _dot(a, b, batched: bool):
    if not batched:
        return sum((x * y).sum() for x, y in zip(a, b, strict=True))
    return sum((x * y).reshape(x.shape[0], -1).sum(1) for x, y in zip(a, b, strict=True))


def _scale(c, t, batched: bool):
    return c.reshape(c.shape + (1,) * (t.dim() - c.dim())) * t if batched else c * t


def _safe_div(num, den):
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(den))


def conjugate_gradient(matvec: Callable[[list], list], b: list, steps: int, *, batched: bool = False) -> list:
    """`steps` iterations of conjugate gradient for `A x = b` from `x = 0`, over lists of tensors.

    `matvec(v) -> A v` for a symmetric positive-definite `A`. The iterations are a fixed number
    (no data-dependent stopping), so the function also runs under `torch.func.vmap`; a direction
    of zero curvature (the residual already 0) takes a step of 0 instead of dividing by zero.

    Args:
        matvec: `matvec(list of tensors) -> list of tensors`.
        b: the right-hand side, a list of tensors.
        steps: iterations, >= 0 (for `n` unknowns, `n` iterations solve exactly, up to rounding).
        batched: the leading dimension of every tensor indexes independent systems (one per task),
            each with its own step sizes; `matvec` maps each row on its own.

    Returns:
        `x`, a list like `b`.

    Raises:
        TypeError: `matvec` is not callable, `b` is not a non-empty list of tensors, a bad `steps` type.
        ValueError: a negative `steps`; `matvec` returns another number of tensors than it was given.

    Examples:
        >>> import torch
        >>> from metabatch import imaml
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x = imaml.conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 2.0])], steps=2)
        >>> torch.allclose(A @ x[0], torch.tensor([1.0, 2.0]))
        True
    """
    fn = "conjugate_gradient"
    _validate.callable_(matvec, "matvec", fn)
    steps = _validate.integer(steps, "steps", fn, low=0)
    batched = _validate.flag(batched, "batched", fn)
    if not isinstance(b, (list, tuple)) or not b or not all(isinstance(t, torch.Tensor) for t in b):
        raise TypeError(f"{fn}(): b must be a non-empty list of tensors (the right-hand side, one tensor per "
                        f"parameter), got {type(b).__name__}.")
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rs = _dot(r, r, batched)
    for _ in range(steps):
        ap = list(matvec(p))
        if len(ap) != len(p):
            raise ValueError(f"{fn}(): matvec returned {len(ap)} tensors for {len(p)}; return A v as a list like v.")
        alpha = _safe_div(rs, _dot(p, ap, batched))
        x = [xi + _scale(alpha, pi, batched) for xi, pi in zip(x, p, strict=True)]
        r = [ri - _scale(alpha, api, batched) for ri, api in zip(r, ap, strict=True)]
        rs_new = _dot(r, r, batched)
        beta = _safe_div(rs_new, rs)
        p = [ri + _scale(beta, pi, batched) for ri, pi in zip(r, p, strict=True)]
        rs = rs_new
    return x


def meta_grad(loss_fn: LossFn, params: PyTree, support: PyTree, query: PyTree, *, lam: float = 1.0,
              steps: int = 10, lr: Rate | None = None, inner: _inner.Optimizer | None = None, cg_steps: int = 5,
              chunk_size: int | None = None, randomness: str = "different", key: _random.Key | None = None,
              batch_rules: bool = True) -> MetaGrad:
    """The implicit-MAML meta-gradient of a batch of tasks (mean over tasks), by CG on Hessian-vector products.

    For each task (vmapped over the leading task dimension): `φ*` from `steps` first-order inner
    steps on `loss_fn(φ, support) + lam/2 · ‖φ − params‖²` (plain SGD with `lr`, or `inner`);
    `g = ∇L_query(φ*)`; then `cg_steps` iterations of conjugate gradient solve
    `(I + H/lam) x = g` with `H` the support loss's Hessian at `φ*`. The result is the mean of
    the `x` and of the query losses. Nothing is differentiated through the inner steps.

    Args:
        loss_fn: `loss_fn(params, data) -> scalar tensor` for one task.
        params: a pytree of floating-point tensors (every leaf is adapted); not modified.
        support: a pytree of tensors with a leading task dimension.
        query: a pytree of tensors with the same leading task dimension.
        lam: the proximal regularisation λ > 0.
        steps: inner steps per task.
        lr: plain SGD's inner learning rate (`None`: 0.01 unless `inner` is given).
        inner: an inner-loop optimizer of `metabatch.inner` for the proximal problem.
        cg_steps: conjugate-gradient iterations, >= 1.
        chunk_size: vmap at most this many tasks at a time.
        randomness: `vmap`'s randomness for random ops in `loss_fn`.
        key: a `metabatch.random` key seeding random ops.
        batch_rules: use [metabatch.batching.batching_rules][].

    Returns:
        A [MetaGrad][metabatch.imaml.MetaGrad].

    Raises:
        ValueError, TypeError: for bad arguments, as [metabatch.maml.meta_loss][].

    Examples:
        >>> import torch, torch.nn.functional as F, metabatch as mb
        >>> from metabatch import imaml
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x = torch.randn(4, 10, 1, generator=torch.Generator().manual_seed(0))
        >>> batch = (x, torch.sin(x))                                  # 4 tasks
        >>> out = imaml.meta_grad(mb.nn.objective(net, F.mse_loss), mb.nn.params(net), batch, batch,
        ...                       lam=1.0, steps=5, lr=0.1)
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        >>> for name, p in net.named_parameters():
        ...     p.grad = out.grads[name]
        >>> opt.step()
    """
    fn = "meta_grad"
    lam = _validate.number(lam, "lam", fn, low=0.0, strict_low=True)
    cg_steps = _validate.integer(cg_steps, "cg_steps", fn, low=1)
    steps = _validate.integer(steps, "steps", fn, low=0)
    _validate.choice(randomness, "randomness", fn, ("different", "same", "error"))
    if chunk_size is not None:
        chunk_size = _validate.integer(chunk_size, "chunk_size", fn, low=1)
    batch_rules = _validate.flag(batch_rules, "batch_rules", fn)
    params = optree.tree_map(torch.Tensor.detach, params)
    paths, leaves, spec = optree.tree_flatten_with_path(params)
    if not leaves:
        raise ValueError(f"{fn}(): params has no leaves; pass e.g. metabatch.nn.params(model).")
    for path, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            what = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(f"{fn}(): params{''.join(f'[{k!r}]' for k in path)} must be a floating-point "
                            f"tensor, got {what}.")
    if lr is not None and inner is not None:
        raise TypeError(f"{fn}(): pass either lr= (plain SGD) or inner= (an optimizer that carries its own rate), "
                        f"not both.")
    _batch.num_tasks(fn, support=support, query=query)

    def prox_loss(theta):
        def prox(phi, data):
            pairs = zip(optree.tree_leaves(phi), optree.tree_leaves(theta), strict=True)
            reg = sum(((a - b) ** 2).sum() for a, b in pairs)
            return loss_fn(phi, data) + 0.5 * lam * reg
        return prox

    def solve(leaves, s):
        theta = optree.tree_unflatten(spec, leaves)
        phi = _maml.adapt(prox_loss(theta), theta, s, steps=steps, lr=lr, inner=inner, first_order=True)
        return [t.detach() for t in optree.tree_leaves(phi)]

    def leaf_loss(ls, data):
        return loss_fn(optree.tree_unflatten(spec, ls), data)

    def vmapped(f, in_dims):
        return torch.func.vmap(f, in_dims=in_dims, randomness=randomness, chunk_size=chunk_size)

    # The Hessian-vector products differentiate a vmapped gradient (vjp outside vmap, as maml.meta_loss's
    # outer backward does): each task's block of the Jacobian is its own Hessian.
    with torch.no_grad(), _batch.seeded(key, leaves), _batching.batching_rules(batch_rules):
        phi = vmapped(solve, (None, 0))(leaves, support)
        g, losses = vmapped(torch.func.grad_and_value(leaf_loss), (0, 0))(phi, query)
        _, hvp = torch.func.vjp(  # type: ignore[misc]  # (the stub also counts has_aux's third value)
            lambda ls: vmapped(torch.func.grad(leaf_loss), (0, 0))(ls, support), phi)

        def matvec(v):
            return [vi + hvi / lam for vi, hvi in zip(v, hvp(v)[0], strict=True)]

        x = conjugate_gradient(matvec, list(g), cg_steps, batched=True)
    return MetaGrad(losses.mean(), optree.tree_unflatten(spec, [xi.mean(0) for xi in x]), losses)
