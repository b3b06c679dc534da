"""The README's main job, timed as a user runs it: idle against busy cores, and against JAX's step.

Two questions, each answered as a ratio measured in one sitting:

1. **Shared cores** (issue 12). ``python examples/maml_sinusoid.py --steps 2000`` with its default
   flags, on the idle machine and with one core held by a busy-loop process, interleaved
   (idle, busy, idle, busy, ...). The figure is the example's own ``ms_per_step`` (the steps after
   the first, which compiles); the ratio busy / idle of the medians (goal <= 1.6). Every run shares
   one inductor cache, warmed by an untimed run first, so that compiling does not colour the rounds.
2. **Against JAX** (issue 15). The full protocol, ``python examples/maml_sinusoid.py`` (70 000
   steps), from a cold compile cache: its wall time from start to exit (compile, training and the
   600-task evaluation included) against 70 000 x the jitted JAX W1 step (benchmarks/maml.py's
   ``make_jax_step``: vmap + optax Adam in one jit), measured just before and just after it; the
   ratio wall / (70 000 x JAX step) (goal <= 2.5).

    python benchmarks/sinusoid.py                      # both: ~3 min + the main job (~2-4 min)
    python benchmarks/sinusoid.py --skip-main-job      # only idle vs busy (~3 min)
    python benchmarks/sinusoid.py --skip-shared-cores  # only the main job against JAX
    python benchmarks/sinusoid.py --quick --out /tmp/s # a smoke run (200 steps, one round, 1 000-step job)

Writes benchmarks/results/sinusoid_speed.json and sinusoid_speed.png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "maml_sinusoid.py"


def _env(cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_example(args: list[str], cache_dir: str, out: pathlib.Path) -> dict:
    """Run the example in its own process; its metrics.json plus the process's wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args, "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, env=_env(cache_dir), check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"maml_sinusoid.py {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "ms_per_step": metrics["ms_per_step"], "first_step_s": metrics["first_step_seconds"],
            "train_s": metrics["train_seconds"], "threads": metrics["threads"],
            "mse": metrics["post_adaptation_mse"]["mean"], "mse_ci95": metrics["post_adaptation_mse"]["ci95"]}


class BusyCore:
    """A process spinning in a loop: one core held by other work while the ``with`` block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        self.start = (time.perf_counter(), _cpu_s(self.proc.pid))
        return self

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self.start[0], _cpu_s(self.proc.pid) - self.start[1]
        self.cores = cpu / wall if wall > 0 else 0.0
        self.proc.kill()
        self.proc.wait()


def _cpu_s(pid: int) -> float:
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def jax_step_ms(reps: int = 2000) -> dict:
    """Median ms of the jitted JAX W1 step (benchmarks/maml.py's), in its own process."""
    code = (f"import sys, time, statistics, json; sys.path.insert(0, {str(HERE)!r}); import maml as bm\n"
            "step, compile_s = bm.make_jax_step('W1', 1)\n"
            "for _ in range(50): step()\n"
            "times = []\n"
            f"for _ in range({reps}):\n"
            "    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)\n"
            "print(json.dumps({'ms': 1000 * statistics.median(times), 'compile_s': compile_s}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_start": os.getloadavg()}


def plot(result: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    shared = result.get("shared_cores")
    ax = axes[0]
    if shared:
        names = ["idle", "one core busy"]
        values = [shared["idle_ms_per_step"], shared["busy_ms_per_step"]]
        ax.bar(names, values, color=["tab:gray", "tab:orange"])
        for i, (k, v) in enumerate(zip(("idle", "busy"), values, strict=False)):
            ax.scatter([i] * len(shared["rounds"][k]), shared["rounds"][k], color="k", s=8, zorder=3)
            ax.text(i, v, f" {v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"main job, {shared['steps']} steps, default flags: ms/step (busy/idle "
                     f"{shared['busy_over_idle']:.2f}x)", fontsize=8)
    else:
        ax.axis("off")
    ax = axes[1]
    main = result.get("main_job")
    if main:
        budget = main["goal_ratio"] * main["steps"] * main["jax_step_ms"] / 1000
        ax.barh(["main job (wall)", f"{main['goal_ratio']} x {main['steps']} x JAX step"],
                [main["wall_s"], budget], color=["tab:orange", "tab:green"])
        ax.set_title(f"full protocol: {main['wall_s']:.0f} s = {main['ratio_to_jax']:.2f} x {main['steps']} x JAX "
                     f"step (goal <= {main['goal_ratio']})", fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps of each idle / busy run (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="idle / busy pairs, interleaved (default 3)")
    parser.add_argument("--main-steps", type=int, default=70_000, help="steps of the main job (default 70000)")
    parser.add_argument("--skip-main-job", action="store_true", help="only the idle / busy comparison")
    parser.add_argument("--skip-shared-cores", action="store_true", help="only the main job against JAX")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 steps, 1 round, a 1 000-step job")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if args.replot:
        return plot(json.loads((out / "sinusoid_speed.json").read_text()), out / "sinusoid_speed.png")
    if args.quick:
        args.steps, args.rounds, args.main_steps = 200, 1, 1000
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    work = pathlib.Path(tempfile.mkdtemp(prefix="sinusoid-bench-"))
    cache = str(work / "inductor")

    result = {"machine": info}
    if not args.skip_shared_cores:
        result["shared_cores"] = shared_cores(args, cache, work)
    if not args.skip_main_job:
        result["main_job"] = main_job(args, work)
    info["load_average_end"] = os.getloadavg()
    previous = out / "sinusoid_speed.json"
    if previous.exists():  # keep the part this run skipped
        old = json.loads(previous.read_text())
        for part in ("shared_cores", "main_job"):
            if part not in result and part in old:
                result[part] = old[part]
    previous.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "sinusoid_speed.png")
    print(f"wrote {previous}")


def shared_cores(args, cache, work) -> dict:
    """ms/step of the default-flag job, idle against one busy core, interleaved rounds (a warm cache)."""
    common = ["--steps", str(args.steps)] + (["--eval-tasks", "50"] if args.quick else [])
    warm = run_example(common, cache, work / "warm")
    print(f"warm-up run (compiles, untimed): first step {warm['first_step_s']:.1f} s", flush=True)
    rounds = {"idle": [], "busy": [], "busy_cores": []}
    for r in range(args.rounds):
        idle = run_example(common, cache, work / f"idle{r}")
        with BusyCore() as busy_core:
            busy = run_example(common, cache, work / f"busy{r}")
        rounds["idle"].append(idle["ms_per_step"])
        rounds["busy"].append(busy["ms_per_step"])
        rounds["busy_cores"].append(busy_core.cores)
        print(f"round {r + 1}: idle {idle['ms_per_step']:.2f} ms/step, busy {busy['ms_per_step']:.2f} ms/step "
              f"(the busy loop held {busy_core.cores:.2f} cores)", flush=True)
    idle_ms, busy_ms = statistics.median(rounds["idle"]), statistics.median(rounds["busy"])
    print(f"idle {idle_ms:.2f} ms/step, one core busy {busy_ms:.2f} ms/step: busy/idle {busy_ms / idle_ms:.2f} "
          f"(goal <= 1.6)", flush=True)
    return {"steps": args.steps, "threads": warm["threads"], "rounds": rounds, "idle_ms_per_step": idle_ms,
            "busy_ms_per_step": busy_ms, "busy_over_idle": busy_ms / idle_ms, "goal": "<= 1.6",
            "first_step_s_warm_cache": warm["first_step_s"], "load_average": os.getloadavg()}


def main_job(args, work) -> dict:
    """The full protocol from a cold compile cache, against JAX's W1 step measured before and after it."""
    before = jax_step_ms()
    job = run_example(["--steps", str(args.main_steps)] + (["--eval-tasks", "50"] if args.quick else []),
                      str(work / "cold-inductor"), work / "main")
    after = jax_step_ms()
    jax_ms = statistics.median([before["ms"], after["ms"]])
    ratio = job["wall_s"] / (args.main_steps * jax_ms / 1000)
    print(f"main job: {job['wall_s']:.1f} s wall (first step {job['first_step_s']:.1f} s cold, "
          f"{job['ms_per_step']:.2f} ms/step), MSE {job['mse']:.3f}; JAX step {jax_ms:.3f} ms: "
          f"{ratio:.2f} x {args.main_steps} JAX steps (goal <= 2.5)", flush=True)
    return {"steps": args.main_steps, "wall_s": job["wall_s"], "train_s": job["train_s"],
            "first_step_s_cold_cache": job["first_step_s"], "ms_per_step": job["ms_per_step"],
            "post_adaptation_mse": job["mse"], "mse_ci95": job["mse_ci95"], "jax_step_ms": jax_ms,
            "jax_step_ms_before_after": [before["ms"], after["ms"]], "jax_compile_s": before["compile_s"],
            "ratio_to_jax": ratio, "goal_ratio": 2.5, "load_average": os.getloadavg()}


if __name__ == "__main__":
    main()
