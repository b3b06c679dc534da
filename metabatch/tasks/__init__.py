"""Ready task families: `sample_task` functions for `metabatch.task_loader`.

- `sinusoid`: sine-wave regression (Finn et al. 2017).
- `gp`: 1-D Gaussian-process functions, for neural processes.
- `classification`: N-way K-shot classification over any class array
  (equal class sizes, or a flat array with one label per example).
- `metabatch.tasks.omniglot`: Omniglot from its official zips or folders,
  and Lake et al.'s one-shot classification runs.
- `metabatch.tasks.miniimagenet`: mini-ImageNet in Ravi & Larochelle's
  split (`images/` plus `train.csv`, `val.csv`, `test.csv`).
- `metabatch.tasks.tieredimagenet`: tiered-ImageNet (Ren et al. 2018), from
  per-split class folders or from the widely shared per-split pickle files.
- `mmap_array` / `MmapArray`: big arrays that loader workers share instead of
  copying (memory-mapped `.npy` files that pickle by reference); the readers'
  caches come back as such arrays.

Every family takes all its randomness from the task key, so a batch depends
only on `(seed, step)`, never on the number of loader workers.

Examples:
    >>> import metabatch as mb
    >>> specs = mb.batch_specs(seed=0, num_tasks=1, batch_size=25, n_ctx=10, n_tgt=10, num_batches=1)
    >>> batch = next(iter(mb.task_loader(mb.tasks.sinusoid, specs)))
    >>> tuple(batch["context"][0].shape)
    (25, 10, 1)
"""

from . import miniimagenet, omniglot, tieredimagenet
from .classification import Classification, classification
from .mapped import MmapArray, mmap_array
from .regression import GP, gp, sinusoid

__all__ = ["GP", "Classification", "MmapArray", "classification", "gp", "miniimagenet", "mmap_array",
           "omniglot", "sinusoid", "tieredimagenet"]
