"""MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019) as functions and options.

Each of MAML++'s changes to MAML is a small piece that composes with
`metabatch.maml`:

| MAML++ piece | in metabatch |
|---|---|
| multi-step loss (MSL), annealed towards the last step | `maml.meta_loss(..., step_weights=step_weights(steps, t))` |
| derivative-order annealing (DA): first-order at first | `maml.meta_loss(..., first_order=step < n)` |
| per-step per-layer learning rates (LSLR) | `inner=inner.lslr(inner.lslr_rates(params, steps, lr))` |
| per-step batch-norm weights and biases (BNWB) | [stack_steps][metabatch.mamlpp.stack_steps] + `per_step=` |
| per-step batch-norm statistics (BNRS) | [bn_statistics][metabatch.mamlpp.bn_statistics] + `per_step=` in evaluation |
| cosine annealing of the meta learning rate (CA) | [cosine_lr][metabatch.mamlpp.cosine_lr] |

`examples/maml_omniglot.py --mamlpp` puts them together, with a flag per piece.

Example:
    >>> from metabatch import mamlpp
    >>> mamlpp.step_weights(3, 0.0), mamlpp.step_weights(3, 1.0)
    ((0.3333333333333333, 0.3333333333333333, 0.3333333333333333), (0.0, 0.0, 1.0))
"""

from __future__ import annotations

import math

import optree
import torch

from . import _taskbatch as _batch
from . import _validate
from . import batching as _batching
from . import inner as _inner
from . import maml as _maml
from . import random as _random
from .typing import LossFn, Mask, PyTree, Rate

__all__ = ["bn_statistics", "cosine_lr", "stack_steps", "step_weights"]


def step_weights(steps: int, progress: float, *, floor: float = 0.03) -> tuple[float, ...]:
    """MAML++'s multi-step loss weights: from uniform towards the last step as `progress` goes 0 → 1.

    At `progress` p < 1, every step but the last weighs `max(1/S − p/S, floor/S)` and the last
    `min(1/S + p·(S−1)/S, 1 − (S−1)·floor/S)` (MAML++'s `get_per_step_loss_importance_vector`,
    with p = epoch / multi-step-loss epochs). From p = 1 on, only the last step counts, as in
    MAML++ once its multi-step phase ends. Steps of weight 0 cost nothing in
    [meta_loss][metabatch.maml.meta_loss].

    Args:
        steps: inner steps S >= 1.
        progress: the fraction of the multi-step phase done, >= 0.
        floor: the smallest weight of a non-final step before p = 1, times S.

    Returns:
        A tuple of S floats summing to 1 (for `step_weights=`).

    Examples:
        >>> from metabatch import mamlpp
        >>> [round(w, 3) for w in mamlpp.step_weights(4, 0.5)]
        [0.125, 0.125, 0.125, 0.625]
    """
    steps = _validate.integer(steps, "steps", "step_weights", low=1)
    progress = _validate.number(progress, "progress", "step_weights", low=0.0)
    floor = _validate.number(floor, "floor", "step_weights", low=0.0, high=1.0)
    if progress >= 1:
        return (0.0,) * (steps - 1) + (1.0,)
    low = floor / steps
    rest = [max(1 / steps - progress / steps, low) for _ in range(steps - 1)]
    last = min(1 / steps + progress * (steps - 1) / steps, 1 - (steps - 1) * low)
    return (*rest, last)


def cosine_lr(step: int, total: int, lr: float, min_lr: float = 0.0) -> float:
    """The meta learning rate at `step` of a cosine annealing from `lr` to `min_lr` over `total` steps.

    `min_lr + (lr − min_lr)·(1 + cos(π·step/total))/2`, and `min_lr` past `total`
    (torch's `CosineAnnealingLR` without restarts, as MAML++ uses it). Set it on the outer
    optimizer's param groups before each step.

    Args:
        step: the meta-step, >= 0.
        total: the steps of the schedule, >= 1.
        lr: the initial rate.
        min_lr: the final rate.

    Returns:
        A float.

    Examples:
        >>> from metabatch import mamlpp
        >>> [round(mamlpp.cosine_lr(step, 100, 1e-3), 6) for step in (0, 50, 100, 150)]
        [0.001, 0.0005, 0.0, 0.0]
    """
    step = _validate.integer(step, "step", "cosine_lr", low=0)
    total = _validate.integer(total, "total", "cosine_lr", low=1)
    lr = _validate.number(lr, "lr", "cosine_lr", low=0.0)
    min_lr = _validate.number(min_lr, "min_lr", "cosine_lr", low=0.0)
    t = min(step, total) / total
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def _flags(select, params, fn: str, name: str = "select") -> list[bool]:
    paths, leaves, spec = optree.tree_flatten_with_path(params)
    if select is None:
        return [False] * len(leaves)
    if callable(select):
        return [bool(select(".".join(str(k) for k in path))) for path in paths]
    flags, sel_spec = optree.tree_flatten(select)
    if sel_spec != spec or not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"{fn}(): {name} must be a predicate on parameter names or a pytree of bools with the "
                        f"structure of params.\n  params: {spec}\n  {name}:{' ' * max(1, 7 - len(name))}{sel_spec}")
    return flags


def stack_steps(params: PyTree, steps: int, select: Mask) -> PyTree:
    """Per-step copies of some parameters (MAML++'s per-step batch-norm weights and biases).

    Every selected leaf `p` becomes a new leaf tensor of shape `[steps, *p.shape]` holding
    `steps` copies of `p`, requiring grad if `p` did; the others are returned as they are.
    Pass the same selection as `per_step=` to [meta_loss][metabatch.maml.meta_loss] and
    [evaluate][metabatch.maml.evaluate], and the new leaves to the outer optimizer.

    Args:
        params: a pytree of tensors.
        steps: inner steps S >= 1.
        select: which leaves to stack: a predicate on dotted names or a pytree of bools.

    Returns:
        A pytree like `params`.

    Raises:
        TypeError: a bad `select`.
        ValueError: `select` picks nothing, or a bad `steps`.

    Examples:
        >>> import torch
        >>> from metabatch import mamlpp
        >>> bn = torch.nn.BatchNorm2d(4)
        >>> p = mamlpp.stack_steps(dict(bn.named_parameters()), 3, lambda name: True)
        >>> p["weight"].shape, p["weight"].requires_grad, p["weight"].is_leaf
        (torch.Size([3, 4]), True, True)
    """
    steps = _validate.integer(steps, "steps", "stack_steps", low=1)
    leaves, spec = optree.tree_flatten(params)
    flags = _flags(select, params, "stack_steps")
    if not any(flags):
        raise ValueError(f"stack_steps(): select picks no parameter; names are "
                         f"{['.'.join(map(str, p)) for p in optree.tree_flatten_with_path(params)[0]]}.")
    out = []
    for leaf, flag in zip(leaves, flags, strict=True):
        if flag:
            stacked = leaf.detach().unsqueeze(0).repeat(steps, *([1] * leaf.dim())).clone()
            leaf = stacked.requires_grad_(leaf.requires_grad)
        out.append(leaf)
    return optree.tree_unflatten(spec, out)


def _norm_layers(model):
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ValueError(f"bn_statistics(): {type(model).__name__} has no batch-norm layer.")
    for name, m in layers:
        if m.running_mean is None:
            raise ValueError(f"bn_statistics(): batch norm {name!r} keeps no running statistics; build it with "
                             f"track_running_stats=True so that evaluation can use the per-step statistics "
                             f"(training still normalises with each task's batch statistics).")
    return layers


def bn_statistics(model: torch.nn.Module, loss_fn: LossFn, params: PyTree, support: PyTree,
                  query: PyTree | None = None, *, steps: int, lr: Rate | None = None,
                  inner: _inner.Optimizer | None = None,
                  mask: Mask = None, per_step: Mask = None, key: _random.Key | None = None,
                  batch_rules: bool = True) -> dict[str, torch.Tensor]:
    """Per-step batch-norm statistics of the adapted networks (MAML++'s BNRS), from a batch of tasks.

    For each task, the inner loop runs as in training (`steps`, `lr` or `inner`,
    `mask`, `per_step`); the input of every batch-norm layer is recorded in the support pass
    of each inner step `s` and, with `query`, in the query pass after step `s + 1` (which
    uses index `s` too). The mean and the unbiased variance over each recording, averaged over
    the recordings and the tasks, are the statistics of step `s`. MAML++ keeps such statistics
    as running averages during training; here they are computed from the parameters at hand, so
    nothing is stored, and the same tasks give the same statistics (with dropout in the
    model: the same tasks and `key`).

    Use them at evaluation: put the model in eval mode (`model.eval()`: batch norm then
    normalises with running statistics) and pass `{**params, **stats}` with
    `per_step=` selecting the statistics' names (and the per-step weights and biases, if any).

    Args:
        model: the module whose batch-norm layers to record (built with `track_running_stats=True`).
        loss_fn: the task loss, e.g. `metabatch.nn.objective(model, F.cross_entropy)`, in training mode.
        params: the parameters (as given to [meta_loss][metabatch.maml.meta_loss]).
        support: a batch of tasks' support sets (leading task dimension).
        query: the same tasks' query sets, or `None`.
        steps: inner steps S >= 1.
        lr: plain SGD's rate (as in [meta_loss][metabatch.maml.meta_loss]).
        inner: an inner-loop optimizer (as in [meta_loss][metabatch.maml.meta_loss]).
        mask: as in [meta_loss][metabatch.maml.meta_loss].
        per_step: as in [meta_loss][metabatch.maml.meta_loss].
        key: as in [meta_loss][metabatch.maml.meta_loss]: seeds the random operations of the model
            (dropout) for this call; `None` draws them from torch's global generator.
        batch_rules: as in [meta_loss][metabatch.maml.meta_loss].

    Returns:
        `{"<layer>.running_mean": [S, C], "<layer>.running_var": [S, C]}` for every batch-norm layer.

    Raises:
        ValueError: the model has no batch norm, or one without running statistics; bad `steps`.

    Examples:
        >>> import torch, torch.nn.functional as F, metabatch as mb
        >>> from metabatch import maml, mamlpp
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        >>> loss_fn, params = mb.nn.objective(net, F.cross_entropy), mb.nn.params(net)
        >>> x = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(0))
        >>> support = (x, torch.tensor([0, 1] * 3).repeat(3, 1))
        >>> stats = mamlpp.bn_statistics(net, loss_fn, params, support, steps=2, lr=0.1)
        >>> {k: tuple(v.shape) for k, v in stats.items()}
        {'1.running_mean': (2, 4), '1.running_var': (2, 4)}
        >>> per_step = lambda name: name.endswith(("running_mean", "running_var"))
        >>> _ = net.eval()
        >>> ev = maml.evaluate(loss_fn, {**params, **stats}, support, support, steps=2, lr=0.1, per_step=per_step)
        >>> _ = net.train()
    """
    steps = _validate.integer(steps, "steps", "bn_statistics", low=1)
    layers = _norm_layers(model)
    params = optree.tree_map(torch.Tensor.detach, params)
    leaves, spec = optree.tree_flatten(params)
    flags = _flags(per_step, params, "bn_statistics", "per_step")
    capture: list = [None]

    def make_hook(i):
        def hook(module, args):
            if capture[0] is not None:
                x = args[0]
                dims = (0, *range(2, x.dim()))
                capture[0][i].append((x.mean(dims), x.var(dims, correction=1)))
        return hook

    def view(phi, s):
        at_s = optree.tree_leaves(_maml.select_step(params, s, per_step)) if any(flags) else leaves
        rows = zip(at_s, optree.tree_leaves(phi), flags, strict=True)
        return optree.tree_unflatten(spec, [a if f else p for a, p, f in rows])

    def record(fn, *args):
        capture[0] = [[] for _ in layers]
        try:
            fn(*args)
        finally:
            out, capture[0] = capture[0], None
        return out

    def task(s_data, q_data):
        stats = [[[] for _ in layers] for _ in range(steps)]
        kw = {"lr": lr, "inner": inner, "mask": mask, "per_step": per_step, "first_order": True}
        for s in range(steps):
            phi = _maml.adapt(loss_fn, params, s_data, steps=s, **kw)
            for i, rec in enumerate(record(loss_fn, view(phi, s), s_data)):
                stats[s][i] += rec
            if q_data is not None:
                phi = _maml.adapt(loss_fn, params, s_data, steps=s + 1, **kw)
                for i, rec in enumerate(record(loss_fn, view(phi, s), q_data)):
                    stats[s][i] += rec
        return [[(torch.stack([m for m, _ in rec]).mean(0), torch.stack([v for _, v in rec]).mean(0))
                 for rec in per_layer] for per_layer in stats]

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, (_, m) in enumerate(layers)]
    try:
        rules = _validate.flag(batch_rules, "batch_rules", "bn_statistics")
        with torch.no_grad(), _batch.seeded(key, optree.tree_leaves(params)), _batching.batching_rules(rules):
            if query is None:
                out = torch.func.vmap(lambda s: task(s, None), randomness="different")(support)
            else:
                out = torch.func.vmap(task, randomness="different")(support, query)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for i, (name, _) in enumerate(layers):
        prefix = f"{name}." if name else ""
        stats[prefix + "running_mean"] = torch.stack([out[s][i][0].mean(0) for s in range(steps)])
        stats[prefix + "running_var"] = torch.stack([out[s][i][1].mean(0) for s in range(steps)])
    return stats

