"""Race metabatch's vmapped MAML against per-task anchors, side by side in one run.

One meta-step = inner loop on every task's support set + outer backward + Adam.

Workloads:
    W1     sinusoid regression: MLP 1-40-40-1, 25 tasks, K=10 support, 10 query, lr 0.01.
    W2     Omniglot 5-way 1-shot: conv4 (64 channels, BatchNorm with batch statistics), 28x28,
           15 query images per class, 8 tasks, lr 0.4.
    W2-32  W2 at meta-batch 32, the MAML paper's Omniglot setting (in the --device cuda run).
    Each with 1 and 5 inner steps, second-order MAML.

Anchors:
    higher          higher.innerloop_ctx, one task at a time (a backward per task)
    higher (THP)    the same with THP_MEM_ALLOC_ENABLE=1, the huge pages metabatch turns on (W2)
    learn2learn     learn2learn's MAML.clone()/adapt(), one task at a time
    torch.func loop torch.func.grad inner loop, one task at a time, one backward
    vmap (naive)    torch.func.vmap over tasks of the same function, stock batching rules
    metabatch       maml.meta_loss(...).backward() + Adam, eager, as the docs write it
    metabatch (THP off)           the same with THP_MEM_ALLOC_ENABLE=0: the allocator lever (W2)
    metabatch channels_last=False the query pass's convolutions in NCHW: the layout lever (W2)
    metabatch accumulate=2  meta_loss over 2 tasks at a time, a backward each (gradient
                    accumulation; the graph of 2 tasks alive at a time, as higher keeps 1) (W2)
    metabatch chunk=2   meta_loss(chunk_size=2): vmap two tasks at a time, one backward (W2)
    metabatch remat chunk=2   meta_loss(remat=True, chunk_size=2): no graph kept, two tasks
                    recomputed at a time in the backward pass (W2)
    metabatch compiled (natural)  torch.compile over the step as a user writes it first:
                    zero_grad, meta_loss(...).backward(), opt.step() (W1)
    metabatch compiled (one graph)  torch.compile(fullgraph=True) of the whole step as one graph:
                    torch.func.grad_and_value + torch.optim.adam.adam (examples/maml_sinusoid.py's
                    make_meta_step), Inductor's default Python wrapper (W1)
    metabatch compiled (recipe)   the same with Inductor's C++ wrapper (options={"cpp_wrapper":
                    True}: the kernels are called from C++, not one by one from Python): the recipe of
                    docs/performance.md and examples/maml_sinusoid.py (W1)
    jax             jit(grad(mean(vmap(task)))) + optax.adam (W1)

Every (workload, steps, anchor) runs in its own process, so that peak memory is its own and one
anchor's allocator state does not colour the next; with --rounds R the whole list runs R times,
interleaved (round-major), and the table reports the median of the R per-process medians. A
compiled anchor keeps one inductor cache per run: its first round compiles from an empty cache
(compile_cold_s), the later rounds from the warm one (compile_warm_s).

Setup (benchmark-only packages, outside metabatch's dependencies):
    pip install -e ".[bench]"          # higher, jax, optax, matplotlib
    pip download --no-deps --no-binary :all: learn2learn==0.2.0 -d /tmp/l2l
    tar xzf /tmp/l2l/learn2learn-0.2.0.tar.gz -C /tmp/l2l
    python benchmarks/maml.py --l2l-src /tmp/l2l/learn2learn-0.2.0
    python benchmarks/maml.py --device cuda --l2l-src /tmp/l2l/learn2learn-0.2.0   # on a GPU machine

``import learn2learn`` needs torchvision, which has no CPU wheel for torch 2.13, and its sdist does
not build on Python 3.11 (its Cython output includes ``longintrepr.h``, gone in 3.11): the benchmark
loads ``learn2learn/algorithms/maml.py`` (with ``utils`` and ``algorithms/base_learner``) straight
from the unpacked sources.

Writes benchmarks/results/maml.json and maml.png (--device cuda: maml_cuda.json, maml_cuda.png).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
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
ROOT = HERE.parent
RESULTS = HERE / "results"

WORKLOADS = {
    "W1": {"tasks": 25, "lr": 0.01, "title": "W1 sinusoid MLP 1-40-40-1, 25 tasks, K=10"},
    "W2": {"tasks": 8, "lr": 0.4, "title": "W2 Omniglot 5-way 1-shot conv4+BN, 8 tasks"},
    "W2-32": {"tasks": 32, "lr": 0.4, "title": "W2 at meta-batch 32 (MAML's Omniglot setting)"},
}
ANCHORS = {
    "cpu": {
        "W1": ["higher", "learn2learn", "torch.func loop", "vmap (naive)", "metabatch",
               "metabatch compiled (natural)", "metabatch compiled (one graph)", "metabatch compiled (recipe)",
               "jax"],
        "W2": ["higher", "higher (THP)", "learn2learn", "torch.func loop", "vmap (naive)", "metabatch",
               "metabatch (THP off)", "metabatch channels_last=False", "metabatch accumulate=2",
               "metabatch chunk=2", "metabatch remat chunk=2"],
        "W2-32": ["higher", "metabatch", "metabatch accumulate=2"],
    },
    "cuda": {
        "W1": ["higher", "learn2learn", "torch.func loop", "metabatch", "metabatch compiled (recipe)", "jax"],
        "W2": ["higher", "learn2learn", "torch.func loop", "metabatch", "metabatch chunk=2"],
        "W2-32": ["higher", "learn2learn", "metabatch", "metabatch chunk=2"],
    },
}
DEFAULT_WORKLOADS = {"cpu": "W1,W2", "cuda": "W1,W2,W2-32"}
# Environment of one anchor's process on top of the run's (the allocator levers).
ANCHOR_ENV = {"higher (THP)": {"THP_MEM_ALLOC_ENABLE": "1"},
              "metabatch (THP off)": {"THP_MEM_ALLOC_ENABLE": "0"}}
COMPILED = {"metabatch compiled (natural)", "metabatch compiled (one graph)", "metabatch compiled (recipe)"}
METABATCH_ANCHORS = "metabatch"  # every anchor whose name starts with it imports metabatch


# ------------------------------------------------------------------------ workloads


def build(workload, device="cpu"):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    t = WORKLOADS[workload]["tasks"]
    if workload == "W1":
        model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
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
        support = (torch.rand(t, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(t, 1))
        query = (torch.rand(t, 75, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(15).repeat(t, 1))
        criterion = torch.nn.functional.cross_entropy
    model = model.to(device)
    support = tuple(x.to(device) for x in support)
    query = tuple(x.to(device) for x in query)
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


def load_sinusoid_example():
    """examples/maml_sinusoid.py as a real module (dynamo looks functions' modules up by name)."""
    spec = importlib.util.spec_from_file_location("maml_sinusoid_example", ROOT / "examples" / "maml_sinusoid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_step(workload, anchor, steps, l2l_src, device="cpu"):
    """A zero-argument function doing one meta-step, and the compile time (s) it took, if any.

    metabatch is imported only for metabatch's anchors: importing it turns on huge pages
    (metabatch.runtime), which the other anchors' processes should not get unasked.
    """
    import torch
    from torch.func import functional_call, grad, vmap

    model, support, query, criterion = build(workload, device)
    t, lr = WORKLOADS[workload]["tasks"], WORKLOADS[workload]["lr"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    params = {k: p for k, p in model.named_parameters()}

    def task_loss(p, x, y):
        return criterion(functional_call(model, p, (x,)), y)

    def func_task(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(task_loss)(p, xs, ys)
            p = {k: p[k] - lr * g[k] for k in p}
        return task_loss(p, xq, yq)

    base = anchor.split(" (THP")[0]
    if base == "higher":
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
        return step, None
    if base == "learn2learn":
        learner = load_learn2learn(l2l_src).MAML(model, lr=lr)

        def step():
            opt.zero_grad()
            for i in range(t):
                clone = learner.clone()
                for _ in range(steps):
                    clone.adapt(criterion(clone(support[0][i]), support[1][i]))
                (criterion(clone(query[0][i]), query[1][i]) / t).backward()
            opt.step()
        return step, None
    if base == "torch.func loop":
        def step():
            loss = sum(func_task(params, support[0][i], support[1][i], query[0][i], query[1][i])
                       for i in range(t)) / t
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step, None
    if base == "vmap (naive)":
        def step():
            loss = vmap(func_task, in_dims=(None, 0, 0, 0, 0))(params, *support, *query).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step, None
    if not anchor.startswith(METABATCH_ANCHORS):
        raise ValueError(f"unknown anchor {anchor!r}")

    import optree

    from metabatch import batching, maml
    from metabatch import nn as mnn

    loss_fn = mnn.objective(model, criterion)
    params = mnn.params(model)
    if anchor in ("metabatch compiled (one graph)", "metabatch compiled (recipe)"):
        example = load_sinusoid_example()
        options = example.COMPILE_OPTIONS if anchor == "metabatch compiled (recipe)" else None
        meta_step = torch.compile(example.make_meta_step(loss_fn, {"params": params}, opt, steps=steps, lr=lr),
                                  fullgraph=True, options=options)
        start = time.perf_counter()
        meta_step(support, query)
        compile_s = time.perf_counter() - start
        return (lambda: meta_step(support, query)), compile_s
    if anchor == "metabatch compiled (natural)":
        @torch.compile
        def natural():
            opt.zero_grad()
            loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, lr=lr)
            loss.backward()
            opt.step()

        start = time.perf_counter()
        natural()
        return natural, time.perf_counter() - start
    if anchor == "metabatch accumulate=2":
        def step():
            opt.zero_grad()
            for lo in range(0, t, 2):
                part = optree.tree_map(lambda x, lo=lo: x[lo:lo + 2], (support, query))
                n = part[0][0].shape[0]
                (maml.meta_loss(loss_fn, params, *part, steps=steps, lr=lr) * (n / t)).backward()
            opt.step()
        return step, None
    options = {"metabatch": {}, "metabatch (THP off)": {}, "metabatch channels_last=False": {},
               "metabatch chunk=2": {"chunk_size": 2},
               "metabatch remat chunk=2": {"chunk_size": 2, "remat": True}}[anchor]
    channels_last = anchor != "metabatch channels_last=False"

    def step():
        with batching.batching_rules(channels_last=channels_last):
            loss = maml.meta_loss(loss_fn, params, support, query, steps=steps, lr=lr, **options)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step, None


def make_jax_step(workload, steps, device="cpu"):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    if workload != "W1":
        raise ValueError("the JAX anchor covers W1 only")
    if device == "cuda":
        try:
            jax.devices("gpu")
        except RuntimeError as err:
            raise RuntimeError(f"JAX has no GPU backend here (pip install 'jax[cuda12]'): {err}") from None
    _, support, query, _ = build(workload)
    lr = WORKLOADS[workload]["lr"]
    sizes = [(1, 40), (40, 40), (40, 1)]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = [(jax.random.normal(k, s) * (1 / s[0]) ** 0.5, jnp.zeros(s[1])) for k, s in zip(keys, sizes, strict=False)]

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
    device = spec.get("device", "cpu")
    cuda = device == "cuda"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    if spec["anchor"] == "jax":
        step, compile_s = make_jax_step(spec["workload"], spec["steps"], device)
    else:
        import torch

        torch.manual_seed(0)
        step, compile_s = make_step(spec["workload"], spec["anchor"], spec["steps"], spec["l2l_src"], device)
    if cuda and spec["anchor"] != "jax":
        inner_step = step

        def step():
            inner_step()
            torch.cuda.synchronize()
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
    out = {"ms": 1000 * statistics.median(times), "ms_p25": 1000 * q[0], "ms_p75": 1000 * q[2],
           "reps": len(times), "peak_rss_mb": rss_mb(), "base_rss_mb": base_rss, "compile_s": compile_s}
    if cuda and spec["anchor"] != "jax":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def child_interleaved(spec):
    """Build every anchor of ``spec["anchors"]`` in this process and alternate them step by step.

    For a noisy (shared) machine: every anchor sees the same moments of contention, and the median
    of single-step times drops the steps another process interrupted. The allocator setting is this
    process's (THP_MEM_ALLOC_ENABLE from the environment; metabatch sets it to 1 unless set).
    """
    import torch

    torch.set_num_threads(1)  # one thread for every anchor: no OpenMP pool spinning between them
    steps_of, compile_s = {}, {}
    for anchor in spec["anchors"]:
        torch.manual_seed(0)
        if anchor == "jax":
            steps_of[anchor], compile_s[anchor] = make_jax_step(spec["workload"], spec["steps"])
        else:
            steps_of[anchor], compile_s[anchor] = make_step(spec["workload"], anchor, spec["steps"],
                                                            spec["l2l_src"])
        for _ in range(spec["warmup"]):
            steps_of[anchor]()
    times = {anchor: [] for anchor in spec["anchors"]}
    for _ in range(spec["rounds"]):
        for anchor, step in steps_of.items():
            for _ in range(spec["per_round"].get(anchor, spec["per_round"]["default"])):
                t0 = time.perf_counter()
                step()
                times[anchor].append(time.perf_counter() - t0)
    print(json.dumps({a: {"ms": 1000 * statistics.median(t), "reps": len(t), "compile_s": compile_s[a]}
                      for a, t in times.items()}))


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- driver


def machine(device):
    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    info = {"device": device, "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "glibc": platform.libc_ver()[1], "load_average_start": os.getloadavg()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["transparent_hugepage"] = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        info["transparent_hugepage"] = None
    for name in ["higher", "jax", "jaxlib", "optax"]:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def run_one(spec, env_extra, timeout, cache_dirs):
    env = dict(os.environ, **env_extra, **ANCHOR_ENV.get(spec["anchor"], {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if spec["anchor"] in COMPILED:  # one cache per anchor and run: cold in round 1, warm after
        key = (spec["workload"], spec["steps"], spec["anchor"])
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dirs.setdefault(key, tempfile.mkdtemp(prefix="inductor-"))
    return run_child(__file__, spec, timeout, env)


def run_child(script, spec: dict, timeout: float, env: dict | None = None) -> dict:
    """Run `script --child SPEC` in a fresh process: its last JSON line, or {"error": ...}.

    benchmarks/inner.py and imaml_memory.py run their anchors through it too.
    """
    try:
        out = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], capture_output=True,
                             text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def combine(runs):
    """One row from the rounds of one (workload, steps, anchor, env): medians, spreads, cold/warm compile."""
    ok = [r for r in runs if "ms" in r]
    if not ok:
        return {"error": runs[-1].get("error", "no result"), "rounds": runs}
    row = {"ms": statistics.median(r["ms"] for r in ok), "ms_rounds": [r["ms"] for r in ok],
           "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
           "base_rss_mb": statistics.median(r["base_rss_mb"] for r in ok),
           "reps": [r["reps"] for r in ok]}
    if any("peak_cuda_mb" in r for r in ok):
        row["peak_cuda_mb"] = statistics.median(r["peak_cuda_mb"] for r in ok)
    if ok[0].get("compile_s") is not None:
        row["compile_cold_s"] = runs[0].get("compile_s") if "ms" in runs[0] else None
        warm = [r["compile_s"] for r in runs[1:] if "ms" in r]
        row["compile_warm_s"] = statistics.median(warm) if warm else None
    if len(ok) < len(runs):
        row["failed_rounds"] = [r["error"] for r in runs if "ms" not in r]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workloads", default=None, help="comma-separated (default: W1,W2 on CPU; "
                        "W1,W2,W2-32 on CUDA)")
    parser.add_argument("--steps", default="1,5")
    parser.add_argument("--anchors", default=None, help="comma-separated subset of anchors")
    parser.add_argument("--rounds", type=int, default=3, help="run every anchor this many times, interleaved")
    parser.add_argument("--l2l-src", default=os.environ.get("L2L_SRC"),
                        help="unpacked learn2learn sdist (folder holding learn2learn/)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, one round (a smoke run)")
    parser.add_argument("--thp-pass", action="store_true",
                        help="also run every W2 anchor with THP_MEM_ALLOC_ENABLE=1 (the allocator for all)")
    parser.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                        help="instead: time all selected anchors of a (workload, steps) in one process, "
                             "alternating them for ROUNDS rounds (a noisy machine); writes maml_interleaved.json, "
                             "no memory figures; the anchors that set their own environment are left out")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-interleaved", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.child_interleaved:
        return child_interleaved(json.loads(args.child_interleaved))
    name = "maml" if args.device == "cpu" else "maml_cuda"
    out = pathlib.Path(args.out)
    if args.replot:
        saved = json.loads((out / f"{name}.json").read_text())
        return plot(saved["results"], out / f"{name}.png", saved["machine"])
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); run it where a GPU is, or use --device cpu.")
    workloads = (args.workloads or DEFAULT_WORKLOADS[args.device]).split(",")
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
    rounds = 1 if args.quick else args.rounds
    out.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    wanted = set(args.anchors.split(",")) if args.anchors else None
    specs = []
    for workload in workloads:
        envs = [("default", {})]
        if workload.startswith("W2") and args.thp_pass:
            envs.append(("THP_MEM_ALLOC_ENABLE=1", {"THP_MEM_ALLOC_ENABLE": "1"}))
        for env_name, env in envs:
            for steps in map(int, args.steps.split(",")):
                for anchor in ANCHORS[args.device][workload]:
                    if (wanted and anchor not in wanted) or (env_name != "default" and anchor in ANCHOR_ENV):
                        continue
                    heavy = workload.startswith("W2") and args.device == "cpu"
                    spec = {"workload": workload, "steps": steps, "anchor": anchor, "l2l_src": args.l2l_src,
                            "device": args.device, "warmup": 1 if heavy else 10,
                            "min_reps": (2 if args.quick else 5) if heavy else (5 if args.quick else 20),
                            "max_reps": 10 if heavy else 2000, "min_seconds": 0 if args.quick else 3.0}
                    specs.append((spec, env_name, env))
    if args.interleaved:
        return interleaved(args, specs, info, out, workloads)
    runs = {i: [] for i in range(len(specs))}
    cache_dirs = {}
    for r in range(rounds):
        for i, (spec, env_name, env) in enumerate(specs):
            result = run_one(spec, env, timeout=1200, cache_dirs=cache_dirs)
            runs[i].append(result)
            shown = f"{result['ms']:9.2f} ms  rss {result['peak_rss_mb']:6.0f} MB" if "ms" in result \
                else result["error"]
            print(f"[round {r + 1}/{rounds}] {spec['workload']} {spec['steps']}-step {spec['anchor']:30s} "
                  f"[{env_name}] {shown}", flush=True)
    rows = []
    for i, (spec, env_name, _) in enumerate(specs):
        rows.append({"workload": spec["workload"], "steps": spec["steps"], "anchor": spec["anchor"],
                     "env": env_name, "device": args.device, **combine(runs[i])})
    info["load_average_end"] = os.getloadavg()
    info["rounds"] = rounds
    summary = ratios(rows)
    result = {"machine": info, "workloads": {w: WORKLOADS[w] for w in workloads}, "notes": NOTES,
              "results": rows, "ratios": summary, "targets": targets(rows)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out / f"{name}.png", info)
    for line in summary + result["targets"]:
        print(line)


# One thread for JAX too, as for torch, in the --interleaved process.
INTERLEAVED_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def interleaved(args, specs, info, out, workloads):
    """One process per (workload, steps): its anchors alternate step by step; medians of single steps."""
    groups = {}
    for spec, env_name, _ in specs:
        if env_name == "default" and spec["anchor"] not in ANCHOR_ENV:
            groups.setdefault((spec["workload"], spec["steps"]), []).append(spec["anchor"])
    rows = []
    for (workload, steps), anchors in groups.items():
        heavy = workload.startswith("W2")
        spec = {"workload": workload, "steps": steps, "anchors": anchors, "l2l_src": args.l2l_src,
                "rounds": args.interleaved, "warmup": 1 if heavy else 10,
                "per_round": {"default": 1 if heavy else 20, "higher": 1 if heavy else 2,
                              "learn2learn": 1 if heavy else 2, "torch.func loop": 1 if heavy else 2}}
        paths = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), XLA_FLAGS=INTERLEAVED_XLA_FLAGS)
        proc = subprocess.run([sys.executable, __file__, "--child-interleaved", json.dumps(spec)], capture_output=True,
                              text=True, env=env, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{workload} {steps}-step: failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
            continue
        for anchor, r in json.loads(lines[-1]).items():
            rows.append({"workload": workload, "steps": steps, "anchor": anchor, "env": "default", "device": "cpu",
                         "timing": "interleaved", "ms": r["ms"], "reps": r["reps"], "compile_s": r["compile_s"]})
            print(f"{workload} {steps}-step {anchor:30s} {r['ms']:9.2f} ms (median of {r['reps']} steps)", flush=True)
    info["load_average_end"] = os.getloadavg()
    info["interleaved_rounds"] = args.interleaved
    info["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    info["threads"] = f"torch 1, XLA_FLAGS={INTERLEAVED_XLA_FLAGS}"
    lines = [line for line in ratios(rows) if "peak memory" not in line]
    result = {"machine": info, "workloads": {w: WORKLOADS[w] for w in workloads},
              "notes": [("ms: median of single meta-steps, all anchors of a (workload, steps) in one process, "
                         "alternating (--interleaved), one intra-op thread for torch and for JAX (with two, "
                         "the OpenMP pool spinning after one anchor slowed the next by up to 10x); no memory "
                         "figures in this mode.")] + NOTES[2:],
              "results": rows, "ratios": lines}
    (out / "maml_interleaved.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out / "maml_interleaved.png", info)
    for line in lines:
        print(line)


NOTES = [
    ("ms: the median over rounds of each process's median wall time of one meta-step (inner loop + outer "
     "backward + Adam); ms_rounds: the per-round medians. CUDA: each step ends with torch.cuda.synchronize()."),
    ("Each (workload, steps, anchor, env) ran in its own process per round; peak_rss_mb is that process's "
     "high-water mark (base_rss_mb: after imports, before building the workload); peak_cuda_mb: "
     "torch.cuda.max_memory_allocated."),
    ("metabatch's processes import metabatch, which sets THP_MEM_ALLOC_ENABLE=1 (huge pages for large CPU "
     "tensors) unless set; the other anchors' processes do not import it. 'higher (THP)' and "
     "'metabatch (THP off)' swap that setting."),
    ("learn2learn 0.2.0: 'import learn2learn' needs torchvision (no CPU wheel for torch 2.13) and its sdist does "
     "not build on Python 3.11; its algorithms/maml.py was loaded directly from the unpacked sources."),
    ("vmap (naive) uses PyTorch's own batching rules: its W2 meta-gradient is wrong (BatchNorm, "
     "pytorch/functorch#534); metabatch's is exact."),
    ("metabatch compiled (one graph): torch.compile(fullgraph=True) of examples/maml_sinusoid.py's "
     "make_meta_step; (recipe): the same with options={'cpp_wrapper': True}, as the example and "
     "docs/performance.md compile it; (natural): torch.compile over zero_grad / meta_loss(...).backward() / "
     "opt.step() (graph breaks at backward and in Optimizer.step). compile_cold_s from an empty inductor "
     "cache, compile_warm_s from the cache the first round left."),
    "jax: jit(grad(mean(vmap(task)))) + optax.adam, float32; compile_s is the first call.",
]


def _row(rows, workload, steps, anchor, env="default"):
    for r in rows:
        if (r["workload"], r["steps"], r["anchor"], r["env"]) == (workload, steps, anchor, env) and "ms" in r:
            return r
    return None


def ratios(rows):
    lines = []
    for r in rows:
        if not r["anchor"].startswith("metabatch") or "ms" not in r:
            continue
        parts = []
        for ref in ["higher", "higher (THP)", "learn2learn", "torch.func loop", "vmap (naive)", "jax"]:
            other = _row(rows, r["workload"], r["steps"], ref, r["env"])
            if other:
                parts.append(f"{other['ms'] / r['ms']:.2f}x vs {ref}")
        higher = _row(rows, r["workload"], r["steps"], "higher", r["env"])
        key = "peak_cuda_mb" if "peak_cuda_mb" in r else "peak_rss_mb"
        if higher and r["workload"].startswith("W2") and r.get(key) and higher.get(key):
            parts.append(f"peak memory {r[key] / higher[key]:.2f}x higher's")
        if r.get("compile_cold_s") is not None:
            parts.append(f"compile {r['compile_cold_s']:.1f} s cold"
                         + (f", {r['compile_warm_s']:.1f} s warm" if r.get("compile_warm_s") else ""))
        lines.append(f"{r['workload']} {r['steps']}-step {r['anchor']} [{r['env']}]: {r['ms']:.2f} ms; "
                     + ", ".join(parts))
    return lines


def targets(rows):
    """Issue 15's targets, as measured ratios (time ratios: smaller is faster for metabatch)."""
    lines = []

    def time_ratio(workload, steps, ours, ref):
        a, b = _row(rows, workload, steps, ours), _row(rows, workload, steps, ref)
        return None if a is None or b is None else a["ms"] / b["ms"]

    for steps in (1, 5):
        for ours, goal in (("metabatch compiled (recipe)", 1.0), ("metabatch compiled (one graph)", 1.0),
                           ("metabatch compiled (natural)", 1.5)):
            v = time_ratio("W1", steps, ours, "jax")
            if v is not None:
                lines.append(f"target W1 {steps}-step {ours}: {v:.2f}x JAX's time (goal <= {goal})")
        v = time_ratio("W1", steps, "higher", "metabatch")
        if v is not None:
            lines.append(f"target W1 {steps}-step metabatch eager: {v:.1f}x higher's speed (goal >= 10)")
        for ours in ("metabatch", "metabatch accumulate=2", "metabatch chunk=2"):
            a, h = _row(rows, "W2", steps, ours), _row(rows, "W2", steps, "higher")
            if a and h:
                lines.append(f"target W2 {steps}-step {ours}: {h['ms'] / a['ms']:.2f}x higher's speed (goal >= 1.5), "
                             f"{a['peak_rss_mb'] / h['peak_rss_mb']:.2f}x its peak RSS (goal <= 1.5)")
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
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (workload, env, steps) in zip(axes.flat, panels, strict=False):
        sel = [r for r in rows if (r["workload"], r["env"], r["steps"]) == (workload, env, steps) and "ms" in r]
        if not sel:
            ax.axis("off")
            continue
        ref = next((r["ms"] for r in sel if r["anchor"] == "higher"), None)
        colors = ["tab:orange" if r["anchor"].startswith("metabatch") else
                  "tab:green" if r["anchor"] == "jax" else "tab:gray" for r in sel]
        ax.barh(range(len(sel)), [r["ms"] for r in sel], color=colors)
        ax.set_yticks(range(len(sel)), [r["anchor"] for r in sel], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.3 * max(r["ms"] for r in sel))
        ax.tick_params(axis="x", labelsize=7)
        title = f"{workload} {steps}-step" + ("" if env == "default" else f", {env}")
        ax.set_title(title + " — ms per meta-step (speed-up vs higher)", fontsize=8)
        for i, r in enumerate(sel):
            note = f" {r['ms']:.3g}" + (f" ({ref / r['ms']:.2f}x)" if ref else "")
            ax.text(r["ms"], i, note, va="center", fontsize=6.5)
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"
    fig.suptitle(f"MAML meta-step (inner loop + outer backward + Adam), {where}, torch {info['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
