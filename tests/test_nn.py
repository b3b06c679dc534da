"""metabatch.nn: the module bridge and the task-batching rules (exact second order under vmap)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from metabatch import batching, maml
from metabatch import nn as mnn

T = 3


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- bridge


def test_params_are_the_live_trainable_parameters():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    net[2].bias.requires_grad_(False)
    p = mnn.params(net)
    assert list(p) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]
    assert all(p[k] is dict(net.named_parameters())[k] for k in p)
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got dict"):
        mnn.params({})


def test_functional_reads_frozen_params_and_copies_buffers():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    net[2].bias.requires_grad_(False)
    net.train()
    apply = mnn.functional(net)
    x = randn(5, 2)
    running = net[1].running_mean.clone()
    out = apply(mnn.params(net), x)
    assert torch.allclose(out, net(x))  # net(x) updates the running stats, apply must not
    assert not torch.equal(net[1].running_mean, running)
    running = net[1].running_mean.clone()
    count = net[1].num_batches_tracked.clone()
    apply(mnn.params(net), x)
    assert torch.equal(net[1].running_mean, running) and torch.equal(net[1].num_batches_tracked, count)
    zero = {k: torch.zeros_like(v) for k, v in mnn.params(net).items()}
    assert torch.equal(apply(zero, x), net[2].bias.detach().expand(5, 1))
    with pytest.raises(ValueError, match=r"\['2.wieght'\] are not parameters or buffers of Sequential"):
        apply({"2.wieght": torch.zeros(1, 3)}, x)
    with pytest.raises(TypeError, match="params must be a dict"):
        apply([torch.zeros(1)], x)


def test_objective_and_accuracy():
    net = nn.Linear(2, 3)
    x, y = randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = mnn.objective(net, F.cross_entropy)
    assert torch.allclose(loss(mnn.params(net), (x, y)), F.cross_entropy(net(x), y))
    acc = mnn.objective(net, mnn.accuracy)
    assert acc(mnn.params(net), (x, y)).item() == (net(x).argmax(-1) == y).double().mean().item()
    bilinear = nn.Bilinear(2, 2, 3)
    two_inputs = mnn.objective(bilinear, F.cross_entropy)
    assert torch.allclose(two_inputs(mnn.params(bilinear), (x, x, y)), F.cross_entropy(bilinear(x, x), y))
    with pytest.raises(TypeError, match=r"data must be a tuple \(inputs, targets\), got Tensor"):
        loss(mnn.params(net), x)
    with pytest.raises(TypeError, match="fn must be callable"):
        mnn.objective(net, "mse")


# ------------------------------------------------------------------ batching rules
#
# For an op f(x, *params), a task's inner loss is sum(f(x * s, *params)^2 * r); the outer
# objective is a function of the inner gradients (with respect to x and to the params),
# differentiated once more with respect to the shared scale s and the shared params.
# Under vmap over tasks (with the rules) this must equal the per-task loop.


def second_order_check(op, x, params, batched_params=(), tol=1e-10):
    first = [p[0] if i in batched_params else p for i, p in enumerate(params)]
    r = randn(*op(x[0], *first).shape, seed=7).abs()
    s = 1 + 0.1 * randn(*x.shape[1:], seed=8)
    u = randn(*x.shape[1:], seed=9)

    def task(s, params, x):
        def inner(x, params):
            return (op(x * s, *params) ** 2 * r).sum()

        gx, gp = grad(inner, argnums=(0, 1))(x, params)
        return (gx * u).sum() + sum((g ** 2).sum() for g in gp)

    def looped(s, params):
        return sum(task(s, [p[t] if i in batched_params else p for i, p in enumerate(params)], x[t])
                   for t in range(T))

    def vmapped(s, params):
        dims = [0 if i in batched_params else None for i in range(len(params))]
        with batching.batching_rules():
            return vmap(task, in_dims=(None, dims, 0))(s, params, x).sum()

    want = grad(looped, argnums=(0, 1))(s, params)
    got = grad(vmapped, argnums=(0, 1))(s, params)
    flat_want = [want[0], *want[1]]
    flat_got = [got[0], *got[1]]
    scale = max(w.abs().max() for w in flat_want)
    for g, w in zip(flat_got, flat_want, strict=True):
        assert (g - w).abs().max() <= tol * scale
    # values too
    with batching.batching_rules():
        ys = vmap(op, in_dims=(0, *[0 if i in batched_params else None for i in range(len(params))]))(x, *params)
    for t in range(T):
        ref = op(x[t], *[p[t] if i in batched_params else p for i, p in enumerate(params)])
        assert torch.allclose(ys[t], ref, rtol=1e-12, atol=1e-12)


CONVS = {
    "plain": {},
    "stride_pad": {"stride": 2, "padding": 1},
    "dilation": {"padding": 2, "dilation": 2},
    "groups": {"groups": 2, "padding": (1, 0)},
}


@pytest.mark.parametrize("batched_weight", [False, True])
@pytest.mark.parametrize("kind", CONVS)
def test_conv2d_rule(kind, batched_weight):
    kw = CONVS[kind]
    cin = 4 if kind == "groups" else 3
    w = randn(*((T,) if batched_weight else ()), 4, cin // kw.get("groups", 1), 3, 3, seed=1)
    b = randn(*((T,) if batched_weight else ()), 4, seed=2)
    def op(x, w, b):
        return F.conv2d(x, w, b, **kw)
    second_order_check(op, randn(T, 2, cin, 6, 7, seed=3), [w, b], batched_params=(0, 1) if batched_weight else ())
    def op_nobias(x, w):
        return F.conv2d(x, w, None, **kw)
    second_order_check(op_nobias, randn(T, 2, cin, 6, 7, seed=4), [w], batched_params=(0,) if batched_weight else ())


@pytest.mark.parametrize("kw", [{"kernel_size": 2},
                                {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
                                {"kernel_size": (2, 3), "stride": 1, "dilation": (1, 2)}])
def test_max_pool2d_rule(kw):
    second_order_check(lambda x: F.max_pool2d(x, **kw), randn(T, 2, 3, 7, 8, seed=5), [])
    x = randn(T, 2, 3, 7, 8, seed=6)
    with batching.batching_rules():
        y, idx = vmap(lambda x: F.max_pool2d(x, return_indices=True, **kw))(x)
    for t in range(T):
        yt, it = F.max_pool2d(x[t], return_indices=True, **kw)
        assert torch.equal(y[t], yt) and torch.equal(idx[t], it)


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (4, 3, 5, 6)])
@pytest.mark.parametrize("affine", ["shared", "per_task", "none"])
def test_batch_norm_rule(shape, affine):
    x = randn(T, *shape, seed=10)
    if affine == "none":
        second_order_check(lambda x: F.batch_norm(x, None, None, training=True), x, [])
        return
    lead = (T,) if affine == "per_task" else ()
    w, b = 1 + randn(*lead, 3, seed=11), randn(*lead, 3, seed=12)
    second_order_check(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), x, [w, b],
                       batched_params=(0, 1) if affine == "per_task" else ())


def test_batch_norm_in_eval_mode_uses_running_stats_natively():
    mean, var = randn(3, seed=13), 1 + randn(3, seed=14).abs()
    w, b = randn(3, seed=15), randn(3, seed=16)
    second_order_check(lambda x, w, b: F.batch_norm(x, mean, var, w, b, training=False),
                       randn(T, 4, 3, 5, seed=17), [w, b])


def test_layer_norm_and_instance_norm_rules():
    x = randn(T, 4, 3, 5, seed=18)
    w, b = 1 + randn(3, 5, seed=19), randn(3, 5, seed=20)
    second_order_check(lambda x, w, b: F.layer_norm(x, (3, 5), w, b), x, [w, b])
    w1, b1 = 1 + randn(5, seed=21), randn(5, seed=22)
    second_order_check(lambda x, w, b: F.layer_norm(x, (5,), w, b), x, [w1, b1])
    wi, bi = 1 + randn(3, seed=23), randn(3, seed=24)
    second_order_check(lambda x, w, b: F.instance_norm(x, weight=w, bias=b), x, [wi, bi])
    second_order_check(lambda x: F.instance_norm(x), x, [])


def test_group_norm_and_rms_norm_are_exact_natively():
    x = randn(T, 4, 6, 5, seed=25)
    w, b = 1 + randn(6, seed=26), randn(6, seed=27)
    second_order_check(lambda x, w, b: F.group_norm(x, 2, w, b), x, [w, b])
    wr = 1 + randn(6, 5, seed=28)
    second_order_check(lambda x, w: F.rms_norm(x, (6, 5), w), x, [wr])


@pytest.mark.xfail(strict=True, reason="pytorch/functorch#534 (see docs/sharp-bits.md): stock vmap rules of "
                                       "batch_norm/layer_norm/instance_norm drop d(weight grad)/d(input)")
@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "instance_norm"])
def test_stock_rules_are_wrong_for_second_order(op):
    """The minimal reproduction of the upstream bug, with the rules off."""
    f = {"batch_norm": lambda x, w: F.batch_norm(x, None, None, w, None, training=True),
         "layer_norm": lambda x, w: F.layer_norm(x, (3,), w),
         "instance_norm": lambda x, w: F.instance_norm(x, weight=w)}[op]
    x = randn(T, 4, 3, 5, seed=29) if op == "instance_norm" else randn(T, 4, 3, seed=29)
    w = 1 + randn(3, seed=30)
    s = 1 + 0.1 * randn(*x.shape[1:], seed=31)

    def task(s, w, x):
        gw = grad(lambda w: (f(x * s, w) ** 3).sum())(w)
        return (gw ** 2).sum()

    want = grad(lambda s: sum(task(s, w, x[t]) for t in range(T)))(s)
    got = grad(lambda s: vmap(task, in_dims=(None, None, 0))(s, w, x).sum())(s)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def common_layers():
    return {
        "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1), "gelu": nn.GELU(), "silu": nn.SiLU(),
        "avg_pool": nn.AvgPool2d(2), "adaptive_avg_pool": nn.AdaptiveAvgPool2d(1),
        "adaptive_max_pool": nn.AdaptiveMaxPool2d(2), "group_norm": nn.GroupNorm(2, 4),
        "instance_norm": nn.InstanceNorm2d(4, affine=True), "layer_norm": nn.LayerNorm([4, 6, 6]),
        "upsample": nn.Upsample(scale_factor=2, mode="bilinear"), "pixel_shuffle": nn.PixelShuffle(2),
        "reflect_pad": nn.ReflectionPad2d(1), "conv_transpose": nn.ConvTranspose2d(4, 2, 3),
        "flatten": nn.Flatten(), "dropout2d_eval": nn.Dropout2d(0.5).eval(),
    }


@pytest.mark.parametrize("name", list(common_layers()))
def test_channels_last_activations_work_with_common_layers(name):
    """The query pass keeps activations channels-last: layers after a conv must neither fail nor warn."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), common_layers()[name])
    x = randn(T, 5, 2, 6, 6, seed=32)
    params = {k: v.detach() for k, v in net.named_parameters()}
    apply = mnn.functional(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with batching.batching_rules():
            y = vmap(apply, in_dims=(None, 0))(params, x)
            g = grad(lambda p: vmap(apply, in_dims=(None, 0))(p, x).pow(2).sum())(params)
    for t in range(T):
        assert torch.allclose(y[t], apply(params, x[t]), atol=1e-12)
    want = grad(lambda p: sum(apply(p, x[t]).pow(2).sum() for t in range(T)))(params)
    for k in params:
        assert torch.allclose(g[k], want[k], atol=1e-10)


def test_view_of_a_channels_last_activation_falls_back_to_reshape():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 9, 2)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
            return self.fc(x.view(x.size(0), -1))

    net = Net()
    loss_fn = mnn.objective(net, F.cross_entropy)
    xs, ys = randn(T, 4, 1, 6, 6, seed=33), torch.randint(0, 2, (T, 4))
    loss = maml.meta_loss(loss_fn, mnn.params(net), (xs, ys), (xs, ys), lr=0.1)
    want = sum(loss_fn(maml.adapt(loss_fn, mnn.params(net), (xs[t], ys[t]), lr=0.1), (xs[t], ys[t]))
               for t in range(T)) / T
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("op", ["conv", "conv_in_vmap", "max_pool", "batch_norm"])
def test_per_task_second_order_under_vmap_equals_loop(op):
    """vmap of grad of grad (e.g. per-task meta-gradients) needs the rules' own backward."""
    x, w = randn(T, 2, 2, 6, 6, seed=34), randn(2, 2, 3, 3, seed=35)
    f = {"conv": lambda x, w: F.conv2d(x, w, padding=1),
         # an inner vmap over samples: the conv rule itself runs under the grads (its own backward)
         "conv_in_vmap": lambda x, w: vmap(lambda xi: F.conv2d(xi[None], w, padding=1, stride=2)[0])(x),
         "max_pool": lambda x, w: F.max_pool2d(F.conv2d(x, w, padding=1), 2),
         "batch_norm": lambda x, w: F.batch_norm(F.conv2d(x, w), None, None, w[:, 0, 0, 0], None, training=True)}[op]

    def task(w, x):  # differentiates the inner gradient above the vmap level
        return grad(lambda w: grad(lambda w: f(x, w).pow(3).sum())(w).pow(2).sum())(w)

    with batching.batching_rules():
        got = vmap(task, in_dims=(None, 0))(w, x)
    for t in range(T):
        assert torch.allclose(got[t], task(w, x[t]), rtol=1e-10, atol=1e-10)


def test_rules_only_touch_batched_calls_and_nest():
    x, w = randn(2, 1, 5, 5, seed=36), randn(2, 1, 3, 3, seed=37)

    def f(w):  # second order without vmap: native ops all the way
        g = grad(lambda w: F.conv2d(x, w).pow(3).sum())(w)
        return (g ** 2).sum()

    want = grad(f)(w)
    with batching.batching_rules(), batching.batching_rules():
        assert torch.equal(grad(f)(w), want)
    with batching.batching_rules(enabled=False):
        assert torch.equal(grad(f)(w), want)


def test_channels_last_can_be_turned_off_for_a_meta_loss_call():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 9, 2))
    loss_fn = mnn.objective(net, F.cross_entropy)
    xs, ys = randn(T, 4, 1, 6, 6, seed=38), torch.randint(0, 2, (T, 4))
    default = maml.meta_loss(loss_fn, mnn.params(net), (xs, ys), (xs, ys), steps=2, lr=0.1)
    with batching.batching_rules(channels_last=False):
        contiguous = maml.meta_loss(loss_fn, mnn.params(net), (xs, ys), (xs, ys), steps=2, lr=0.1)
    assert contiguous.item() == pytest.approx(default.item(), rel=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func.jvp's
def test_forward_mode_inside_vmap_uses_exact_fallbacks():
    x, tangent = randn(T, 4, 3, 6, 6, seed=39), randn(T, 4, 3, 6, 6, seed=40)
    w = 1 + randn(3, seed=41)

    def f(x):
        return F.max_pool2d(F.batch_norm(x, None, None, w, None, training=True), 2)

    def jvp(x, t):
        return torch.func.jvp(f, (x,), (t,))

    with batching.batching_rules():
        out, tan = vmap(jvp)(x, tangent)
    for t in range(T):
        ref_out, ref_tan = jvp(x[t], tangent[t])
        assert torch.allclose(out[t], ref_out, atol=1e-12) and torch.allclose(tan[t], ref_tan, atol=1e-12)


def test_nn_batching_rules_is_the_batching_module_s():
    assert mnn.batching_rules is batching.batching_rules
