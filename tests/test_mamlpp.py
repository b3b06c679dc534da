"""MAML++ pieces: multi-step loss, per-step parameters, LSLR, per-step BN statistics, vs explicit loops (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metabatch as mb
from metabatch import inner, maml, mamlpp
from metabatch import nn as mnn

from .test_maml import assert_close_grads, at, classification_batch, init

T = 3


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def bn_net(seed=0, track=False):
    layers = []
    for i in range(2):
        layers += [nn.Conv2d(1 if i == 0 else 3, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=track),
                   nn.ReLU(), nn.MaxPool2d(2)]
    return init(nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), seed)


def is_bn(name):
    return name.split(".")[0] in ("1", "5")


def mamlpp_loop(loss_fn, params, support, query, rates, weights, stepwise):
    """MAML++'s inner loop written out: per-step BN tensors (index s), LSLR, the weighted query loss after each step."""
    steps = len(weights)
    moving = [k for k in params if not stepwise(k)]
    total = 0
    for t in range(T):
        s_t, q_t = at(support, t), at(query, t)
        phi = dict(params)

        def at_step(p, s):
            return {k: (params[k][min(s, params[k].shape[0] - 1)] if stepwise(k) else p[k]) for k in p}

        task = 0
        for s in range(steps):
            grads = torch.autograd.grad(loss_fn(at_step(phi, s), s_t), [phi[k] for k in moving], create_graph=True)
            phi = {**phi, **{k: phi[k] - rates[k][s] * g for k, g in zip(moving, grads, strict=True)}}
            if weights[s]:
                task = task + weights[s] * loss_fn(at_step(phi, s), q_t)
        total = total + task
    return total / T


@pytest.mark.parametrize("steps,progress", [(1, 0.0), (3, 0.0), (3, 0.4), (3, 1.0)])
def test_multi_step_loss_per_step_bn_and_lslr_equal_an_explicit_loop(steps, progress):
    net = bn_net(seed=1)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=2)
    params = mamlpp.stack_steps(mnn.params(net), steps, is_bn)
    with torch.no_grad():  # different BN weights per step, so that a wrong index shows
        for k, p in params.items():
            if is_bn(k):
                p.add_(0.1 * torch.arange(steps).reshape(-1, 1))
    rates = inner.lslr_rates({k: p for k, p in params.items() if not is_bn(k)}, steps, 0.3)
    with torch.no_grad():
        for r in rates.values():
            r.mul_(torch.linspace(1.0, 0.5, steps))
    all_rates = {k: rates.get(k, torch.zeros(steps)) for k in params}  # BN entries are never used
    weights = mamlpp.step_weights(steps, progress)
    wrt = list(params.values()) + list(rates.values())
    want = torch.autograd.grad(mamlpp_loop(loss_fn, params, support, query, rates, weights, is_bn), wrt)
    loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, inner=inner.lslr(all_rates),
                          per_step=is_bn, step_weights=weights)
    assert_close_grads(torch.autograd.grad(loss, wrt), want)
    # The same with the weights as a tensor, and the loss of the last step alone when they are one-hot.
    as_tensor = maml.meta_loss(loss_fn, params, support, query, steps=steps, inner=inner.lslr(all_rates),
                               per_step=is_bn, step_weights=torch.tensor(weights))
    assert as_tensor.item() == pytest.approx(loss.item(), rel=1e-12)
    if progress >= 1:
        last = maml.meta_loss(loss_fn, params, support, query, steps=steps, inner=inner.lslr(all_rates),
                              per_step=is_bn)
        assert last.item() == pytest.approx(loss.item(), rel=1e-12)


def test_per_step_leaves_are_selected_not_adapted():
    net = bn_net(seed=3)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, _ = classification_batch((1, 16, 16), seed=4)
    params = mamlpp.stack_steps(mnn.params(net), 2, is_bn)
    adapted = maml.adapt(loss_fn, params, at(support, 0), steps=3, lr=0.1, per_step=is_bn)
    for k, p in params.items():
        if is_bn(k):
            assert adapted[k] is not p and torch.equal(adapted[k], p[1])  # after 3 steps: index min(2, 1)
        else:
            assert adapted[k].shape == p.shape
            assert k in ("0.bias", "4.bias") or not torch.equal(adapted[k], p)  # conv biases before BN: ~0 grads
    assert maml.adapt(loss_fn, params, at(support, 0), steps=0, per_step=is_bn)["1.weight"] is not None
    g = maml.reptile_grad(loss_fn, params, support, steps=2, lr=0.1, per_step=is_bn)
    assert all((g[k] == 0).all() for k in params if is_bn(k))
    with pytest.raises(ValueError, match="per_step selects params\\['x'\\], a 0-d tensor"):
        maml.adapt(lambda p, d: p["w"].sum() * p["x"], {"w": torch.ones(2), "x": torch.tensor(1.0)},
                   None, per_step=lambda n: n == "x")


def test_step_weights_anneal_like_mamlpp():
    assert mamlpp.step_weights(5, 0.0) == pytest.approx((0.2,) * 5)
    mid = mamlpp.step_weights(5, 0.5)
    assert mid[:4] == pytest.approx((0.1,) * 4) and mid[4] == pytest.approx(0.6)
    late = mamlpp.step_weights(5, 0.99)
    assert late[:4] == pytest.approx((0.03 / 5,) * 4) and sum(late) == pytest.approx(1.0)
    assert mamlpp.step_weights(5, 3.0) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert mamlpp.step_weights(1, 0.3) == (1.0,)
    with pytest.raises(ValueError, match=r"step_weights\(\): progress must be >= 0.0"):
        mamlpp.step_weights(3, -0.1)


def test_step_weights_errors():
    net = bn_net()
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=5)
    params = mnn.params(net)
    with pytest.raises(ValueError, match=r"one weight per inner step \(2\), got 3"):
        maml.meta_loss(loss_fn, params, support, query, steps=2, step_weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"step_weights\[1\] must be >= 0.0"):
        maml.meta_loss(loss_fn, params, support, query, steps=2, step_weights=[0.2, -1])
    with pytest.raises(TypeError, match="step_weights must be a sequence"):
        maml.meta_loss(loss_fn, params, support, query, steps=2, step_weights=0.5)


def test_cosine_lr():
    assert mamlpp.cosine_lr(0, 10, 1.0, 0.1) == 1.0
    assert mamlpp.cosine_lr(5, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert mamlpp.cosine_lr(10, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert mamlpp.cosine_lr(20, 10, 1.0, 0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10, 0.1)
    for step in range(1, 10):
        opt.step()
        sched.step()
        assert mamlpp.cosine_lr(step, 10, 1.0, 0.1) == pytest.approx(sched.get_last_lr()[0], rel=1e-12)


def test_bn_statistics_equal_a_per_task_loop_and_drive_evaluation():
    net = bn_net(seed=6, track=True)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=7)
    params = mamlpp.stack_steps(mnn.params(net), 2, is_bn)
    rates = inner.lslr_rates(params, 2, 0.2)
    opt = inner.lslr(rates)
    stats = mamlpp.bn_statistics(net, loss_fn, params, support, query, steps=2, inner=opt, per_step=is_bn)
    assert sorted(stats) == ["1.running_mean", "1.running_var", "5.running_mean", "5.running_var"]
    # The same by hand: the input of each BN layer at step s, support (phi_s) and query (phi_{s+1}).
    seen = {}
    hooks = [net[i].register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, []).append(a[0].detach()))
             for i in (1, 5)]
    want = {i: [[] for _ in range(2)] for i in (1, 5)}
    try:
        for t in range(T):
            for s in range(2):
                for data, k in ((at(support, t), s), (at(query, t), s + 1)):
                    phi = maml.adapt(loss_fn, params, at(support, t), steps=k, inner=opt, per_step=is_bn)
                    phi = {n: (params[n][s] if is_bn(n) else v) for n, v in phi.items()}
                    seen.clear()
                    with torch.no_grad():
                        loss_fn(phi, data)
                    for i in (1, 5):
                        x = seen[i][0]
                        want[i][s].append((x.mean((0, 2, 3)), x.var((0, 2, 3), correction=1)))
    finally:
        for h in hooks:
            h.remove()
    for i in (1, 5):
        for s in range(2):
            mean = torch.stack([m for m, _ in want[i][s]]).mean(0)
            var = torch.stack([v for _, v in want[i][s]]).mean(0)
            assert torch.allclose(stats[f"{i}.running_mean"][s], mean, rtol=1e-12, atol=1e-14)
            assert torch.allclose(stats[f"{i}.running_var"][s], var, rtol=1e-12, atol=1e-14)
    # Evaluation in eval mode normalises with the statistics of each step.
    def per_step(n):
        return is_bn(n) or n.endswith(("running_mean", "running_var"))
    net.eval()
    try:
        ev = maml.evaluate(loss_fn, {**params, **stats}, support, query, steps=2, inner=opt, per_step=per_step)
        phi = maml.adapt(loss_fn, {**params, **stats}, at(support, 0), steps=2, inner=opt, per_step=per_step)
        assert ev.per_task_loss[0].item() == pytest.approx(loss_fn(phi, at(query, 0)).item(), rel=1e-10)
    finally:
        net.train()
    with pytest.raises(ValueError, match="track_running_stats=True"):
        mamlpp.bn_statistics(bn_net(), loss_fn, params, support, steps=2, inner=opt, per_step=is_bn)
    with pytest.raises(TypeError, match=r"bn_statistics\(\): per_step must be a predicate on parameter names"):
        mamlpp.bn_statistics(net, loss_fn, params, support, steps=2, inner=opt, per_step={"1.weight": True})


def test_stack_steps():
    p = {"a": torch.ones(2, requires_grad=True), "b": torch.zeros(3)}
    out = mamlpp.stack_steps(p, 4, {"a": True, "b": False})
    assert out["a"].shape == (4, 2) and out["a"].requires_grad and out["a"].is_leaf
    assert out["b"] is p["b"]
    with pytest.raises(ValueError, match="select picks no parameter"):
        mamlpp.stack_steps(p, 4, lambda n: False)
    with pytest.raises(TypeError, match="select must be a predicate"):
        mamlpp.stack_steps(p, 4, {"a": 1, "b": 0})


def test_bn_statistics_with_dropout_follow_the_key_not_the_global_generator():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(8),
                              torch.nn.Linear(8, 2))
    loss_fn, params = mb.nn.objective(net, torch.nn.functional.cross_entropy), mb.nn.params(net)
    g = torch.Generator().manual_seed(1)
    support = (torch.randn(4, 6, 3, generator=g), torch.randint(0, 2, (4, 6), generator=g))
    k1, k2 = mb.random.split(mb.random.key(0))
    state = torch.get_rng_state()
    a = mamlpp.bn_statistics(net, loss_fn, params, support, steps=2, lr=0.1, key=k1)
    b = mamlpp.bn_statistics(net, loss_fn, params, support, steps=2, lr=0.1, key=k1)
    c = mamlpp.bn_statistics(net, loss_fn, params, support, steps=2, lr=0.1, key=k2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["2.running_mean"], c["2.running_mean"])
