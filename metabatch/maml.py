"""The MAML family as pure functions on `torch.func`.

A task's loss is a function `loss_fn(params, data) -> scalar` of any pytree
of parameters (e.g. `metabatch.nn.params(model)`) and one task's data. The
inner loop [adapt][metabatch.maml.adapt] takes `steps` gradient steps on a
task's support set with `torch.func.grad`; [meta_loss][metabatch.maml.meta_loss]
maps it with `torch.func.vmap` over the leading task dimension of a batch and
returns the mean query loss, differentiable by ordinary autograd
(`loss.backward()`) and by `torch.func.grad` alike. Variants are options,
not classes:

* `first_order=True`: first-order MAML (the inner gradient is a constant);
* `lr` a pytree like `params`: Meta-SGD (learned per-parameter rates);
* `inner`: any inner-loop optimizer of `metabatch.inner` (momentum, Adam,
  MAML++'s per-step rates);
* `mask`: ANIL and friends (adapt only some parameters);
* `per_step`: parameters with one entry per inner step (MAML++'s per-step batch norm);
* `step_weights`: the multi-step loss of MAML++;
* [reptile_grad][metabatch.maml.reptile_grad]: the Reptile meta-gradient, for any `torch.optim`;
* [evaluate][metabatch.maml.evaluate]: adapt with more steps, per-task loss and metric, mean ± 95 % CI.

The options shared by [meta_loss][metabatch.maml.meta_loss],
[reptile_grad][metabatch.maml.reptile_grad] and [evaluate][metabatch.maml.evaluate]
are the fields of [Options][metabatch.maml.Options].

Batch norm, layer norm, instance norm, convolutions and max-pooling inside the
vmapped tasks go through [metabatch.batching.batching_rules][] (exact
second-order gradients, faster convolutions; see `docs/sharp-bits.md`).

Example:
    >>> import torch, metabatch as mb
    >>> from metabatch import maml
    >>> def loss_fn(p, data):
    ...     x, y = data
    ...     return ((x * p["w"] - y) ** 2).mean()
    >>> params = {"w": torch.tensor(0.0, requires_grad=True)}
    >>> x = torch.ones(4, 5)                    # 4 tasks, 5 points each
    >>> support = query = (x, 2 * x)
    >>> loss = maml.meta_loss(loss_fn, params, support, query, steps=1, lr=0.25)
    >>> loss.backward()
    >>> round(loss.item(), 4), round(params["w"].grad.item(), 4)
    (1.0, -1.0)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import NamedTuple, cast

import optree
import torch

from . import _taskbatch as _batch
from . import _validate
from . import batching as _batching
from . import inner as _inner
from . import random as _random
from .typing import LossFn, Mask, PyTree, Rate

__all__ = ["Evaluation", "Options", "adapt", "evaluate", "mean_ci", "meta_loss", "reptile_grad",
           "select_step"]

_RANDOMNESS = ("different", "same", "error")
_DEFAULT_LR = 0.01


class Options(NamedTuple):
    """The inner-loop options that [meta_loss][metabatch.maml.meta_loss],
    [reptile_grad][metabatch.maml.reptile_grad] and [evaluate][metabatch.maml.evaluate] share.

    Each function takes them as keywords (their defaults for `steps` differ: 1, 5 and 10);
    an `Options` value passes the same set to all three with `**options._asdict()`.

    Attributes:
        steps: inner steps per task.
        lr: inner learning rate of plain SGD: a number, a 0-d tensor, or a pytree like
            `params` (Meta-SGD). `None`: 0.01, or the rate that `inner` carries.
        inner: an inner-loop optimizer ([metabatch.inner.Optimizer][]); `None` is
            `metabatch.inner.sgd(lr)`. It carries its own learning rate: giving both
            `lr` and `inner` is a TypeError.
        mask: which parameters to adapt (ANIL): `None` for all, a predicate on the dotted
            parameter name, or a pytree of bools like `params`.
        per_step: which parameters hold one entry per inner step (MAML++'s per-step batch-norm
            weights, biases and statistics): same forms as `mask`, `None` for none. The support
            pass of inner step `s` sees `leaf[s]`, the query pass after `k` steps sees
            `leaf[k - 1]` (`leaf[0]` when `k = 0`); indices past the end use the last entry.
            These leaves are never adapted in the inner loop.
        chunk_size: vmap at most this many tasks at a time.
        randomness: `vmap`'s randomness for random ops in `loss_fn`.
        key: a `metabatch.random` key seeding random ops, or `None`.
        batch_rules: use [metabatch.batching.batching_rules][].

    Examples:
        >>> import torch
        >>> from metabatch import maml, inner
        >>> opts = maml.Options(steps=3, inner=inner.momentum(0.1))
        >>> loss_fn = lambda p, y: ((p["w"] - y) ** 2).mean()
        >>> ys = torch.tensor([[1.0], [2.0]])
        >>> ev = maml.evaluate(loss_fn, {"w": torch.tensor(0.0)}, ys, ys, **opts._asdict())
        >>> round(ev.loss, 4)
        0.0096
    """

    steps: int = 1
    lr: Rate | None = None
    inner: _inner.Optimizer | None = None
    mask: Mask = None
    per_step: Mask = None
    chunk_size: int | None = None
    randomness: str = "different"
    key: _random.Key | None = None
    batch_rules: bool = True


class _Plan(NamedTuple):
    """Validated options, resolved against `params`."""

    spec: optree.PyTreeSpec
    leaves: list
    opt: _inner.Optimizer
    lr: object  # the validated lr (None when `inner` was given)
    keep: list   # adapted leaves
    stepwise: list  # per-step leaves
    steps: int
    chunk_size: int | None
    randomness: str
    key: object
    batch_rules: bool


# ------------------------------------------------------------------------- validation


def _paths(params) -> list[str]:
    return [".".join(str(k) for k in path) for path in optree.tree_flatten_with_path(params)[0]]


def _where(path) -> str:
    return "params" + "".join(f"[{k!r}]" for k in path)


def _select(sel, params, spec, fn: str, name: str) -> list[bool]:
    """A mask-like argument as one bool per leaf: a predicate on dotted names, or a bool pytree."""
    if callable(sel):
        return [bool(sel(path)) for path in _paths(params)]
    flags, sel_spec = optree.tree_flatten(sel)
    if sel_spec != spec:
        raise TypeError(f"{fn}(): {name} must be a predicate on parameter names or a pytree of bools "
                        f"with the structure of params.\n  params: {spec}\n  {name}:{' ' * (7 - len(name))}{sel_spec}")
    for flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}(): {name} leaves must be Python bools, got {type(flag).__name__}.")
    return flags


def _flatten_params(params, fn: str):
    paths, leaves, spec = optree.tree_flatten_with_path(params)
    if not leaves:
        raise ValueError(f"{fn}(): params has no leaves; pass e.g. metabatch.nn.params(model).")
    for path, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}(): every leaf of params must be a tensor, got {_where(path)} = "
                            f"{type(leaf).__name__}.")
    return leaves, spec


def _plan(fn: str, params, options: Options) -> _Plan:
    steps = _validate.integer(options.steps, "steps", fn, low=0)
    chunk_size = options.chunk_size
    if chunk_size is not None:
        chunk_size = _validate.integer(chunk_size, "chunk_size", fn, low=1)
    _validate.choice(options.randomness, "randomness", fn, _RANDOMNESS)
    batch_rules = _validate.flag(options.batch_rules, "batch_rules", fn)
    leaves, spec = _flatten_params(params, fn)
    lr, opt = options.lr, options.inner
    if opt is not None:
        if lr is not None:
            raise TypeError(f"{fn}(): pass either lr= (plain SGD, Meta-SGD) or inner= (an optimizer that carries "
                            f"its own rate), not both; e.g. inner=metabatch.inner.momentum({lr!r}).")
        if not isinstance(opt, tuple) or len(opt) != 2 or not all(callable(f) for f in opt):
            raise TypeError(f"{fn}(): inner must be an (init, update) pair such as metabatch.inner.adam(1e-3), "
                            f"got {type(opt).__name__}.")
        opt = _inner.Optimizer(*opt)
    else:
        lr = _validate.rate(_DEFAULT_LR if lr is None else lr, "lr", fn)
        opt = _inner.sgd(lr)
    stepwise = [False] * len(leaves) if options.per_step is None else _select(
        options.per_step, params, spec, fn, "per_step")
    paths = optree.tree_flatten_with_path(params)[0]
    for path, leaf, sw in zip(paths, leaves, stepwise, strict=True):
        if sw and leaf.dim() == 0:
            raise ValueError(f"{fn}(): per_step selects {_where(path)}, a 0-d tensor; per-step parameters have "
                             f"a leading step dimension.")
    keep = [True] * len(leaves) if options.mask is None else _select(options.mask, params, spec, fn, "mask")
    keep = [k and not sw for k, sw in zip(keep, stepwise, strict=True)]
    if lr is not None and not (isinstance(lr, float) or (isinstance(lr, torch.Tensor) and lr.dim() == 0)):
        lr_paths, _, lr_spec = optree.tree_flatten_with_path(lr)
        if lr_spec != spec and not {p for p, k in zip(paths, keep, strict=True) if k} <= set(lr_paths):
            raise TypeError(f"{fn}(): lr must be a number, a scalar tensor, or a pytree with the structure "
                            f"of params (Meta-SGD), with a rate for every parameter it adapts."
                            f"\n  params: {spec}\n  lr:     {lr_spec}")
    if not any(keep) and steps > 0:
        raise ValueError(f"{fn}(): mask selects no parameter to adapt (per-step parameters are never adapted); "
                         f"names are {_paths(params)}.")
    for path, leaf, k in zip(paths, leaves, keep, strict=True):
        if k and not leaf.is_floating_point():
            raise TypeError(f"{fn}(): {_where(path)} is a {leaf.dtype} tensor, which cannot be adapted by "
                            f"gradient steps; leave integer buffers out of params (metabatch.nn.params(model) "
                            f"does) or exclude them with mask=.")
    return _Plan(spec, leaves, opt, options.lr if options.inner is not None else lr, keep, stepwise, steps,
                 chunk_size, options.randomness, options.key, batch_rules)


def _step_weights(weights, steps: int, fn: str):
    """MAML++'s multi-step loss weights: `steps` finite numbers >= 0 (or a tensor of them)."""
    if isinstance(weights, torch.Tensor):
        if weights.shape != (steps,):
            raise ValueError(f"{fn}(): step_weights must hold one weight per inner step ({steps}), got shape "
                             f"{tuple(weights.shape)}.")
        return list(weights.unbind())
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{fn}(): step_weights must be a sequence of {steps} numbers (one per inner step) or a "
                        f"tensor, got {type(weights).__name__}.")
    if len(weights) != steps:
        raise ValueError(f"{fn}(): step_weights must hold one weight per inner step ({steps}), got "
                         f"{len(weights)}: {list(weights)!r}.")
    return [_validate.number(w, f"step_weights[{i}]", fn, low=0.0) for i, w in enumerate(weights)]


# ------------------------------------------------------------------------------ core


def _at_step(leaves, stepwise, s: int) -> list:
    """The leaves seen at inner step `s`: per-step leaves indexed (clamped to their last entry)."""
    return [leaf[min(s, leaf.shape[0] - 1)] if sw else leaf for leaf, sw in zip(leaves, stepwise, strict=True)]


def _query_view(spec, leaves, stepwise, k: int):
    """The parameters the query pass sees after `k` inner steps."""
    return optree.tree_unflatten(spec, _at_step(leaves, stepwise, max(k - 1, 0)))


def _trajectory(loss_fn, spec, leaves, opt, keep, stepwise, data, steps, first_order):
    """Yield the leaves after each of `steps` inner updates; fixed leaves stay the caller's tensors."""
    idx = [i for i, k in enumerate(keep) if k]

    def inner_loss(moving, leaves, data, s):
        leaves = _at_step(leaves, stepwise, s)
        for i, p in zip(idx, moving, strict=True):
            leaves[i] = p
        return loss_fn(optree.tree_unflatten(spec, leaves), data)

    leaves = list(leaves)
    if steps == 0:
        return
    state = opt.init(optree.tree_unflatten(spec, [p if k else None for p, k in zip(leaves, keep, strict=True)]))
    for s in range(steps):
        grads = torch.func.grad(inner_loss)([leaves[i] for i in idx], leaves, data, s)
        full = [None] * len(leaves)
        for i, g in zip(idx, grads, strict=True):
            full[i] = g.detach() if first_order else g
        moving = [p if k else None for p, k in zip(leaves, keep, strict=True)]
        updates, state = opt.update(optree.tree_unflatten(spec, full), state, optree.tree_unflatten(spec, moving))
        updates = spec.flatten_up_to(updates)
        for i in idx:
            if updates[i] is not None:
                leaves[i] = leaves[i] + updates[i]
        yield list(leaves)


def _adapt_leaves(loss_fn, plan, leaves, opt, data, first_order):
    out = list(leaves)
    for after_step in _trajectory(loss_fn, plan.spec, leaves, opt, plan.keep, plan.stepwise, data, plan.steps,
                                  first_order):
        out = after_step
    return out


def adapt(loss_fn: LossFn, params: PyTree, support: PyTree, *, steps: int = 1, lr: Rate | None = None,
          inner: _inner.Optimizer | None = None, first_order: bool = False, mask: Mask = None,
          per_step: Mask = None) -> PyTree:
    """Adapt `params` to one task: `steps` inner-optimizer steps on its support set.

    With the default plain SGD, `φ ← φ − lr · ∇φ loss_fn(φ, support)`, starting from `φ = params`,
    with `torch.func.grad`; with `inner`, the updates of that optimizer
    (`metabatch.inner`). The result stays differentiable with respect to `params` (and
    tensor learning rates) unless `first_order` is set.

    Args:
        loss_fn: `loss_fn(params, data) -> scalar tensor` for one task.
        params: a pytree of tensors (e.g. `metabatch.nn.params(model)`); not modified.
        support: one task's data, passed to `loss_fn` as is.
        steps: number of inner steps (0 returns `params`' leaves unchanged).
        lr: learning rate of plain SGD: a number, a 0-d tensor, or a pytree like `params`
            (Meta-SGD: per-parameter rates, tensors that may require grad). `None`: 0.01.
        inner: an inner-loop optimizer, e.g. `metabatch.inner.adam(1e-3)`; not with `lr`.
        first_order: treat the inner gradients as constants (FOMAML).
        mask: which parameters to adapt (ANIL): `None` for all, a predicate on
            the dotted parameter name (`lambda name: name.startswith("head.")`),
            or a pytree of bools like `params`. The others stay fixed.
        per_step: parameters with a leading step dimension (see [Options][metabatch.maml.Options]).

    Returns:
        The adapted parameters, a pytree like `params`, ready for the query pass. Per-step
        leaves are given at the query's index (`leaf[steps - 1]`).

    Raises:
        ValueError: for a negative `steps`, a non-finite `lr`, a mask selecting nothing.
        TypeError: for a non-int `steps`; when `lr`, `mask` or `per_step` is a pytree whose
            structure differs from `params`; for both `lr` and `inner`; for an integer leaf to adapt.

    Examples:
        >>> import torch
        >>> from metabatch import maml, inner
        >>> loss_fn = lambda p, d: ((p["w"] - d) ** 2).sum()
        >>> maml.adapt(loss_fn, {"w": torch.tensor(0.0)}, torch.tensor(1.0), steps=2, lr=0.25)
        {'w': tensor(0.7500)}
        >>> maml.adapt(loss_fn, {"w": torch.tensor(0.0)}, torch.tensor(1.0), steps=2,
        ...            inner=inner.momentum(0.25, momentum=0.5))
        {'w': tensor(1.)}
    """
    plan = _plan("adapt", params, Options(steps, lr, inner, mask, per_step))
    first_order = _validate.flag(first_order, "first_order", "adapt")
    leaves = _adapt_leaves(loss_fn, plan, plan.leaves, plan.opt, support, first_order)
    return _query_view(plan.spec, leaves, plan.stepwise, plan.steps)


def select_step(params: PyTree, step: int, per_step: Mask) -> PyTree:
    """`params` as inner step `step` sees them: each per-step leaf replaced by `leaf[step]`.

    Indices past the end use the last entry. The support pass of inner step `s` sees
    `select_step(φ_s, s, per_step)`; the query pass after `k ≥ 1` steps sees
    `select_step(φ_k, k - 1, per_step)` (MAML++'s convention).

    Args:
        params: a pytree of tensors.
        step: the inner step, >= 0.
        per_step: which leaves have a leading step dimension (see [Options][metabatch.maml.Options]).

    Returns:
        A pytree like `params`.

    Examples:
        >>> import torch
        >>> from metabatch import maml
        >>> p = {"scale": torch.tensor([1.0, 2.0, 3.0]), "w": torch.tensor(5.0)}
        >>> maml.select_step(p, 1, lambda name: name == "scale")
        {'scale': tensor(2.), 'w': tensor(5.)}
    """
    step = _validate.integer(step, "step", "select_step", low=0)
    leaves, spec = _flatten_params(params, "select_step")
    stepwise = [False] * len(leaves) if per_step is None else _select(per_step, params, spec, "select_step",
                                                                       "per_step")
    return optree.tree_unflatten(spec, _at_step(leaves, stepwise, step))


def _captured(opt) -> list[torch.Tensor]:
    """Tensors that require grad, held by an optimizer's functions (closures, partial arguments)."""
    found = []
    for fn in opt:
        values = []
        for cell in getattr(fn, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                values.append(cell.cell_contents)
        values += list(getattr(fn, "args", ())) + list(getattr(fn, "keywords", {}).values())
        for value in values:
            if isinstance(value, (torch.Tensor, dict, list, tuple)):
                found += [t for t in optree.tree_leaves(cast(PyTree, value))
                          if isinstance(t, torch.Tensor) and t.requires_grad]
    unique = {id(t): t for t in found}
    return list(unique.values())


def _map_tasks(task, fn_name, plan, batches, *, lr_leaves=None, key=None):
    """vmap `task(leaves, *task_batches)` over the task dimension of `batches`."""
    leaves = plan.leaves if lr_leaves is None else lr_leaves
    in_dims = (None,) + (0,) * len(batches)
    with _batch.seeded(key, leaves + optree.tree_leaves(batches)), _batching.batching_rules(plan.batch_rules):
        return torch.func.vmap(task, in_dims=in_dims, randomness=plan.randomness,
                               chunk_size=plan.chunk_size)(leaves, *batches)


def meta_loss(loss_fn: LossFn, params: PyTree, support: PyTree, query: PyTree, *, steps: int = 1,
              lr: Rate | None = None, inner: _inner.Optimizer | None = None, first_order: bool = False,
              mask: Mask = None, per_step: Mask = None, step_weights: Sequence[float] | torch.Tensor | None = None,
              chunk_size: int | None = None, randomness: str = "different", key: _random.Key | None = None,
              batch_rules: bool = True, remat: bool = False) -> torch.Tensor:
    """The MAML meta-objective of a batch of tasks: mean query loss after adapting on the support.

    For each task `t` (the leading dimension of every leaf of `support` and
    `query`), `φ_t = adapt(loss_fn, params, support[t], ...)` and the result
    is `mean_t loss_fn(φ_t, query[t])`, computed with `torch.func.vmap` over
    the tasks. Back-propagate it with `loss.backward()` into `nn.Parameter`
    leaves (then step any `torch.optim` optimizer), or differentiate it with
    `torch.func.grad`. Gradients also reach `lr` when it holds tensors
    that require grad (Meta-SGD), and the tensors `inner` was built with (learned rates).

    Args:
        loss_fn: `loss_fn(params, data) -> scalar tensor` for one task.
        params: a pytree of tensors; not modified.
        support: a pytree of tensors with a leading task dimension `T`.
        query: a pytree of tensors with the same leading task dimension.
        steps: inner steps per task.
        lr: plain SGD's inner learning rate: a number, a 0-d tensor, or a pytree like `params`
            (Meta-SGD). `None`: 0.01 (unless `inner` is given).
        inner: an inner-loop optimizer of `metabatch.inner` (`momentum`, `adam`, `lslr`);
            `None` is plain SGD with `lr`. Giving both `lr` and `inner` is a TypeError:
            the optimizer carries its own rate.
        first_order: first-order MAML (no second-order terms).
        mask: which parameters to adapt (ANIL); see [adapt][metabatch.maml.adapt].
        per_step: parameters with one entry per inner step; see [Options][metabatch.maml.Options].
        step_weights: MAML++'s multi-step loss: one weight per inner step `k = 1..steps`; the
            task's loss is then `Σ_k w_k · loss_fn(φ_k, query)`, the query loss after every
            step (steps of weight 0 cost nothing). `None`: the query loss after the last step
            only. `metabatch.mamlpp.step_weights` gives MAML++'s annealed weights.
        chunk_size: vmap at most this many tasks at a time (`torch.func.vmap`'s
            `chunk_size`): less memory; on CPU, activations above glibc's 32 MB
            mmap threshold are slow to allocate, so chunks can also be faster.
        randomness: `vmap`'s randomness for random ops in `loss_fn` (dropout):
            `"different"` (each task draws its own; the default), `"same"`
            (one draw shared by all tasks) or `"error"`.
        key: a `metabatch.random` key. When given, random ops draw from
            torch's generators seeded from it, and their previous states are
            restored afterwards: the same key gives the same result. `None`
            draws from torch's global generator as any module would.
        batch_rules: use [metabatch.batching.batching_rules][] (exact batch-norm
            meta-gradients, faster convolutions). `False` uses PyTorch's own rules.
        remat: keep no graph in the forward pass; recompute `chunk_size` tasks at a
            time (default 1) during the backward pass instead. Peak memory is then
            that of one chunk, for a second forward pass. Gradients reach `params`, tensor
            `lr` leaves and the tensors `inner` holds through ordinary autograd
            (`loss.backward()`, `torch.autograd.grad`), not through `torch.func` transforms
            or a second backward. Random ops replay the same draws in the recomputation.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: when the leaves of `support` and `query` disagree on the number of
            tasks or hold none, for a bad `steps`, `chunk_size`, `randomness` or `step_weights`.
        TypeError: when `lr`, `mask` or `per_step` does not match `params`, a data leaf is not
            a tensor, both `lr` and `inner` are given, or a leaf to adapt is an integer tensor.

    Examples:
        >>> import torch
        >>> from metabatch import maml
        >>> def loss_fn(p, data):
        ...     x, y = data
        ...     return ((x @ p["w"] - y) ** 2).mean()
        >>> w = torch.zeros(3, requires_grad=True)
        >>> rates = {"w": torch.full((3,), 0.1, requires_grad=True)}   # Meta-SGD
        >>> x = torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(0))
        >>> batch = (x, x.sum(-1))                                       # 8 tasks, 5 points
        >>> loss = maml.meta_loss(loss_fn, {"w": w}, batch, batch, steps=2, lr=rates)
        >>> loss.backward()
        >>> w.grad.shape, rates["w"].grad.shape
        (torch.Size([3]), torch.Size([3]))
    """
    options = Options(steps, lr, inner, mask, per_step, chunk_size, randomness, key, batch_rules)
    plan = _plan("meta_loss", params, options)
    first_order = _validate.flag(first_order, "first_order", "meta_loss")
    remat = _validate.flag(remat, "remat", "meta_loss")
    weights = None if step_weights is None else _step_weights(step_weights, plan.steps, "meta_loss")
    n_tasks = _batch.num_tasks("meta_loss", support=support, query=query)

    def query_loss(leaves, k, q):
        loss = loss_fn(_query_view(plan.spec, leaves, plan.stepwise, k), q)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"meta_loss(): loss_fn must return a scalar tensor for one task, got "
                             f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}.")
        return loss

    def task_fn(opt):
        def task(leaves, s, q):
            if weights is None:
                return query_loss(_adapt_leaves(loss_fn, plan, leaves, opt, s, first_order), plan.steps, q)
            total = 0
            for k, adapted in enumerate(_trajectory(loss_fn, plan.spec, leaves, opt, plan.keep, plan.stepwise, s,
                                                    plan.steps, first_order), start=1):
                w = weights[k - 1]
                if isinstance(w, torch.Tensor) or w != 0:
                    total = total + w * query_loss(adapted, k, q)
            return total if isinstance(total, torch.Tensor) else query_loss(leaves, 0, q) * 0
        return task

    if remat:
        return _remat_mean(task_fn, plan, (support, query), n_tasks)
    losses = _map_tasks(task_fn(plan.opt), "meta_loss", plan, (support, query), key=plan.key)
    return losses.mean()


def _remat_mean(task_fn, plan, batches, n_tasks):
    """mean_t task(...) with no graph kept: chunks of tasks are recomputed in the backward pass."""
    leaves = plan.leaves
    if plan.opt is not None and plan.lr is None:  # a user's optimizer: its own tensors are extra inputs
        lr_leaves, lr_spec, slots = [], None, []
        captured = _captured(plan.opt)
    else:
        lr_leaves, lr_spec = optree.tree_flatten(plan.lr)
        slots = [i for i, v in enumerate(lr_leaves) if isinstance(v, torch.Tensor)]
        captured = []
    inputs = leaves + [lr_leaves[i] for i in slots]
    if any(torch._C._functorch.maybe_get_level(x) != -1 for x in inputs + captured):
        raise ValueError("meta_loss(remat=True) works with ordinary autograd (loss.backward()), not inside "
                         "torch.func transforms; use remat=False there.")
    size = plan.chunk_size or 1

    def chunk_loss(tensors, lo):
        if lr_spec is not None:
            rates = list(lr_leaves)
            for i, v in zip(slots, tensors[len(leaves):], strict=True):
                rates[i] = v
            opt = _inner.sgd(optree.tree_unflatten(lr_spec, rates))
        else:
            opt = plan.opt
        part = optree.tree_map(lambda x: x[lo:lo + size], batches)
        key = plan.key if plan.key is None else _random.fold_in(plan.key, lo)
        chunk_plan = plan._replace(leaves=list(tensors[:len(leaves)]), chunk_size=None)
        losses = _map_tasks(task_fn(opt), "meta_loss", chunk_plan, part, key=key)
        return losses.sum()

    return _Remat.apply(chunk_loss, range(0, n_tasks, size), n_tasks, len(inputs), *inputs, *captured)


class _Remat(torch.autograd.Function):
    """Sum of chunk losses / n, recomputing each chunk in backward (with the forward's RNG state).

    The first `n_inputs` tensors are the ones `chunk_loss` reads (recomputed from detached
    copies); the rest are tensors it captures itself (an inner optimizer's rates), whose
    gradients are taken at the tensors themselves.
    """

    @staticmethod
    def forward(ctx, chunk_loss, starts, n, n_inputs, *tensors):
        ctx.chunk_loss, ctx.starts, ctx.n, ctx.n_inputs = chunk_loss, starts, n, n_inputs
        ctx.captured = tensors[n_inputs:]
        ctx.devices = sorted({x.device.index or 0 for x in tensors if x.is_cuda})
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        ctx.save_for_backward(*tensors[:n_inputs])
        with torch.no_grad():
            return sum(chunk_loss(tensors, lo) for lo in starts) / n

    @staticmethod
    def backward(ctx, grad):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        wanted = [x for x in inputs if x.requires_grad] + [c for c in ctx.captured if c.requires_grad]
        total = [torch.zeros_like(x) for x in wanted]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            for d, state in zip(ctx.devices, ctx.rng[1], strict=True):
                torch.cuda.set_rng_state(state, d)
            for lo in ctx.starts:
                grads = torch.autograd.grad(ctx.chunk_loss(inputs, lo), wanted, allow_unused=True)
                for acc, g in zip(total, grads, strict=True):
                    if g is not None:
                        acc.add_(g)
        it = iter(total)
        out = [next(it) * (grad / ctx.n) if x.requires_grad else None for x in inputs]
        out += [next(it) * (grad / ctx.n) if c.requires_grad else None for c in ctx.captured]
        return (None, None, None, None, *out)


def reptile_grad(loss_fn: LossFn, params: PyTree, support: PyTree, *, steps: int = 5, lr: Rate | None = None,
                 inner: _inner.Optimizer | None = None, mask: Mask = None, per_step: Mask = None,
                 chunk_size: int | None = None, randomness: str = "different", key: _random.Key | None = None,
                 batch_rules: bool = True) -> PyTree:
    """The Reptile meta-gradient `θ − mean_t φ_t` of a batch of tasks.

    `φ_t` is `params` after `steps` first-order inner steps on task `t`'s
    support set (plain SGD, or `inner`: Reptile's paper used Adam), vmapped over tasks. Assign
    the result to the parameters' `.grad` and step any `torch.optim` optimizer: plain SGD
    with learning rate ε gives Reptile's `θ ← θ + ε (mean φ − θ)`.

    Args:
        loss_fn: `loss_fn(params, data) -> scalar tensor` for one task.
        params: a pytree of tensors; not modified.
        support: a pytree of tensors with a leading task dimension.
        steps: inner first-order steps per task.
        lr: plain SGD's inner learning rate (as in [meta_loss][metabatch.maml.meta_loss]).
        inner: an inner-loop optimizer (as in [meta_loss][metabatch.maml.meta_loss]).
        mask: which parameters to adapt; see [adapt][metabatch.maml.adapt].
        per_step: as in [meta_loss][metabatch.maml.meta_loss].
        chunk_size: as in [meta_loss][metabatch.maml.meta_loss].
        randomness: as in [meta_loss][metabatch.maml.meta_loss].
        key: as in [meta_loss][metabatch.maml.meta_loss].
        batch_rules: as in [meta_loss][metabatch.maml.meta_loss].

    Returns:
        A pytree like `params` of detached tensors (exactly zero for leaves that are not adapted).

    Raises:
        ValueError, TypeError: as [meta_loss][metabatch.maml.meta_loss].

    Examples:
        >>> import torch
        >>> from metabatch import maml
        >>> w = torch.nn.Parameter(torch.zeros(()))
        >>> loss_fn = lambda p, y: ((p["w"] - y) ** 2).mean()
        >>> targets = torch.tensor([[1.0], [3.0]])          # 2 tasks
        >>> g = maml.reptile_grad(loss_fn, {"w": w}, targets, steps=1, lr=0.25)
        >>> g
        {'w': tensor(-1.)}
        >>> w.grad = g["w"]; torch.optim.SGD([w], lr=1.0).step(); w.data
        tensor(1.)
    """
    options = Options(steps, lr, inner, mask, per_step, chunk_size, randomness, key, batch_rules)
    params = optree.tree_map(torch.Tensor.detach, params)
    plan = _plan("reptile_grad", params, options)
    _batch.num_tasks("reptile_grad", support=support)

    def task(leaves, s):
        return _adapt_leaves(loss_fn, plan, leaves, plan.opt, s, True)

    with torch.no_grad():
        adapted = _map_tasks(task, "reptile_grad", plan, (support,), key=plan.key)
        return optree.tree_unflatten(plan.spec, [p - a.mean(0) if k else torch.zeros_like(p)
                                                 for p, a, k in zip(plan.leaves, adapted, plan.keep, strict=True)])


class Evaluation(NamedTuple):
    """Result of [evaluate][metabatch.maml.evaluate]: per-task values and their mean with a 95 % interval.

    Attributes:
        loss: mean query loss over tasks.
        loss_ci: half-width of the 95 % confidence interval of `loss`.
        metric: mean of `metric_fn` over tasks (`None` without `metric_fn`).
        metric_ci: half-width of its 95 % confidence interval.
        per_task_loss: the query loss of each task, shape `[T]`.
        per_task_metric: `metric_fn` of each task, shape `[T]`, or `None`.
    """

    loss: float
    loss_ci: float
    metric: float | None
    metric_ci: float | None
    per_task_loss: torch.Tensor
    per_task_metric: torch.Tensor | None


def mean_ci(values: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width `z·s/√n` of its normal confidence interval (95 % by default).

    Args:
        values: a 1-D tensor of per-task values.
        z: the normal quantile (1.96 for 95 %).

    Returns:
        `(mean, half_width)`; the half-width is `nan` for fewer than two values.

    Examples:
        >>> from metabatch import maml
        >>> import torch
        >>> [round(v, 3) for v in maml.mean_ci(torch.tensor([1.0, 2.0, 3.0]))]
        [2.0, 1.132]
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("mean_ci(): values is empty.")
    half = float(z * values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), half


def evaluate(loss_fn: LossFn, params: PyTree, support: PyTree, query: PyTree, *, steps: int = 10,
             lr: Rate | None = None, inner: _inner.Optimizer | None = None, metric_fn: LossFn | None = None,
             mask: Mask = None, per_step: Mask = None, chunk_size: int | None = None,
             randomness: str = "different", key: _random.Key | None = None,
             batch_rules: bool = True) -> Evaluation:
    """Meta-test: adapt each task (often with more steps than in training) and score its query set.

    No graph is kept for the outer parameters (first-order inner steps under
    `torch.no_grad`), so this is cheap enough for many evaluation tasks;
    split them into batches or pass `chunk_size` to bound memory.

    Args:
        loss_fn: `loss_fn(params, data) -> scalar tensor` for one task.
        params: a pytree of tensors; not modified.
        support: a pytree of tensors with a leading task dimension.
        query: a pytree of tensors with the same leading task dimension.
        steps: inner steps per task.
        lr: plain SGD's inner learning rate (as in [meta_loss][metabatch.maml.meta_loss]).
        inner: an inner-loop optimizer (as in [meta_loss][metabatch.maml.meta_loss]).
        metric_fn: optional `metric_fn(params, data) -> scalar`, e.g.
            `metabatch.nn.objective(model, metabatch.nn.accuracy)`.
        mask: which parameters to adapt; see [adapt][metabatch.maml.adapt].
        per_step: as in [meta_loss][metabatch.maml.meta_loss].
        chunk_size: as in [meta_loss][metabatch.maml.meta_loss].
        randomness: as in [meta_loss][metabatch.maml.meta_loss].
        key: as in [meta_loss][metabatch.maml.meta_loss].
        batch_rules: as in [meta_loss][metabatch.maml.meta_loss].

    Returns:
        An [Evaluation][metabatch.maml.Evaluation].

    Raises:
        ValueError, TypeError: as [meta_loss][metabatch.maml.meta_loss].

    Examples:
        >>> import torch
        >>> from metabatch import maml
        >>> loss_fn = lambda p, y: ((p["w"] - y) ** 2).mean()
        >>> hit = lambda p, y: (p["w"] - y).abs().lt(0.5).float().mean()
        >>> ys = torch.tensor([[1.0], [2.0], [3.0]])
        >>> ev = maml.evaluate(loss_fn, {"w": torch.tensor(0.0)}, ys, ys, steps=5, lr=0.5, metric_fn=hit)
        >>> ev.metric, round(ev.loss, 6), ev.per_task_loss.shape
        (1.0, 0.0, torch.Size([3]))
    """
    options = Options(steps, lr, inner, mask, per_step, chunk_size, randomness, key, batch_rules)
    params = optree.tree_map(torch.Tensor.detach, params)
    plan = _plan("evaluate", params, options)
    if metric_fn is not None:
        _validate.callable_(metric_fn, "metric_fn", "evaluate")
    _batch.num_tasks("evaluate", support=support, query=query)

    def task(leaves, s, q):
        adapted = _query_view(plan.spec, _adapt_leaves(loss_fn, plan, leaves, plan.opt, s, True), plan.stepwise,
                              plan.steps)
        loss = loss_fn(adapted, q)
        return (loss, metric_fn(adapted, q)) if metric_fn is not None else (loss,)

    with torch.no_grad():
        out = _map_tasks(task, "evaluate", plan, (support, query), key=plan.key)
    loss, loss_ci = mean_ci(out[0])
    metric = metric_ci = None
    if metric_fn is not None:
        metric, metric_ci = mean_ci(out[1])
    return Evaluation(loss, loss_ci, metric, metric_ci, out[0].detach(),
                      out[1].detach() if metric_fn is not None else None)
