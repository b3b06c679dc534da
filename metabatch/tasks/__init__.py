"""Ready task families: ``sample_task`` functions for :func:`metabatch.task_loader`.

- :func:`sinusoid`: sine-wave regression (Finn et al. 2017).
- :func:`gp`: 1-D Gaussian-process functions, for neural processes.
- :func:`classification`: N-way K-shot classification over any class array.
- :mod:`metabatch.tasks.omniglot`: Omniglot from its official zips or folders,
  and Lake et al.'s one-shot classification runs.
- :mod:`metabatch.tasks.miniimagenet`: mini-ImageNet in Ravi & Larochelle's
  split (``images/`` plus ``train.csv``, ``val.csv``, ``test.csv``).

Every family takes all its randomness from the task key, so a batch depends
only on ``(seed, step)``, never on the number of loader workers.

Examples:
    >>> import metabatch as mb
    >>> specs = mb.batch_specs(seed=0, num_tasks=1, batch_size=25, n_ctx=10, n_tgt=10, num_batches=1)
    >>> batch = next(iter(mb.task_loader(mb.tasks.sinusoid, specs)))
    >>> tuple(batch["context"][0].shape)
    (25, 10, 1)
"""

from . import miniimagenet, omniglot
from .classification import Classification, classification
from .regression import GP, gp, sinusoid

__all__ = ["GP", "Classification", "classification", "gp", "miniimagenet", "omniglot", "sinusoid"]
