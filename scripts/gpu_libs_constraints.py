"""Write requirements/gpu-libs-cpu.txt: the GPU set's library versions, for a CPU machine.

requirements/gpu.txt pins only what vLLM forces (vllm, torch, fastapi, prefect, ...); the rest of the
GPU environment's versions come out of pip's resolution (vLLM caps transformers below 5.18, numpy, ...).
This script resolves the GPU install exactly as a GPU machine would
(`pip install --dry-run --ignore-installed -c requirements/gpu.txt -e ".[gpu,dev]"`, which only reads
package metadata: nothing is downloaded whole or built), then keeps the packages the project installs
without its `gpu` extra (the dependency closure of `.[dev]`, markers evaluated), with the versions the
GPU resolution chose. Two exceptions: torch is pinned to the same release without the `!=...+cpu`
guard, so a CPU machine takes its CPU build, and torch's CUDA-only dependencies (nvidia-*, cuda-*,
triton) are left out. vLLM and everything only vLLM needs are left out by the closure.

scripts/test_gpu_versions.sh installs the project into .venv-gpulibs with this file as constraints and
runs the fast tests there. The file's header records a digest of requirements/gpu.txt and of
pyproject.toml's dependency lists; tests/test_gpu_versions.py fails when either changed since the
file was written, with the command to regenerate it:

    python scripts/gpu_libs_constraints.py            # resolves (a few minutes; needs the package index)
    python scripts/gpu_libs_constraints.py --report R # from an existing `pip install --report` file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "requirements" / "gpu.txt"
OUT = ROOT / "requirements" / "gpu-libs-cpu.txt"
PROJECT = "rlvr-pipeline"
EXTRAS = ("dev",)  # the project's extras the CPU environment installs (not `gpu`: vLLM and DeepSpeed)
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")
DIGEST_LINE = "# derived from: "


def source_digest(root: Path = ROOT) -> str:
    """sha1 of requirements/gpu.txt and pyproject.toml's dependency lists: what the resolution depends on."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = json.dumps([project["dependencies"], project.get("optional-dependencies", {})], sort_keys=True)
    return hashlib.sha1((root / "requirements" / "gpu.txt").read_bytes() + deps.encode()).hexdigest()[:16]


def recorded_digest(path: Path = OUT) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE):].split()[0]
    return ""


def resolve(report: Path) -> None:
    """pip's resolution of the GPU install, as a JSON report (metadata only)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", str(report), "-c", str(GPU), "-e", f".[{','.join(('gpu', *EXTRAS))}]"],
                   cwd=ROOT, check=True)


def closure(report: dict) -> dict[str, str]:
    """{name: version} of the packages `pip install -e .[dev]` needs, at the versions in `report`."""
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    environment = {**default_environment(), **report.get("environment", {})}
    wanted, todo = {}, [(canonicalize_name(PROJECT), frozenset(EXTRAS))]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name not in items:
            raise SystemExit(f"{name} is needed but not in the GPU resolution; re-run without --report")
        meta = items[name]["metadata"]
        wanted[name] = meta["version"]
        for text in meta.get("requires_dist") or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**environment, "extra": e}) for e in ("", *extras)):
                continue
            dep = canonicalize_name(req.name)
            if name == "torch" and CUDA_ONLY.match(dep):
                continue
            todo.append((dep, frozenset(req.extras)))
    del wanted[canonicalize_name(PROJECT)]
    return dict(sorted(wanted.items()))


def render(pins: dict[str, str], digest: str) -> str:
    head = [
        "# GPU-set library versions for a CPU machine (pip -c): the versions requirements/gpu.txt resolves to,",
        "# for the packages the project installs without its `gpu` extra (no vLLM, no DeepSpeed), torch as its CPU build.",
        "# Used by scripts/test_gpu_versions.sh (.venv-gpulibs). Generated; do not edit by hand:",
        "#   python scripts/gpu_libs_constraints.py",
        "# after any change to requirements/gpu.txt or pyproject.toml's dependencies (tests/test_gpu_versions.py checks).",
        f"{DIGEST_LINE}{digest} (sha1 of requirements/gpu.txt + pyproject.toml dependencies)",
    ]
    return "\n".join(head + [f"{name}=={version}" for name, version in pins.items()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="an existing pip --report of the GPU install (skip resolving)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = args.report or Path(tmp) / "gpu-report.json"
        if args.report is None:
            resolve(report_path)
        pins = closure(json.loads(report_path.read_text()))
    pins["torch"] = pins["torch"].split("+")[0]
    OUT.write_text(render(pins, source_digest()))
    print(f"wrote {OUT.relative_to(ROOT)}: {len(pins)} pins (transformers {pins.get('transformers')}, "
          f"trl {pins.get('trl')}, accelerate {pins.get('accelerate')}, prefect {pins.get('prefect')}, "
          f"mlflow {pins.get('mlflow')}, torch {pins['torch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
