"""Every example script takes the same flags for the same things, with their defaults in --help.

--threads (default: metabatch.runtime.default_threads(--num-workers), the value shown), --num-workers,
--resume and --out; examples/lightning_maml.py answers --help without Lightning installed and, run without
it, names the extra to install.
"""

import os
import pathlib
import re
import runpy
import subprocess
import sys

import pytest

import metabatch as mb

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
SHARED = ("--threads", "--num-workers", "--resume", "--out")

# Scripts others are bringing to the policy, with their owner: strict, so that a script that follows it
# fails here until its entry is removed.
NOT_YET: dict[str, str] = {}


def run(*args, env=None, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def flag_help(text: str, flag: str) -> str:
    """The help of one option in argparse's --help output, on one line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s+{re.escape(flag)}[ ,=]", line) or line.strip() == flag or \
                re.match(rf"\s+{re.escape(flag)}\s+[A-Z_]+$", line):
            out = [line]
            for nxt in lines[i + 1:]:
                if re.match(r" {2}-", nxt) or not nxt.strip():  # the next option, or the end
                    break
                out.append(nxt)
            return " ".join(s.strip() for s in out)
    raise AssertionError(f"{flag} is not in the --help output")


@pytest.mark.parametrize("script", [
    pytest.param(s, marks=[pytest.mark.xfail(reason=NOT_YET[s], strict=True)] if s in NOT_YET else [])
    for s in EXAMPLES])
def test_shared_flags_with_defaults_in_help(script):
    out = run(ROOT / "examples" / script, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in SHARED:
        if flag != "--resume":  # the others have a value when not given: --help says which
            assert "default" in flag_help(out.stdout, flag), (flag, flag_help(out.stdout, flag))
        else:
            flag_help(out.stdout, flag)
    threads = flag_help(out.stdout, "--threads")
    assert "minus --num-workers" in threads, threads
    workers = int(re.search(r"default (\d+)", flag_help(out.stdout, "--num-workers")).group(1))
    shown = re.search(r"at least 1: (\d+)", threads)
    assert shown and int(shown.group(1)) == mb.runtime.default_threads(workers), threads


def example(name):
    return runpy.run_path(str(ROOT / "examples" / name), run_name="__not_main__")


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_threads_default_follows_the_worker_count(num_workers):
    expected = mb.runtime.default_threads(num_workers)
    assert example("cnp.py")["parse_args"](["--num-workers", str(num_workers)]).threads == expected
    ddp = example("maml_ddp.py")
    assert ddp["rank_threads"](None, num_workers, 1) == expected
    assert ddp["rank_threads"](None, num_workers, 2) == max(1, mb.runtime.cpu_count() // 2 - num_workers)
    assert ddp["rank_threads"](3, num_workers, 2) == 3
    assert example("cnp.py")["parse_args"](["--threads", "3"]).threads == 3


def test_lightning_example_without_lightning(tmp_path):
    (tmp_path / "lightning.py").write_text("raise ImportError('lightning is hidden by the test')\n")
    hidden = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    helped = run(ROOT / "examples" / "lightning_maml.py", "--help", env=hidden)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--threads" in helped.stdout and "--resume" in helped.stdout
    ran = run(ROOT / "examples" / "lightning_maml.py", "--steps", 1, "--out", tmp_path / "out", env=hidden)
    assert ran.returncode == 1
    assert "pip install 'metabatch[lightning]'" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
