"""Data-parallel meta-training on `torch.distributed`: which share to load, and the averaged meta-gradient.

Launch one process per device with `torchrun` and initialise the process
group as usual (`torch.distributed.init_process_group`); then

* [`shard`][metabatch.distributed.shard] gives `rank=` / `world_size=` for [metabatch.batch_specs][],
  so that every rank loads only its contiguous share of each global batch
  (`mb.batch_specs(..., **mb.distributed.shard())`);
* [`all_reduce_grads`][metabatch.distributed.all_reduce_grads] averages the `.grad` of the outer
  parameters over the ranks after `loss.backward()`, and [`pmean`][metabatch.distributed.pmean] averages any
  pytree of tensors (a `torch.func.grad` result, a [metabatch.maml.reptile_grad][],
  a loss to log).

[metabatch.maml.meta_loss][] is the *mean* over a rank's tasks, and every
rank holds `batch_size // world_size` of them, so the mean of the per-rank
meta-gradients is the meta-gradient of the whole global batch: every rank
takes the same optimizer step as one process holding the whole batch would.
Without an initialised process group every function here acts as a single
process (rank 0 of 1): the same script runs with `python` and `torchrun`.
The recipe, multi-node launches and GPUs: `docs/distributed.md`.

Examples:
    >>> import metabatch as mb
    >>> mb.distributed.rank_and_world_size()            # no process group: one rank
    (0, 1)
    >>> specs = mb.batch_specs(0, num_tasks=100, batch_size=8, n_ctx=5, n_tgt=5, **mb.distributed.shard())
    >>> len(specs[0].indices)
    8
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import optree
import torch
import torch.distributed as _dist

__all__ = ["rank_and_world_size", "shard", "pmean", "all_reduce_grads"]


def _initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """This process's rank and the number of ranks, from the process group; `(0, 1)` without one.

    Args:
        group: a `torch.distributed` process group; `None` for the default
            (world) group.

    Returns:
        `(rank, world_size)` within `group`, or `(0, 1)` when no process
        group is initialised (or `torch.distributed` is not built in).

    Raises:
        ValueError: a launcher announced several ranks (the `WORLD_SIZE`
            environment variable that `torchrun` sets is above 1) but no process
            group is initialised yet (every rank would take the whole batch:
            call `torch.distributed.init_process_group()` first); `group` is
            given without a process group, or this process is not a member of it.

    Examples:
        >>> import metabatch as mb
        >>> rank, world_size = mb.distributed.rank_and_world_size()
        >>> rank, world_size
        (0, 1)
    """
    if not _initialized():
        announced = os.environ.get("WORLD_SIZE", "1")
        if announced.strip().isdigit() and int(announced) > 1:
            raise ValueError(
                f"WORLD_SIZE={announced} in the environment (set by torchrun) but no torch.distributed "
                f"process group is initialised, so every rank would see itself as rank 0 of 1 and load "
                f"the whole batch: call torch.distributed.init_process_group() before "
                f"metabatch.distributed.shard() / rank_and_world_size().")
        if group is not None:
            raise ValueError(f"rank_and_world_size(): group={group!r} was given but no torch.distributed "
                             f"process group is initialised; call torch.distributed.init_process_group() "
                             f"first, or pass group=None.")
        return 0, 1
    rank = _dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"rank_and_world_size(): this process is not a member of group={group!r}; "
                         f"only its members may ask for their rank in it.")
    return rank, _dist.get_world_size(group)


def shard(group: Any = None) -> dict[str, int]:
    """`{"rank": r, "world_size": w}` of the process group, to splat into [metabatch.batch_specs][].

    `mb.batch_specs(..., **mb.distributed.shard())` gives this rank the
    `rank`-th contiguous chunk of every global batch (task keys stay those of
    the global batch), so the ranks' shares together are exactly the batch one
    process would load. `batch_size` is the global batch and must be
    divisible by the world size.

    Args:
        group: a process group; `None` for the default group.

    Returns:
        A dict with the keys `rank` and `world_size`, this process's rank and
        the number of ranks (rank 0 of 1 without a process group).

    Raises:
        ValueError: as [`rank_and_world_size`][metabatch.distributed.rank_and_world_size].

    Examples:
        >>> import metabatch as mb
        >>> mb.distributed.shard()                       # no process group
        {'rank': 0, 'world_size': 1}
        >>> mb.batch_specs(0, num_tasks=100, batch_size=8, n_ctx=5, n_tgt=5, **mb.distributed.shard()).world_size
        1
    """
    rank, world_size = rank_and_world_size(group)
    return {"rank": rank, "world_size": world_size}


def _path(path: tuple) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def _check_tensors(leaves: list, fn: str, what: str) -> None:
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}(): every leaf of {what} must be a tensor, got {type(leaf).__name__} "
                            f"{leaf!r:.80}; wrap numbers in torch.tensor(...) and leave other values out.")
        if leaf.layout != torch.strided:
            raise TypeError(f"{fn}(): {what} holds a {leaf.layout} tensor; only dense tensors can be "
                            f"averaged here: pass .to_dense() (or a dense gradient, e.g. "
                            f"nn.Embedding(sparse=False)).")
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(f"{fn}(): {what} holds a {leaf.dtype} tensor; averaging needs floating-point "
                            f"or complex tensors: convert it with .float() (e.g. a count to average).")


def _device(leaves: list, group) -> torch.device:
    if leaves:
        return leaves[0].device
    if _dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(entry) -> str:
    if entry is None:
        return "nothing (it has fewer leaves)"
    name, shape, dtype = entry
    return f"{name} {dtype.removeprefix('torch.')} of shape {shape}"


def _check_agreement(names: list, leaves: list, group, world_size: int, fn: str) -> None:
    """Raise on every rank unless all ranks pass leaves of the same names, shapes and dtypes, in order.

    One all-gather of a 16-byte digest and the leaf count per call; only when
    the digests differ do the ranks exchange their leaf lists, to name the
    first leaf that differs. Without this check, ranks that disagree make the
    averaging collectives abort, block until the process group's timeout, or
    return wrong sums silently.
    """
    desc = [(name, tuple(t.shape), str(t.dtype)) for name, t in zip(names, leaves, strict=True)]
    digest = hashlib.blake2b(repr(desc).encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8)] + [len(desc)]
    mine = torch.tensor(words, dtype=torch.int64, device=_device(leaves, group))
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    _dist.all_gather(gathered, mine, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    everyone: list = [None] * world_size
    _dist.all_gather_object(everyone, desc, group=group)
    counts = [len(d) for d in everyone]
    for i in range(max(counts)):
        at = [d[i] if i < len(d) else None for d in everyone]
        if any(a != at[0] for a in at):
            break
    else:  # (digests of equal lists cannot differ; kept for safety)
        return
    variants: dict = {}
    for rank, a in enumerate(at):
        variants.setdefault(a, []).append(rank)
    told = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {_describe(a)}"
                     for a, r in variants.items())
    how_many = "" if len(set(counts)) == 1 else f" The ranks pass {' / '.join(map(str, counts))} leaves."
    raise ValueError(f"{fn}(): the ranks disagree on leaf {i}, so it cannot be averaged: {told}.{how_many} "
                     f"Every rank must pass the same leaves (names, shapes, dtypes) in the same order.")


def _mean_over_ranks(tensors: list, group, world_size: int) -> list:
    """Average `tensors` over the ranks: one all-reduce per (device, dtype), then `/ world_size`.

    The sums are taken in the tensors' own dtype (`ReduceOp.SUM`, which every
    backend has; gloo lacks `AVG`). The results are fresh tensors, views of
    one flat buffer per (device, dtype); the inputs are left unchanged.
    """
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    out: list = [None] * len(tensors)
    with torch.no_grad():
        for idx in buckets.values():  # the same order on every rank: that of the leaves
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            _dist.all_reduce(flat, op=_dist.ReduceOp.SUM, group=group)
            flat.div_(world_size)
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
                out[i] = piece.view(tensors[i].shape)
    return out


def pmean(tree: Any, *, group: Any = None) -> Any:
    """The mean over the ranks of a pytree of tensors (a collective: every rank must call it).

    Use it for meta-gradients that are values rather than `.grad`
    attributes (`torch.func.grad` of [metabatch.maml.meta_loss][],
    [metabatch.maml.reptile_grad][]) and for losses or metrics to log.
    Every rank must pass a tree of the same structure, shapes and dtypes.

    Args:
        tree: a pytree of floating-point (or complex) dense tensors; not modified.
        group: a process group; `None` for the default group.

    Returns:
        A pytree like `tree` of detached tensors, the same on every rank. With
        one rank (or no process group) its leaves are `tree`'s leaves,
        detached.

    Raises:
        TypeError: a leaf is not a floating-point or complex dense tensor.
        ValueError: as [`rank_and_world_size`][metabatch.distributed.rank_and_world_size]; or the
            ranks disagree on the tree's leaves (names, shapes, dtypes, order): raised on every
            rank, naming the first
            leaf that differs (one small all-gather per call checks it).

    Examples:
        >>> import torch, metabatch as mb
        >>> mb.distributed.pmean({"loss": torch.tensor(0.5), "grad": torch.ones(2)})   # one rank
        {'loss': tensor(0.5000), 'grad': tensor([1., 1.])}
    """
    leaves, spec = optree.tree_flatten(tree)
    _check_tensors(leaves, "pmean", "tree")
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return optree.tree_unflatten(spec, [leaf.detach() for leaf in leaves])
    _check_agreement([_path(p) for p in optree.tree_paths(tree)], leaves, group, world_size, "pmean")
    if not leaves:
        return optree.tree_unflatten(spec, [])
    return optree.tree_unflatten(spec, _mean_over_ranks(leaves, group, world_size))


def all_reduce_grads(params: Any, *, group: Any = None) -> None:
    """Average the `.grad` of `params` over the ranks, in place (call it between `backward` and `step`).

    After `loss.backward()` each rank holds the meta-gradient of its share of
    the global batch; after `all_reduce_grads(params)` every rank holds the
    mean over the ranks, which for equal shares and a mean-over-tasks loss
    ([metabatch.maml.meta_loss][]) is the meta-gradient of the whole global
    batch. Every rank must call it with the same parameters in the same order.

    A parameter whose `.grad` is `None` on some ranks but not on others
    counts as a zero gradient there (its loss did not depend on it); one whose
    `.grad` is `None` on every rank keeps `None`, so the optimizer skips
    it as it would in one process. This costs one small extra all-reduce of
    per-parameter flags, and one all-gather of a 16-byte digest of the
    parameters' names, shapes and dtypes that checks that the ranks agree; the
    gradients themselves travel in one all-reduce per (device, dtype).

    Args:
        params: the outer parameters: a pytree of tensors (`metabatch.nn.params(model)`,
            `(params, rates)` for Meta-SGD), a list of tensors, or an
            `nn.Module` (its `parameters()`).
        group: a process group; `None` for the default group.

    Returns:
        `None`; the gradients are updated in place (an existing `.grad`
        tensor is overwritten, not replaced).

    Raises:
        TypeError: a parameter or gradient is not a floating-point (or complex) dense tensor.
        ValueError: as [`rank_and_world_size`][metabatch.distributed.rank_and_world_size]; or the
            ranks disagree on the parameters (names, shapes, dtypes, order): raised on every
            rank, naming the first one that
            differs, instead of a crash, a hang until the process group's timeout, or a
            silently wrong mean (one small all-gather per call checks it).

    Examples:
        >>> import torch, metabatch as mb
        >>> w = torch.ones(2, requires_grad=True)
        >>> (3 * w).sum().backward()
        >>> mb.distributed.all_reduce_grads({"w": w})     # one rank: nothing to average
        >>> w.grad
        tensor([3., 3.])
    """
    if isinstance(params, torch.nn.Module):
        named = list(params.named_parameters())
        names, leaves = [n for n, _ in named], [p for _, p in named]
    else:
        leaves = optree.tree_leaves(params)
        names = [_path(p) for p in optree.tree_paths(params)]
    _check_tensors(leaves, "all_reduce_grads", "params")
    unique, unique_names, seen = [], [], set()
    for name, p in zip(names, leaves, strict=True):  # a tied parameter appears once
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
            unique_names.append(name)
    grads = [p.grad for p in unique]
    _check_tensors([g for g in grads if g is not None], "all_reduce_grads", "the gradients")
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return
    _check_agreement(unique_names, unique, group, world_size, "all_reduce_grads")
    if not unique:
        return
    flags = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=unique[0].device)
    _dist.all_reduce(flags, op=_dist.ReduceOp.SUM, group=group)
    live = [i for i, n in enumerate(flags.tolist()) if n > 0]
    local = [grads[i] if grads[i] is not None else torch.zeros_like(unique[i]) for i in live]
    with torch.no_grad():
        for i, mean in zip(live, _mean_over_ranks(local, group, world_size), strict=True):
            grad = grads[i]
            if grad is not None:
                grad.copy_(mean)
            else:
                unique[i].grad = mean
