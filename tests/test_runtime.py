import pytest
import torch

import metabatch as mb
from metabatch import runtime


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
