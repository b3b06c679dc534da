"""metabatch.inner: every rule's contract, exact against torch.optim, higher and explicit loops (float64)."""

import itertools
import math

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabatch import inner, maml
from metabatch import nn as mnn
from metabatch.batching import batching_rules

from .test_maml import MODELS, assert_close_grads, at, classification_batch, gen, init

T = 3


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


RULES = {
    "sgd": lambda: inner.sgd(0.1),
    "sgd-pytree": lambda: inner.sgd({"a": 0.1, "b": torch.tensor([0.2, 0.3])}),
    "momentum": lambda: inner.momentum(0.1),
    "nesterov": lambda: inner.momentum(0.1, momentum=0.8, nesterov=True),
    "adam": lambda: inner.adam(0.1),
    "lslr": lambda: inner.lslr({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([[0.1, 0.1], [0.3, 0.2]])}),
}


def toy():
    return {"a": torch.tensor(1.5), "b": torch.tensor([-1.0, 2.0])}


def toy_grads(params):
    return {"a": 2 * params["a"], "b": torch.sin(params["b"])}


def run(opt, params, steps, grads_fn=toy_grads):
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(grads_fn(params), state, params)
        params = inner.apply_updates(params, updates)
    return params, state


# ------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("rule", RULES)
def test_contract_pure_named_tuples_and_inputs_unchanged(rule):
    opt = RULES[rule]()
    assert isinstance(opt, inner.Optimizer) and tuple(opt._fields) == ("init", "update")
    init_fn, update_fn = opt  # an (init, update) pair
    params = toy()
    before = [t.clone() for t in optree.tree_leaves(params)]
    state = init_fn(params)
    assert isinstance(state, tuple) and hasattr(state, "_fields") and state.count == 0
    grads = toy_grads(params)
    u1, s1 = update_fn(grads, state, params)
    u2, s2 = update_fn(grads, state, params)
    assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(u1), optree.tree_leaves(u2), strict=True))
    assert s1.count == s2.count == 1 and state.count == 0
    assert all(torch.equal(b, a) for b, a in zip(before, optree.tree_leaves(params), strict=True))
    assert optree.tree_structure(u1) == optree.tree_structure(params)


@pytest.mark.parametrize("rule", RULES)
def test_contract_none_gradient_leaves_are_skipped(rule):
    opt = RULES[rule]()
    params = start = toy()
    view = {"a": None, "b": params["b"]}
    state = opt.init(view)
    for _ in range(3):
        updates, state = opt.update({"a": None, "b": torch.sin(view["b"])}, state, view)
        assert updates["a"] is None
        new = inner.apply_updates(params, updates)
        assert new["a"] is params["a"]
        params, view = new, {"a": None, "b": new["b"]}
    full, _ = run(opt, start, 3, lambda p: {"a": torch.zeros(()), "b": torch.sin(p["b"])})
    assert torch.allclose(view["b"], full["b"], rtol=0, atol=1e-15)


@pytest.mark.parametrize("rule", RULES)
def test_contract_vmap_over_tasks_equals_a_loop(rule):
    opt = RULES[rule]()
    starts = {"a": torch.tensor([1.5, -0.5, 0.25]), "b": torch.randn(3, 2, generator=gen(0))}

    def adapted(params):
        return run(opt, params, 3)[0]

    got = torch.func.vmap(adapted)(starts)
    for t in range(3):
        want = adapted(at(starts, t))
        for k in want:
            assert torch.allclose(got[k][t], want[k], rtol=0, atol=1e-15)


@pytest.mark.parametrize("rule", ["sgd", "momentum", "nesterov", "adam", "lslr"])
def test_contract_gradcheck_through_three_steps(rule):
    opt = RULES[rule]()

    def f(a, b):
        out, _ = run(opt, {"a": a, "b": b}, 3)
        return out["a"] * 1.0, out["b"]

    a, b = torch.tensor(1.5, requires_grad=True), torch.tensor([-1.0, 2.0], requires_grad=True)
    assert torch.autograd.gradcheck(f, (a, b))
    assert torch.autograd.gradgradcheck(f, (a, b))


# -------------------------------------------------------- single steps against torch.optim


OPTIM = {
    "momentum": (lambda: inner.momentum(0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "nesterov": (lambda: inner.momentum(0.05, momentum=0.7, nesterov=True),
                 lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.7, nesterov=True)),
    "adam": (lambda: inner.adam(0.05), lambda ps: torch.optim.Adam(ps, lr=0.05)),
    "adam-betas": (lambda: inner.adam(0.02, b1=0.5, b2=0.9, eps=1e-3),
                   lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.5, 0.9), eps=1e-3)),
}


@pytest.mark.parametrize("name", OPTIM)
def test_steps_equal_torch_optim(name):
    ours, theirs = OPTIM[name]
    params = {"a": torch.tensor([0.3, -2.0, 0.0]), "b": torch.randn(2, 2, generator=gen(1))}
    target = {"a": torch.tensor([1.0, 1.0, 0.0]), "b": torch.zeros(2, 2)}  # a[2]: a zero gradient throughout

    def loss(p):
        return sum(((p[k] - target[k]) ** 4).sum() for k in p)

    mine, _ = run(ours(), params, 7, lambda p: torch.func.grad(loss)(p))
    copy = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = theirs(list(copy.values()))
    for _ in range(7):
        opt.zero_grad()
        loss(copy).backward()
        opt.step()
    for k in params:
        assert torch.allclose(mine[k], copy[k].detach(), rtol=1e-13, atol=1e-15), k


# ----------------------------------------------------------------- meta-gradients, float64


def setup(model, seed=2, **kw):
    make, shape = MODELS[model]
    net = make(**kw)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch(shape, seed=seed)
    return net, loss_fn, mnn.params(net), support, query


def higher_meta_loss(net, optim, support, query, steps, override=None):
    higher = pytest.importorskip("higher", reason="higher==0.2.1 is in the dev extra")
    total = 0
    for t in range(T):
        with higher.innerloop_ctx(net, optim, copy_initial_weights=False) as (fnet, diffopt):
            for s in range(steps):
                xs, ys = at(support, t)
                diffopt.step(F.cross_entropy(fnet(xs), ys), override=override(s) if override else None)
            xq, yq = at(query, t)
            total = total + F.cross_entropy(fnet(xq), yq)
    return total / T


CASES = list(itertools.product(["mlp", "conv4"], [1, 3]))


@pytest.mark.parametrize("model,steps", CASES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_meta_gradient_equals_higher(model, steps, nesterov):
    net, loss_fn, params, support, query = setup(model)
    optim = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9, nesterov=nesterov)
    want = torch.autograd.grad(higher_meta_loss(net, optim, support, query, steps), list(params.values()))
    loss = maml.meta_loss(loss_fn, params, support, query, steps=steps,
                          inner=inner.momentum(0.3, momentum=0.9, nesterov=nesterov))
    assert_close_grads(torch.autograd.grad(loss, list(params.values())), want)


def safe_sqrt(v):
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1).sqrt(), 0)


def adam_loop(loss_fn, params, support, query, steps, lr, b1=0.9, b2=0.999, eps=1e-8, first_order=False,
              sqrt=safe_sqrt, task_range=range(T)):
    """torch.optim.Adam's documented update, one task at a time, with autograd.grad(create_graph=True)."""
    names = list(params)
    total, adapted = 0, []
    for t in task_range:
        s, q = at(support, t), at(query, t)
        phi = dict(params)
        m = {k: torch.zeros_like(p) for k, p in phi.items()}
        v = {k: torch.zeros_like(p) for k, p in phi.items()}
        for step in range(1, steps + 1):
            grads = torch.autograd.grad(loss_fn(phi, s), [phi[k] for k in names], create_graph=not first_order)
            for k, g in zip(names, grads, strict=True):
                g = g.detach() if first_order else g
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                m_hat = m[k] / (1 - b1**step)
                v_hat = v[k] / (1 - b2**step)
                phi[k] = phi[k] - lr * m_hat / (sqrt(v_hat) + eps)
        adapted.append(phi)
        total = total + loss_fn(phi, q)
    return total / len(task_range), adapted


@pytest.mark.parametrize("model,steps", CASES)
def test_adam_reference_loop_equals_torch_optim_adam(model, steps):
    _, loss_fn, params, support, query = setup(model)
    _, adapted = adam_loop(loss_fn, params, support, query, steps, lr=0.01)
    for t in range(T):
        copy = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
        opt = torch.optim.Adam(list(copy.values()), lr=0.01)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(copy, at(support, t)).backward()
            opt.step()
        for k in params:
            # noise-level grads of biases before BN
            assert torch.allclose(adapted[t][k], copy[k], rtol=1e-12, atol=1e-10), (t, k)


@pytest.mark.parametrize("model,steps", CASES)
@pytest.mark.parametrize("first_order", [False, True])
def test_adam_meta_gradient_equals_explicit_loop(model, steps, first_order):
    _, loss_fn, params, support, query = setup(model)
    ref, _ = adam_loop(loss_fn, params, support, query, steps, lr=0.01, first_order=first_order)
    want = torch.autograd.grad(ref, list(params.values()))
    loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, inner=inner.adam(0.01),
                          first_order=first_order)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert_close_grads(torch.autograd.grad(loss, list(params.values())), want)
    # torch.func.grad over the same function.
    plain = {k: p.detach() for k, p in params.items()}
    fgrad = torch.func.grad(lambda p: maml.meta_loss(loss_fn, p, support, query, steps=steps, inner=inner.adam(0.01),
                                                     first_order=first_order))(plain)
    assert_close_grads(list(fgrad.values()), want)


def bias_corrected_eps(eps, b2=0.999):
    return lambda s: {"eps": [eps * math.sqrt(1 - b2 ** (s + 1))]}


@pytest.mark.parametrize("model,steps", CASES)
def test_higher_adam_matches_only_with_eps_rescaled(model, steps):
    """higher 0.2.1 puts eps before the bias correction: lr·√bc2/bc1 · m/(√v + eps)."""
    net, loss_fn, params, support, query = setup(model)
    loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, inner=inner.adam(0.01))
    got = torch.autograd.grad(loss, list(params.values()))
    optim = torch.optim.Adam(net.parameters(), lr=0.01)
    rescaled = higher_meta_loss(net, optim, support, query, steps, override=bias_corrected_eps(1e-8))
    assert_close_grads(got, torch.autograd.grad(rescaled, list(params.values())))
    plain = torch.autograd.grad(higher_meta_loss(net, optim, support, query, steps), list(params.values()))
    scale = max(g.abs().max().item() for g in got)
    worst = max((a - b).abs().max().item() for a, b in zip(got, plain, strict=True))
    assert worst > 1e-6 * scale  # as is, higher's Adam is another update rule


def relu_mlp(seed=0):
    return init(nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)), seed)


def test_adam_meta_gradient_is_finite_at_dead_relu_units():
    net = relu_mlp(seed=3)
    loss_fn = mnn.objective(net, F.mse_loss)
    g = gen(4)
    xs, xq = torch.randn(T, 10, 1, generator=g) * 3, torch.randn(T, 10, 1, generator=g) * 3
    support, query = (xs, torch.sin(xs)), (xq, torch.sin(xq))
    params = mnn.params(net)
    first = torch.func.grad(loss_fn)(params, at(support, 0))
    zeros = sum((v == 0).sum().item() for v in first.values()) / sum(v.numel() for v in first.values())
    assert zeros > 0.2  # dead units: many exact zeros in the inner gradient
    naive, _ = adam_loop(loss_fn, params, support, query, 2, lr=0.01, sqrt=torch.sqrt)
    assert any(torch.isnan(x).any() for x in torch.autograd.grad(naive, list(params.values())))
    loss = maml.meta_loss(loss_fn, params, support, query, steps=2, inner=inner.adam(0.01))
    got = torch.autograd.grad(loss, list(params.values()))
    assert all(torch.isfinite(x).all() for x in got)
    ref, _ = adam_loop(loss_fn, params, support, query, 2, lr=0.01)
    assert_close_grads(got, torch.autograd.grad(ref, list(params.values())))
    # higher masks the gradient into v where v == 0: the same subgradient.
    optim = torch.optim.Adam(net.parameters(), lr=0.01)
    higher = pytest.importorskip("higher")
    total = 0
    for t in range(T):
        with higher.innerloop_ctx(net, optim, copy_initial_weights=False) as (fnet, diffopt):
            for s in range(2):
                diffopt.step(F.mse_loss(fnet(xs[t]), torch.sin(xs[t])), override=bias_corrected_eps(1e-8)(s))
            total = total + F.mse_loss(fnet(xq[t]), torch.sin(xq[t]))
    assert_close_grads(got, torch.autograd.grad(total / T, list(params.values())))


# -------------------------------------------------------------------------------- LSLR


def lslr_loop(loss_fn, params, support, query, rates):
    names = list(params)
    steps = next(iter(rates.values())).shape[0]
    total = 0
    for t in range(T):
        phi = dict(params)
        for s in range(steps):
            grads = torch.autograd.grad(loss_fn(phi, at(support, t)), [phi[k] for k in names], create_graph=True)
            phi = {k: phi[k] - rates[k][s] * g for k, g in zip(names, grads, strict=True)}
        total = total + loss_fn(phi, at(query, t))
    return total / T


@pytest.mark.parametrize("model,steps", CASES)
@pytest.mark.parametrize("per_entry", [False, True])
def test_lslr_meta_gradient_reaches_params_and_rates(model, steps, per_entry):
    _, loss_fn, params, support, query = setup(model)
    rates = inner.lslr_rates(params, steps, 0.2, per_entry=per_entry)
    with torch.no_grad():  # distinct rates per step, so that a wrong index shows
        for r in rates.values():
            r.mul_(torch.linspace(0.5, 1.5, steps).reshape(-1, *([1] * (r.dim() - 1))))
    wrt = list(params.values()) + list(rates.values())
    want = torch.autograd.grad(lslr_loop(loss_fn, params, support, query, rates), wrt)
    loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, inner=inner.lslr(rates))
    assert_close_grads(torch.autograd.grad(loss, wrt), want)
    remat = maml.meta_loss(loss_fn, params, support, query, steps=steps, inner=inner.lslr(rates), remat=True)
    assert_close_grads(torch.autograd.grad(remat, wrt), want)


def test_lslr_reuses_the_last_rate_past_its_steps():
    opt = inner.lslr({"w": torch.tensor([1.0, 0.5])})
    params, state = run(opt, {"w": torch.tensor(0.0)}, 4, lambda p: {"w": torch.tensor(1.0)})
    assert params["w"].item() == -2.5 and state.count == 4


def test_learned_rates_get_meta_gradients_through_momentum_and_adam():
    _, loss_fn, params, support, query = setup("mlp")
    for make in (lambda r: inner.momentum(r), lambda r: inner.adam(r)):
        rate = torch.tensor(0.05, requires_grad=True)
        loss = maml.meta_loss(loss_fn, params, support, query, steps=2, inner=make(rate))
        g = torch.autograd.grad(loss, rate)[0]
        step = 1e-6
        with torch.no_grad():
            up = maml.meta_loss(loss_fn, params, support, query, steps=2, inner=make(rate + step))
            down = maml.meta_loss(loss_fn, params, support, query, steps=2, inner=make(rate - step))
        assert g.item() == pytest.approx(((up - down) / (2 * step)).item(), rel=1e-6)


# ------------------------------------------------------------------ maml with inner= everywhere


def sgd_reference(loss_fn, params, support, query, steps, lr):
    """metabatch 0.9's meta_loss written out: `p - lr * g` per step, vmapped over tasks with the batching rules."""
    leaves, spec = optree.tree_flatten(params)

    def task(leaves, s, q):
        for _ in range(steps):
            grads = torch.func.grad(lambda ls: loss_fn(optree.tree_unflatten(spec, ls), s))(leaves)
            leaves = [p - lr * g for p, g in zip(leaves, grads, strict=True)]
        return loss_fn(optree.tree_unflatten(spec, leaves), q)

    with batching_rules():
        return torch.func.vmap(task, in_dims=(None, 0, 0), randomness="different")(leaves, support, query).mean()


def test_default_inner_is_plain_sgd_exactly():
    _, loss_fn, params, support, query = setup("conv4")
    a = maml.meta_loss(loss_fn, params, support, query, steps=2, lr=0.3)
    ref = sgd_reference(loss_fn, params, support, query, 2, 0.3)  # bitwise the update calls made before inner=
    assert a.item() == ref.item()
    g_ref = torch.autograd.grad(ref, list(params.values()))
    assert all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(a, list(params.values()), retain_graph=True),
                                                  g_ref, strict=True))
    b = maml.meta_loss(loss_fn, params, support, query, steps=2, inner=inner.sgd(0.3))
    assert a.item() == b.item()
    ga = torch.autograd.grad(a, list(params.values()))
    gb = torch.autograd.grad(b, list(params.values()))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    default = maml.meta_loss(loss_fn, params, support, query)
    assert default.item() == maml.meta_loss(loss_fn, params, support, query, lr=0.01).item()


def test_adapt_evaluate_and_reptile_take_inner():
    _, loss_fn, params, support, query = setup("mlp")
    opt = inner.adam(0.05)
    adapted = [maml.adapt(loss_fn, params, at(support, t), steps=3, inner=opt, first_order=True) for t in range(T)]
    _, loop = adam_loop(loss_fn, params, support, query, 3, lr=0.05, first_order=True)
    for t in range(T):
        for k in params:
            assert torch.allclose(adapted[t][k], loop[t][k], rtol=0, atol=1e-13)
    ev = maml.evaluate(loss_fn, params, support, query, steps=3, inner=opt)
    for t in range(T):
        assert ev.per_task_loss[t].item() == pytest.approx(loss_fn(adapted[t], at(query, t)).item(), rel=1e-12)
    g = maml.reptile_grad(loss_fn, params, support, steps=3, inner=opt)
    for k, p in params.items():
        want = p.detach() - torch.stack([a[k] for a in adapted]).mean(0)
        assert torch.allclose(g[k], want, rtol=0, atol=1e-13)


def test_mask_with_an_inner_optimizer_keeps_fixed_leaves():
    _, loss_fn, params, support, _ = setup("mlp")
    def head(name):
        return name.startswith("4.")
    adapted = maml.adapt(loss_fn, params, at(support, 0), steps=2, inner=inner.adam(0.1), mask=head)
    for k in params:
        assert (adapted[k] is params[k]) == (not head(k))


def test_lr_and_inner_together_is_an_error():
    _, loss_fn, params, support, query = setup("mlp")
    with pytest.raises(TypeError, match=r"meta_loss\(\): pass either lr= .* or inner="):
        maml.meta_loss(loss_fn, params, support, query, lr=0.1, inner=inner.sgd(0.1))
    with pytest.raises(TypeError, match=r"inner must be an \(init, update\) pair"):
        maml.meta_loss(loss_fn, params, support, query, inner=torch.optim.SGD)


# ------------------------------------------------------------------------------- errors


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"sgd\(\): lr must be finite, got nan"):
        inner.sgd(float("nan"))
    with pytest.raises(ValueError, match=r"adam\(\): lr\['b'\] must be finite"):
        inner.adam({"a": 0.1, "b": torch.tensor([0.1, float("nan")])})
    with pytest.raises(ValueError, match=r"adam\(\): b2 must be < 1, got 1.0"):
        inner.adam(0.1, b2=1.0)
    with pytest.raises(ValueError, match=r"adam\(\): eps must be > 0, got 0.0: .* 0/0 = NaN; .*eps=1e-8"):
        inner.adam(0.1, eps=0.0)  # a zero gradient entry (a dead unit) would make its update NaN
    tiny = inner.adam(0.1, eps=1e-30).update({"w": torch.zeros(2)}, inner.AdamState(0, None, None))[0]["w"]
    assert torch.equal(tiny, torch.zeros(2))
    with pytest.raises(ValueError, match=r"momentum\(\): momentum must be >= 0.0"):
        inner.momentum(0.1, momentum=-0.5)
    with pytest.raises(TypeError, match=r"momentum\(\): nesterov must be True or False"):
        inner.momentum(0.1, nesterov="yes")
    with pytest.raises(TypeError, match=r"sgd\(\): every leaf of lr must be a number or a tensor"):
        inner.sgd({"a": "fast"})
    with pytest.raises(TypeError, match=r"lslr\(\): rates\['w'\] must be a tensor with a leading step dimension"):
        inner.lslr({"w": torch.tensor(0.1)})
    opt = inner.sgd({"a": 0.1})
    with pytest.raises(TypeError, match=r"sgd\(\): lr must be .* structure of params"):
        opt.update(toy_grads(toy()), opt.init(toy()))
    assert inner.sgd(torch.tensor(0.5)).update({"w": torch.tensor(2.0)}, inner.SgdState(0))[0]["w"].item() == -1.0
