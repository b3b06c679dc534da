"""metabatch.imaml: the implicit meta-gradient against its closed form on quadratic tasks (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabatch import imaml, inner, maml
from metabatch import nn as mnn

from .test_maml import assert_close_grads, at, gen, init

T, D = 4, 5


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def quadratic_tasks(seed=0):
    """Support loss 1/2 w'Aw - b'w (A SPD, eigenvalues in [1, 3]); query loss 1/2 |w - c|^2."""
    g = gen(seed)
    q, _ = torch.linalg.qr(torch.randn(T, D, D, generator=g))
    eig = 1 + 2 * torch.rand(T, D, generator=g)
    a = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    b = torch.randn(T, D, generator=g)
    c = torch.randn(T, D, generator=g)
    return (a, b), c


def support_loss(p, data):
    a, b = data
    w = p["w"]
    return 0.5 * w @ a @ w - b @ w


def query_loss(p, c):
    return 0.5 * ((p["w"] - c) ** 2).sum()


def quad_loss(p, data):
    """One loss_fn for both sets: support data is the pair (A, b), query data the target c."""
    return support_loss(p, data) if isinstance(data, tuple) else query_loss(p, data)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_quadratic_tasks_give_the_analytic_implicit_gradient(lam):
    support, query = quadratic_tasks()
    theta = torch.randn(D, generator=gen(1))
    a, b = support
    eye = torch.eye(D)
    phi = torch.linalg.solve(a + lam * eye, b + lam * theta)               # the proximal optimum
    want = torch.linalg.solve(eye + a / lam, phi - query)                 # (I + H/λ)^-1 ∇L_q(φ*)
    # Gradient descent on the proximal problem contracts by max|1 - lr·(eig + λ)| <= 0.5 per step.
    lr = 1 / (3 + lam)
    out = imaml.meta_grad(quad_loss, {"w": theta}, support, query, lam=lam, steps=80, lr=lr, cg_steps=D)
    assert torch.allclose(out.grads["w"], want.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(out.per_task_loss, 0.5 * ((phi - query) ** 2).sum(-1), rtol=1e-12, atol=0)
    assert out.loss.item() == pytest.approx(out.per_task_loss.mean().item(), rel=1e-14)
    # Any inner optimizer that reaches the optimum gives the same gradient.
    with_momentum = imaml.meta_grad(quad_loss, {"w": theta}, support, query, lam=lam, steps=150,
                                    inner=inner.momentum(lr / 2, momentum=0.5), cg_steps=D)
    assert torch.allclose(with_momentum.grads["w"], want.mean(0), rtol=0, atol=1e-10)
    # The same as differentiating through many unrolled steps of the proximal problem.
    w = theta.clone().requires_grad_()

    def loss_fn(p, data):  # support data (A, b): the proximal objective; query data c: the query loss
        if isinstance(data, tuple):
            return support_loss(p, data) + 0.5 * lam * ((p["w"] - w) ** 2).sum()
        return query_loss(p, data)

    unrolled = maml.meta_loss(loss_fn, {"w": w}, support, query, steps=80, lr=lr)
    assert torch.allclose(torch.autograd.grad(unrolled, w)[0], want.mean(0), rtol=0, atol=1e-10)


def test_conjugate_gradient_solves_spd_systems_exactly_in_n_steps():
    g = gen(2)
    m = torch.randn(6, 6, generator=g)
    a = m @ m.T + 0.5 * torch.eye(6)
    b = [torch.randn(4, generator=g), torch.randn(2, generator=g)]

    def matvec(v):
        out = a @ torch.cat(v)
        return [out[:4], out[4:]]

    x = imaml.conjugate_gradient(matvec, b, steps=6)
    assert torch.allclose(torch.cat(x), torch.linalg.solve(a, torch.cat(b)), rtol=0, atol=1e-10)
    zero = imaml.conjugate_gradient(matvec, [torch.zeros(4), torch.zeros(2)], steps=3)  # no 0/0
    assert all((z == 0).all() for z in zero)


def test_mlp_implicit_gradient_equals_a_per_task_explicit_solve():
    net = init(nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)), 3)
    loss_fn = mnn.objective(net, F.mse_loss)
    g = gen(4)
    xs, xq = torch.randn(T, 8, 1, generator=g), torch.randn(T, 8, 1, generator=g)
    support, query = (xs, torch.sin(2 * xs)), (xq, torch.sin(2 * xq))
    params = mnn.params(net)
    lam = 4.0
    out = imaml.meta_grad(loss_fn, params, support, query, lam=lam, steps=200, lr=0.1, cg_steps=30)
    names = list(params)
    flat_theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def unflat(v):
        out, i = {}, 0
        for k, p in params.items():
            out[k] = v[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return out

    want = 0
    for t in range(T):
        s, q = at(support, t), at(query, t)
        def prox(v, s=s):
            return loss_fn(unflat(v), s) + 0.5 * lam * ((v - flat_theta) ** 2).sum()
        v = flat_theta.clone()
        for _ in range(400):                             # the proximal optimum, to rounding
            v = v - 0.1 * torch.func.grad(prox)(v)
        h = torch.func.jacrev(torch.func.jacrev(lambda v, s=s: loss_fn(unflat(v), s)))(v)
        gq = torch.func.grad(lambda v, q=q: loss_fn(unflat(v), q))(v)
        want = want + torch.linalg.solve(torch.eye(len(v)) + h / lam, gq) / T
    got = torch.cat([out.grads[k].reshape(-1) for k in names])
    # 200 inner steps leave the optimum ~1e-9 away; CG with 30 iterations on 19 unknowns is exact.
    assert_close_grads([got], [want], tol=1e-6)
    assert not any(v.requires_grad for v in out.grads.values())


def test_errors():
    support, query = quadratic_tasks()
    params = {"w": torch.zeros(D)}
    with pytest.raises(ValueError, match=r"meta_grad\(\): lam must be > 0.0"):
        imaml.meta_grad(quad_loss, params, support, query, lam=0.0)
    with pytest.raises(ValueError, match=r"meta_grad\(\): cg_steps must be >= 1"):
        imaml.meta_grad(quad_loss, params, support, query, cg_steps=0)
    with pytest.raises(TypeError, match="pass either lr= .* or inner="):
        imaml.meta_grad(quad_loss, params, support, query, lr=0.1, inner=inner.sgd(0.1))
    with pytest.raises(TypeError, match=r"params\['n'\] must be a floating-point tensor, got torch.int64"):
        imaml.meta_grad(quad_loss, {"w": torch.zeros(D), "n": torch.tensor(1)}, support, query)
    with pytest.raises(ValueError, match="the batch holds no tasks"):
        imaml.meta_grad(quad_loss, params, at(support, slice(0, 0)), query[:0])



def test_conjugate_gradient_errors_name_the_bad_value():
    b = [torch.ones(2)]
    with pytest.raises(ValueError, match=r"conjugate_gradient\(\): steps must be >= 0, got -1"):
        imaml.conjugate_gradient(lambda v: v, b, steps=-1)  # was: x = 0 silently
    with pytest.raises(TypeError, match=r"conjugate_gradient\(\): steps must be an int"):
        imaml.conjugate_gradient(lambda v: v, b, steps=2.0)
    with pytest.raises(TypeError, match=r"conjugate_gradient\(\): matvec must be callable"):
        imaml.conjugate_gradient(None, b, steps=2)
    with pytest.raises(TypeError, match=r"conjugate_gradient\(\): b must be a non-empty list of tensors"):
        imaml.conjugate_gradient(lambda v: v, torch.ones(2), steps=2)
    with pytest.raises(ValueError, match=r"matvec returned 2 tensors for 1; return A v as a list like v"):
        imaml.conjugate_gradient(lambda v: v + v, b, steps=2)

def test_conv_batch_norm_vmapped_equals_a_per_task_autograd_loop():
    from .test_maml import classification_batch, conv4

    net = conv4(seed=5)
    loss_fn = mnn.objective(net, F.cross_entropy)
    support, query = classification_batch((1, 16, 16), seed=6)
    params = mnn.params(net)
    lam, steps, lr, cg = 2.0, 3, 0.1, 4
    out = imaml.meta_grad(loss_fn, params, support, query, lam=lam, steps=steps, lr=lr, cg_steps=cg)
    names = list(params)
    want = [0] * len(names)
    for t in range(3):
        s, q = at(support, t), at(query, t)
        phi = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
        for _ in range(steps):
            prox = loss_fn(phi, s) + 0.5 * lam * sum(((phi[k] - params[k].detach()) ** 2).sum() for k in names)
            grads = torch.autograd.grad(prox, list(phi.values()))
            phi = {k: (phi[k] - lr * g).detach().requires_grad_() for k, g in zip(names, grads, strict=True)}
        gq = torch.autograd.grad(loss_fn(phi, q), list(phi.values()))
        gs = torch.autograd.grad(loss_fn(phi, s), list(phi.values()), create_graph=True)

        def matvec(v, gs=gs, phi=phi):
            hv = torch.autograd.grad(gs, list(phi.values()), v, retain_graph=True)
            return [vi + h / lam for vi, h in zip(v, hv, strict=True)]

        x = imaml.conjugate_gradient(matvec, list(gq), cg)
        want = [w + xi / 3 for w, xi in zip(want, x, strict=True)]
    assert_close_grads([out.grads[k] for k in names], want)
