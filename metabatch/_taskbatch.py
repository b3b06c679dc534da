"""What the task-vmapped algorithms share (private, shared on purpose): task counting and keyed seeding."""

from __future__ import annotations

import contextlib

import optree
import torch

from . import random as _random


def num_tasks(fn: str, **batches) -> int:
    """The shared leading task dimension of every leaf of every batch."""
    sizes = {}
    for name, batch in batches.items():
        paths, leaves, _ = optree.tree_flatten_with_path(batch)
        if not leaves:
            raise ValueError(f"{fn}(): {name} has no tensors.")
        for path, leaf in zip(paths, leaves, strict=True):
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
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{fn}(): the batch holds no tasks (its leading task dimension is 0: "
                         + ", ".join(f"{k}: {v}" for k, v in sizes.items()) + "); pass at least one task.")
    return n


@contextlib.contextmanager
def seeded(key, tensors):
    """Seed torch's generators from `key` for the duration, restoring their states after."""
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
