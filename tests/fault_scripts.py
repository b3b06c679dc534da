"""Processes for tests/test_faults.py to start, signal and inspect (run as scripts).

    python tests/fault_scripts.py train OUT_DIR STRATEGY    # a training loop with 2 loader workers, forever
    python tests/fault_scripts.py epochs OUT_DIR STRATEGY PERSISTENT   # 3 epochs, /dev/shm counted

Loader workers write their pid to OUT_DIR/worker-<pid> when they start, so that the test can tell
which processes and /dev/shm entries ("torch_<pid>_...") are theirs.
"""

import ctypes
import functools
import gc
import json
import os
import pathlib
import signal
import sys
import time

import numpy as np
import torch

import metabatch as mb
from tests import tasks_for_tests as T

CULPRIT = 7  # the task index that misbehaves in the loader rows


def misbehaves(how, key, idx, n_ctx, n_tgt):
    """A task function (use functools.partial(misbehaves, how)) whose task CULPRIT fails as ``how`` says."""
    if idx == CULPRIT and (how == "raise" or torch.utils.data.get_worker_info() is not None):
        if how == "raise":
            raise KeyError(f"no such character: {idx}")
        if how == "sys.exit(3)":
            sys.exit(3)
        if how == "sys.exit(0)":
            sys.exit(0)
        if how == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if how == "os._exit(5)":
            os._exit(5)
        if how == "segfault":
            ctypes.string_at(0)
        if how == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "hang":
            time.sleep(120)
    return np.zeros(n_ctx, np.float32)


def record_pid(out: str, worker_id: int) -> None:
    (pathlib.Path(out) / f"worker-{os.getpid()}").touch()


def recorded_pids(out) -> set:
    return {int(p.name.split("-")[1]) for p in pathlib.Path(out).glob("worker-*")}


def shm_entries(pids) -> list:
    """The /dev/shm entries created by these processes (torch names them torch_<pid>_...)."""
    prefixes = tuple(f"torch_{pid}_" for pid in pids)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefixes))


def loader(out, **options):
    specs = mb.batch_specs(0, 50, 4, (1, 3), 2, num_batches=options.pop("num_batches", None))
    return mb.task_loader(T.big_task, specs, num_workers=2, worker_init_fn=functools.partial(record_pid, out),
                          **options)


def train(out, strategy):
    torch.multiprocessing.set_sharing_strategy(strategy)
    w = torch.zeros(64, requires_grad=True)
    for step, (x, y) in enumerate(loader(out)):
        loss = (x.mean(dim=(0, 1)) @ w.reshape(64, 1).expand(64, 64)).sum() + y.float().mean()
        loss.backward()
        if step == 5:
            print("training", flush=True)
        time.sleep(0.005)


def epochs(out, strategy, persistent):
    """Entries in /dev/shm after each of 3 epochs (batches dropped) and after `del loader`."""
    torch.multiprocessing.set_sharing_strategy(strategy)
    dl = loader(out, num_batches=20, persistent_workers=persistent == "1")
    counts = []
    for _ in range(3):
        for batch in dl:
            del batch
        gc.collect()
        counts.append(len(shm_entries(recorded_pids(out) | {os.getpid()})))
    del dl
    gc.collect()
    deadline = time.monotonic() + 10
    while True:  # the workers' exit trails the loader's death
        last = shm_entries(recorded_pids(out) | {os.getpid()})
        if not last or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    counts.append(len(last))
    print(json.dumps({"counts": counts, "left": last}), flush=True)


if __name__ == "__main__":
    {"train": train, "epochs": epochs}[sys.argv[1]](*sys.argv[2:])
