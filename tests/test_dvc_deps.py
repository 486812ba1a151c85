"""dvc.yaml lists, for every stage, every project module the stage runs, and no other.

A stage runs `python -m flows STAGE`: flows/__main__.py, flows/__init__.py and flows/stages.py, then
stages/STAGE.py, and whatever those import from the project, transitively. flows/stages.py imports
every stage module to build its table of flows; that edge is not followed, since a stage runs only
its own module. Imports are read with `ast`, statically, including those inside functions (a lazy
import still runs when the stage needs it), and a package's `__init__.py` counts for every module
imported from it, since Python runs it first.

A missing module means editing it leaves the stage's cached result stale; an extra one reruns the
stage for nothing. Non-Python deps (data, models) are not checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PACKAGES = ("flows", "rlvr", "stages")
ENTRY = ("flows/__main__.py", "flows/__init__.py", "flows/stages.py")
DISPATCH = "flows/stages.py"  # imports every stage module; a stage follows only its own


def module_file(name: str, root: Path = ROOT) -> str | None:
    """The project file (relative POSIX path) of dotted module `name`, or None if it is not ours."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(root).as_posix()
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(root).as_posix()
    return None


def imported_modules(path: str, root: Path = ROOT) -> set[str]:
    """Dotted names of every module `path` imports anywhere in its body (absolute or relative)."""
    tree = ast.parse((root / path).read_text(), filename=path)
    package = ".".join(Path(path).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # `from pkg import name` imports pkg.name when that is a module
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_imports(path: str, root: Path = ROOT) -> set[str]:
    """The project files `path` imports directly, with the `__init__.py` of each package on the way."""
    files = set()
    for name in imported_modules(path, root):
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            found = module_file(".".join(parts[:depth]), root)
            if found:
                files.add(found)
    files.discard(path)
    return files


def stage_closure(stage: str, root: Path = ROOT) -> set[str]:
    """Every project file `python -m flows STAGE` runs, per the rules in the module docstring."""
    seen: set[str] = set()
    todo = [*ENTRY, f"stages/{stage}.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for dep in project_imports(path, root):
            if path == DISPATCH and dep.startswith("stages/") and dep != "stages/__init__.py":
                continue
            todo.append(dep)
    return seen


def declared_code_deps(spec: dict) -> set[str]:
    deps = [next(iter(d)) if isinstance(d, dict) else str(d) for d in spec.get("deps") or []]
    return {d for d in deps if d.endswith(".py")}


def compare(stage: str, spec: dict, root: Path = ROOT) -> str | None:
    """None when the stage's .py deps equal its import closure, else a message naming the difference."""
    closure, declared = stage_closure(stage, root), declared_code_deps(spec)
    missing, extra = sorted(closure - declared), sorted(declared - closure)
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(f"missing {missing} (imported when the stage runs)")
    if extra:
        parts.append(f"extra {extra} (the stage never imports them)")
    return f"dvc.yaml stage {stage!r} deps: " + "; ".join(parts)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_its_import_closure(stage):
    problem = compare(stage, STAGES[stage])
    if problem:
        pytest.fail(problem, pytrace=False)


def test_closure_follows_lazy_and_transitive_imports_and_names_the_difference(tmp_path):
    files = {
        "flows/__init__.py": "",
        "flows/__main__.py": "def main():\n    from flows.stages import FLOWS\n",
        "flows/stages.py": "from rlvr import config\nfrom stages import a, b\n",
        "rlvr/__init__.py": "",
        "rlvr/config.py": "import yaml\n",
        "rlvr/io.py": "import os\n",
        "rlvr/models.py": "from rlvr.io import write\n",
        "stages/__init__.py": "",
        "stages/a.py": "import numpy\n\ndef run():\n    from rlvr import models\n",
        "stages/b.py": "from .a import run\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    base = {"flows/__init__.py", "flows/__main__.py", "flows/stages.py", "rlvr/__init__.py", "rlvr/config.py",
            "stages/__init__.py"}
    a = base | {"stages/a.py", "rlvr/models.py", "rlvr/io.py"}
    assert stage_closure("a", tmp_path) == a  # lazy import in a function, then rlvr.io through models
    assert stage_closure("b", tmp_path) == a | {"stages/b.py"}  # relative import of a sibling stage
    spec = {"deps": ["data/x", *sorted(a - {"rlvr/io.py"}), "rlvr/unused.py"]}
    message = compare("a", spec, tmp_path)
    assert "stage 'a'" in message and "missing ['rlvr/io.py']" in message and "extra ['rlvr/unused.py']" in message
    assert compare("a", {"deps": sorted(a)}, tmp_path) is None
