"""Docs stay in step with the API: every public name has a docstring and a reference entry."""

import inspect
import pathlib
import subprocess
import sys

import pytest

import metabatch as mb

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()


def public_objects():
    for name in mb.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(mb, name)
        if inspect.ismodule(obj):
            for sub in getattr(obj, "__all__", ()):
                yield f"metabatch.{name}.{sub}", getattr(obj, sub)
        else:
            yield f"metabatch.{name}", obj


@pytest.mark.parametrize("path, obj", list(public_objects()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_is_documented(path, obj):
    assert inspect.getdoc(obj), f"{path} has no docstring"
    assert f"::: {path}\n" in API + "\n", f"{path} is missing from docs/api.md"


def test_import_prints_nothing_and_warns_nothing():
    out = subprocess.run([sys.executable, "-W", "error", "-c", "import metabatch"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


def test_version_in_one_place():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text
    assert mb.__version__.startswith("0.")
