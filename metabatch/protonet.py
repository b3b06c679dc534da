"""Prototypical networks (Snell, Swersky & Zemel, 2017) as a pure function vmapped over tasks.

A task's support and query examples are embedded by `embed_fn(params, x) -> [n, d]`; each class's
prototype is the mean embedding of its support examples; a query example's logits are its negative
squared Euclidean distances to the prototypes, and the task's loss is their cross-entropy.
[loss][metabatch.protonet.loss] does this for every task of a batch (a leading task dimension, as
[metabatch.task_loader][] yields it from [metabatch.tasks.classification][]) with `torch.func.vmap`,
and returns the mean loss (differentiable by `loss.backward()` and `torch.func.grad`) with the
accuracy. There is no inner loop: one forward pass per task, so a meta-step costs what a plain
training step on `T·N·(K + Q)` images costs.

Support and query examples go through `embed_fn` in one call (`torch.cat`), as in Snell et al.'s
code: batch norm with batch statistics then normalises both with the same statistics.

Example:
    >>> import torch, metabatch as mb
    >>> from metabatch import protonet
    >>> embed = lambda p, x: x @ p["w"]                       # a linear embedding
    >>> params = {"w": torch.eye(2, requires_grad=True)}
    >>> xs = torch.tensor([[[0.0, 0.0], [4.0, 4.0]]])         # 1 task, 2 classes, 1 shot
    >>> xq = torch.tensor([[[0.5, 0.0], [3.0, 4.0]]])
    >>> ys = yq = torch.tensor([[0, 1]])
    >>> out = protonet.loss(embed, params, (xs, ys), (xq, yq))
    >>> out.accuracy.item(), round(out.loss.item(), 4)
    (1.0, 0.0)
    >>> out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch
import torch.nn.functional as F

from . import _taskbatch as _batch
from . import _validate
from . import batching as _batching
from . import maml as _maml
from . import random as _random
from .typing import PyTree

__all__ = ["Result", "evaluate", "loss", "prototypes", "task_loss"]

_DISTANCES = ("sqeuclidean", "cosine")
EmbedFn = Callable[[PyTree, torch.Tensor], torch.Tensor]  # embed_fn(params, x [n, ...]) -> [n, ...]
Pair = tuple[torch.Tensor, torch.Tensor]  # (inputs, integer labels)


class Result(NamedTuple):
    """What [loss][metabatch.protonet.loss] returns.

    Attributes:
        loss: the mean query cross-entropy over tasks, a scalar (differentiable).
        accuracy: the mean query accuracy over tasks, a scalar.
        per_task_loss: each task's loss, shape `[T]`.
        per_task_accuracy: each task's accuracy, shape `[T]`.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    per_task_loss: torch.Tensor
    per_task_accuracy: torch.Tensor


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """The mean embedding of each class: `[ways, d]` from embeddings `[n, d]` and labels `[n]` in `0..ways-1`.

    Works for any number of examples per class (a class without examples gets a zero prototype)
    and under `torch.func.vmap`.

    Examples:
        >>> import torch
        >>> from metabatch import protonet
        >>> protonet.prototypes(torch.tensor([[1.0], [3.0], [10.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[ 2.],
                [10.]])
    """
    onehot = F.one_hot(labels, ways).to(embeddings.dtype)          # [n, ways]
    counts = onehot.sum(0).clamp(min=1)
    return (onehot.transpose(0, 1) @ embeddings) / counts.unsqueeze(-1)


def task_loss(embed_fn: EmbedFn, params: PyTree, support: Pair, query: Pair, ways: int, *,
              distance: str = "sqeuclidean") -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and accuracy of one N-way task: `(cross-entropy, accuracy)` of its query examples.

    Args:
        embed_fn: `embed_fn(params, x) -> [n, ...]` embeddings (flattened to `[n, d]`), e.g.
            `metabatch.nn.functional(encoder)`.
        params: the embedding's parameters, a pytree of tensors.
        support: `(x [n_s, ...], labels [n_s])`, labels in `0..ways-1`.
        query: `(x [n_q, ...], labels [n_q])`.
        ways: the number of classes N.
        distance: `"sqeuclidean"` (Snell et al.) or `"cosine"` (negative cosine similarity).

    Returns:
        `(loss, accuracy)`, two scalars.

    Examples:
        >>> import torch
        >>> from metabatch import protonet
        >>> embed = lambda p, x: x * p
        >>> s = (torch.tensor([[0.0], [2.0]]), torch.tensor([0, 1]))
        >>> q = (torch.tensor([[0.4], [1.0]]), torch.tensor([0, 1]))
        >>> [round(v.item(), 4) for v in protonet.task_loss(embed, torch.tensor(1.0), s, q, 2)]
        [0.39, 0.5]
    """
    xs, ys = support
    xq, yq = query
    z = embed_fn(params, torch.cat([xs, xq]))
    z = z.reshape(z.shape[0], -1)
    zs, zq = z[: xs.shape[0]], z[xs.shape[0]:]
    protos = prototypes(zs, ys, ways)
    if distance == "cosine":
        logits = F.normalize(zq, dim=-1) @ F.normalize(protos, dim=-1).transpose(0, 1)
    else:
        logits = -((zq.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
    loss = F.cross_entropy(logits, yq)
    accuracy = (logits.argmax(-1) == yq).to(logits.dtype).mean()
    return loss, accuracy


def _check_batch(support, query, fn: str):
    for name, batch in (("support", support), ("query", query)):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{fn}(): {name} must be a pair (inputs [T, n, ...], labels [T, n]) such as a "
                            f"task_loader batch's 'context' or 'target', got {type(batch).__name__}.")
        x, y = batch
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{fn}(): {name} must hold two tensors, got ({type(x).__name__}, {type(y).__name__}).")
        if y.dim() != 2 or x.dim() < 3 or x.shape[:2] != y.shape:
            raise ValueError(f"{fn}(): {name} must be (inputs [T, n, ...], labels [T, n]), got shapes "
                             f"{tuple(x.shape)} and {tuple(y.shape)}.")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"{fn}(): {name} labels must be integers 0..ways-1, got dtype {y.dtype}.")
    if support[0].shape[0] != query[0].shape[0]:
        raise ValueError(f"{fn}(): support holds {support[0].shape[0]} tasks and query {query[0].shape[0]}; "
                         f"stack the same tasks in both.")
    if support[0].shape[0] == 0:
        raise ValueError(f"{fn}(): the batch holds no tasks; pass at least one.")


def _ways(ways, support, fn: str) -> int:
    if ways is not None:
        return _validate.integer(ways, "ways", fn, low=1)
    labels = support[1]
    if _validate.is_traced(labels):
        raise ValueError(f"{fn}(): ways=None reads the support labels, which are traced here; pass ways=N.")
    if labels.numel() == 0:
        raise ValueError(f"{fn}(): the support sets are empty; pass at least one example per class.")
    if int(labels.min()) < 0:
        raise ValueError(f"{fn}(): support labels must be 0..ways-1, got {int(labels.min())}.")
    return int(labels.max()) + 1


def loss(embed_fn: EmbedFn, params: PyTree, support: Pair, query: Pair, *, ways: int | None = None,
         distance: str = "sqeuclidean", chunk_size: int | None = None, randomness: str = "different",
         key: _random.Key | None = None, batch_rules: bool = True) -> Result:
    """The prototypical-network loss and accuracy of a batch of N-way K-shot tasks, vmapped over tasks.

    Args:
        embed_fn: `embed_fn(params, x) -> [n, ...]` for one task's inputs, e.g.
            `metabatch.nn.functional(encoder)`.
        params: the embedding's parameters, a pytree of tensors (e.g. `metabatch.nn.params(encoder)`).
        support: `(x [T, n_s, ...], labels [T, n_s])`: a task_loader batch's `"context"`.
        query: `(x [T, n_q, ...], labels [T, n_q])`: its `"target"`.
        ways: N; `None` reads it from the support labels (their maximum + 1).
        distance: `"sqeuclidean"` (the paper's) or `"cosine"`.
        chunk_size: vmap at most this many tasks at a time.
        randomness: `vmap`'s randomness for random ops in `embed_fn`.
        key: a `metabatch.random` key seeding random ops (as in [metabatch.maml.meta_loss][]).
        batch_rules: use [metabatch.batching.batching_rules][] (faster convolutions).

    Returns:
        A [Result][metabatch.protonet.Result] with `.loss` to back-propagate, `.accuracy`, and per-task values.

    Raises:
        TypeError: `support` or `query` is not a pair of tensors, labels are not integers.
        ValueError: shapes that do not fit, no tasks, a bad `ways`, `distance`, `chunk_size` or `randomness`.

    Examples:
        >>> import torch, metabatch as mb
        >>> from metabatch import protonet
        >>> encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8))
        >>> task = mb.tasks.classification(torch.rand(10, 6, 2, 2), ways=3)
        >>> specs = mb.batch_specs(seed=0, num_tasks=100, batch_size=4, n_ctx=1, n_tgt=2, num_batches=1)
        >>> batch = next(iter(mb.task_loader(task, specs, num_workers=0)))
        >>> out = protonet.loss(mb.nn.functional(encoder), mb.nn.params(encoder), batch["context"], batch["target"])
        >>> out.per_task_accuracy.shape, out.loss.requires_grad
        (torch.Size([4]), True)
    """
    fn = "protonet.loss"
    _check_batch(support, query, fn)
    n_ways = _ways(ways, support, fn)
    _validate.choice(distance, "distance", fn, _DISTANCES)
    _validate.choice(randomness, "randomness", fn, ("different", "same", "error"))
    if chunk_size is not None:
        chunk_size = _validate.integer(chunk_size, "chunk_size", fn, low=1)
    leaves, spec = optree.tree_flatten(params)

    def task(leaves, s, q):
        return task_loss(embed_fn, optree.tree_unflatten(spec, leaves), s, q, n_ways, distance=distance)

    rules = _validate.flag(batch_rules, "batch_rules", fn)
    with _batch.seeded(key, leaves + [support[0]]), _batching.batching_rules(rules):
        losses, accs = torch.func.vmap(task, in_dims=(None, 0, 0), randomness=randomness,
                                       chunk_size=chunk_size)(leaves, tuple(support), tuple(query))
    return Result(losses.mean(), accs.mean(), losses, accs)


def evaluate(embed_fn: EmbedFn, params: PyTree, support: Pair, query: Pair, *, ways: int | None = None,
             distance: str = "sqeuclidean", chunk_size: int | None = None, key: _random.Key | None = None,
             batch_rules: bool = True) -> _maml.Evaluation:
    """Meta-test: the query loss and accuracy of every task, with means and 95 % intervals, no graph kept.

    Args:
        embed_fn: as in [loss][metabatch.protonet.loss].
        params: as in [loss][metabatch.protonet.loss]; not modified.
        support: as in [loss][metabatch.protonet.loss].
        query: as in [loss][metabatch.protonet.loss].
        ways: as in [loss][metabatch.protonet.loss].
        distance: as in [loss][metabatch.protonet.loss].
        chunk_size: as in [loss][metabatch.protonet.loss].
        key: as in [loss][metabatch.protonet.loss].
        batch_rules: as in [loss][metabatch.protonet.loss].

    Returns:
        A [metabatch.maml.Evaluation][] whose metric is the accuracy.

    Examples:
        >>> import torch
        >>> from metabatch import protonet
        >>> embed = lambda p, x: x
        >>> xs = torch.tensor([[[0.0], [2.0]], [[0.0], [2.0]]])
        >>> xq = torch.tensor([[[0.4], [1.5]], [[1.2], [1.9]]])
        >>> y = torch.tensor([[0, 1], [0, 1]])
        >>> ev = protonet.evaluate(embed, {}, (xs, y), (xq, y))
        >>> ev.metric, ev.per_task_metric.tolist()
        (0.75, [1.0, 0.5])
    """
    with torch.no_grad():
        out = loss(embed_fn, params, support, query, ways=ways, distance=distance, chunk_size=chunk_size, key=key,
                   batch_rules=batch_rules)
    mean, half = _maml.mean_ci(out.per_task_loss)
    acc, acc_half = _maml.mean_ci(out.per_task_accuracy)
    return _maml.Evaluation(mean, half, acc, acc_half, out.per_task_loss, out.per_task_accuracy)
