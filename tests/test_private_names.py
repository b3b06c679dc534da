"""House rule: a module never uses another module's private names (`from .x import _y`, `module._y`).

Private helper modules (`metabatch/_validate.py`, `examples/_fewshot.py`) are shared on purpose; what
they share is their public names.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("metabatch", "examples", "benchmarks")
LOCAL = {p.stem for d in ("examples", "benchmarks") for p in (ROOT / d).glob("*.py")}  # scripts import siblings


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own(module: str | None, level: int) -> bool:
    return level > 0 or (module or "").split(".")[0] == "metabatch" or (module or "") in LOCAL


def violations(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _own(node.module, node.level):
            for alias in node.names:
                # `from . import _validate` names a private module (allowed); `from .x import _y` a private name.
                if node.module is not None and _private(alias.name):
                    found.append(f"{node.lineno}: from {'.' * node.level}{node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _own(alias.name, 0):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


FILES = sorted(p for d in FOLDERS for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_module_uses_another_modules_private_names(path):
    assert violations(path) == [], f"{path.relative_to(ROOT)} uses private names of other modules"


def test_the_check_finds_both_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import _fewshot\nfrom .maml import _plan\nfrom . import _validate\n"
                   "x = _fewshot._to(1)\ny = _validate.integer\n")
    assert violations(bad) == ["2: from .maml import _plan", "4: _fewshot._to"]
