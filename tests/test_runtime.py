import os
import pathlib
import subprocess
import sys

import pytest
import torch

import metabatch as mb
from metabatch import runtime


def _thp_setting() -> str:
    try:
        return pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "[never]"


def test_default_threads_leaves_a_core_per_worker(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_count", lambda: 8)
    assert [runtime.default_threads(w) for w in (0, 1, 2, 7, 8, 20)] == [8, 7, 6, 1, 1, 1]


def test_cpu_count_respects_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(runtime, "_cgroup_cpus", lambda: 1.5)
    assert runtime.cpu_count() == min(2, len(__import__("os").sched_getaffinity(0)))
    monkeypatch.setattr(runtime, "_cgroup_cpus", lambda: None)
    assert runtime.cpu_count() == len(__import__("os").sched_getaffinity(0))


def test_use_threads_sets_and_returns_previous(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert mb.runtime.use_threads(1) == before
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(runtime, "cpu_count", lambda: 3)
        assert mb.runtime.use_threads(num_workers=1) == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: runtime.default_threads(-1), ValueError, "num_workers must be >= 0, got -1"),
    (lambda: runtime.default_threads(1.0), TypeError, "num_workers must be an int, got 1.0"),
    (lambda: runtime.use_threads(0), ValueError, "threads must be >= 1, got 0"),
    (lambda: runtime.use_threads("2"), TypeError, "threads must be an int, got '2'"),
])
def test_bad_arguments(call, exc, words):
    before = torch.get_num_threads()
    with pytest.raises(exc, match=words):
        call()
    assert torch.get_num_threads() == before


PROBE = """
import os, torch, metabatch
x = torch.empty(2 ** 24)
x.fill_(1.0)
huge, inside = 0, False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= x.data_ptr() < hi
    elif inside and head == "AnonHugePages:":
        huge = int(line.split()[1])
print(os.environ["THP_MEM_ALLOC_ENABLE"], huge > 0)
"""


def _probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists()
                    or "[never]" in _thp_setting(), reason="needs Linux with transparent huge pages")
def test_import_turns_on_huge_pages_for_large_tensors_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert _probe(env) == ["1", "True"]  # torch took it up: the 64 MB tensor sits on huge pages
    assert _probe({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == ["0", "False"]
