"""Spawn and forkserver workers: what they cannot import is caught in the main process, with the fix.

Each case is a real program run in a fresh interpreter (a script file, ``python -c``, stdin), because what
a worker can import depends on how the main program was started. Before these checks, every case here
ended in "DataLoader worker (pid(s) …) exited unexpectedly" or multiprocessing's "bootstrapping phase"
RuntimeError.
"""

import multiprocessing
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import metabatch as mb
from metabatch import _spawn
from tests import tasks_for_tests as T

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUARD = 'if __name__ == "__main__":'

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception in thread QueueFeederThread:pytest.PytestUnhandledThreadExceptionWarning")

HEAD = """\
import functools
import numpy as np
import torch
import metabatch as mb

def specs():
    return mb.batch_specs(0, num_tasks=10, batch_size=2, n_ctx=1, n_tgt=1, num_batches=2)
"""

TASK = """\
def sample_task(key, idx, n_ctx, n_tgt):
    return mb.random.numpy_rng(key).uniform(size=(n_ctx,))
"""


def run(code: str, tmp_path, how: str = "file"):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = dict(cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    if how == "file":
        script = tmp_path / "prog.py"
        script.write_text(code)
        return subprocess.run([sys.executable, str(script)], stdin=subprocess.DEVNULL, **args)
    if how == "-c":
        return subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, **args)
    return subprocess.run([sys.executable, "-"], input=code, **args)


def indent(code: str) -> str:
    return textwrap.indent(code, "    ")


def loop(task: str = "sample_task", method: str = "spawn", maker: str = "mb.task_loader") -> str:
    return (f"print('batches', len(list({maker}({task}, specs(), num_workers=1, "
            f"multiprocessing_context={method!r}))))\n")


def assert_caught(out, error: str, *needles: str):
    text = out.stderr
    assert out.returncode != 0, out.stdout
    assert "exited unexpectedly" not in text and "bootstrapping phase" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(error + ":"), text[-3000:]
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_task_defined_under_the_main_guard_is_caught(tmp_path, method):
    out = run(HEAD + GUARD + "\n" + indent(TASK + loop(method=method)), tmp_path)
    assert_caught(out, "TypeError", "task_loader(): sample_task is __main__.sample_task", f"'{method}'",
                  str(tmp_path / "prog.py"), GUARD, "define it at the top level of the script")


def test_partial_of_a_guarded_function_is_caught(tmp_path):
    body = TASK + loop("functools.partial(sample_task)")
    out = run(HEAD + GUARD + "\n" + indent(body), tmp_path)
    assert_caught(out, "TypeError", "sample_task=functools.partial(", "refers to __main__.sample_task",
                  "'spawn'", GUARD)


def test_dataset_class_under_the_guard_is_caught(tmp_path):
    dataset = """\
class Squares(torch.utils.data.Dataset):
    def __getitem__(self, spec):
        return mb.loader.Tasks(spec, [np.full(spec.n_ctx, i * i) for i in spec.indices])
"""
    out = run(HEAD + GUARD + "\n" + indent(dataset + loop("Squares()", maker="mb.TaskDataLoader")), tmp_path)
    assert_caught(out, "TypeError", "TaskDataLoader(): dataset=", "refers to __main__.Squares", "'spawn'")


def test_legacy_taskset_under_the_guard_is_caught(tmp_path):
    taskset = """\
class Points(mb.TaskSet):
    def __len__(self):
        return 10
    def __gettask__(self, idx, n_context, n_target):
        return np.zeros(n_context)
print(len(list(mb.TaskLoader(Points(1, 2, 3), batch_size=2, num_workers=1, multiprocessing_context="spawn"))))
"""
    out = run(HEAD + GUARD + "\n" + indent(taskset), tmp_path)
    assert_caught(out, "TypeError", "TaskLoader(): dataset=", "refers to __main__.Points", "'spawn'")


@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_task_in_a_main_without_file_is_caught(tmp_path, how):
    out = run(HEAD + TASK + loop(), tmp_path, how=how)
    assert_caught(out, "TypeError", "sample_task is __main__.sample_task", "__main__ has no file", "'spawn'",
                  "put it in a .py module")


def test_stdin_main_is_caught_even_with_an_importable_task(tmp_path):
    out = run(HEAD + "from tests.tasks_for_tests import sinusoid\n" + loop("sinusoid"), tmp_path, how="stdin")
    assert_caught(out, "RuntimeError", "read from '<stdin>'", "'spawn'", "save the script as a .py file")
    # python -c has no main file to run: an importable task works there
    ok = run(HEAD + "from tests.tasks_for_tests import sinusoid\n" + loop("sinusoid"), tmp_path, how="-c")
    assert ok.returncode == 0 and "batches 2" in ok.stdout, ok.stderr[-3000:]


def test_loop_at_the_top_level_of_a_script_is_caught(tmp_path):
    out = run(HEAD + TASK + loop(), tmp_path)
    assert_caught(out, "RuntimeError", "iterated at the top level of", "(line 10)", GUARD, "'spawn'")


def test_main_called_without_guard_is_caught_at_its_call(tmp_path):
    out = run(HEAD + TASK + "def main():\n" + indent(loop()) + "main()\n", tmp_path)
    assert_caught(out, "RuntimeError", "(line 12)", GUARD)


def test_a_guarded_script_with_a_top_level_task_runs(tmp_path):
    body = (HEAD + TASK + "if True:\n    def helper(): pass\n" + GUARD + "\n"
            + indent(loop("functools.partial(sample_task)")))
    out = run(body, tmp_path)
    assert out.returncode == 0 and "batches 2" in out.stdout, out.stderr[-3000:]


def test_a_worker_still_importing_the_main_script_names_the_fix(monkeypatch):
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    loader = mb.task_loader(T.sinusoid, mb.batch_specs(0, 4, 2, 1, 1, num_batches=1), num_workers=1)
    with pytest.raises(RuntimeError, match="still importing the main script.*__name__ == \"__main__\""):
        next(iter(loader))


def test_fork_and_no_workers_are_not_checked(tmp_path):
    body = HEAD + GUARD + "\n" + indent(TASK + loop(method="fork") + "print('batches', len(list("
                                         "mb.task_loader(sample_task, specs()))))\n")
    out = run(body, tmp_path)
    assert out.returncode == 0 and out.stdout.count("batches 2") == 2, out.stderr[-3000:]


@pytest.mark.parametrize("source, names, guards", [
    ("import os.path as p, sys\nfrom x import y as z\n", {"p", "sys", "z"}, []),
    ("a = b = 1\nfor i in []: pass\nwith open(f) as fh: pass\n", {"a", "b", "i", "fh"}, []),
    ("try:\n    import q\nexcept ImportError:\n    def q(): pass\n", {"q"}, []),
    (f"def f(): pass\n{GUARD}\n    def g(): pass\n    h = 1\nelse:\n    k = 2\n", {"f", "k"}, [(3, 4)]),
    ("if '__main__' == __name__:\n    g = 1\nclass C: pass\n", {"C"}, [(2, 2)]),
])
def test_names_bound_at_import(tmp_path, source, names, guards):
    path = tmp_path / "script.py"
    path.write_text(source)
    assert _spawn._script(str(path)) == (names, guards)
