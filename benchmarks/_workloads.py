"""The task workloads of the loader benchmark, written against numpy only.

Every function takes ``rng``: anything with numpy's ``uniform`` / ``standard_normal`` /
``permutation`` methods. metabatch's path passes ``metabatch.random.numpy_rng(key)`` (a
``numpy.random.Generator``); the legacy paths (metabatch 0.9.1 and the compat ``TaskSet``)
pass the ``numpy.random`` module itself, whose global generator they draw from. Only the
methods common to both are used, so that every method does the same work per task.

This module must not import metabatch: the 0.9.1 child process imports the old package under
that name.
"""

from __future__ import annotations

import numpy as np

# Medium workload: an in-memory image array like Omniglot's (classes, examples, 28, 28).
N_CLASSES, N_EXAMPLES, SIDE = 400, 20, 28
N_WAY = 5

_images = None


def images() -> np.ndarray:
    """The uint8 image array [400, 20, 28, 28], made once per process (fork shares it)."""
    global _images
    if _images is None:
        gen = np.random.Generator(np.random.PCG64(0))
        _images = gen.integers(0, 256, size=(N_CLASSES, N_EXAMPLES, SIDE, SIDE), dtype=np.uint8)
    return _images


def sinusoid(rng, n_ctx: int, n_tgt: int) -> dict:
    """Light: a sinusoid regression task, amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].

    Returns ``{"context": (x, y), "target": (x, y)}`` with float32 arrays ``[n, 1]``.
    """
    amp = rng.uniform(0.1, 5.0)
    phase = rng.uniform(0.0, np.pi)
    x = rng.uniform(-5.0, 5.0, size=(n_ctx + n_tgt, 1)).astype(np.float32)
    y = (amp * np.sin(x + phase)).astype(np.float32)
    return {"context": (x[:n_ctx], y[:n_ctx]), "target": (x[n_ctx:], y[n_ctx:])}


def classification(rng, n_ctx: int, n_tgt: int) -> dict:
    """Medium: 5-way ``n_ctx``-shot ``n_tgt``-query classification from :func:`images`.

    Five distinct classes, ``n_ctx + n_tgt`` distinct examples of each, one random multiple of
    90 degrees of rotation per class; images float32 in [0, 1].

    Returns ``{"support": (images [5*n_ctx, 1, 28, 28], labels [5*n_ctx]), "query": (...)}``,
    labels int64.
    """
    data = images()
    per_class = n_ctx + n_tgt
    classes = rng.permutation(N_CLASSES)[:N_WAY]
    turns = (rng.uniform(0.0, 4.0, size=N_WAY)).astype(np.int64)
    support = np.empty((N_WAY, n_ctx, SIDE, SIDE), dtype=np.float32)
    query = np.empty((N_WAY, n_tgt, SIDE, SIDE), dtype=np.float32)
    for c in range(N_WAY):
        picked = data[classes[c], rng.permutation(N_EXAMPLES)[:per_class]]
        picked = np.rot90(picked, int(turns[c]), axes=(1, 2))
        support[c] = picked[:n_ctx]
        query[c] = picked[n_ctx:]
    support *= np.float32(1 / 255)
    query *= np.float32(1 / 255)
    labels = np.arange(N_WAY, dtype=np.int64)
    return {"support": (support.reshape(N_WAY * n_ctx, 1, SIDE, SIDE), np.repeat(labels, n_ctx)),
            "query": (query.reshape(N_WAY * n_tgt, 1, SIDE, SIDE), np.repeat(labels, n_tgt))}
