"""metabatch: functional meta-learning on PyTorch.

Explicit random keys, seeded batch specs, a parallel task loader that builds
uniform batches of tasks in worker processes, and the MAML family as pure
functions on `torch.func` (`grad` + `vmap` over the task dimension), with
differentiable inner-loop optimizers, MAML++, prototypical networks and implicit MAML.

Examples:
    >>> import metabatch as mb
    >>> specs = mb.batch_specs(seed=0, num_tasks=10, batch_size=2, n_ctx=3, n_tgt=4)
    >>> specs[0].n_ctx, specs[0].n_tgt
    (3, 4)
"""

from . import (
    batching,
    checkpoint,
    distributed,
    imaml,
    inner,
    maml,
    mamlpp,
    nn,
    protonet,
    random,
    runtime,
    tasks,
    typing,
)
from .compat import TaskLoader, TaskSet
from .loader import TaskDataLoader, build_batch, stack, task_loader
from .sampler import BatchSpec, BatchSpecs, batch_specs

__version__ = "0.10.0.dev0"

__all__ = [
    "random",
    "tasks",
    "maml",
    "inner",
    "mamlpp",
    "protonet",
    "imaml",
    "nn",
    "batching",
    "distributed",
    "checkpoint",
    "runtime",
    "typing",
    "BatchSpec",
    "BatchSpecs",
    "batch_specs",
    "task_loader",
    "TaskDataLoader",
    "build_batch",
    "stack",
    "TaskSet",
    "TaskLoader",
    "__version__",
]
