"""Module-level task functions for the loader tests (picklable for spawn workers)."""

import os
import signal

import numpy as np
import torch

import metabatch as mb


def sinusoid(key, idx, n_ctx, n_tgt):
    rng = mb.random.numpy_rng(key)
    amp, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    x = rng.uniform(-5, 5, size=(n_ctx + n_tgt, 1)).astype(np.float32)
    y = (amp * np.sin(x + phase)).astype(np.float32)
    return {"context": (x[:n_ctx], y[:n_ctx]), "target": (x[n_ctx:], y[n_ctx:]),
            "idx": np.int64(idx)}


def torch_task(key, idx, n_ctx, n_tgt):
    g = mb.random.torch_generator(key)
    return torch.randn(n_ctx, 3, generator=g), torch.full((n_tgt,), float(idx))


def big_task(key, idx, n_ctx, n_tgt):
    """Large enough (256 KiB a task) to travel through shared memory."""
    rng = mb.random.numpy_rng(key)
    return rng.standard_normal((n_ctx, 64, 64)).astype(np.float32), np.full(n_tgt, idx)


def ragged(key, idx, n_ctx, n_tgt):
    n = n_ctx + (1 if idx == 7 else 0)
    return {"x": np.zeros((n, 2), np.float32)}


def restructured(key, idx, n_ctx, n_tgt):
    if idx == 7:
        return {"x": np.zeros(n_ctx), "extra": np.zeros(1)}
    return {"x": np.zeros(n_ctx)}


def retyped(key, idx, n_ctx, n_tgt):
    return {"x": np.zeros(n_ctx, np.float64 if idx == 7 else np.float32)}


def failing(key, idx, n_ctx, n_tgt):
    if idx == 7:
        raise KeyError(f"no such character: {idx}")
    return np.zeros(n_ctx)


def killer(key, idx, n_ctx, n_tgt):
    if idx == 7 and torch.utils.data.get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return np.zeros(n_ctx)


def string_leaf(key, idx, n_ctx, n_tgt):
    return {"x": np.zeros(n_ctx), "name": "dog"}
