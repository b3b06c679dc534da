"""metabatch.maml: meta-gradients against an explicit per-task autograd loop, in float64."""

import inspect
import itertools

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metabatch as mb
from metabatch import maml
from metabatch import nn as mnn

T = 3  # tasks per batch


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def init(module, seed):
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def mlp(seed=0):
    return init(nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)), seed)


def conv4(seed=0, ch=3, cin=1, norm=None):
    """Conv-BN-ReLU-MaxPool x4 (16x16 -> 1x1), BN with batch statistics as in MAML."""
    norm = norm or (lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    layers = []
    for i in range(4):
        layers += [nn.Conv2d(cin if i == 0 else ch, ch, 3, padding=1), norm(ch), nn.ReLU(), nn.MaxPool2d(2)]
    return init(nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch, 3)), seed)


def classification_batch(shape, seed, n_s=4, n_q=5):
    g = gen(seed)
    s = (torch.randn(T, n_s, *shape, generator=g), torch.randint(0, 3, (T, n_s), generator=g))
    q = (torch.randn(T, n_q, *shape, generator=g), torch.randint(0, 3, (T, n_q), generator=g))
    return s, q


MODELS = {
    "mlp": (mlp, (2,)),
    "conv4": (conv4, (1, 16, 16)),
}


def at(tree, t):
    """Task ``t`` (an index or a slice) of a batched pytree."""
    return optree.tree_map(lambda x: x[t], tree)


def reference_meta_loss(loss_fn, params, support, query, steps, lr, first_order, keep=None):
    """The per-task loop that meta_loss must match: torch.autograd.grad(create_graph=True)."""
    names = list(params)
    keep = keep or {k: True for k in names}
    total = 0
    for t in range(T):
        s = at(support, t)
        q = at(query, t)
        phi = dict(params)
        for _ in range(steps):
            moving = [k for k in names if keep[k]]
            grads = torch.autograd.grad(loss_fn(phi, s), [phi[k] for k in moving], create_graph=not first_order)
            for k, g in zip(moving, grads, strict=True):
                rate = lr[k] if isinstance(lr, dict) else lr
                phi[k] = phi[k] - rate * (g.detach() if first_order else g)
        total = total + loss_fn(phi, q)
    return total / T


def leaves_of(params, lr):
    return list(params.values()) + (list(lr.values()) if isinstance(lr, dict) else [])


def assert_close_grads(got, want, tol=1e-8):
    scale = max(w.abs().max().item() for w in want)
    assert scale > 0
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        err = (g - w).abs().max().item()
        assert err <= tol * scale, f"max |error| {err:.3g} > {tol} x largest gradient entry {scale:.3g}"


def make_lr(params, kind, seed=1):
    if kind == "float":
        return 0.3
    g = gen(seed)
    return {k: (0.1 + 0.4 * torch.rand(p.shape, generator=g)).requires_grad_() for k, p in params.items()}


CASES = list(itertools.product(["mlp", "conv4"], [1, 3], [False, True], ["float", "meta-sgd"]))


@pytest.mark.parametrize("model,steps,first_order,lr_kind", CASES)
def test_meta_gradient_equals_explicit_loop(model, steps, first_order, lr_kind):
    make, shape = MODELS[model]
    net = make()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch(shape, seed=2)
    params = mnn.params(net)
    lr = make_lr(params, lr_kind)

    want = torch.autograd.grad(reference_meta_loss(loss_fn, params, support, query, steps, lr, first_order),
                               leaves_of(params, lr))
    # Ordinary autograd into nn.Parameters (and the Meta-SGD rates).
    loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, lr=lr, first_order=first_order)
    got = torch.autograd.grad(loss, leaves_of(params, lr))
    assert_close_grads(got, want)
    # torch.func.grad over the same function.
    plain = {k: p.detach() for k, p in params.items()}
    rates = {k: r.detach() for k, r in lr.items()} if isinstance(lr, dict) else lr
    fgrad = torch.func.grad(
        lambda p, r: maml.meta_loss(loss_fn, p, support, query, steps=steps, lr=r, first_order=first_order),
        argnums=(0, 1) if isinstance(lr, dict) else 0)(plain, rates)
    if isinstance(lr, dict):
        fgrad = list(fgrad[0].values()) + list(fgrad[1].values())
    else:
        fgrad = list(fgrad.values())
    assert_close_grads(fgrad, want)


def test_backward_fills_parameter_grads_and_an_optimizer_steps():
    net = conv4()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    maml.meta_loss(loss_fn, mnn.params(net), support, query, steps=2, lr=0.4).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


def finite_difference(f, tensor, index, eps=1e-6):
    with torch.no_grad():
        old = tensor[index].item()
        tensor[index] = old + eps
        up = f().item()
        tensor[index] = old - eps
        down = f().item()
        tensor[index] = old
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_agrees_with_finite_differences(first_order):
    # FOMAML's gradient is not the derivative of the meta-loss: only second order is checked by FD.
    net = conv4(seed=4)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=5)
    params = mnn.params(net)

    def f():
        return maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.3)

    grads = dict(zip(params, torch.autograd.grad(f(), list(params.values())), strict=True))
    if first_order:
        fo = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.3, first_order=True)
        fo_grads = torch.autograd.grad(fo, list(params.values()))
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(fo_grads, grads.values(), strict=True))
        return
    for name, index in [("0.weight", (0, 0, 1, 1)), ("0.weight", (2, 0, 0, 2)), ("1.weight", (1,)),
                        ("4.weight", (1, 2, 0, 0)), ("17.bias", (2,))]:
        fd = finite_difference(f, params[name], index)
        assert grads[name][index].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), name


@pytest.mark.parametrize("steps", [1, 2])
def test_batch_norm_meta_gradient_is_exact(steps):
    """The known trap: stock vmap rules get BN's second-order term wrong; metabatch does not."""
    net = conv4(seed=6)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=7)
    params = mnn.params(net)
    want = torch.autograd.grad(reference_meta_loss(loss_fn, params, support, query, steps, 0.4, False),
                               list(params.values()))
    got = torch.autograd.grad(maml.meta_loss(loss_fn, params, support, query, steps=steps, lr=0.4),
                              list(params.values()))
    assert_close_grads(got, want)
    # The first conv weight is where the stock rules are furthest off.
    fd = finite_difference(lambda: maml.meta_loss(loss_fn, params, support, query, steps=steps, lr=0.4),
                           params["0.weight"], (1, 0, 2, 1))
    assert got[0][1, 0, 2, 1].item() == pytest.approx(fd, rel=1e-5)


@pytest.mark.xfail(strict=True, reason="pytorch/functorch#534: vmap's batch-norm backward rule drops the "
                                       "second-order terms through the batch statistics. When this passes, "
                                       "PyTorch fixed it: see docs/sharp-bits.md.")
def test_stock_batching_rules_get_batch_norm_meta_gradient_wrong():
    net = conv4(seed=6)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=7)
    params = mnn.params(net)
    want = torch.autograd.grad(reference_meta_loss(loss_fn, params, support, query, 1, 0.4, False),
                               list(params.values()))
    got = torch.autograd.grad(maml.meta_loss(loss_fn, params, support, query, lr=0.4, batch_rules=False),
                              list(params.values()))
    assert_close_grads(got, want, tol=1e-6)


NORMS = {
    "layer_norm": lambda c, hw: nn.LayerNorm([c, hw, hw]),
    "group_norm": lambda c, hw: nn.GroupNorm(1, c),
    "instance_norm": lambda c, hw: nn.InstanceNorm2d(c, affine=True),
    "batch_norm_no_affine": lambda c, hw: nn.BatchNorm2d(c, affine=False, track_running_stats=False),
}


@pytest.mark.parametrize("norm", NORMS)
def test_other_norm_layers_meta_gradient_is_exact(norm):
    make = NORMS[norm]
    net = init(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), make(3, 16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(3, 3, 3, padding=1), make(3, 8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 64, 3)), 8)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=9)
    params = mnn.params(net)
    want = torch.autograd.grad(reference_meta_loss(loss_fn, params, support, query, 2, 0.4, False),
                               list(params.values()))
    got = torch.autograd.grad(maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.4),
                              list(params.values()))
    assert_close_grads(got, want)


def dropout_net():
    return init(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)), 10)


def test_dropout_same_randomness_equals_loop_with_the_same_seed():
    net = dropout_net()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=11)
    params = mnn.params(net)
    key = mb.random.key(3)
    got_loss = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.4, randomness="same", key=key)
    got = torch.autograd.grad(got_loss, list(params.values()))
    # vmap's "same" draws each dropout mask once for all tasks: reseeding before every task of
    # the loop gives each task those masks.
    seed = mb.random.torch_generator(key).initial_seed()
    per_task = []
    with torch.random.fork_rng(devices=[]):
        for t in range(T):
            torch.manual_seed(seed)
            per_task.append(reference_meta_loss_task(loss_fn, params, at(support, slice(t, t + 1)),
                                                     at(query, slice(t, t + 1))))
    want_loss = torch.stack(per_task).mean()
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert_close_grads(got, torch.autograd.grad(want_loss, list(params.values())))


def reference_meta_loss_task(loss_fn, params, support, query):
    global T
    saved, T = T, 1
    try:
        return reference_meta_loss(loss_fn, params, support, query, 2, 0.4, False)
    finally:
        T = saved


def test_same_key_same_result_different_key_different_result():
    net = dropout_net()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=12)
    params = mnn.params(net)
    state = torch.random.get_rng_state()
    a = maml.meta_loss(loss_fn, params, support, query, key=mb.random.key(0))
    b = maml.meta_loss(loss_fn, params, support, query, key=mb.random.key(0))
    c = maml.meta_loss(loss_fn, params, support, query, key=mb.random.key(1))
    assert a.item() == b.item() != c.item()
    # The caller's global stream is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)
    ev1 = maml.evaluate(loss_fn, params, support, query, steps=2, key=mb.random.key(5))
    ev2 = maml.evaluate(loss_fn, params, support, query, steps=2, key=mb.random.key(5))
    assert torch.equal(ev1.per_task_loss, ev2.per_task_loss)


@pytest.mark.parametrize("model", ["mlp", "conv4"])
def test_vmap_over_tasks_equals_python_loop_of_adapt(model):
    make, shape = MODELS[model]
    net = make()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch(shape, seed=13)
    params = mnn.params(net)
    per_task = []
    for t in range(T):
        s = at(support, t)
        q = at(query, t)
        per_task.append(loss_fn(maml.adapt(loss_fn, params, s, steps=2, lr=0.3), q))
    want = torch.stack(per_task).mean()
    got = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    chunked = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.3, chunk_size=2)
    assert chunked.item() == pytest.approx(want.item(), rel=1e-12)
    assert_close_grads(torch.autograd.grad(chunked, list(params.values())),
                       torch.autograd.grad(want, list(params.values())))


def snapshot(*trees):
    return [t.detach().clone() for t in optree.tree_leaves(trees)]


def test_inputs_are_never_mutated():
    net = init(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 16 * 16, 3)), 14)
    net.train()  # BN with running statistics, in training mode: it would update them in place
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=15)
    params = mnn.params(net)
    lr = make_lr(params, "meta-sgd")
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    before = snapshot(params, lr, support, query)
    maml.meta_loss(loss_fn, params, support, query, steps=2, lr=lr).backward()
    maml.adapt(loss_fn, params, optree.tree_map(lambda x: x[0], support), steps=2, lr=lr)
    maml.evaluate(loss_fn, params, support, query, steps=3, lr=lr)
    maml.reptile_grad(loss_fn, params, support, steps=2, lr=lr)
    after = snapshot(params, lr, support, query)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(b, dict(net.named_buffers())[k]) for k, b in buffers.items())


def test_anil_adapts_only_the_masked_parameters():
    net = conv4(seed=16)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=17)
    params = mnn.params(net)
    head = {k: k.startswith("17.") for k in params}
    s0 = optree.tree_map(lambda x: x[0], support)
    by_name = maml.adapt(loss_fn, params, s0, steps=2, lr=0.3, mask=lambda name: name.startswith("17."))
    by_tree = maml.adapt(loss_fn, params, s0, steps=2, lr=0.3, mask=head)
    for k in params:
        assert (by_name[k] is params[k]) == (not head[k])
        assert torch.equal(by_name[k], by_tree[k])
    want = torch.autograd.grad(reference_meta_loss(loss_fn, params, support, query, 2, 0.3, False, keep=head),
                               list(params.values()))
    got = torch.autograd.grad(maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.3, mask=head),
                              list(params.values()))
    assert_close_grads(got, want)


def test_reptile_grad_is_theta_minus_mean_adapted():
    net = mlp(seed=18)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, _ = classification_batch((2,), seed=19)
    params = mnn.params(net)
    got = maml.reptile_grad(loss_fn, params, support, steps=3, lr=0.2)
    adapted = [maml.adapt(loss_fn, params, at(support, t), steps=3, lr=0.2,
                          first_order=True) for t in range(T)]
    for k, p in params.items():
        want = p.detach() - torch.stack([a[k] for a in adapted]).mean(0)
        assert torch.allclose(got[k], want, rtol=0, atol=1e-12)
        assert not got[k].requires_grad
    # Used as .grad by any optimizer: plain SGD with lr 1 moves the params onto mean phi.
    for k, p in params.items():
        p.grad = got[k]
    torch.optim.SGD(net.parameters(), lr=1.0).step()
    for k, p in params.items():
        assert torch.allclose(p, torch.stack([a[k] for a in adapted]).mean(0), atol=1e-12)


def test_evaluate_reports_per_task_values_and_a_95_percent_interval():
    net = conv4(seed=20)
    loss_fn = mnn.objective(net, F.cross_entropy)
    acc_fn = mnn.objective(net, mnn.accuracy)
    support, query = classification_batch((1, 16, 16), seed=21)
    params = mnn.params(net)
    ev = maml.evaluate(loss_fn, params, support, query, steps=4, lr=0.3, metric_fn=acc_fn)
    for t in range(T):
        phi = maml.adapt(loss_fn, params, at(support, t), steps=4, lr=0.3)
        q = at(query, t)
        assert ev.per_task_loss[t].item() == pytest.approx(loss_fn(phi, q).item(), rel=1e-10)
        assert ev.per_task_metric[t].item() == pytest.approx(acc_fn(phi, q).item())
    losses = ev.per_task_loss
    assert ev.loss == pytest.approx(losses.mean().item())
    assert ev.loss_ci == pytest.approx(1.96 * losses.std().item() / T ** 0.5)
    assert 0 <= ev.metric <= 1 and ev.metric_ci >= 0
    assert not ev.per_task_loss.requires_grad
    no_metric = maml.evaluate(loss_fn, params, support, query, steps=1)
    assert no_metric.metric is None and no_metric.per_task_metric is None


def test_mean_ci():
    mean, half = maml.mean_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and half == pytest.approx(1.96 * torch.tensor([1.0, 2, 3, 4]).std().item() / 2)
    assert maml.mean_ci(torch.tensor([5.0]))[1] != maml.mean_ci(torch.tensor([5.0]))[1]  # nan
    with pytest.raises(ValueError, match="empty"):
        maml.mean_ci(torch.tensor([]))


def test_any_pytree_of_params_works():
    w = torch.randn(2, 3, generator=gen(22), requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    params = {"layer": [w, (b,)]}

    def loss_fn(p, data):
        x, y = data
        w, (b,) = p["layer"]
        return F.cross_entropy(x @ w + b, y)

    support, query = classification_batch((2,), seed=23)
    loss = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.1)
    got = torch.autograd.grad(loss, [w, b])
    flat = {"w": w, "b": b}
    ref = reference_meta_loss(lambda p, d: loss_fn({"layer": [p["w"], (p["b"],)]}, d), flat, support, query,
                              2, 0.1, False)
    assert_close_grads(got, torch.autograd.grad(ref, [w, b]))
    rates = {"layer": [torch.tensor(0.1), (torch.tensor(0.1),)]}
    assert maml.meta_loss(loss_fn, params, support, query, steps=2, lr=rates).item() == pytest.approx(loss.item())


def test_steps_zero_is_plain_query_loss():
    net = mlp()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=24)
    params = mnn.params(net)
    want = torch.stack([loss_fn(params, (query[0][t], query[1][t])) for t in range(T)]).mean()
    assert maml.meta_loss(loss_fn, params, support, query, steps=0).item() == pytest.approx(want.item())


# ------------------------------------------------------------------------- errors


def test_errors_name_the_bad_value_and_the_fix():
    net = mlp()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=25)
    params = mnn.params(net)
    short = (query[0][:2], query[1][:2])
    with pytest.raises(ValueError, match=r"leading \(task\) dimension differs.*query\[0\]: 2"):
        maml.meta_loss(loss_fn, params, support, short)
    with pytest.raises(TypeError, match="structure of params"):
        maml.meta_loss(loss_fn, params, support, query, lr={"0.weight": 0.1})
    with pytest.raises(ValueError, match=r"meta_loss\(\): steps must be >= 0, got -1"):
        maml.meta_loss(loss_fn, params, support, query, steps=-1)
    with pytest.raises(TypeError, match=r"adapt\(\): steps must be an int, got 1.5 \(float\)"):
        maml.adapt(loss_fn, params, support, steps=1.5)
    with pytest.raises(ValueError, match="randomness must be one of"):
        maml.meta_loss(loss_fn, params, support, query, randomness="maybe")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        maml.meta_loss(loss_fn, params, support, query, chunk_size=0)
    with pytest.raises(ValueError, match="mask selects no parameter"):
        maml.meta_loss(loss_fn, params, support, query, mask=lambda name: False)
    with pytest.raises(TypeError, match="mask leaves must be Python bools"):
        maml.meta_loss(loss_fn, params, support, query, mask={k: 1 for k in params})
    with pytest.raises(ValueError, match="lr must be finite"):
        maml.meta_loss(loss_fn, params, support, query, lr=float("nan"))
    with pytest.raises(TypeError, match=r"query\[1\]\[0\] must be a tensor with a leading task dimension, got int"):
        maml.meta_loss(loss_fn, params, support, (query[0], [1, 2, 3]))
    with pytest.raises(TypeError, match="every leaf of params must be a tensor"):
        maml.adapt(loss_fn, {"w": 1.0}, support)
    with pytest.raises(ValueError, match="scalar tensor for one task"):
        maml.meta_loss(lambda p, d: mnn.functional(net)(p, d[0]).sum(-1) if d[0].shape[0] == 5
                       else loss_fn(p, d), params, support, query)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_remat_gives_the_same_meta_gradient(chunk_size):
    net = conv4(seed=26)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=27)
    params = mnn.params(net)
    lr = make_lr(params, "meta-sgd")
    kw = {"steps": 2, "lr": lr, "chunk_size": chunk_size}
    want_loss = maml.meta_loss(loss_fn, params, support, query, **kw)
    want = torch.autograd.grad(want_loss, leaves_of(params, lr))
    got_loss = maml.meta_loss(loss_fn, params, support, query, remat=True, **kw)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert got_loss.requires_grad
    assert_close_grads(torch.autograd.grad(got_loss, leaves_of(params, lr)), want)
    with pytest.raises(ValueError, match=r"remat=True\) works with ordinary autograd"):
        torch.func.grad(lambda p: maml.meta_loss(loss_fn, p, support, query, remat=True))(
            {k: p.detach() for k, p in params.items()})


def test_remat_replays_the_random_draws():
    net = dropout_net()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=28)
    params = mnn.params(net)
    state = torch.random.get_rng_state()
    want_loss = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.4, chunk_size=1)
    want = torch.autograd.grad(want_loss, list(params.values()))
    torch.random.set_rng_state(state)
    got_loss = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.4, remat=True)
    after_forward = torch.random.get_rng_state()
    got = torch.autograd.grad(got_loss, list(params.values()))
    assert torch.equal(torch.random.get_rng_state(), after_forward)  # backward's replay is forked
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert_close_grads(got, want)
    keyed = [maml.meta_loss(loss_fn, params, support, query, remat=True, key=mb.random.key(4)) for _ in range(2)]
    assert keyed[0].item() == keyed[1].item()
    assert_close_grads(torch.autograd.grad(keyed[0], list(params.values())),
                       torch.autograd.grad(keyed[1], list(params.values())))


# ------------------------------------------------------------ faults (issue 13, item 8)


def test_empty_task_batch_is_a_clear_error():
    net = mlp()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=30)
    empty = at(support, slice(0, 0)), at(query, slice(0, 0))
    params = mnn.params(net)
    for kw in ({}, {"remat": True}, {"remat": True, "chunk_size": 2}):
        with pytest.raises(ValueError, match=r"meta_loss\(\): the batch holds no tasks .*support\[0\]: 0"):
            maml.meta_loss(loss_fn, params, *empty, **kw)
    with pytest.raises(ValueError, match=r"evaluate\(\): the batch holds no tasks"):
        maml.evaluate(loss_fn, params, *empty)
    with pytest.raises(ValueError, match=r"reptile_grad\(\): the batch holds no tasks"):
        maml.reptile_grad(loss_fn, params, empty[0])


def test_integer_buffer_among_params_is_named():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=31)
    state = dict(net.state_dict(keep_vars=True))  # parameters and buffers, num_batches_tracked among them
    with pytest.raises(TypeError, match=r"params\['1.num_batches_tracked'\] is a torch.int64 tensor.*mask="):
        maml.meta_loss(loss_fn, state, support, query)
    def floats(name):
        return not name.endswith("num_batches_tracked")
    assert torch.isfinite(maml.meta_loss(loss_fn, state, support, query, mask=floats))


def test_numpy_learning_rates_are_numbers():
    import numpy as np

    net = mlp()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=32)
    params = mnn.params(net)
    for lr in (np.float32(0.25), np.float64(0.25), np.array(0.25)):
        got = maml.meta_loss(loss_fn, params, support, query, lr=lr)
        assert got.item() == maml.meta_loss(loss_fn, params, support, query, lr=0.25).item()
    rates = {k: np.float32(0.25) for k in params}
    assert maml.meta_loss(loss_fn, params, support, query, lr=rates).item() == pytest.approx(got.item(), rel=1e-15)


def test_nan_inside_an_lr_pytree_is_rejected_like_a_top_level_nan():
    net = mlp()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=33)
    params = mnn.params(net)
    bad = {k: torch.full_like(p, 0.1) for k, p in params.items()}
    bad["2.weight"][1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"meta_loss\(\): lr\['2.weight'\] must be finite"):
        maml.meta_loss(loss_fn, params, support, query, lr=bad)
    with pytest.raises(ValueError, match=r"adapt\(\): lr\['0.bias'\] must be finite, got inf"):
        maml.adapt(loss_fn, params, at(support, 0), lr={**{k: 0.1 for k in params}, "0.bias": float("inf")})
    with pytest.raises(ValueError, match=r"evaluate\(\): lr must be finite, got a tensor with NaN"):
        maml.evaluate(loss_fn, params, support, query, lr=torch.tensor(float("nan")))
    # Inside torch.func transforms the values are not read (they are traced), and nothing breaks.
    good = {k: torch.full_like(p, 0.1) for k, p in params.items()}
    plain = {k: p.detach() for k, p in params.items()}
    grads = torch.func.grad(lambda r: maml.meta_loss(loss_fn, plain, support, query, lr=r))(good)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_options_pass_one_set_of_inner_loop_options_to_all_three():
    from metabatch import inner

    net = mlp()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((2,), seed=34)
    params = mnn.params(net)
    opts = maml.Options(steps=2, inner=inner.momentum(0.2), mask=lambda n: n.startswith("4."), chunk_size=2)
    a = maml.meta_loss(loss_fn, params, support, query, **opts._asdict())
    b = maml.meta_loss(loss_fn, params, support, query, steps=2, inner=inner.momentum(0.2),
                       mask=lambda n: n.startswith("4."))
    assert a.item() == pytest.approx(b.item(), rel=1e-14)
    ev = maml.evaluate(loss_fn, params, support, query, **opts._asdict())
    assert ev.loss == pytest.approx(a.item(), rel=1e-12)
    g = maml.reptile_grad(loss_fn, params, support, **opts._asdict())
    assert all((g[k] == 0).all() for k in params if not k.startswith("4."))
    assert set(maml.Options._fields) <= set(inspect.signature(maml.reptile_grad).parameters)
    assert set(maml.Options._fields) <= set(inspect.signature(maml.evaluate).parameters)
    assert set(maml.Options._fields) <= set(inspect.signature(maml.meta_loss).parameters)
