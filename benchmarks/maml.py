"""Race metabatch's vmapped MAML against per-task anchors, side by side in one run.

One meta-step = inner loop on every task's support set + outer backward + Adam.

Workloads:
    W1  sinusoid regression: MLP 1-40-40-1, 25 tasks, K=10 support, 10 query, lr 0.01.
    W2  Omniglot 5-way 1-shot: conv4 (64 channels, BatchNorm with batch statistics), 28x28,
        15 query images per class, 8 tasks, lr 0.4.
    Each with 1 and 5 inner steps, second-order MAML.

Anchors:
    higher          higher.innerloop_ctx, one task at a time
    learn2learn     learn2learn's MAML.clone()/adapt(), one task at a time
    torch.func loop torch.func.grad inner loop, one task at a time
    vmap (naive)    torch.func.vmap over tasks of the same function, stock batching rules
    metabatch       maml.meta_loss (eager; BatchNorm meta-gradients exact, unlike naive vmap)
    metabatch chunk=2   the same with vmap's chunk_size=2 (W2)
    metabatch remat chunk=2   meta_loss(remat=True, chunk_size=2): no graph kept, two tasks
                    recomputed at a time in the backward pass (W2: the memory-lean setting)
    metabatch compiled  torch.compile of the whole step (W1)
    jax             jit(grad(mean(vmap(task)))) + optax.adam (W1)

Every (workload, steps, anchor) runs in its own process, so that peak RSS is its own and
one anchor's allocator state does not colour the next. W2 runs twice: with the default
allocator settings, and with PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages
for large CPU tensors; see docs/sharp-bits.md for why vmapped workloads care).

Setup (benchmark-only packages, outside metabatch's dependencies):
    pip install -e ".[bench]"          # higher, jax, optax, matplotlib
    pip download --no-deps --no-binary :all: learn2learn==0.2.0 -d /tmp/l2l
    tar xzf /tmp/l2l/learn2learn-0.2.0.tar.gz -C /tmp/l2l
    python benchmarks/maml.py --l2l-src /tmp/l2l/learn2learn-0.2.0

``import learn2learn`` needs torchvision, which has no CPU wheel for torch 2.13, and its
sdist does not build on Python 3.11: the benchmark loads ``learn2learn/algorithms/maml.py``
(with ``utils`` and ``algorithms/base_learner``) straight from the unpacked sources.

Writes benchmarks/results/maml.json and maml.png.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

WORKLOADS = {
    "W1": {"tasks": 25, "lr": 0.01, "title": "W1 sinusoid MLP 1-40-40-1, 25 tasks, K=10"},
    "W2": {"tasks": 8, "lr": 0.4, "title": "W2 Omniglot 5-way 1-shot conv4+BN, 8 tasks"},
}
ANCHORS = {
    "W1": ["higher", "learn2learn", "torch.func loop", "vmap (naive)", "metabatch", "metabatch compiled", "jax"],
    "W2": ["higher", "learn2learn", "torch.func loop", "vmap (naive)", "metabatch", "metabatch chunk=2",
           "metabatch remat chunk=2"],
}


# ------------------------------------------------------------------------ workloads


def build(workload):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if workload == "W1":
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        t = WORKLOADS["W1"]["tasks"]
        amp = 0.1 + 4.9 * torch.rand(t, 1, 1, generator=g)
        phase = 3.14159 * torch.rand(t, 1, 1, generator=g)
        xs = -5 + 10 * torch.rand(t, 10, 1, generator=g)
        xq = -5 + 10 * torch.rand(t, 10, 1, generator=g)
        support, query = (xs, amp * torch.sin(xs + phase)), (xq, amp * torch.sin(xq + phase))
        criterion = torch.nn.functional.mse_loss
    else:
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(1 if i == 0 else 64, 64, 3, padding=1),
                       nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 5))
        t = WORKLOADS["W2"]["tasks"]
        support = (torch.rand(t, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(t, 1))
        query = (torch.rand(t, 75, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(15).repeat(t, 1))
        criterion = torch.nn.functional.cross_entropy
    return model, support, query, criterion


def load_learn2learn(src):
    try:
        return importlib.import_module("learn2learn.algorithms.maml")
    except ImportError:  # torchvision missing: load the module files directly
        for name in [n for n in sys.modules if n.startswith("learn2learn")]:
            del sys.modules[name]
    if not src:
        raise RuntimeError("learn2learn needs --l2l-src PATH (an unpacked learn2learn sdist)")
    for name in ["learn2learn", "learn2learn.algorithms"]:
        module = types.ModuleType(name)
        module.__path__ = [str(pathlib.Path(src, *name.split(".")))]
        sys.modules[name] = module
    return importlib.import_module("learn2learn.algorithms.maml")


def make_step(workload, anchor, steps, l2l_src):
    """A zero-argument function doing one meta-step, and the compile time (s) it took, if any."""
    import torch
    from torch.func import functional_call, grad, vmap

    from metabatch import maml
    from metabatch import nn as mnn

    model, support, query, criterion = build(workload)
    t, lr = WORKLOADS[workload]["tasks"], WORKLOADS[workload]["lr"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = mnn.params(model)

    def task_loss(p, x, y):
        return criterion(functional_call(model, p, (x,)), y)

    def func_task(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(task_loss)(p, xs, ys)
            p = {k: p[k] - lr * g[k] for k in p}
        return task_loss(p, xq, yq)

    if anchor == "higher":
        import higher

        inner = torch.optim.SGD(model.parameters(), lr=lr)

        def step():
            opt.zero_grad()
            for i in range(t):
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(criterion(fmodel(support[0][i]), support[1][i]))
                    (criterion(fmodel(query[0][i]), query[1][i]) / t).backward()
            opt.step()
    elif anchor == "learn2learn":
        learner = load_learn2learn(l2l_src).MAML(model, lr=lr)

        def step():
            opt.zero_grad()
            for i in range(t):
                clone = learner.clone()
                for _ in range(steps):
                    clone.adapt(criterion(clone(support[0][i]), support[1][i]))
                (criterion(clone(query[0][i]), query[1][i]) / t).backward()
            opt.step()
    elif anchor == "torch.func loop":
        def step():
            loss = sum(func_task(params, support[0][i], support[1][i], query[0][i], query[1][i])
                       for i in range(t)) / t
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif anchor == "vmap (naive)":
        def step():
            loss = vmap(func_task, in_dims=(None, 0, 0, 0, 0))(params, *support, *query).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif anchor.startswith("metabatch") and anchor != "metabatch compiled":
        loss_fn = mnn.objective(model, criterion)
        chunk = 2 if anchor.endswith("chunk=2") else None
        remat = "remat" in anchor

        def step():
            loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, lr=lr, chunk_size=chunk,
                                  remat=remat)
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif anchor == "metabatch compiled":
        loss_fn = mnn.objective(model, criterion)

        @torch.compile
        def step():
            detached = {k: p.detach() for k, p in params.items()}
            grads = torch.func.grad(
                lambda p: maml.meta_loss(loss_fn, p, support, query, steps=steps, lr=lr))(detached)
            for k, p in params.items():
                p.grad = grads[k]
            opt.step()

        start = time.perf_counter()
        step()
        return step, time.perf_counter() - start
    else:
        raise ValueError(f"unknown anchor {anchor!r}")
    return step, None


def make_jax_step(workload, steps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    if workload != "W1":
        raise ValueError("the JAX anchor covers W1 only")
    _, support, query, _ = build(workload)
    lr = WORKLOADS[workload]["lr"]
    sizes = [(1, 40), (40, 40), (40, 1)]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = [(jax.random.normal(k, s) * (1 / s[0]) ** 0.5, jnp.zeros(s[1])) for k, s in zip(keys, sizes)]

    def net(p, x):
        for i, (w, b) in enumerate(p):
            x = x @ w + b
            if i < 2:
                x = jax.nn.relu(x)
        return x

    def loss(p, x, y):
        return jnp.mean((net(p, x) - y) ** 2)

    def task(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = jax.grad(loss)(p, xs, ys)
            p = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)
        return loss(p, xq, yq)

    def meta_loss(p, *data):
        return jnp.mean(jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(p, *data))

    opt = optax.adam(1e-3)

    @jax.jit
    def jstep(p, state, *data):
        g = jax.grad(meta_loss)(p, *data)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    data = [jnp.asarray(np.asarray(a)) for a in (*support, *query)]
    carry = [params, opt.init(params)]
    start = time.perf_counter()
    jax.block_until_ready(jstep(*carry, *data))
    compile_s = time.perf_counter() - start

    def step():
        carry[:] = jstep(*carry, *data)
        jax.block_until_ready(carry[0])

    return step, compile_s


def child(spec):
    """Time one (workload, steps, anchor) in this process; print one JSON line."""
    base_rss = rss_mb()
    if spec["anchor"] == "jax":
        step, compile_s = make_jax_step(spec["workload"], spec["steps"])
    else:
        import torch

        torch.manual_seed(0)
        step, compile_s = make_step(spec["workload"], spec["anchor"], spec["steps"], spec["l2l_src"])
    for _ in range(spec["warmup"]):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < spec["min_reps"] or (time.perf_counter() - start < spec["min_seconds"]
                                            and len(times) < spec["max_reps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    print(json.dumps({"ms": 1000 * statistics.median(times), "ms_p25": 1000 * q[0], "ms_p75": 1000 * q[2],
                      "reps": len(times), "peak_rss_mb": rss_mb(), "base_rss_mb": base_rss,
                      "compile_s": compile_s}))


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- driver


def machine():
    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads":
            torch.get_num_threads(), "python": platform.python_version(), "glibc": platform.libc_ver()[1],
            "load_average_start": os.getloadavg()}
    for name in ["higher", "jax", "optax"]:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def run_one(spec, env_extra, timeout):
    env = dict(os.environ, **env_extra)
    if spec["anchor"] == "metabatch compiled":  # a cold compile, not one from an earlier run's cache
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                             text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--steps", default="1,5")
    parser.add_argument("--anchors", default=None, help="comma-separated subset of anchors")
    parser.add_argument("--l2l-src", default=os.environ.get("L2L_SRC"),
                        help="unpacked learn2learn sdist (folder holding learn2learn/)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--no-thp", action="store_true", help="skip W2's THP_MEM_ALLOC_ENABLE=1 pass")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--replot", action="store_true", help="redraw maml.png from maml.json only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.replot:
        saved = json.loads((pathlib.Path(args.out) / "maml.json").read_text())
        return plot(saved["results"], pathlib.Path(args.out) / "maml.png", saved["machine"])

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    rows = []
    wanted = set(args.anchors.split(",")) if args.anchors else None
    for workload in args.workloads.split(","):
        envs = [("default", {})]
        if workload == "W2" and not args.no_thp:
            envs.append(("THP_MEM_ALLOC_ENABLE=1", {"THP_MEM_ALLOC_ENABLE": "1"}))
        for env_name, env in envs:
            for steps in map(int, args.steps.split(",")):
                for anchor in ANCHORS[workload]:
                    if wanted and anchor not in wanted:
                        continue
                    heavy = workload == "W2"
                    spec = {"workload": workload, "steps": steps, "anchor": anchor, "l2l_src": args.l2l_src,
                            "warmup": 1 if heavy else 10, "min_reps": (2 if args.quick else 5) if heavy else 20,
                            "max_reps": 10 if heavy else 2000, "min_seconds": 0 if args.quick else 3.0}
                    result = run_one(spec, env, timeout=1200)
                    row = {"workload": workload, "steps": steps, "anchor": anchor, "env": env_name, **result}
                    rows.append(row)
                    shown = f"{row['ms']:9.2f} ms  rss {row['peak_rss_mb']:6.0f} MB" if "ms" in row \
                        else row["error"]
                    print(f"{workload} {steps}-step {anchor:20s} [{env_name}] {shown}", flush=True)
    info["load_average_end"] = os.getloadavg()
    summary = ratios(rows)
    result = {"machine": info, "workloads": WORKLOADS, "notes": NOTES, "results": rows, "ratios": summary}
    (out / "maml.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out / "maml.png", info)
    for line in summary:
        print(line)


NOTES = [
    "ms: median wall time of one meta-step (inner loop + outer backward + Adam); ms_p25/ms_p75: quartiles.",
    ("Each (workload, steps, anchor, env) ran in its own process; peak_rss_mb is that process's high-water mark "
    "(base_rss_mb: after imports, before building the workload)."),
    ("learn2learn 0.2.0: 'import learn2learn' needs torchvision (no CPU wheel for torch 2.13) and its sdist does "
    "not build on Python 3.11; its algorithms/maml.py was loaded directly from the unpacked sources."),
    ("vmap (naive) uses PyTorch's own batching rules: its W2 meta-gradient is wrong (BatchNorm, "
    "pytorch/functorch#534); metabatch's is exact."),
    ("metabatch compiled: torch.compile of torch.func.grad(meta_loss) + Adam's step, compile_s from an empty "
    "inductor cache (first call)."),
    "jax: jit(grad(mean(vmap(task)))) + optax.adam, float32 on CPU; compile_s is the first call.",
]


def ratios(rows):
    def ms(workload, steps, anchor, env="default"):
        for r in rows:
            if (r["workload"], r["steps"], r["anchor"], r["env"]) == (workload, steps, anchor, env) and "ms" in r:
                return r
        return None

    lines = []
    for r in rows:
        if not r["anchor"].startswith("metabatch") or "ms" not in r:
            continue
        parts = []
        for ref in ["higher", "learn2learn", "torch.func loop", "vmap (naive)", "jax"]:
            other = ms(r["workload"], r["steps"], ref, r["env"])
            if other:
                parts.append(f"{other['ms'] / r['ms']:.2f}x vs {ref}")
        loop = ms(r["workload"], r["steps"], "torch.func loop", r["env"])
        if loop and r["workload"] == "W2":
            parts.append(f"peak RSS {r['peak_rss_mb'] / loop['peak_rss_mb']:.2f}x the loop's")
        if r.get("compile_s"):
            parts.append(f"compile {r['compile_s']:.1f} s")
        lines.append(f"{r['workload']} {r['steps']}-step {r['anchor']} [{r['env']}]: {r['ms']:.2f} ms; "
                     + ", ".join(parts))
    return lines


def plot(rows, path, info):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    panels = sorted({(r["workload"], r["env"], r["steps"]) for r in rows},
                    key=lambda p: (p[0], p[1] != "default", p[2]))
    cols = 2
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (workload, env, steps) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["workload"], r["env"], r["steps"]) == (workload, env, steps) and "ms" in r]
        ref = next((r["ms"] for r in sel if r["anchor"] == "higher"), None)
        colors = ["tab:orange" if r["anchor"].startswith("metabatch") else
                  "tab:green" if r["anchor"] == "jax" else "tab:gray" for r in sel]
        ax.barh(range(len(sel)), [r["ms"] for r in sel], color=colors)
        ax.set_yticks(range(len(sel)), [r["anchor"] for r in sel], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.25 * max(r["ms"] for r in sel))
        ax.tick_params(axis="x", labelsize=7)
        title = f"{workload} {steps}-step" + ("" if env == "default" else f", {env}")
        ax.set_title(title + " — ms per meta-step (speed-up vs higher)", fontsize=8)
        for i, r in enumerate(sel):
            note = f" {r['ms']:.3g}" + (f" ({ref / r['ms']:.2f}x)" if ref else "")
            ax.text(r["ms"], i, note, va="center", fontsize=7)
    fig.suptitle(f"MAML meta-step (inner loop + outer backward + Adam), {info['cpu']} ({info['cores']} cores), "
                 f"torch {info['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
