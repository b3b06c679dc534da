"""Every ```python block of README.md and docs/*.md runs as written.

Per page, the blocks are joined in order into one script (a page's blocks share their names, as a reader
runs them) and run as ``python page.py`` from the repository root, with ``../shared/data`` beside it, in a
fresh interpreter: ``__name__ == "__main__"``, so main guards run and spawn / forkserver workers can import
the script's functions. The blocks are found by mktestdocs (a fence whose info string is exactly
``python``); a block that is not meant to run uses another info string (``python notest``, ``text``).
"""

import os
import pathlib
import subprocess
import sys

import mktestdocs
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 600  # a hang guard, not a speed claim: a page is meant to run in well under 2 minutes


def blocks(page: pathlib.Path) -> list[str]:
    return mktestdocs.grab_code_blocks(page.read_text(encoding="utf-8"), lang="python")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_fences_are_whole_lines(page):
    """mktestdocs toggles on any line holding three backticks: one in prose would shift every block."""
    bad = [(n, line) for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
           if "```" in line and not line.lstrip().startswith("```")]
    assert not bad, f"{page.name}: a fence marker inside a line of prose (write it differently): {bad[:3]}"
    fences = [ln for ln in page.read_text(encoding="utf-8").splitlines() if ln.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{page.name}: an unclosed code fence"


def test_the_quickstarts_are_collected():
    assert len(blocks(ROOT / "README.md")) >= 1
    assert any("task_loader" in b for b in blocks(ROOT / "docs" / "index.md"))


# Pages whose blocks do not run yet, with their owner's issue: strict, so that a page that starts to run
# fails here until its entry is removed.
NOT_YET: dict[str, str] = {}


# Run under spawn too (the start method of macOS and Windows): the pages a new user copies first. The
# other pages' loops carry the same main guard; running them twice would double the suite's longest tests.
SPAWN_TOO = {"README.md", "docs/index.md", "docs/getting-started.md", "docs/concepts.md", "docs/migrating.md"}


def cases():
    for page in PAGES:
        if not blocks(page):
            continue
        name = str(page.relative_to(ROOT))
        marks = [pytest.mark.xfail(reason=NOT_YET[name], strict=True)] if name in NOT_YET else []
        yield pytest.param(page, None, marks=marks, id=name)
        if name in SPAWN_TOO:
            yield pytest.param(page, "spawn", id=f"{name}-spawn")


@pytest.mark.slow
@pytest.mark.parametrize("page, start_method", list(cases()))
def test_page_runs_as_one_script(page, start_method, tmp_path):
    script = tmp_path / f"{page.stem}.py"
    prelude = "" if start_method is None else (
        f"import multiprocessing\nmultiprocessing.set_start_method({start_method!r}, force=True)\n\n")
    script.write_text(prelude + "\n\n".join(blocks(page)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        out = subprocess.run([sys.executable, "-W", "error", str(script)], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{page.name}: its blocks, run as one script, did not end within {TIMEOUT_S} s "
                    f"(a stream without num_batches? a loop without break?)\n{err.stdout or ''}")
    assert out.returncode == 0, (f"{page.name}: its blocks, run as one script ({script}), failed:\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
