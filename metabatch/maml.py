"""The MAML family as pure functions on ``torch.func``.

A task's loss is a function ``loss_fn(params, data) -> scalar`` of any pytree
of parameters (e.g. ``metabatch.nn.params(model)``) and one task's data. The
inner loop :func:`adapt` takes ``steps`` gradient steps on a task's support
set with ``torch.func.grad``; :func:`meta_loss` maps it with
``torch.func.vmap`` over the leading task dimension of a batch and returns the
mean query loss, differentiable by ordinary autograd (``loss.backward()``) and
by ``torch.func.grad`` alike. Variants are options, not classes:

* ``first_order=True``: first-order MAML (the inner gradient is a constant);
* ``lr`` a pytree like ``params``: Meta-SGD (learned per-parameter rates);
* ``mask``: ANIL and friends (adapt only some parameters);
* :func:`reptile_grad`: the Reptile meta-gradient, for any ``torch.optim``;
* :func:`evaluate`: adapt with more steps, per-task loss and metric, mean ± 95 % CI.

Batch norm, layer norm, instance norm, convolutions and max-pooling inside the
vmapped tasks go through :func:`metabatch.batching.batching_rules` (exact
second-order gradients, faster convolutions; see ``docs/sharp-bits.md``).

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
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from . import batching as _batching
from . import random as _random

__all__ = ["Evaluation", "adapt", "evaluate", "mean_ci", "meta_loss", "reptile_grad"]

PyTree = Any  # nested tuples / lists / dicts / NamedTuples of tensors (optree)
LossFn = Callable[[PyTree, PyTree], torch.Tensor]
Rate = "float | torch.Tensor | PyTree"
Mask = "Callable[[str], bool] | PyTree | None"
_RANDOMNESS = ("different", "same", "error")


# ------------------------------------------------------------------------- validation


def _check_int(value, name: str, fn: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{fn}(): {name} must be an int >= {low}, got {value!r}.")
    return value


def _rates(lr, spec, fn: str) -> list:
    """One inner learning rate per leaf of ``params``: a float, a scalar tensor, or a pytree."""
    if isinstance(lr, bool):
        raise TypeError(f"{fn}(): lr must be a float, a scalar tensor or a pytree like params, got a bool.")
    if isinstance(lr, (int, float)):
        if not math.isfinite(lr):
            raise ValueError(f"{fn}(): lr must be finite, got {lr!r}.")
        return [float(lr)] * spec.num_leaves
    if isinstance(lr, torch.Tensor) and lr.dim() == 0:
        return [lr] * spec.num_leaves
    leaves, lr_spec = optree.tree_flatten(lr)
    if lr_spec != spec:
        raise TypeError(f"{fn}(): lr must be a float, a scalar tensor, or a pytree with the structure of "
                        f"params (Meta-SGD).\n  params: {spec}\n  lr:     {lr_spec}")
    for leaf in leaves:
        if not isinstance(leaf, (int, float, torch.Tensor)) or isinstance(leaf, bool):
            raise TypeError(f"{fn}(): every leaf of lr must be a float or a tensor, got "
                            f"{type(leaf).__name__}.")
    return leaves


def _keep(mask, params, spec, fn: str) -> list[bool]:
    """Which leaves of ``params`` are adapted: all, a predicate on dotted names, or a bool pytree."""
    if mask is None:
        return [True] * spec.num_leaves
    if callable(mask):
        paths, _, _ = optree.tree_flatten_with_path(params)
        keep = [bool(mask(".".join(str(k) for k in path))) for path in paths]
    else:
        keep, mask_spec = optree.tree_flatten(mask)
        if mask_spec != spec:
            raise TypeError(f"{fn}(): mask must be a predicate on parameter names or a pytree of bools "
                            f"with the structure of params.\n  params: {spec}\n  mask:   {mask_spec}")
        if not all(isinstance(k, bool) for k in keep):
            bad = next(k for k in keep if not isinstance(k, bool))
            raise TypeError(f"{fn}(): mask leaves must be Python bools, got {type(bad).__name__}.")
    if not any(keep):
        raise ValueError(f"{fn}(): mask selects no parameter to adapt; names are "
                         f"{['.'.join(map(str, p)) for p in optree.tree_flatten_with_path(params)[0]]}.")
    return keep


def _flatten_params(params, fn: str):
    leaves, spec = optree.tree_flatten(params)
    if not leaves:
        raise ValueError(f"{fn}(): params has no leaves; pass e.g. metabatch.nn.params(model).")
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}(): every leaf of params must be a tensor, got {type(leaf).__name__}.")
    return leaves, spec


def _num_tasks(fn: str, **batches) -> int:
    """The shared leading task dimension of every leaf of every batch."""
    sizes = {}
    for name, batch in batches.items():
        paths, leaves, _ = optree.tree_flatten_with_path(batch)
        if not leaves:
            raise ValueError(f"{fn}(): {name} has no tensors.")
        for path, leaf in zip(paths, leaves):
            where = name + "".join(f"[{k!r}]" for k in path)
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{fn}(): {where} must be a tensor with a leading task dimension, "
                                f"got {type(leaf).__name__}.")
            if leaf.dim() == 0:
                raise ValueError(f"{fn}(): {where} is a scalar; every leaf needs a leading task dimension.")
            sizes[where] = leaf.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{fn}(): the leading (task) dimension differs between leaves: "
                         + ", ".join(f"{k}: {v}" for k, v in sizes.items())
                         + ". Stack the same number of tasks in support and query.")
    return next(iter(sizes.values()))


@contextlib.contextmanager
def _seeded(key, tensors):
    """Seed torch's generators from ``key`` for the duration, restoring their states after."""
    if key is None:
        yield
        return
    seed = _random.torch_generator(key).initial_seed()
    cuda = sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


# ------------------------------------------------------------------------------ core


def _adapt_leaves(loss_fn, spec, leaves, rates, keep, data, steps, first_order):
    """``steps`` SGD steps on the kept leaves; the rest stay the caller's tensors."""
    idx = [i for i, k in enumerate(keep) if k]

    def inner(moving, leaves, data):
        leaves = list(leaves)
        for i, p in zip(idx, moving):
            leaves[i] = p
        return loss_fn(optree.tree_unflatten(spec, leaves), data)

    leaves = list(leaves)
    for _ in range(steps):
        grads = torch.func.grad(inner)([leaves[i] for i in idx], leaves, data)
        for i, g in zip(idx, grads):
            leaves[i] = leaves[i] - rates[i] * (g.detach() if first_order else g)
    return leaves


def adapt(loss_fn: LossFn, params: PyTree, support: PyTree, *, steps: int = 1, lr: Rate = 0.01,
          first_order: bool = False, mask: Mask = None) -> PyTree:
    """Adapt ``params`` to one task: ``steps`` gradient steps on its support set.

    ``φ ← φ − lr · ∇φ loss_fn(φ, support)``, starting from ``φ = params``, with
    ``torch.func.grad``. The result stays differentiable with respect to
    ``params`` (and ``lr``) unless ``first_order`` is set.

    Args:
        loss_fn: ``loss_fn(params, data) -> scalar tensor`` for one task.
        params: a pytree of tensors (e.g. ``metabatch.nn.params(model)``); not modified.
        support: one task's data, passed to ``loss_fn`` as is.
        steps: number of inner gradient steps (0 returns ``params``' leaves unchanged).
        lr: inner learning rate: a float, a 0-d tensor, or a pytree like ``params``
            (Meta-SGD: per-parameter rates, tensors that may require grad).
        first_order: treat the inner gradients as constants (FOMAML).
        mask: which parameters to adapt (ANIL): ``None`` for all, a predicate on
            the dotted parameter name (``lambda name: name.startswith("head.")``),
            or a pytree of bools like ``params``. The others stay fixed.

    Returns:
        The adapted parameters, a pytree like ``params``.

    Raises:
        ValueError: for a negative or non-int ``steps``, a non-finite ``lr``, a mask selecting nothing.
        TypeError: when ``lr`` or ``mask`` is a pytree whose structure differs from ``params``.

    Examples:
        >>> import torch
        >>> from metabatch import maml
        >>> loss_fn = lambda p, d: ((p["w"] - d) ** 2).sum()
        >>> maml.adapt(loss_fn, {"w": torch.tensor(0.0)}, torch.tensor(1.0), steps=2, lr=0.25)
        {'w': tensor(0.7500)}
    """
    _check_int(steps, "steps", "adapt")
    leaves, spec = _flatten_params(params, "adapt")
    rates = _rates(lr, spec, "adapt")
    keep = _keep(mask, params, spec, "adapt")
    leaves = _adapt_leaves(loss_fn, spec, leaves, rates, keep, support, steps, bool(first_order))
    return optree.tree_unflatten(spec, leaves)


def _map_tasks(fn, fn_name, params, batches, *, lr, mask, chunk_size, randomness, key, batch_rules):
    """vmap ``fn(leaves, rates, keep, *task_batches)`` over the task dimension of ``batches``."""
    if randomness not in _RANDOMNESS:
        raise ValueError(f"{fn_name}(): randomness must be one of {_RANDOMNESS}, got {randomness!r}.")
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", fn_name, low=1)
    leaves, spec = _flatten_params(params, fn_name)
    rates = _rates(lr, spec, fn_name)
    keep = _keep(mask, params, spec, fn_name)

    def task(leaves, rates, *data):
        return fn(spec, leaves, rates, keep, *data)

    in_dims = (None, None) + (0,) * len(batches)
    with _seeded(key, leaves + optree.tree_leaves(batches)), _batching.batching_rules(batch_rules):
        return spec, torch.func.vmap(task, in_dims=in_dims, randomness=randomness,
                                     chunk_size=chunk_size)(leaves, rates, *batches)


def meta_loss(loss_fn: LossFn, params: PyTree, support: PyTree, query: PyTree, *, steps: int = 1,
              lr: Rate = 0.01, first_order: bool = False, mask: Mask = None, chunk_size: int | None = None,
              randomness: str = "different", key: _random.Key | None = None, batch_rules: bool = True,
              remat: bool = False) -> torch.Tensor:
    """The MAML meta-objective of a batch of tasks: mean query loss after adapting on the support.

    For each task ``t`` (the leading dimension of every leaf of ``support`` and
    ``query``), ``φ_t = adapt(loss_fn, params, support[t], ...)`` and the result
    is ``mean_t loss_fn(φ_t, query[t])``, computed with ``torch.func.vmap`` over
    the tasks. Back-propagate it with ``loss.backward()`` into ``nn.Parameter``
    leaves (then step any ``torch.optim`` optimizer), or differentiate it with
    ``torch.func.grad``. Gradients also reach ``lr`` when it holds tensors
    that require grad (Meta-SGD).

    Args:
        loss_fn: ``loss_fn(params, data) -> scalar tensor`` for one task.
        params: a pytree of tensors; not modified.
        support: a pytree of tensors with a leading task dimension ``T``.
        query: a pytree of tensors with the same leading task dimension.
        steps: inner gradient steps per task.
        lr: inner learning rate: a float, a 0-d tensor, or a pytree like ``params`` (Meta-SGD).
        first_order: first-order MAML (no second-order terms).
        mask: which parameters to adapt (ANIL); see :func:`adapt`.
        chunk_size: vmap at most this many tasks at a time (``torch.func.vmap``'s
            ``chunk_size``): less memory; on CPU, activations above glibc's 32 MB
            mmap threshold are slow to allocate, so chunks can also be faster.
        randomness: ``vmap``'s randomness for random ops in ``loss_fn`` (dropout):
            ``"different"`` (each task draws its own; the default), ``"same"``
            (one draw shared by all tasks) or ``"error"``.
        key: a :mod:`metabatch.random` key. When given, random ops draw from
            torch's generators seeded from it, and their previous states are
            restored afterwards: the same key gives the same result. ``None``
            draws from torch's global generator as any module would.
        batch_rules: use :func:`metabatch.batching.batching_rules` (exact batch-norm
            meta-gradients, faster convolutions). ``False`` uses PyTorch's own rules.
        remat: keep no graph in the forward pass; recompute ``chunk_size`` tasks at a
            time (default 1) during the backward pass instead. Peak memory is then
            that of one chunk, for a second forward pass. Gradients reach ``params`` and
            tensor ``lr`` leaves through ordinary autograd (``loss.backward()``,
            ``torch.autograd.grad``), not through ``torch.func`` transforms or a second
            backward. Random ops replay the same draws in the recomputation.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: when the leaves of ``support`` and ``query`` disagree on the number of
            tasks, for a bad ``steps``, ``chunk_size`` or ``randomness``.
        TypeError: when ``lr`` or ``mask`` does not match ``params``, or a data leaf is not a tensor.

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
    _check_int(steps, "steps", "meta_loss")
    _num_tasks("meta_loss", support=support, query=query)

    def task(spec, leaves, rates, keep, s, q):
        adapted = _adapt_leaves(loss_fn, spec, leaves, rates, keep, s, steps, bool(first_order))
        loss = loss_fn(optree.tree_unflatten(spec, adapted), q)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"meta_loss(): loss_fn must return a scalar tensor for one task, got "
                             f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}.")
        return loss

    options = {"lr": lr, "mask": mask, "randomness": randomness, "key": key, "batch_rules": batch_rules}
    if remat:
        return _remat_mean(task, params, (support, query), chunk_size, options)
    _, losses = _map_tasks(task, "meta_loss", params, (support, query), chunk_size=chunk_size, **options)
    return losses.mean()


def _remat_mean(task, params, batches, chunk_size, options):
    """mean_t task(...) with no graph kept: chunks of tasks are recomputed in the backward pass."""
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", "meta_loss", low=1)
    leaves, spec = _flatten_params(params, "meta_loss")
    lr_leaves, lr_spec = optree.tree_flatten(options["lr"])
    slots = [i for i, v in enumerate(lr_leaves) if isinstance(v, torch.Tensor)]
    inputs = leaves + [lr_leaves[i] for i in slots]
    if any(torch._C._functorch.maybe_get_level(x) != -1 for x in inputs):
        raise ValueError("meta_loss(remat=True) works with ordinary autograd (loss.backward()), not inside "
                         "torch.func transforms; use remat=False there.")
    n_tasks = _num_tasks("meta_loss", support=batches[0], query=batches[1])
    size = chunk_size or 1

    def chunk_loss(tensors, lo):
        rates = list(lr_leaves)
        for i, v in zip(slots, tensors[len(leaves):]):
            rates[i] = v
        part = optree.tree_map(lambda x: x[lo:lo + size], batches)
        key = options["key"] if options["key"] is None else _random.fold_in(options["key"], lo)
        _, losses = _map_tasks(task, "meta_loss", optree.tree_unflatten(spec, list(tensors[:len(leaves)])),
                               part, chunk_size=None,
                               **dict(options, lr=optree.tree_unflatten(lr_spec, rates), key=key))
        return losses.sum()

    return _Remat.apply(chunk_loss, range(0, n_tasks, size), n_tasks, *inputs)


class _Remat(torch.autograd.Function):
    """Sum of chunk losses / n, recomputing each chunk in backward (with the forward's RNG state)."""

    @staticmethod
    def forward(ctx, chunk_loss, starts, n, *inputs):
        ctx.chunk_loss, ctx.starts, ctx.n = chunk_loss, starts, n
        ctx.devices = sorted({x.device.index or 0 for x in inputs if x.is_cuda})
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return sum(chunk_loss(inputs, lo) for lo in starts) / n

    @staticmethod
    def backward(ctx, grad):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        wanted = [x for x in inputs if x.requires_grad]
        total = [torch.zeros_like(x) for x in wanted]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            for d, state in zip(ctx.devices, ctx.rng[1]):
                torch.cuda.set_rng_state(state, d)
            for lo in ctx.starts:
                grads = torch.autograd.grad(ctx.chunk_loss(inputs, lo), wanted, allow_unused=True)
                for acc, g in zip(total, grads):
                    if g is not None:
                        acc.add_(g)
        it = iter(total)
        out = [next(it) * (grad / ctx.n) if x.requires_grad else None for x in inputs]
        return (None, None, None, *out)


def reptile_grad(loss_fn: LossFn, params: PyTree, support: PyTree, *, steps: int = 5, lr: Rate = 0.01,
                 mask: Mask = None, chunk_size: int | None = None, randomness: str = "different",
                 key: _random.Key | None = None, batch_rules: bool = True) -> PyTree:
    """The Reptile meta-gradient ``θ − mean_t φ_t`` of a batch of tasks.

    ``φ_t`` is ``params`` after ``steps`` first-order SGD steps on task ``t``'s
    support set (vmapped over tasks). Assign the result to the parameters'
    ``.grad`` and step any ``torch.optim`` optimizer: plain SGD with learning
    rate ε gives Reptile's ``θ ← θ + ε (mean φ − θ)``.

    Args:
        loss_fn: ``loss_fn(params, data) -> scalar tensor`` for one task.
        params: a pytree of tensors; not modified.
        support: a pytree of tensors with a leading task dimension.
        steps: inner first-order SGD steps per task.
        lr: inner learning rate (float, 0-d tensor or pytree, as in :func:`meta_loss`).
        mask: which parameters to adapt; see :func:`adapt`.
        chunk_size: as in :func:`meta_loss`.
        randomness: as in :func:`meta_loss`.
        key: as in :func:`meta_loss`.
        batch_rules: as in :func:`meta_loss`.

    Returns:
        A pytree like ``params`` of detached tensors.

    Raises:
        ValueError, TypeError: as :func:`meta_loss`.

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
    _check_int(steps, "steps", "reptile_grad")
    _num_tasks("reptile_grad", support=support)
    params = optree.tree_map(torch.Tensor.detach, params)

    def task(spec, leaves, rates, keep, s):
        return _adapt_leaves(loss_fn, spec, leaves, rates, keep, s, steps, True)

    with torch.no_grad():
        spec, adapted = _map_tasks(task, "reptile_grad", params, (support,), lr=lr, mask=mask,
                                   chunk_size=chunk_size, randomness=randomness, key=key,
                                   batch_rules=batch_rules)
        leaves = optree.tree_leaves(params)
        return optree.tree_unflatten(spec, [p - a.mean(0) for p, a in zip(leaves, adapted)])


class Evaluation(NamedTuple):
    """Result of :func:`evaluate`: per-task values and their mean with a 95 % interval.

    Attributes:
        loss: mean query loss over tasks.
        loss_ci: half-width of the 95 % confidence interval of ``loss``.
        metric: mean of ``metric_fn`` over tasks (``None`` without ``metric_fn``).
        metric_ci: half-width of its 95 % confidence interval.
        per_task_loss: the query loss of each task, shape ``[T]``.
        per_task_metric: ``metric_fn`` of each task, shape ``[T]``, or ``None``.
    """

    loss: float
    loss_ci: float
    metric: float | None
    metric_ci: float | None
    per_task_loss: torch.Tensor
    per_task_metric: torch.Tensor | None


def mean_ci(values: torch.Tensor, z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width ``z·s/√n`` of its normal confidence interval (95 % by default).

    Args:
        values: a 1-D tensor of per-task values.
        z: the normal quantile (1.96 for 95 %).

    Returns:
        ``(mean, half_width)``; the half-width is ``nan`` for fewer than two values.

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
             lr: Rate = 0.01, metric_fn: LossFn | None = None, mask: Mask = None,
             chunk_size: int | None = None, randomness: str = "different", key: _random.Key | None = None,
             batch_rules: bool = True) -> Evaluation:
    """Meta-test: adapt each task (often with more steps than in training) and score its query set.

    No graph is kept for the outer parameters (first-order inner steps under
    ``torch.no_grad``), so this is cheap enough for many evaluation tasks;
    split them into batches or pass ``chunk_size`` to bound memory.

    Args:
        loss_fn: ``loss_fn(params, data) -> scalar tensor`` for one task.
        params: a pytree of tensors; not modified.
        support: a pytree of tensors with a leading task dimension.
        query: a pytree of tensors with the same leading task dimension.
        steps: inner gradient steps per task.
        lr: inner learning rate (float, 0-d tensor or pytree, as in :func:`meta_loss`).
        metric_fn: optional ``metric_fn(params, data) -> scalar``, e.g.
            ``metabatch.nn.objective(model, metabatch.nn.accuracy)``.
        mask: which parameters to adapt; see :func:`adapt`.
        chunk_size: as in :func:`meta_loss`.
        randomness: as in :func:`meta_loss`.
        key: as in :func:`meta_loss`.
        batch_rules: as in :func:`meta_loss`.

    Returns:
        An :class:`Evaluation`.

    Raises:
        ValueError, TypeError: as :func:`meta_loss`.

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
    _check_int(steps, "steps", "evaluate")
    _num_tasks("evaluate", support=support, query=query)
    params = optree.tree_map(torch.Tensor.detach, params)

    def task(spec, leaves, rates, keep, s, q):
        adapted = optree.tree_unflatten(
            spec, _adapt_leaves(loss_fn, spec, leaves, rates, keep, s, steps, True))
        loss = loss_fn(adapted, q)
        return (loss, metric_fn(adapted, q)) if metric_fn is not None else (loss,)

    with torch.no_grad():
        _, out = _map_tasks(task, "evaluate", params, (support, query), lr=lr, mask=mask,
                            chunk_size=chunk_size, randomness=randomness, key=key,
                            batch_rules=batch_rules)
    loss, loss_ci = mean_ci(out[0])
    metric = metric_ci = None
    if metric_fn is not None:
        metric, metric_ci = mean_ci(out[1])
    return Evaluation(loss, loss_ci, metric, metric_ci, out[0].detach(),
                      out[1].detach() if metric_fn is not None else None)
