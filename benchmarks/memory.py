"""Task data larger than memory: memory-mapped class arrays against in-memory ones, side by side.

A synthetic uint8 class array [C, 600, 3, 84, 84] (mini-ImageNet's shape; 12.7 MB a class) of each
--sizes GB is written once to --data-dir as .npy. For each size and start method, a fresh process
runs `mb.task_loader(mb.tasks.classification(images, ways=5), ...)` with --workers workers, 5-way
1-shot 15-query, 4 tasks a batch, for one epoch of its classes (C tasks), with the images held
three ways:

    mmap        `mb.tasks.mmap_array(path)`: a read-only memory map that pickles by reference (what the
                dataset readers return); workers map the file and share the page cache, and each
                process drops its mapping of what it read every `release_every` (64 MiB) bytes
    mmap-kept   `mb.tasks.mmap_array(path, release_every=None)`: the same map, never released (what
                the first version did): touched pages stay mapped and count in the process's USS
    in-memory   `np.load(path)`: the array in the main process's memory (what the readers returned
                before); fork shares it copy-on-write, spawn pickles a copy into every worker

plus a tiny set (5 classes, "empty") for the baseline memory of a worker. Sizes where the in-memory
copies would not fit (main + workers > 60 % of RAM) are skipped for in-memory.

Start methods (--methods): fork, spawn, forkserver, and two recipes that cut what starting a worker
costs after the first time: forkserver-preload (`multiprocessing.set_forkserver_preload(["__main__",
"torch", "metabatch"])`: one server imports them once, workers are forks of it) and spawn-persistent
(`persistent_workers=True`: the workers outlive the epoch).

Measured per cell: the time to open the array; the time from creating the loader to the first batch,
split (from timestamps the workers take, one clock for all processes) into (a) worker start: until a
worker begins to unpickle the task (process, interpreter, importing torch, metabatch and the main
module) and (b) what the data adds: unpickling the task (a reference, or a copy of the array), the
first batch's tasks (first page touches) and its delivery; the same for the first batch of a second
epoch over the same loader; tasks/s once every worker has delivered a batch (an epoch, at least
--min-batches batches); and from /proc/<pid>/smaps_rollup of the main process and of each worker,
after the first batch and at the end of the epoch: RSS, PSS, USS (Private_Clean + Private_Dirty), USS
without clean file pages (Private_Dirty: anonymous memory, the copies), Pss_Anon, Pss_File. Clean
pages of a mapped file that only one process touched count in its USS although they are page cache
the kernel can drop at any time; both numbers are reported. The file's pages are evicted from the
page cache (posix_fadvise DONTNEED) before each cell unless --warm, so every cell starts cold.

Also measured: how long a bare interpreter, `import torch` and `import torch, metabatch` take here (what
every spawned worker pays), and the cost of the bound: tasks/s of the same tasks built in one
process from the warm file by `mmap` and `mmap-kept`, interleaved (--release-rounds).

Targets (issue 17): first batch under spawn <= 1 s at every size (checked on (b), the data's part,
when (a) alone is over 1 s); each worker's USS within 100 MB of its value for the empty set, at every
size; the 8 GB set iterates a full epoch with the summed USS of all processes <= 1 GB.

    python benchmarks/memory.py --sizes 0.5 2 8 --data-dir /tmp/metabatch-memory   # the full run
    python benchmarks/memory.py --sizes 0.1 0.5 --name memory_quick                 # a quick check

Writes DIR/<name>.json and DIR/<name>.png (DIR: --out, default benchmarks/results; name: memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PER_CLASS, ITEM = 600, (3, 84, 84)
CLASS_BYTES = PER_CLASS * int(np.prod(ITEM))
BATCH, WAYS, N_CTX, N_TGT = 4, 5, 1, 15
MODES = ("mmap", "mmap-kept", "in-memory")
METHODS = ("fork", "spawn", "forkserver", "forkserver-preload", "spawn-persistent")
TARGETS = {"first_batch_spawn_s": "<= 1 s at every size (mmap); on data_s where worker_start_s alone is over",
           "worker_uss_vs_empty_mb": "<= 100 MB above the empty set's, every size (mmap)",
           "sum_uss_8gb_epoch_mb": "<= 1024 MB (mmap, 8 GB set, one epoch)"}


# --------------------------------------------------------------------------- data


def dataset(folder: pathlib.Path, gb: float | None) -> pathlib.Path:
    """The synthetic set of ``gb`` GB (``None``: the 5-class "empty" set), written once, in chunks."""
    classes = 5 if gb is None else max(WAYS, round(gb * 2**30 / CLASS_BYTES))
    path = folder / f"classes-{classes}x{PER_CLASS}x{'x'.join(map(str, ITEM))}.npy"
    shape = (classes, PER_CLASS) + ITEM
    if path.exists():
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            if np.lib.format.read_array_header_1_0(f)[0] == shape and path.stat().st_size >= math.prod(shape):
                return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    rng = np.random.default_rng(classes)
    print(f"writing {path} ({math.prod(shape) / 2**30:.2f} GiB) ...", flush=True)
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for _ in range(classes):
            f.write(rng.integers(0, 256, (PER_CLASS,) + ITEM, dtype=np.uint8).tobytes())
    os.replace(tmp, path)
    return path


def evict(path: pathlib.Path) -> None:
    """Drop the file's pages from the page cache (ours only; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ measuring


FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty")


def smaps(pid) -> dict | None:
    """MB figures of /proc/<pid>/smaps_rollup, plus uss = Private_Clean + Private_Dirty."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        if name in FIELDS:
            kb[name] = int(rest.split()[0])
    mb = {k.lower(): v / 1024 for k, v in kb.items()}
    mb["uss"] = (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024
    mb["uss_anon"] = kb.get("Private_Dirty", 0) / 1024
    return mb


def snapshot(main_pid: int, workers: list) -> dict:
    return {"main": smaps(main_pid), "workers": [smaps(w) for w in workers]}


def workers_of(pid: int) -> list:
    """The loader workers among the descendants of ``pid`` (not multiprocessing's helper processes)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                try:
                    with open(f"/proc/{kid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                todo.append(kid)
                helper = "resource_tracker" in cmd or ("forkserver import main" in cmd and p == pid)
                if not helper:  # the forkserver's own children (the workers) share its command line
                    found.append(kid)
    return sorted(found)


def touch(batch) -> int:
    import optree

    leaves = optree.tree_leaves(batch)
    for leaf in leaves:
        flat = leaf.reshape(-1)
        flat[::max(1, 4096 // leaf.element_size())].sum()
    return leaves[0].shape[0]


CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)  # the clock of /proc/<pid>/stat's start time


def now() -> float:
    return time.clock_gettime(CLOCK)


class _Stamp:
    """Unpickles to the time it is unpickled at (`now()`, one clock for every process)."""

    def __reduce__(self):
        return time.clock_gettime, (CLOCK,)


def _stamped(unpickle_start: float, task, folder: str, unpickle_end: float) -> Stamped:
    return Stamped(task, folder, unpickle_start, unpickle_end)


@dataclasses.dataclass
class Stamped:
    """A `sample_task` wrapper that records, in each worker, when it was unpickled and ran its first batch.

    It pickles as `(stamp, task, folder, stamp)`, so the worker's unpickler takes a timestamp right before
    and right after the task itself: what comes before is the worker's start (interpreter, imports,
    the main module, the loader's own objects), what comes between is the task's data (a reference or a
    copy). After its first BATCH tasks it writes them, with its process's start time, to
    `folder/<pid>.json`.
    """

    task: object
    folder: str
    unpickle_start: float | None = None
    unpickle_end: float | None = None
    calls: int = 0
    first_call: float | None = None

    def __reduce__(self):
        return _stamped, (_Stamp(), self.task, self.folder, _Stamp())

    def __call__(self, key, idx, n_ctx, n_tgt):
        if self.calls == 0:
            self.first_call = now()
        out = self.task(key, idx, n_ctx, n_tgt)
        self.calls += 1
        if self.calls == BATCH:
            import torch.utils.data

            info = torch.utils.data.get_worker_info()
            with open(f"/proc/{os.getpid()}/stat") as f:  # field 22: start time in clock ticks since boot
                started = int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
            record = {"pid": os.getpid(), "worker": None if info is None else info.id, "started": started,
                      "unpickle_start": self.unpickle_start, "unpickle_end": self.unpickle_end,
                      "first_call": self.first_call, "batch_end": now()}
            pathlib.Path(self.folder, f"{os.getpid()}.json").write_text(json.dumps(record))
        return out


def split(folder: pathlib.Path, t0: float, first_s: float, seen: set) -> dict:
    """The first batch's time split by the stamps of the workers not in `seen` (then added to it)."""
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if record["pid"] not in seen:
            seen.add(record["pid"])
            records.append(record)
    if not records:  # persistent workers: nothing was started again
        return {"worker_start_s": 0.0, "data_s": first_s, "workers": []}
    rel = [{k: (v - t0 if k in ("started", "unpickle_start", "unpickle_end", "first_call", "batch_end")
                and v is not None else v) for k, v in r.items()} for r in records]
    first = min(rel, key=lambda r: (r["worker"] is None, r["worker"] or 0))  # worker 0 builds batch 0
    begin = first["unpickle_start"] if first["unpickle_start"] is not None else first["first_call"]
    out = {"worker_start_s": begin, "data_s": first_s - begin, "process_started_s": first["started"],
           "first_tasks_s": first["batch_end"] - first["first_call"],
           "delivery_s": first_s - first["batch_end"], "workers": rel}
    if first["unpickle_start"] is not None:  # fork workers inherit the task: nothing to unpickle
        out["unpickle_s"] = first["unpickle_end"] - first["unpickle_start"]
        out["after_unpickle_s"] = first["first_call"] - first["unpickle_end"]
    return out


def open_images(path: pathlib.Path, mode: str):
    import metabatch as mb

    if mode == "mmap":
        return mb.tasks.mmap_array(path)
    if mode == "mmap-kept":
        return mb.tasks.mmap_array(path, release_every=None)
    return np.load(path)


def cell(spec: dict) -> dict:
    """One measurement, in its own process: spec = {path, mode, method, workers, epochs, min_batches}."""
    import multiprocessing

    import torch

    import metabatch as mb

    torch.set_num_threads(1)
    method = spec["method"]
    context = method.split("-")[0]
    if method == "forkserver-preload":  # the recipe: one server imports these once, workers are its forks
        multiprocessing.set_forkserver_preload(["__main__", "torch", "metabatch"])
    path = pathlib.Path(spec["path"])
    tic = time.perf_counter()
    images = open_images(path, spec["mode"])
    open_s = time.perf_counter() - tic
    stamps = pathlib.Path(tempfile.mkdtemp(prefix="metabatch-memory-stamps-"))
    sample_task = Stamped(mb.tasks.classification(images, ways=WAYS), str(stamps))
    num_classes = len(images)
    num_batches = max(math.ceil(spec["epochs"] * num_classes / BATCH), spec["min_batches"])
    specs = mb.batch_specs(seed=0, num_tasks=num_classes, batch_size=BATCH, n_ctx=N_CTX, n_tgt=N_TGT,
                           num_batches=num_batches)
    before = smaps("self")
    t0 = now()
    loader = mb.task_loader(sample_task, specs, num_workers=spec["workers"], multiprocessing_context=context,
                            persistent_workers=method.endswith("-persistent"))
    it = iter(loader)
    first = next(it)
    first_s = now() - t0
    tasks = touch(first)
    workers = workers_of(os.getpid())
    at_first = snapshot(os.getpid(), workers)
    for _ in range(spec["workers"] - 1):  # every worker has started and delivered once: the rate starts here
        tasks += touch(next(it))
    peak = {"main": 0.0, "workers": [0.0] * len(workers), "sum": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            snap = snapshot(os.getpid(), workers)
            if stop.is_set() or not snap["main"] or not all(snap["workers"]):  # only while all are alive
                continue
            uss = [s["uss"] for s in snap["workers"]]
            main = snap["main"]["uss"]
            peak["main"] = max(peak["main"], main)
            peak["workers"] = [max(a, b) for a, b in zip(peak["workers"], uss, strict=False)]
            peak["sum"] = max(peak["sum"], main + sum(uss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tic = time.perf_counter()
    start = tic - first_s
    rest, at_end = 0, None
    received = spec["workers"]
    for batch in it:
        rest += touch(batch)
        received += 1
        if received == num_batches - 1:  # the workers exit with the iterator: measure them before the end
            at_end = snapshot(os.getpid(), workers)
            stop.set()
    seconds = time.perf_counter() - tic
    epoch_s = time.perf_counter() - start
    if at_end is None:
        at_end = at_first
    stop.set()
    sampler.join()
    del it
    seen: set = set()
    first_split = split(stamps, t0, first_s, seen)
    t1 = now()  # a second epoch over the same loader: new workers, unless persistent
    again = iter(loader)
    touch(next(again))
    again_s = now() - t1
    del again, loader
    again_split = split(stamps, t1, again_s, seen)
    shutil.rmtree(stamps, ignore_errors=True)
    return {"classes": num_classes, "gb": path.stat().st_size / 2**30, "open_s": open_s,
            "first_batch_s": first_s,
            "split": first_split, "again_first_batch_s": again_s, "again_split": again_split,
            "tasks": tasks + rest, "batches": num_batches, "tasks_per_s": rest / seconds if rest else None,
            "epoch_s": epoch_s, "main_before_loader": before, "after_first_batch": at_first, "end": at_end,
            "peak_uss": peak, "workers": len(workers)}


def mapped_mb(array: np.ndarray) -> float:
    """MB of `array`'s memory map that this process has mapped (Rss of its mapping in /proc/self/smaps)."""
    address, inside, total = array.__array_interface__["data"][0], False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total / 1024


def release_cost(spec: dict) -> dict:
    """Tasks/s of the same tasks from the warm file, bounded (the default) and kept, in one process.

    Arms: mmap (released past release_every), mmap-kept (release_every=None), interleaved, the
    order reversed every other round.
    """
    import torch

    import metabatch as mb

    torch.set_num_threads(1)
    path = pathlib.Path(spec["path"])
    arms = {mode: mb.tasks.classification(open_images(path, mode), ways=WAYS)
            for mode in ("mmap", "mmap-kept")}
    keys = [mb.random.fold_in(mb.random.key(1), i) for i in range(spec["tasks"])]

    def run(sample_task) -> float:
        tic = time.perf_counter()
        for k in keys:
            sample_task(k, 0, N_CTX, N_TGT)
        return len(keys) / (time.perf_counter() - tic)

    for sample_task in arms.values():  # warm: the page cache holds these tasks' pages
        run(sample_task)
    rates = {mode: [] for mode in arms}
    for r in range(spec["rounds"]):
        for mode in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            rates[mode].append(run(arms[mode]))
    median = {m: statistics.median(v) for m, v in rates.items()}
    return {"tasks": len(keys), "rounds": spec["rounds"], "tasks_per_s": rates, "median_tasks_per_s": median,
            "mmap_over_kept": median["mmap"] / median["mmap-kept"],
            "releases": {m: arm.classes._pager.releases for m, arm in arms.items()},
            "release_every_mb": arms["mmap"].classes._pager.every / 2**20,
            "mapped_mb": {m: mapped_mb(arm.classes) for m, arm in arms.items()}}


def child_env() -> dict:
    """This environment with the repository first on PYTHONPATH (workers import this metabatch)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def run_cell(spec: dict, timeout: float) -> dict:
    env = child_env()
    try:
        proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    return json.loads(lines[-1])


def startup(rounds: int) -> dict:
    """Seconds (median of `rounds`, interleaved) of a bare interpreter and of a spawned worker's imports."""
    env = child_env()
    programs = {"python": "pass", "import numpy": "import numpy", "import torch": "import torch",
                "import torch, metabatch": "import torch, metabatch"}
    times = {name: [] for name in programs}
    for _ in range(rounds):
        for name, code in programs.items():
            tic = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
            times[name].append(time.perf_counter() - tic)
    return {"rounds": rounds, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "runs_s": times}


# --------------------------------------------------------------------------- results


def machine() -> dict:
    import torch

    import metabatch as mb

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    with open("/proc/loadavg") as f:
        load = f.read().strip()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": mem["MemTotal"] / 2**20,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "metabatch": mb.__version__, "kernel": platform.release(), "date": date, "loadavg_start": load}


def find(cells: list, size: str, method: str, mode: str) -> dict | None:
    return next((c for c in cells if c["size"] == size and c["method"] == method and c["mode"] == mode
                 and "error" not in c and "skipped" not in c), None)


def largest(c: dict, field: str) -> float:
    return max((w[field] for w in c["end"]["workers"] if w), default=0.0)


def total(c: dict, field: str) -> float:
    return c["end"]["main"][field] + sum(w[field] for w in c["end"]["workers"] if w)


def rate(a: dict, b: dict) -> float | None:
    """tasks/s of cell a over cell b."""
    return a["tasks_per_s"] / b["tasks_per_s"] if a["tasks_per_s"] and b["tasks_per_s"] else None


def summary(cells: list) -> dict:
    """Targets, checks and ratios from the cells."""
    out = {"targets": TARGETS, "checks": {}, "ratios": {}, "restart": {}}
    for method in sorted({c["method"] for c in cells}):
        empty = find(cells, "empty", method, "mmap")
        base = largest(empty, "uss") if empty else None
        sizes = ["empty"] + sorted({c["size"] for c in cells if c["size"] != "empty"}, key=float)
        for size in sizes:
            mm = find(cells, size, method, "mmap")
            if mm is None:
                continue
            key = f"{size}GB/{method}" if size != "empty" else f"empty/{method}"
            sp = mm["split"]
            check = {"first_batch_s": mm["first_batch_s"], "worker_start_s": sp["worker_start_s"],
                     "data_s": sp["data_s"], "unpickle_s": sp.get("unpickle_s"),
                     "first_tasks_s": sp.get("first_tasks_s"), "open_s": mm["open_s"],
                     "worker_uss_mb": [w["uss"] for w in mm["end"]["workers"] if w],
                     "worker_uss_anon_mb": [w["uss_anon"] for w in mm["end"]["workers"] if w],
                     "empty_worker_uss_mb": base, "sum_uss_mb": total(mm, "uss"),
                     "sum_pss_mb": total(mm, "pss"),
                     "peak_sum_uss_mb": mm["peak_uss"]["sum"], "tasks_per_s": mm["tasks_per_s"]}
            if base is not None and size != "empty":
                check["worker_uss_above_empty_mb"] = largest(mm, "uss") - base
                check["worker_uss_target_met"] = largest(mm, "uss") - base <= 100
            if size not in ("empty",) and float(size) >= 8:
                check["sum_uss_target_met"] = total(mm, "uss") <= 1024
            if method != "fork":
                check["first_batch_target_met"] = mm["first_batch_s"] <= 1.0
                check["data_target_met"] = sp["data_s"] <= 1.0
            out["checks"][key] = check
            again = mm["again_split"]
            out["restart"][key] = {"first_batch_s": mm["first_batch_s"],
                                   "again_first_batch_s": mm["again_first_batch_s"],
                                   "again_worker_start_s": again["worker_start_s"],
                                   "again_data_s": again["data_s"]}
            ratios = {}
            kept = find(cells, size, method, "mmap-kept")
            if kept is not None:  # what releasing the mapping changes
                ratios.update({
                    "worker_uss_kept_over_released": largest(kept, "uss") / largest(mm, "uss"),
                    "worker_pss_kept_over_released": largest(kept, "pss") / largest(mm, "pss"),
                    "sum_uss_kept_over_released": total(kept, "uss") / total(mm, "uss"),
                    "sum_pss_kept_over_released": total(kept, "pss") / total(mm, "pss"),
                    "peak_sum_uss_kept_over_released": kept["peak_uss"]["sum"] / mm["peak_uss"]["sum"],
                    "tasks_per_s_released_over_kept": rate(mm, kept)})
            mem = find(cells, size, method, "in-memory")
            if mem is not None:
                ratios.update({
                    "first_batch_in_memory_over_mmap": mem["first_batch_s"] / mm["first_batch_s"],
                    "data_s_in_memory_over_mmap": mem["split"]["data_s"] / sp["data_s"],
                    "worker_uss_in_memory_over_mmap": largest(mem, "uss") / largest(mm, "uss"),
                    "open_plus_first_batch_in_memory_over_mmap": ((mem["open_s"] + mem["first_batch_s"])
                                                                  / (mm["open_s"] + mm["first_batch_s"])),
                    "tasks_per_s_mmap_over_in_memory": rate(mm, mem),
                    "open_plus_epoch_in_memory_over_mmap": ((mem["open_s"] + mem["epoch_s"])
                                                            / (mm["open_s"] + mm["epoch_s"])),
                    "worker_uss_anon_in_memory_over_mmap": (largest(mem, "uss_anon")
                                                            / largest(mm, "uss_anon"))})
            if ratios:
                out["ratios"][key] = ratios
    return out


LABELS = {"empty": "empty"}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if "error" not in c and "skipped" not in c]
    sizes = sorted({c["size"] for c in cells}, key=lambda s: -1.0 if s == "empty" else float(s))
    combos = [(m, d) for m in METHODS for d in MODES
              if any(c["method"] == m and c["mode"] == d for c in cells)]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    width = 0.8 / max(1, len(combos))
    colors = plt.get_cmap("tab20").colors
    for k, (method, mode) in enumerate(combos):
        xs, start, data, uss, anon, summed, again = [], [], [], [], [], [], []
        for i, size in enumerate(sizes):
            c = find(cells, size, method, mode)
            if c is None:
                continue
            xs.append(i + (k - (len(combos) - 1) / 2) * width)
            start.append(c["split"]["worker_start_s"])
            data.append(c["split"]["data_s"])
            uss.append(largest(c, "uss"))
            anon.append(largest(c, "uss_anon"))
            summed.append(total(c, "uss"))
            again.append(c["again_first_batch_s"])
        color, label = colors[k % len(colors)], f"{method}, {mode}"
        axes[0].bar(xs, start, width, color=color, alpha=0.45, hatch="//")
        axes[0].bar(xs, data, width, bottom=start, color=color, label=label)
        axes[1].bar(xs, uss, width, color=color, label=label)
        axes[1].scatter(xs, anon, color="black", marker="_", s=60, zorder=3)
        axes[2].bar(xs, summed, width, color=color, label=label)
        axes[3].bar(xs, again, width, color=color, label=label)
    axes[0].axhline(1.0, color="red", ls="--", lw=1, label="target (spawn): 1 s")
    axes[2].axhline(1024, color="red", ls="--", lw=1, label="target (8 GB set): 1 GB")
    titles = ("first batch (s): hatched = worker start, solid = the data's part",
              "largest worker USS (MB); black: without clean file pages",
              "USS of main + workers, end of epoch (MB)", "first batch of the next epoch (s)")
    for ax, title in zip(axes, titles, strict=False):
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([s if s == "empty" else f"{s} GB" for s in sizes])
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=6, ncol=2)
    axes[0].legend(fontsize=6, ncol=2)
    m = result["machine"]
    fig.suptitle(f"metabatch: class arrays of each size, {result['workers']} workers, 5-way 1-shot 15-query, "
                 f"one epoch - {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.0f} GB, {m['date'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def rounded(d: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()
            if not isinstance(v, (list, dict))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0, 8.0],
                        help="GB (default 0.5 2 8)")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=["fork", "spawn", "forkserver-preload", "spawn-persistent"],
                        help="default: fork spawn forkserver-preload spawn-persistent")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--recipe-sizes", type=float, nargs="*", default=None,
                        help="sizes (GB) at which the recipes (forkserver-preload, spawn-persistent) run; "
                             "default: the smallest of --sizes (and the empty set)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0,
                        help="epochs of the classes per cell (default 1)")
    parser.add_argument("--min-batches", type=int, default=40, help="at least this many batches per cell")
    parser.add_argument("--data-dir", default="/tmp/metabatch-memory",
                        help="where the synthetic sets are written")
    parser.add_argument("--warm", action="store_true", help="do not evict the files from the page cache")
    parser.add_argument("--in-memory-limit", type=float, default=None,
                        help="GB the in-memory copies may take (default: 60 %% of RAM)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    parser.add_argument("--startup-rounds", type=int, default=3, help="interpreter/import timings (0: skip)")
    parser.add_argument("--release-rounds", type=int, default=5,
                        help="release-cost rounds per size (0: skip)")
    parser.add_argument("--release-tasks", type=int, default=200, help="tasks per release-cost round")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="memory")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args()
    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(release_cost(spec) if spec.get("kind") == "release" else cell(spec)))
        return
    out = pathlib.Path(args.out)
    if args.plot_only:
        plot(json.loads((out / f"{args.name}.json").read_text()), out / f"{args.name}.png")
        return
    folder = pathlib.Path(args.data_dir)
    info = machine()
    ram_mb = info["ram_gb"] * 1024
    recipe_sizes = set(args.recipe_sizes if args.recipe_sizes is not None else [min(args.sizes)])
    start_info = startup(args.startup_rounds) if args.startup_rounds else None
    if start_info:
        print("startup (median s):", rounded(start_info["median_s"]), flush=True)
    cells, costs = [], {}
    for size in [None] + sorted(args.sizes):
        path = dataset(folder, size)
        label = "empty" if size is None else f"{size:g}"
        for method in args.methods:
            recipe = method in ("forkserver-preload", "spawn-persistent")
            if recipe and size is not None and size not in recipe_sizes:
                continue
            modes = [m for m in args.modes if size is not None or m == "mmap"]
            if recipe:
                modes = [m for m in modes if m == "mmap"]
            for mode in modes:
                spec = {"path": str(path), "mode": mode, "method": method, "workers": args.workers,
                        "epochs": args.epochs, "min_batches": args.min_batches}
                copies = 1 + (args.workers if method != "fork" else 0)
                need = copies * path.stat().st_size / 2**20
                row = {"size": label, "method": method, "mode": mode}
                limit = 0.6 * ram_mb if args.in_memory_limit is None else args.in_memory_limit * 1024
                if mode == "in-memory" and need > limit:
                    row["skipped"] = (f"{copies} copies need {need / 1024:.1f} GB, over the limit of "
                                      f"{limit / 1024:.1f} GB ({ram_mb / 1024:.0f} GB RAM)")
                    print(f"{label:>6} {method:>18} {mode:>9}: skipped ({row['skipped']})", flush=True)
                    cells.append(row)
                    continue
                if not args.warm:
                    evict(path)
                row.update(run_cell(spec, args.timeout))
                cells.append(row)
                if "error" in row:
                    print(f"{label:>6} {method:>18} {mode:>9}: ERROR {row['error']}", flush=True)
                    continue
                ws = [w for w in row["end"]["workers"] if w]
                uss, anon, pss = (", ".join(f"{w[k]:.0f}" for w in ws) for k in ("uss", "uss_anon", "pss"))
                sp = row["split"]
                print(f"{label:>6} {method:>18} {mode:>9}: first batch {row['first_batch_s']:6.2f} s (start "
                      f"{sp['worker_start_s']:5.2f} + data {sp['data_s']:5.2f}), next epoch "
                      f"{row['again_first_batch_s']:5.2f} s, {row['tasks_per_s'] or 0:6.1f} tasks/s; USS "
                      f"main {row['end']['main']['uss']:5.0f} MB, workers {uss} MB (anonymous {anon}), PSS "
                      f"workers {pss} MB", flush=True)
        if args.release_rounds:
            spec = {"kind": "release", "path": str(path), "rounds": args.release_rounds,
                    "tasks": args.release_tasks}
            costs[label] = run_cell(spec, args.timeout)
            c = costs[label]
            if "error" in c:
                print(f"{label:>6} release cost: ERROR {c['error']}", flush=True)
            else:
                print(f"{label:>6} cost of the bound (in-process, warm): mmap/mmap-kept tasks/s "
                      f"{c['mmap_over_kept']:.3f}; releases {c['releases']} in "
                      f"{c['tasks'] * (c['rounds'] + 1)} tasks each; mapped at the end: "
                      f"{rounded(c['mapped_mb'])} MB", flush=True)
    with open("/proc/loadavg") as f:
        info["loadavg_end"] = f.read().strip()
    result = {"machine": info, "workers": args.workers, "epochs": args.epochs, "batch": BATCH,
              "task": f"{WAYS}-way {N_CTX}-shot {N_TGT}-query, uint8 [C, {PER_CLASS}, 3, 84, 84]",
              "cold": not args.warm, "startup": start_info, "release_cost": costs, "cells": cells,
              **summary(cells)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    try:
        plot(result, out / f"{args.name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    for key, check in result["checks"].items():
        print(key, rounded(check))
    for key, r in result["ratios"].items():
        print(key, rounded(r))
    for key, r in result["restart"].items():
        print(key, "restart:", rounded(r))
    print(f"wrote {out / args.name}.json, .png")


if __name__ == "__main__":
    main()
