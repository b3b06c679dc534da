"""The fault matrix (issue 13): every fault gives a clear error, nothing is lost, nothing leaks.

One row per fault in ``ROWS``: what is done, the exception expected (or ``None``: the input is
accepted and the row checks the result itself) and the words that must name the culprit. Every row
runs under the ``clean`` fixture, which afterwards asserts that no child process is left alive, no
file descriptor is left open and no /dev/shm entry made by this process or its loader workers
remains. Rows that need a process of their own (signals, another sharing strategy, torchrun,
checkpoint writers that die) start one and kill its whole process group on the way out.

docs/sharp-bits.md ("Failure modes") tells users the same table.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import metabatch as mb
from metabatch import sampler
from tests import fault_scripts as F
from tests import tasks_for_tests as T

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Subprocesses import this checkout's metabatch (after whatever PYTHONPATH already names first).
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([*filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), str(ROOT)]))

# DataLoader's shutdown after a worker's error can race torch's own index-queue feeder thread
# ("Exception in thread QueueFeederThread ... Bad file descriptor"), and a connection may be closed
# twice in that teardown: torch-side messages in torch threads (see tests/test_loader.py).
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


# ----------------------------------------------------------------------------------------- clean


def children() -> set:
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return {p for p in pids if alive(p)}


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Clean:
    """What a row may use, and what it must leave as it found."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.pids_dir = tmp / "pids"
        self.pids_dir.mkdir()
        self.init_fn = functools.partial(F.record_pid, str(self.pids_dir))
        self.extra_pids: set = set()  # processes of a row's own subprocess tree

    def pids(self) -> set:
        return F.recorded_pids(self.pids_dir) | self.extra_pids

    def loader(self, task, specs, **options) -> mb.TaskDataLoader:
        return mb.task_loader(task, specs, worker_init_fn=self.init_fn, **options)


def settle(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        gc.collect()
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def warm_up():
    """First uses start lasting helpers (multiprocessing's resource tracker, sockets): before any row."""
    specs = mb.batch_specs(0, 10, 2, 1, 1, num_batches=2)
    for context in ("fork", "spawn"):
        list(mb.task_loader(T.big_task, specs, num_workers=1, multiprocessing_context=context))
    gc.collect()


def assert_clean(kids: set, fds: int, state: Clean, seconds: float = 20) -> None:
    """No child beyond ``kids``, no worker of ``state`` alive, no /dev/shm entry of ours, no fd beyond ``fds``."""
    assert settle(lambda: children() <= kids, seconds), f"child processes left alive: {children() - kids}"
    def left():
        return [p for p in state.pids() if alive(p)]
    assert settle(lambda: not left(), seconds), f"worker processes left: {left()}"
    def shm():
        return F.shm_entries(state.pids() | {os.getpid()})
    assert settle(lambda: not shm(), seconds / 2), f"/dev/shm entries left: {shm()}"
    assert settle(lambda: open_fds() <= fds, seconds / 2), f"{open_fds() - fds} file descriptors left open"


@pytest.fixture
def clean(tmp_path):
    gc.collect()
    kids, fds = children(), open_fds()
    state = Clean(tmp_path)
    yield state
    assert_clean(kids, fds, state)


def test_the_clean_check_notices_leaks(tmp_path):
    gc.collect()
    kids, fds = children(), open_fds()
    state = Clean(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(AssertionError, match="child processes left alive"):
            assert_clean(kids, fds, state, seconds=0.2)
    finally:
        child.kill()
        child.wait()
    entry = pathlib.Path("/dev/shm") / f"torch_{os.getpid()}_0_0"
    entry.touch()
    try:
        with pytest.raises(AssertionError, match="/dev/shm entries left"):
            assert_clean(kids, fds, state, seconds=0.2)
    finally:
        entry.unlink()
    with open(tmp_path / "x", "w") as f, pytest.raises(AssertionError, match="1 file descriptors left open"):
        assert_clean(kids, fds, state, seconds=0.2)
    assert f.closed
    assert_clean(kids, fds, state, seconds=5)


# ----------------------------------------------------------------------------------------- rows


class Row(NamedTuple):
    """One fault: ``run(clean)`` provokes it; ``raises`` (or None: accepted) and ``words`` say what the user gets."""

    id: str
    item: str  # the issue's item, or "handled" for a fault class that was already handled
    run: Callable[[Clean], Any]
    raises: type | None = None
    words: str = ""  # a regex over the message and its notes
    cause: str = ""  # a regex over the message of the exception's __cause__ (kept from torch)
    slow: bool = False  # starts processes of its own (seconds)


# item 9 and handled classes: a loader whose task CULPRIT (7) misbehaves. Steps take two tasks in
# order, so the culprit is task 1 of step 3, indices (6, 7).
CULPRIT_SPECS = mb.batch_specs(0, 10, 2, 1, 1, shuffle=False, num_batches=5)
CULPRIT_KEY = mb.random.key_data(CULPRIT_SPECS[3].key)
NAMES_THE_BATCH = (r"step 3 \(task indices \(6, 7\), n_ctx=1, n_tgt=1\).*"
                   + re.escape(f"metabatch.random.key_from_data({CULPRIT_KEY})"))


def misbehaving(how: str, num_workers=2, **options) -> Callable[[Clean], Any]:
    def run(clean):
        loader = clean.loader(functools.partial(F.misbehaves, how), CULPRIT_SPECS, num_workers=num_workers,
                              **options)
        for _ in loader:
            pass
    return run


def one_batch(task, num_workers=0, specs=None) -> Callable[[Clean], Any]:
    def run(clean):
        return list(clean.loader(task, specs or mb.batch_specs(0, 10, 4, 0, 0, num_batches=1),
                                 num_workers=num_workers))
    return run


def bfloat16_zero_size(key, idx, n_ctx, n_tgt):
    return {"x": torch.zeros(n_ctx, 3, dtype=torch.bfloat16), "z": torch.zeros(n_ctx, dtype=torch.bfloat16)}


def huge_int(key, idx, n_ctx, n_tgt):
    return {"x": np.zeros(2), "n": 2**70 if idx == 2 else idx}


def tensor_then_numpy(key, idx, n_ctx, n_tgt):
    x = np.full((2, 3), idx, np.float32)
    return {"x": torch.from_numpy(x) if idx == 0 else x, "s": torch.tensor(1.0) if idx == 0 else np.float32(2)}


def numpy_then_tensor(key, idx, n_ctx, n_tgt):
    x = np.full((2, 3), idx, np.float32)
    return {"x": x if idx == 0 else torch.from_numpy(x)}


def accepts_zero_size_bfloat16(num_workers):
    def run(clean):
        [batch] = one_batch(bfloat16_zero_size, num_workers)(clean)
        assert batch["x"].shape == (4, 0, 3) and batch["x"].dtype == torch.bfloat16
        assert batch["z"].shape == (4, 0) and batch["z"].dtype == torch.bfloat16
    return run


def accepts_mixed_tensor_and_numpy(task, num_workers):
    def run(clean):
        specs = mb.batch_specs(0, 3, 3, 0, 0, shuffle=False, num_batches=1)
        [batch] = one_batch(task, num_workers, specs)(clean)
        assert batch["x"].dtype == torch.float32 and batch["x"][:, 0, 0].tolist() == [0.0, 1.0, 2.0]
        if "s" in batch:
            assert batch["s"].tolist() == [1.0, 2.0, 2.0]
    return run


def no_timeout_without_workers(clean):
    mb.task_loader(T.sinusoid, CULPRIT_SPECS, num_workers=0, timeout=5)


# item 4: /dev/shm under both sharing strategies, in a process of its own.
def shm_after_epochs(strategy, persistent):
    def run(clean):
        proc = subprocess.run([sys.executable, "tests/fault_scripts.py", "epochs", str(clean.pids_dir), strategy,
                               "1" if persistent else "0"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        # Between epochs persistent workers keep their pools (2 workers' buffers and flags); nothing grows.
        assert len(set(got["counts"][:3])) == 1, got
        assert got["counts"][:3] == [got["counts"][0]] * 3 and (persistent or got["counts"][0] == 0), got
        assert got["counts"][3] == 0 and got["left"] == [], got
    return run


# handled: SIGINT / SIGTERM to a training script.
def signal_training(sig, to_group, strategy="file_descriptor"):
    def run(clean):
        proc = subprocess.Popen([sys.executable, "tests/fault_scripts.py", "train", str(clean.pids_dir), strategy],
                                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            assert proc.stdout.readline().strip() == "training", proc.stderr.read()[-3000:]
            clean.extra_pids.add(proc.pid)
            assert len(clean.pids()) == 3  # the script and its 2 loader workers
            (os.killpg if to_group else os.kill)(proc.pid, sig)
            assert proc.wait(timeout=60) == -sig
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        # The workers follow (DataLoader's watchdog checks the parent every 5 s); under "file_system",
        # torch's shm manager unlinks what the killed processes held once they are all gone. The
        # `clean` fixture waits for both.
    return run


# item 5: ranks that disagree, from one torchrun launch of tests/distributed_faults.py.
@functools.cache
def distributed_outcomes(out: str) -> tuple:
    from tests.test_distributed import torchrun
    torchrun(ROOT / "tests" / "distributed_faults.py", out)
    return tuple(json.loads((pathlib.Path(out) / f"rank{r}.json").read_text()) for r in (0, 1))


_DIST_DIR = []


def ranks_disagree(case):
    def run(clean):
        if not _DIST_DIR:
            _DIST_DIR.append(str(clean.tmp.parent / "distributed"))
            os.makedirs(_DIST_DIR[0], exist_ok=True)
        ranks = distributed_outcomes(_DIST_DIR[0])
        assert ranks[0]["after"] == ranks[1]["after"] == [0.5, 0.5, 0.5]  # the group still works
        assert ranks[0][case] == ranks[1][case], ranks  # every rank raises, with the same message
        kind, message = ranks[0][case]
        raise {"ValueError": ValueError, None: AssertionError}.get(kind, RuntimeError)(message)
    return run


# item 6: batch specs.
def bad_specs(*args, **kw):
    def run(clean):
        mb.batch_specs(*args, **kw)[0]
    return run


def huge_num_tasks(clean):
    specs = mb.batch_specs(0, 2**40, 64, 1, 1)
    seen = [i for step in (0, 1, 10**9) for i in specs[step].indices]
    assert len(set(seen)) == len(seen) and all(0 <= i < 2**40 for i in seen)
    assert specs[5] == mb.batch_specs(0, 2**40, 64, 1, 1)[5]  # a pure function of (seed, step)
    assert specs[0].indices != mb.batch_specs(1, 2**40, 64, 1, 1)[0].indices
    assert mb.batch_specs(0, 2**64 - 1, 2, 1, 1)[2**40].indices  # up to 2**64 tasks


def feistel_is_a_permutation(clean):
    for n in (1, 2, 3, 5, 16, 17, 1000, 4099):
        perm = sampler._feistel(mb.random.key(n), n)
        assert sorted(perm(i) for i in range(n)) == list(range(n)), n
    perm = sampler._feistel(mb.random.key(0), 1000)
    assert [perm(i) for i in range(1000)] != list(range(1000))


def every_task_once_per_epoch_above_huge(clean):
    real = sampler.HUGE
    sampler.HUGE = 0  # every size goes through the per-index permutation
    try:
        for n, b in ((7, 3), (10, 10), (33, 4)):
            specs = mb.batch_specs(1, n, b, 1, 1)
            stream = [i for step in range(-(-2 * n // b)) for i in specs[step].indices]
            assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
            assert stream[:n] != stream[n:2 * n]  # reshuffled every epoch
    finally:
        sampler.HUGE = real


# item 10: compat and ints.
class Points(mb.TaskSet):
    def __len__(self):
        return 10

    def __gettask__(self, idx, n_context, n_target):
        return {"x": np.full(n_context, idx, np.float32), "y": np.zeros(n_target, np.float32)}


def compat_eval_set_later(clean):
    ts = Points(min_pts=2, max_ctx_pts=5, max_tgt_pts=8, total_tgt_pts=2, predict_full_target_during_eval=True)
    loader = mb.TaskLoader(ts, batch_size=2, seed=0)
    assert len(list(loader)) == 5
    ts.eval = True  # 0.9.1 code flips it after construction: n_target = 2 - n_context <= 0
    list(loader)


def compat_numpy_batch_size(clean):
    batches = list(mb.TaskLoader(Points(1, 2, 4), batch_size=np.int64(2), seed=0))
    assert len(batches) == 5 and batches[0]["x"].shape[0] == 2


def call(fn, *args, **kw):
    def run(clean):
        fn(*args, **kw)
    return run


# item 1 (through metabatch.checkpoint) and handled: checkpoints.
def checkpoint_crash_during_write(clean):
    path = clean.tmp / "last.pt"
    mb.checkpoint.save({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    code = textwrap.dedent(f"""
        import os, torch, metabatch as mb
        def dying(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os._exit(3)
        torch.save = dying
        mb.checkpoint.save({{"step": 2}}, {str(path)!r})
    """)
    assert subprocess.run([sys.executable, "-c", code], env=ENV, check=False).returncode == 3
    assert path.read_bytes() == before and mb.checkpoint.load(path)["step"] == 1
    mb.checkpoint.save({"step": 3}, path)  # and the dead writer's temporary goes with the next save
    assert sorted(p.name for p in path.parent.iterdir() if p.name != "pids") == ["last.pt"]


def checkpoint_concurrent_writers(clean):
    path = clean.tmp / "shared.pt"
    code = textwrap.dedent("""
        import sys, torch, metabatch as mb
        i = int(sys.argv[1])
        for step in range(15):
            mb.checkpoint.save({"writer": i, "step": step, "w": torch.full((20000,), float(i))}, sys.argv[2])
            got = mb.checkpoint.load(sys.argv[2])  # whoever wrote last: always whole
            assert torch.equal(got["w"], torch.full((20000,), float(got["writer"]))), got["writer"]
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(path)], env=ENV) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got = mb.checkpoint.load(path)
    assert got["step"] == 14 and torch.equal(got["w"], torch.full((20000,), float(got["writer"])))
    assert sorted(p.name for p in path.parent.iterdir() if p.name != "pids") == ["shared.pt"]


def checkpoint_that_runs_code(clean):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = clean.tmp / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"x": Evil()}, f)
    mb.checkpoint.load(path)


ROWS = [
    # ---- item 4: /dev/shm under both sharing strategies
    Row("shm/file_system/3-epochs", "4", shm_after_epochs("file_system", False)),
    Row("shm/file_system/persistent-workers", "4", shm_after_epochs("file_system", True)),
    Row("shm/file_descriptor/3-epochs", "4", shm_after_epochs("file_descriptor", False)),
    # ---- item 5: ranks that disagree (2 gloo ranks)
    Row("distributed/float32-vs-float64", "5", ranks_disagree("dtype"), ValueError,
        r"disagree on leaf 0.*rank 0: \['w'\] float32 of shape \(3,\); rank 1: \['w'\] float64"),
    Row("distributed/parameter-count", "5", ranks_disagree("count"), ValueError,
        r"leaf 2.*rank 0: nothing.*rank 1: \['c'\] float32 of shape \(5,\)\. The ranks pass 2 / 3 leaves"),
    Row("distributed/sizes-3-vs-4", "5", ranks_disagree("shape"), ValueError,
        r"leaf 1.*\['b'\] float32 of shape \(3,\); rank 1: \['b'\] float32 of shape \(4,\)"),
    Row("distributed/same-shapes-other-order", "5", ranks_disagree("order"), ValueError,
        r"leaf 0.*rank 0: \[0\] float32 of shape \(3,\); rank 1: \[0\] float32 of shape \(4,\)"),
    Row("distributed/module-parameters", "5", ranks_disagree("module"), ValueError,
        r"leaf 0.*0\.weight float32 of shape \(4, 2\); rank 1: 0\.weight float32 of shape \(3, 2\)"),
    Row("distributed/pmean-trees", "5", ranks_disagree("pmean"), ValueError, r"pmean\(\).*\['acc'\]"),
    # ---- item 6: batch specs
    Row("specs/batch_size-2**40", "6", bad_specs(0, 10, 2**40, 1, 1), ValueError,
        r"batch_specs\(\): batch_size must be <= 65536, got 1099511627776"),
    Row("specs/n_ctx-2**64", "6", bad_specs(0, 10, 2, 2**64, 1), ValueError,
        r"batch_specs\(\): n_ctx must be <= 1099511627776, got 18446744073709551616"),
    Row("specs/n_tgt-range-2**64", "6", bad_specs(0, 10, 2, 1, (1, 2**64)), ValueError, r"n_tgt must lie in"),
    Row("specs/seed-2**64", "6", bad_specs(2**64, 10, 2, 1, 1), ValueError, r"seed must be <= "),
    Row("specs/step-past-2**64", "6", lambda clean: mb.batch_specs(0, 10, 4, 1, 1)[2**62], IndexError,
        r"step 4611686018427387904 lies past the last step"),
    Row("specs/num_tasks-2**40", "6", huge_num_tasks),
    Row("specs/feistel-bijection", "6", feistel_is_a_permutation),
    Row("specs/every-task-once-per-epoch-feistel", "6", every_task_once_per_epoch_above_huge),
    # ---- item 9: the loader
    Row("loader/bfloat16-zero-size/0-workers", "9", accepts_zero_size_bfloat16(0)),
    Row("loader/bfloat16-zero-size/2-workers", "9", accepts_zero_size_bfloat16(2)),
    Row("loader/int-2**70/0-workers", "9", one_batch(huge_int, 0,
                                                     mb.batch_specs(0, 4, 4, 0, 0, shuffle=False, num_batches=1)),
        ValueError, r"step 0: leaf \['n'\] of task 2 \(index 2\) is the int 1180591620717411303424, outside "
                    r"torch's int64 range"),
    Row("loader/int-2**70/2-workers", "9", one_batch(huge_int, 2,
                                                     mb.batch_specs(0, 4, 4, 0, 0, shuffle=False, num_batches=1)),
        ValueError, r"step 0: leaf \['n'\] of task 2 \(index 2\) is the int"),
    Row("loader/int-2**70-in-task-0", "9", one_batch(huge_int, 0,
                                                     mb.batch_specs(0, 4, 2, 0, 0, shuffle=False, start=1,
                                                                    num_batches=2)),
        ValueError, r"step 1: leaf \['n'\] of task 0 \(index 2\) is the int"),
    Row("loader/tensor-then-numpy/0-workers", "9", accepts_mixed_tensor_and_numpy(tensor_then_numpy, 0)),
    Row("loader/tensor-then-numpy/2-workers", "9", accepts_mixed_tensor_and_numpy(tensor_then_numpy, 2)),
    Row("loader/numpy-then-tensor", "9", accepts_mixed_tensor_and_numpy(numpy_then_tensor, 0)),
    Row("loader/timeout-without-workers", "9", no_timeout_without_workers, ValueError,
        r"task_loader\(\): timeout=5 needs worker processes, but num_workers=0"),
    Row("loader/worker-sys.exit(3)", "9", misbehaving("sys.exit(3)"), RuntimeError,
        r"worker \d \(pid \d+\) exited with code 3 .*" + NAMES_THE_BATCH, "exited unexpectedly"),
    Row("loader/worker-sys.exit(0)", "9", misbehaving("sys.exit(0)"), RuntimeError,
        r"exited with code 0 before sending its batch.*" + NAMES_THE_BATCH, "exited unexpectedly"),
    Row("loader/worker-KeyboardInterrupt", "9", misbehaving("KeyboardInterrupt"), RuntimeError,
        r"KeyboardInterrupt or sys.exit\(0\).*" + NAMES_THE_BATCH, "exited unexpectedly"),
    Row("loader/worker-os._exit(5)", "9", misbehaving("os._exit(5)"), RuntimeError,
        r"exited with code 5 .*" + NAMES_THE_BATCH, "exited unexpectedly"),
    Row("loader/worker-segfault", "9", misbehaving("segfault"), RuntimeError,
        r"was killed by SIGSEGV .*" + NAMES_THE_BATCH, "exited unexpectedly"),
    # ---- fault classes handled before the issue (kept as rows)
    Row("handled/worker-SIGKILL", "handled", misbehaving("SIGKILL"), RuntimeError,
        r"was killed by SIGKILL \(the out-of-memory killer.*" + NAMES_THE_BATCH, "exited unexpectedly"),
    Row("handled/hang-with-timeout", "handled", misbehaving("hang", timeout=2), RuntimeError,
        r"worker 1 \(pid \d+\) sent nothing for timeout=2 s while building the batch of "
        + NAMES_THE_BATCH, "timed out after 2 seconds"),
    Row("handled/sample_task-raises/fork", "handled", misbehaving("raise", multiprocessing_context="fork"), KeyError,
        r"no such character: 7.*step 3, task 1 of the batch \(index 7\)"
        + re.escape(f", key {CULPRIT_SPECS[3].task_keys()[1]!r}")),
    Row("handled/sample_task-raises/spawn", "handled", misbehaving("raise", multiprocessing_context="spawn"),
        KeyError, r"no such character: 7.*step 3, task 1 of the batch \(index 7\)"),
    Row("handled/sample_task-raises/0-workers", "handled", misbehaving("raise", num_workers=0), KeyError,
        r"step 3, task 1 of the batch \(index 7\).*sample_task\(metabatch.random.key_from_data"),
    Row("handled/SIGINT-to-the-process-group", "handled", signal_training(signal.SIGINT, True)),
    Row("handled/SIGINT-to-the-script", "handled", signal_training(signal.SIGINT, False)),
    Row("handled/SIGTERM-to-the-script", "handled", signal_training(signal.SIGTERM, False)),
    Row("handled/SIGTERM-to-the-process-group", "handled", signal_training(signal.SIGTERM, True)),
    Row("handled/SIGTERM-to-the-script/file_system", "4", signal_training(signal.SIGTERM, False, "file_system")),
    Row("handled/SIGINT-to-the-process-group/file_system", "4",
        signal_training(signal.SIGINT, True, "file_system")),
    Row("handled/checkpoint-crash-during-write", "1", checkpoint_crash_during_write),
    Row("handled/checkpoint-concurrent-writers", "handled", checkpoint_concurrent_writers),
    Row("handled/checkpoint-that-runs-code", "1", checkpoint_that_runs_code, ValueError,
        r"evil\.pt.*weights_only=True refuses to run code"),
    # ---- item 10: compat, and ints across the package
    Row("compat/eval-set-after-construction", "10", compat_eval_set_later, ValueError,
        r"in eval with predict_full_target_during_eval, n_target = total_tgt_pts - n_context = 2 - \d = "
        r"-?\d: no target point is left"),
    Row("compat/workers='2'", "10", call(mb.TaskLoader, Points(1, 2, 4), batch_size=2, workers="2"), TypeError,
        r"TaskLoader\(\): workers must be an int, got '2' \(str\)"),
    Row("compat/batch_size=np.int64(2)", "10", compat_numpy_batch_size),
    Row("compat/batch_size=2.0", "10", call(mb.TaskLoader, Points(1, 2, 4), batch_size=2.0), TypeError,
        r"batch_size must be an int, got 2.0 \(float\)"),
    Row("ints/num_workers=1.0", "10", call(mb.task_loader, T.sinusoid, CULPRIT_SPECS, num_workers=1.0), TypeError,
        r"task_loader\(\): num_workers must be an int, got 1.0 \(float\)"),
    Row("ints/num_workers=-1", "10", call(mb.task_loader, T.sinusoid, CULPRIT_SPECS, num_workers=-1), ValueError,
        r"num_workers must be >= 0, got -1"),
    Row("ints/batch_specs-num_tasks=10.0", "10", bad_specs(0, 10.0, 2, 1, 1), TypeError,
        r"batch_specs\(\): num_tasks must be an int, got 10.0 \(float\)"),
    Row("ints/batch_specs-shuffle='yes'", "10", bad_specs(0, 10, 2, 1, 1, shuffle="yes"), TypeError,
        r"shuffle must be True or False"),
    Row("ints/key(1.5)", "10", call(mb.random.key, 1.5), TypeError, r"key\(\): seed must be an int, got 1.5"),
    Row("ints/split(key, 0)", "10", call(mb.random.split, mb.random.key(0), 0), ValueError,
        r"split\(\): num must be >= 1, got 0"),
    Row("ints/fold_in(key, -1)", "10", call(mb.random.fold_in, mb.random.key(0), -1), ValueError,
        r"fold_in\(\): data must lie in \[0, 2\*\*64\), got -1"),
]

# Rows that start processes of their own or wait on torch's 5-second worker checks.
_SLOW = ("shm/", "distributed/", "handled/SIG", "handled/checkpoint-c", "handled/sample_task-raises/spawn",
         "handled/hang", "loader/worker-sys.exit(0)", "loader/worker-KeyboardInterrupt")
ROWS = [row._replace(slow=row.id.startswith(_SLOW)) for row in ROWS]


def _message(err: BaseException | None) -> str:
    if err is None:
        return ""
    return "\n".join([str(err), *getattr(err, "__notes__", [])])


@pytest.mark.parametrize("row", [pytest.param(row, id=row.id, marks=[pytest.mark.slow] if row.slow else [])
                                 for row in ROWS])
def test_fault(row, clean):
    try:
        row.run(clean)
        got = None
    except Exception as err:  # noqa: BLE001 - the row says what it expects
        got = (type(err), _message(err), _message(err.__cause__), "".join(traceback.format_exception(err)))
        traceback.clear_frames(err.__traceback__)  # let go of loaders and their workers
        del err
    if row.raises is None:
        assert got is None, got[3]
        return
    assert got is not None, f"{row.id}: nothing was raised; expected {row.raises.__name__}"
    kind, message, cause, text = got
    assert issubclass(kind, row.raises), text
    assert re.search(row.words, message, re.DOTALL), f"{row.words!r} not in:\n{message}"
    if row.cause:
        assert re.search(row.cause, cause), f"cause {row.cause!r} not in {cause!r}"


def test_every_item_of_the_issue_that_is_ours_has_rows():
    assert {row.item for row in ROWS} >= {"1", "4", "5", "6", "9", "10", "handled"}
    assert len({row.id for row in ROWS}) == len(ROWS)


def test_arrived_reads_results_without_unpickling_them():
    """After a worker died, the results already sent are told apart from the batch it was building."""
    import multiprocessing
    import queue

    from metabatch import loader

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never run",))

    class Iterator:
        pass

    it = Iterator()
    it._worker_result_queue = it._data_queue = multiprocessing.get_context("fork").Queue()
    for item in ((4, Evil()), (2**40, "x"), (7, None)):
        it._data_queue.put(item)
    got, deadline = set(), time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:  # (the queue's feeder thread writes them)
        got |= loader._arrived(it)
        time.sleep(0.05)
    assert got == {4, 2**40, 7}
    it._data_queue.close()
    it._data_queue.join_thread()
    it._data_queue = queue.Queue()  # with pin_memory: the pin thread's queue of (idx, batch)
    for idx in (3, 5):
        it._data_queue.put((idx, object()))
    assert loader._arrived(it) == {3, 5}
