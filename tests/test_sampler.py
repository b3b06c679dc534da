import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metabatch as mb

# Golden values: the first specs of seed 0. A change here silently changes every user's stream.
GOLDEN = [((8, 1, 0, 4), 3, 3), ((7, 5, 2, 3), 4, 6), ((6, 9, 3, 6), 5, 9), ((1, 2, 7, 9), 2, 7)]


def specs0(**kw):
    args = dict(seed=0, num_tasks=10, batch_size=4, n_ctx=(1, 5), n_tgt=(1, 10))
    args.update(kw)
    return mb.batch_specs(**args)


def test_golden_specs():
    s = specs0()
    got = [(spec.indices, spec.n_ctx, spec.n_tgt) for spec in (s[0], s[1], s[2], s[3])]
    assert got == GOLDEN
    assert s[0].key == mb.random.fold_in(mb.random.split(mb.random.key(0), 3)[0], 0)


def test_specs_are_a_pure_function_of_seed_and_step():
    a, b = specs0(), specs0()
    for step in (5, 0, 17, 3):  # any order: random access
        assert a[step] == b[step]
    assert specs0(seed=1)[0] != a[0]
    assert [s.step for s in specs0(num_batches=3)] == [0, 1, 2]


def test_iteration_from_start_is_the_tail():
    full = list(specs0(num_batches=12))
    assert list(specs0(num_batches=12, start=7)) == full[7:]
    assert len(specs0(num_batches=12, start=7)) == 5
    endless = iter(specs0())
    assert [next(endless) for _ in range(12)] == full


@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**32), st.booleans())
@settings(max_examples=60, deadline=None)
def test_every_task_once_per_epoch(num_tasks, batch_size, seed, shuffle):
    specs = mb.batch_specs(seed, num_tasks, batch_size, 1, 1, shuffle=shuffle)
    stream = [i for step in range(-(-3 * num_tasks // batch_size)) for i in specs[step].indices]
    for e in range(3):
        epoch = stream[e * num_tasks:(e + 1) * num_tasks]
        if len(epoch) == num_tasks:
            assert sorted(epoch) == list(range(num_tasks))
            if not shuffle:
                assert epoch == list(range(num_tasks))


def test_epochs_are_reshuffled():
    s = specs0(num_tasks=8, batch_size=8)
    assert s[0].indices != s[1].indices
    assert sorted(s[0].indices) == sorted(s[1].indices) == list(range(8))


@given(st.integers(0, 2**32), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))
@settings(max_examples=60, deadline=None)
def test_sizes_in_range_and_shared(seed, a, b, c):
    lo, hi = min(a, b), max(a, b)
    specs = mb.batch_specs(seed, 5, 3, (lo, hi), c)
    for step in range(5):
        assert lo <= specs[step].n_ctx <= hi
        assert specs[step].n_tgt == c


def test_sizes_cover_the_range():
    s = specs0()
    seen = {s[k].n_ctx for k in range(300)}
    assert seen == {1, 2, 3, 4, 5}
    assert {s[k].n_tgt for k in range(300)} == set(range(1, 11))


@given(st.integers(0, 2**32), st.sampled_from([(4, 1), (4, 2), (4, 4), (12, 3), (6, 2)]), st.integers(1, 30))
@settings(max_examples=40, deadline=None)
def test_ranks_partition_the_global_batch(seed, bw, num_tasks):
    batch_size, world = bw
    single = mb.batch_specs(seed, num_tasks, batch_size, (1, 5), (2, 4))
    ranks = [mb.batch_specs(seed, num_tasks, batch_size, (1, 5), (2, 4), rank=r, world_size=world)
             for r in range(world)]
    for step in (0, 1, 7):
        parts = [r[step] for r in ranks]
        assert sum((p.indices for p in parts), ()) == single[step].indices
        assert all(p.key == single[step].key for p in parts)
        assert all((p.n_ctx, p.n_tgt) == (single[step].n_ctx, single[step].n_tgt) for p in parts)
        assert [p.offset for p in parts] == [r * (batch_size // world) for r in range(world)]
        keys = [k for p in parts for k in p.task_keys()]
        assert keys == list(single[step].task_keys())


def test_straddling_and_small_datasets():
    s = mb.batch_specs(0, num_tasks=3, batch_size=7, n_ctx=1, n_tgt=1, shuffle=False)
    assert s[0].indices == (0, 1, 2, 0, 1, 2, 0)
    assert s[1].indices == (1, 2, 0, 1, 2, 0, 1)


@pytest.mark.parametrize("kw, name", [
    (dict(n_ctx=(5, 2)), "n_ctx"), (dict(n_tgt=-1), "n_tgt"), (dict(n_ctx=(-1, 3)), "n_ctx"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-3), "batch_size"),
    (dict(num_tasks=0), "num_tasks"), (dict(rank=2, world_size=2), "rank"),
    (dict(world_size=3), "world_size"), (dict(world_size=0), "world_size"), (dict(seed=-1), "seed"),
    (dict(start=5, num_batches=3), "start"), (dict(rank=-1), "rank"),
])
def test_bad_arguments_raise_value_error_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        specs0(**kw)


@pytest.mark.parametrize("kw, name", [(dict(n_ctx=(1, 2, 3)), "n_ctx"), (dict(n_tgt=2.5), "n_tgt"),
                                      (dict(batch_size=True), "batch_size"), (dict(seed="0"), "seed")])
def test_bad_types_raise_type_error(kw, name):
    with pytest.raises(TypeError, match=name):
        specs0(**kw)


def test_indexing_errors():
    s = specs0(num_batches=3)
    with pytest.raises(IndexError, match="past the end"):
        s[3]
    with pytest.raises(IndexError):
        s[-1]
    with pytest.raises(TypeError, match="infinite"):
        len(specs0())


def test_replace_resumes():
    s = specs0(num_batches=10)
    assert list(s.replace(start=4)) == list(s)[4:]
    assert s.replace(seed=3)[0] == specs0(seed=3, num_batches=10)[0]
    assert "seed=0" in repr(s)


def test_numpy_ints_accepted():
    assert specs0(seed=np.int64(0), batch_size=np.int32(4))[0] == specs0()[0]
