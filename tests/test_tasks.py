import functools
import math
import pickle

import numpy as np
import optree
import pytest
import torch

import metabatch as mb
from metabatch import tasks

# Tiny synthetic class arrays (no global RNG: a seeded Generator).
_RNG = np.random.default_rng(0)
IMAGES = _RNG.integers(0, 256, size=(12, 8, 6, 6), dtype=np.uint8)      # 12 classes, 8 examples, 6x6
FEATURES = _RNG.standard_normal((7, 5, 3)).astype(np.float32)           # 7 classes, 5 examples, 3 features
CHANNELS = _RNG.random((6, 5, 2, 5, 5))                                  # float64 (C, H, W) items
# Classes of different sizes, examples out of class order: class c holds examples whose pixels are all c.
RAGGED_LABELS = _RNG.permutation(np.repeat([4, 9, 2, 7], [7, 6, 6, 5]))  # 24 examples: 4: 7, 9: 6, 2: 6, 7: 5
RAGGED = np.broadcast_to(RAGGED_LABELS[:, None, None].astype(np.uint8), (24, 4, 4)).copy()


def _families():
    return {
        "sinusoid": tasks.sinusoid,
        "sinusoid-info": functools.partial(tasks.sinusoid, info=True),
        "gp": tasks.gp(),
        "gp-ranges": tasks.gp(length_scale=(0.2, 1.0), output_scale=(0.5, 2.0), noise=0.1, info=True),
        "classification": tasks.classification(IMAGES, ways=5, rotate=True, info=True),
        "classification-features": tasks.classification(FEATURES, ways=3, shuffle=True),
        "classification-channels": tasks.classification(CHANNELS, ways=2, rotate=True),
        "classification-labels": tasks.classification(RAGGED, ways=3, labels=RAGGED_LABELS, rotate=True,
                                                       info=True),
    }


FAMILIES = _families()
NAMES = sorted(FAMILIES)


def leaves(task):
    return [np.asarray(x) for x in optree.tree_leaves(task)]


def same(a, b) -> bool:
    if optree.tree_structure(a) != optree.tree_structure(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
               for x, y in zip(leaves(a), leaves(b), strict=True))


# -- the contract every family passes --------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_same_key_same_task(name, key):
    f = FAMILIES[name]
    assert same(f(key, 0, 1, 2), f(key, 0, 1, 2))


@pytest.mark.parametrize("name", NAMES)
def test_different_keys_different_tasks(name, key):
    f = FAMILIES[name]
    a, b = f(key, 0, 1, 2), f(mb.random.fold_in(key, 1), 0, 1, 2)
    assert not same(a, b)
    assert not np.array_equal(a["target"][0], b["target"][0])


@pytest.mark.parametrize("name", NAMES)
def test_idx_is_ignored(name, key):
    f = FAMILIES[name]
    assert same(f(key, 0, 2, 1), f(key, 12345, 2, 1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_ctx, n_tgt", [(1, 1), (3, 0), (0, 2), (2, 3)])
def test_shapes_follow_n_ctx_n_tgt(name, n_ctx, n_tgt, key):
    f = FAMILIES[name]
    task = f(key, 0, n_ctx, n_tgt)
    (xc, yc), (xt, yt) = task["context"], task["target"]
    ways = getattr(f, "ways", 1)
    assert len(xc) == len(yc) == ways * n_ctx and len(xt) == len(yt) == ways * n_tgt
    assert xc.shape[1:] == xt.shape[1:] and xc.dtype == xt.dtype == np.float32
    if isinstance(f, tasks.Classification):
        assert yc.dtype == yt.dtype == np.int64 and yc.ndim == 1
    else:
        assert xc.shape[1:] == yc.shape[1:] == (1,) and yc.dtype == np.float32


@pytest.mark.parametrize("name", NAMES)
def test_inputs_unchanged(name, key):
    before = [IMAGES.copy(), FEATURES.copy(), CHANNELS.copy()]
    f = FAMILIES[name]
    task = f(key, 0, 2, 3)
    for leaf in leaves(task):  # outputs own their memory: writing to them touches no input
        leaf[...] = 0
    f(key, 0, 2, 3)
    assert all(np.array_equal(a, b) for a, b in zip(before, [IMAGES, FEATURES, CHANNELS], strict=True))
    assert IMAGES.flags.writeable


@pytest.mark.parametrize("name", NAMES)
def test_picklable(name, key):
    f = FAMILIES[name]
    assert same(pickle.loads(pickle.dumps(f))(key, 0, 2, 2), f(key, 0, 2, 2))


def test_task_loader_workers_match_in_process():
    for name in NAMES:
        f = FAMILIES[name]
        specs = mb.batch_specs(seed=3, num_tasks=50, batch_size=4, n_ctx=(1, 2), n_tgt=(1, 3), num_batches=3)
        ref = list(mb.task_loader(f, specs))
        got = list(mb.task_loader(f, specs, num_workers=2))
        assert len(got) == 3
        for a, b in zip(ref, got, strict=True):
            assert optree.tree_structure(a) == optree.tree_structure(b), name
            for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
                assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("name", NAMES)
def test_bad_sizes(name, key):
    f = FAMILIES[name]
    with pytest.raises(ValueError, match=r"\(\): n_ctx must be >= 0, got -1"):
        f(key, 0, -1, 2)
    with pytest.raises(TypeError, match=r"\(\): n_ctx must be an int, got 1.5"):
        f(key, 0, 1.5, 2)
    with pytest.raises(ValueError, match=r"n_tgt must be <= 1099511627776, got 18446744073709551616"):
        f(key, 0, 1, 2**64)


# -- sinusoid ----------------------------------------------------------------------------------------

def test_sinusoid_golden_stream(key):
    task = tasks.sinusoid(key, 0, 2, 1, info=True)
    assert task["info"]["amplitude"] == np.float32(0.37091798)
    assert task["info"]["phase"] == np.float32(1.194224)
    assert task["context"][0][:, 0].tolist() == pytest.approx([-2.9343557, -3.0856822], abs=1e-7)
    assert task["target"][0][0, 0] == pytest.approx(4.354221, abs=1e-6)


def test_sinusoid_is_a_sine_wave(key):
    task = tasks.sinusoid(key, 0, 10, 20, info=True)
    a, p = float(task["info"]["amplitude"]), float(task["info"]["phase"])
    for x, y in (task["context"], task["target"]):
        np.testing.assert_allclose(y, a * np.sin(x.astype(np.float64) + p), atol=1e-5)


def test_sinusoid_default_output_is_minimal(key):
    assert set(tasks.sinusoid(key, 0, 1, 1)) == {"context", "target"}


def test_sinusoid_parameter_ranges():
    root = mb.random.key(1)
    infos = [tasks.sinusoid(mb.random.fold_in(root, i), 0, 0, 5, info=True) for i in range(2000)]
    amp = np.array([t["info"]["amplitude"] for t in infos])
    phase = np.array([t["info"]["phase"] for t in infos])
    x = np.concatenate([t["target"][0] for t in infos])
    assert 0.1 <= amp.min() < 0.15 and 4.95 < amp.max() <= 5.0
    assert 0.0 <= phase.min() < 0.01 and math.pi - 0.01 < phase.max() <= math.pi
    assert -5.0 <= x.min() < -4.99 and 4.99 < x.max() <= 5.0
    assert abs(amp.mean() - 2.55) < 0.1 and abs(phase.mean() - math.pi / 2) < 0.06


def test_sinusoid_custom_ranges(key):
    task = tasks.sinusoid(key, 0, 3, 3, amplitude=(1.0, 1.0), phase=(0.0, 0.0), x_range=(0.0, 1.0))
    x, y = task["context"]
    assert (0 <= x).all() and (x <= 1).all()
    np.testing.assert_allclose(y, np.sin(x), atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        tasks.sinusoid(key, 0, 1, 1, amplitude=(5.0, 0.1))
    with pytest.raises(TypeError, match="pair"):
        tasks.sinusoid(key, 0, 1, 1, phase=3.0)


# -- gp ----------------------------------------------------------------------------------------------

def test_gp_golden_stream(key):
    task = tasks.gp()(key, 0, 1, 1)
    assert task["context"][0][0, 0] == pytest.approx(-1.7788424, abs=1e-6)
    assert task["context"][1][0, 0] == pytest.approx(1.111226, abs=1e-5)


def test_gp_context_and_target_lie_on_one_function():
    # A length scale far above the input range makes each function nearly constant,
    # so every point of a task, context or target, shows that task's level.
    sample = tasks.gp(length_scale=1000.0, noise=0.0)
    root = mb.random.key(2)
    levels, spread = [], []
    for i in range(200):
        task = sample(mb.random.fold_in(root, i), 0, 5, 5)
        y = np.concatenate([task["context"][1], task["target"][1]])
        levels.append(y.mean())
        spread.append(np.ptp(y))
    assert max(spread) < 0.03  # the 1e-6 jitter alone moves points by ~1e-3
    assert 0.7 < np.std(levels) < 1.3  # the levels themselves vary with output_scale 1


def test_gp_marginal_variance():
    sample = tasks.gp(output_scale=2.0, noise=0.5)
    root = mb.random.key(3)
    y = np.array([sample(mb.random.fold_in(root, i), 0, 1, 0)["context"][1][0, 0] for i in range(3000)])
    assert abs(y.var() / (4.0 + 0.25) - 1) < 0.1


def test_gp_ranges_drawn_per_task():
    sample = tasks.gp(length_scale=(0.1, 0.2), output_scale=(1.0, 3.0), x_range=(5.0, 6.0), info=True)
    root = mb.random.key(4)
    for i in range(50):
        task = sample(mb.random.fold_in(root, i), 0, 4, 4)
        assert 0.1 <= task["info"]["length_scale"] <= 0.2
        assert 1.0 <= task["info"]["output_scale"] <= 3.0
        assert ((5 <= task["target"][0]) & (task["target"][0] <= 6)).all()


def test_gp_many_points_without_noise_stay_finite(key):
    task = tasks.gp(noise=0.0)(key, 0, 100, 400)
    assert np.isfinite(task["target"][1]).all()


def test_gp_repr_and_errors():
    assert "length_scale=(0.6, 0.6)" in repr(tasks.gp())
    with pytest.raises(ValueError, match="length_scale"):
        tasks.gp(length_scale=0.0)
    with pytest.raises(ValueError, match="noise"):
        tasks.gp(noise=-0.1)
    with pytest.raises(ValueError, match="empty"):
        tasks.gp(x_range=(2.0, -2.0))
    with pytest.raises(TypeError, match="output_scale"):
        tasks.gp(output_scale="1")


# -- classification ------------------------------------------------------------------------------------

def test_classification_golden_stream(key):
    info = tasks.classification(IMAGES, ways=5, rotate=True, info=True)(key, 0, 1, 2)["info"]
    assert info["classes"].tolist() == [4, 1, 2, 3, 0]
    assert info["rotations"].tolist() == [3, 0, 1, 3, 1]


def test_classification_labels_grouped_by_class(key):
    task = tasks.classification(IMAGES, ways=4)(key, 0, 2, 3)
    assert task["context"][1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert task["target"][1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def _source(classes, label_class, turns, image):
    """The examples of ``label_class`` (rotated by ``turns``) that ``image`` equals."""
    rotated = np.rot90(classes[label_class], turns, axes=(-2, -1)).astype(np.float32) / 255
    return [e for e in range(len(rotated)) if np.array_equal(rotated[e], image)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_classification_every_image_comes_from_its_labels_rotated_class(shuffle):
    sample = tasks.classification(IMAGES, ways=5, rotate=True, shuffle=shuffle, info=True)
    root = mb.random.key(5)
    for i in range(20):
        task = sample(mb.random.fold_in(root, i), 0, 3, 4)
        classes, turns = task["info"]["classes"], task["info"]["rotations"]
        assert len(set(classes.tolist())) == 5
        used = {}
        for x, y in (task["context"], task["target"]):
            assert sorted(np.bincount(y, minlength=5).tolist()) == [len(y) // 5] * 5
            for image, label in zip(x, y, strict=True):
                found = _source(IMAGES, classes[label], turns[label], image[0])
                assert len(found) == 1
                used.setdefault(int(label), []).append(found[0])
        for examples in used.values():  # 3 + 4 distinct examples per class
            assert len(set(examples)) == 7


def test_classification_rotations_and_label_order_vary():
    sample = tasks.classification(IMAGES, ways=5, rotate=True, info=True)
    root = mb.random.key(6)
    infos = [sample(mb.random.fold_in(root, i), 0, 1, 1)["info"] for i in range(200)]
    turns = np.concatenate([i["rotations"] for i in infos])
    assert set(turns.tolist()) == {0, 1, 2, 3} and 0.2 < (turns == 0).mean() < 0.3
    first = [i["classes"][0] for i in infos]
    assert len(set(first)) == 12  # any class can get label 0
    assert sum(list(i["classes"]) == sorted(i["classes"]) for i in infos) < 10


def test_classification_without_rotation(key):
    task = tasks.classification(IMAGES, ways=3, info=True)(key, 0, 1, 1)
    assert task["info"]["rotations"].tolist() == [0, 0, 0]
    c = task["info"]["classes"]
    for label in range(3):
        assert _source(IMAGES, c[label], 0, task["context"][0][label, 0])


def test_classification_values(key):
    images = np.zeros((3, 2, 4, 4), np.uint8)
    images[:, :, 0, 0] = 255
    images[:, :, 1, 1] = 51
    x = tasks.classification(images, ways=3)(key, 0, 1, 1)["context"][0]
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(x).tolist()) == {0.0, np.float32(0.2), 1.0}
    floats = tasks.classification(FEATURES, ways=3, info=True)(key, 0, 1, 1)
    c = floats["info"]["classes"]
    assert any(np.array_equal(floats["context"][0][0], FEATURES[c[0], e]) for e in range(5))
    bools = tasks.classification(images > 100, ways=2)(key, 0, 1, 1)["target"][0]
    assert bools.dtype == np.float32 and set(np.unique(bools).tolist()) == {0.0, 1.0}


def test_classification_item_shapes(key):
    assert tasks.classification(IMAGES, 2)(key, 0, 1, 1)["context"][0].shape == (2, 1, 6, 6)
    assert tasks.classification(IMAGES, 2, channel_dim=False)(key, 0, 1, 1)["context"][0].shape == (2, 6, 6)
    assert tasks.classification(CHANNELS, 2)(key, 0, 1, 1)["context"][0].shape == (2, 2, 5, 5)
    assert tasks.classification(FEATURES, 2)(key, 0, 1, 1)["context"][0].shape == (2, 3)


def test_classification_accepts_tensors(key):
    from_tensor = tasks.classification(torch.from_numpy(IMAGES), ways=3, rotate=True)
    assert same(from_tensor(key, 0, 2, 2), tasks.classification(IMAGES, 3, rotate=True)(key, 0, 2, 2))


def test_classification_keeps_a_read_only_view_and_pickles_it_once(key):
    sample = tasks.classification(IMAGES, ways=2)
    assert np.shares_memory(sample.classes, IMAGES) and not sample.classes.flags.writeable
    assert IMAGES.nbytes < len(pickle.dumps(sample)) < IMAGES.nbytes + 1000
    assert "uint8 array (12, 8, 6, 6)" in repr(sample)


def test_classification_errors(key):
    with pytest.raises(ValueError, match=r"ways=13 must lie in \[1, num_classes=12\]"):
        tasks.classification(IMAGES, ways=13)
    with pytest.raises(TypeError, match="ways must be an int"):
        tasks.classification(IMAGES, ways=2.0)
    with pytest.raises(TypeError, match="dtype int32"):
        tasks.classification(IMAGES.astype(np.int32), ways=2)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        tasks.classification(IMAGES.tolist(), ways=2)
    with pytest.raises(ValueError, match="at least one item dimension"):
        tasks.classification(IMAGES[:, :, 0, 0], ways=2)
    with pytest.raises(ValueError, match="square images"):
        tasks.classification(IMAGES[:, :, :, :5], ways=2, rotate=True)
    with pytest.raises(ValueError, match="square images"):
        tasks.classification(FEATURES, ways=2, rotate=True)
    with pytest.raises(ValueError, match=r"5 \+ 4 = 9 examples per class, but each class has only 8"):
        tasks.classification(IMAGES, ways=2)(key, 0, 5, 4)


# -- classes of different sizes (labels=) ---------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"rotate": True, "info": True}, {"shuffle": True, "channel_dim": False}])
def test_labels_with_equal_sorted_classes_draw_the_rectangular_tasks(options):
    flat = IMAGES.reshape((-1,) + IMAGES.shape[2:])          # 12 classes x 8 examples, class-major
    labels = np.repeat(np.arange(12), 8)
    ragged = tasks.classification(flat, ways=5, labels=labels, **options)
    square = tasks.classification(IMAGES, ways=5, **options)
    assert ragged.order is None  # sorted labels: no sorting index kept
    for k in range(20):
        key = mb.random.key(k)
        assert same(ragged(key, 0, 2, 3), square(key, 0, 2, 3))


def test_labels_draw_distinct_examples_of_the_drawn_classes_only(key):
    sample = tasks.classification(RAGGED, ways=3, labels=RAGGED_LABELS, info=True, shuffle=True)
    assert sample.order is not None and sample.labels.tolist() == [2, 4, 7, 9]
    seen = set()
    for k in range(200):
        task = sample(mb.random.key(k), 0, 1, 2)
        drawn = task["info"]["classes"].tolist()
        assert len(set(drawn)) == 3 and set(drawn) <= {2, 4, 7, 9}
        for part, n in (("context", 1), ("target", 2)):
            x, y = task[part]
            assert x.shape == (3 * n, 1, 4, 4)
            values = np.round(x[:, 0, 0, 0] * 255).astype(int)  # the class an example came from
            assert values.tolist() == [drawn[label] for label in y.tolist()]
        seen.update(drawn)
    assert seen == {2, 4, 7, 9}
    # all 5 examples of class 7 (the smallest), and distinct ones of the others
    task = tasks.classification(np.arange(24, dtype=np.float32)[:, None], ways=4, labels=RAGGED_LABELS,
                                info=True)(key, 0, 2, 3)
    rows = np.concatenate([task["context"][0], task["target"][0]])[:, 0].astype(int)
    assert len(set(rows.tolist())) == 20 and set(np.flatnonzero(RAGGED_LABELS == 7)) <= set(rows.tolist())
    assert all(RAGGED_LABELS[r] == task["info"]["classes"][lab] for r, lab in
               zip(rows, np.concatenate([task["context"][1], task["target"][1]]), strict=True))


def test_labels_from_tensors_and_pickling(key):
    sample = tasks.classification(torch.from_numpy(RAGGED), ways=2, labels=torch.from_numpy(RAGGED_LABELS))
    same_np = tasks.classification(RAGGED, ways=2, labels=RAGGED_LABELS)
    assert same(sample(key, 0, 1, 1), same_np(key, 0, 1, 1))
    clone = pickle.loads(pickle.dumps(sample))
    assert same(clone(key, 0, 2, 1), sample(key, 0, 2, 1))
    assert "labels=<4 classes>" in repr(sample)


def test_labels_errors(key):
    sample = tasks.classification(RAGGED, ways=2, labels=RAGGED_LABELS)
    with pytest.raises(ValueError, match=r"3 \+ 3 = 6 examples per class, but class 7 has only 5 \(the fewest\)"):
        sample(key, 0, 3, 3)
    with pytest.raises(TypeError, match="labels must be an int array .*got an array of float64"):
        tasks.classification(RAGGED, ways=2, labels=RAGGED_LABELS.astype(float))
    with pytest.raises(TypeError, match="labels must be an int array .*got list"):
        tasks.classification(RAGGED, ways=2, labels=RAGGED_LABELS.tolist())
    with pytest.raises(ValueError, match=r"one entry per example: shape \(24,\), got \(23,\)"):
        tasks.classification(RAGGED, ways=2, labels=RAGGED_LABELS[1:])
    with pytest.raises(ValueError, match=r"ways=5 must lie in \[1, num_classes=4\]"):
        tasks.classification(RAGGED, ways=5, labels=RAGGED_LABELS)
    with pytest.raises(ValueError, match="with labels=, classes must have shape"):
        tasks.classification(RAGGED[:, 0, 0], ways=2, labels=RAGGED_LABELS)
    with pytest.raises(ValueError, match="square images"):
        tasks.classification(RAGGED[:, :, :3], ways=2, labels=RAGGED_LABELS, rotate=True)
