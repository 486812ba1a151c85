"""Recipes: named sets of params overrides for real models and launch layouts (configs/recipes/NAME.yaml).

A recipe file holds a `description` and `set`, a mapping from dotted params keys to values, the same
keys `dvc exp run -S` takes. Every key must already exist in params.yaml and the result must pass
rlvr/config.py's validation: a recipe that names a removed key or breaks a rule fails before anything
runs, with the recipe file and the key in the message.

  rlvr recipe NAME --dry-run    the resolved params diff and the exact command each stage would run
  rlvr recipe NAME --exp        run it as a DVC experiment named recipe-NAME (tracked, comparable:
                                `dvc exp show`); with --queue only queue it (`dvc queue start` runs it)
  rlvr recipe NAME --apply      write the overrides into params.yaml (comments kept)

`--exp` and `--apply` both apply the overrides with DVC's own `-S` code (`dvc.utils.hydra.apply_overrides`,
a round-trip YAML edit that keeps comments and key order), so the workspace and the experiment see the
same params; `--apply` does it on a copy, validates the copy, then renames it over params.yaml.
What is not covered: inputs a recipe names that are not on this machine (hub models, GPUs) are checked
only when the stage runs (`rlvr check` checks local paths).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from flows import launch
from rlvr import config
from rlvr.errors import RlvrError
from rlvr.io import atomic_path

RECIPES = Path("configs/recipes")
RECIPE_KEYS = ("description", "set")
EXPERIMENT_PREFIX = "recipe-"
# `dvc.yaml` stage order, for the dry run.
STAGES = ("prepare", "warmup", "score", "rollout", "filter", "one_shot", "train", "evaluate")


# Strings Hydra's grammar reads back as the same string without quotes; anything else is quoted.
_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
_KEYWORDS = {"null", "true", "false", "inf", "nan"}


class RecipeError(RlvrError):
    """A recipe that does not exist, is malformed, or names a params key that does not exist."""


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    overrides: dict[str, object]


def available(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in (root / RECIPES).glob("*.yaml"))


def load(name: str, root: Path = Path(".")) -> Recipe:
    path = root / RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"no recipe {name!r} in {root / RECIPES}; available: {', '.join(available(root)) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(data, dict) or sorted(data) != sorted(RECIPE_KEYS):
        raise RecipeError(f"{path}: a recipe is a mapping with exactly the keys {list(RECIPE_KEYS)}")
    if not isinstance(data["set"], dict) or not data["set"]:
        raise RecipeError(f"{path}: `set` must map dotted params keys to values, e.g. model.name: Qwen/Qwen2.5-Math-1.5B")
    return Recipe(name, path, str(data["description"]), dict(data["set"]))


def _lookup(data: dict, dotted: str, where: Path) -> tuple[dict, str]:
    """The mapping that holds `dotted`'s last part, and that part; the key must exist."""
    node, parts = data, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise RecipeError(f"{where}: set.{dotted}: params.yaml has no key {'.'.join(parts[: i + 1])!r}; "
                              "a recipe may only change keys that exist (docs/configuration.md lists them)")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def resolve(recipe: Recipe, params_file: Path) -> tuple[dict, list[tuple[str, object, object]]]:
    """params.yaml with the recipe applied (validated), and the (key, before, after) of every change."""
    data = config.parse_yaml(params_file.read_text())
    changes = []
    for key, value in recipe.overrides.items():
        node, last = _lookup(data, key, recipe.path)
        if node[last] != value:
            changes.append((key, node[last], value))
        node[last] = value
    try:
        config.from_dict(data)
    except config.ConfigError as error:
        raise RecipeError(f"{recipe.path}: applied to {params_file}: {error}") from error
    return data, changes


def hydra_value(value: object) -> str:
    """A value in the override grammar `dvc exp run -S key=value` parses (Hydra's): strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _BARE.match(value) and value.lower() not in _KEYWORDS:
            return value
        # Hydra's quoted strings: backslashes before a quote (or the closing quote) come in pairs
        return '"' + re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, value).replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise RecipeError(f"cannot pass {value!r} ({type(value).__name__}) to dvc exp run -S")


def overrides(recipe: Recipe) -> list[str]:
    return [f"{key}={hydra_value(value)}" for key, value in recipe.overrides.items()]


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def exp_command(recipe: Recipe, queue: bool = False, dvc: str | None = None) -> list[str]:
    cmd = [dvc or _dvc(), "exp", "run", "--name", f"{EXPERIMENT_PREFIX}{recipe.name}"]
    if queue:
        cmd.append("--queue")
    for item in overrides(recipe):
        cmd += ["-S", item]
    return cmd


def _show(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def dry_run(recipe: Recipe, params_file: Path, root: Path = Path(".")) -> str:
    """The report `rlvr recipe NAME --dry-run` prints: what changes, and what each stage would run."""
    data, changes = resolve(recipe, params_file)
    params = config.from_dict(data)
    lines = [f"recipe {recipe.name}: {recipe.description}", f"  ({recipe.path})", "",
             f"params ({len(changes)} of {len(recipe.overrides)} keys change {params_file}):"]
    width = max(len(k) for k, _, _ in changes) if changes else 0
    lines += [f"  {key:<{width}}  {_show(before)}  ->  {_show(after)}" for key, before, after in changes]
    lines += ["", "as a DVC experiment (rlvr recipe NAME --exp):", "  " + shlex.join(exp_command(recipe, dvc="dvc")),
              "", f"each stage ({params.launch.processes} process(es) per machine x {params.launch.machines} "
              f"machine(s); launched stages: {', '.join(launch.STAGES)}):"]
    lines += [f"  {stage:<8}  {launch.describe(params, stage)}" for stage in STAGES]
    if params.launch.machines > 1:
        lines += ["", "every other machine R (1 .. launch.machines - 1) joins each launched stage with:",
                  "  python -m flows.launch node STAGE --machine-rank R   (configs/recipes/slurm/ does this)"]
    missing = [p for p in (params.launch.accelerate_config,) if p and not (root / p).is_file()]
    if missing:
        lines += ["", f"warning: {missing[0]} does not exist under {root.resolve()}"]
    return "\n".join(lines)


def apply(recipe: Recipe, params_file: Path) -> list[tuple[str, object, object]]:
    """Write the recipe into `params_file` with DVC's -S code (comments kept), validated, atomically."""
    from dvc.utils.hydra import apply_overrides

    _, changes = resolve(recipe, params_file)
    with atomic_path(params_file) as tmp:
        shutil.copyfile(params_file, tmp)
        apply_overrides(tmp, overrides(recipe))
        try:
            config.load(tmp)
        except config.ConfigError as error:  # resolve() passed, so this is a bug in the -S rendering
            raise RuntimeError(f"{recipe.path}: DVC applied the overrides differently: {error}") from error
    return changes


def run_experiment(recipe: Recipe, root: Path, queue: bool) -> int:
    from flows.services import dvc_env

    cmd = exp_command(recipe, queue)
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root, env=dvc_env())
