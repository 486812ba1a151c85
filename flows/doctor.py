"""`rlvr doctor`: check this machine for the pipeline and say what is missing and how to fix it.

One line per check: `ok`, `warn` (works without it, or works differently) or `MISSING` (the pipeline
needs it), with the fix. The exit code is 1 only when something the pipeline needs is missing: the
Python version, git, the project's direct dependencies (installed, with an importable module). Versions
that differ from requirements/cpu.txt, PostgreSQL binaries (only `--backend postgres` needs them),
service ports held by other programs, an unreachable DVC remote, and a missing GPU or vLLM (the
built-in default runs on CPU) are warnings.

Nothing here imports the heavy libraries except torch, for the CUDA check; packages are checked from
their installed metadata and module specs.
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

from flows import postgres, services

PROJECT = Path(__file__).resolve().parents[1]  # the source checkout: pyproject.toml, requirements/
SETUP = "bash scripts/setup.sh"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" or "missing"
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "missing"


def _requirement_name(spec: str) -> str:
    """`math-verify[antlr4_9_3]>=0.8,<0.10` -> `math-verify`."""
    return re.split(r"[\[<>=!~; ]", spec.strip(), maxsplit=1)[0]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a constraints file."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[_normal(name)] = version.strip()
    return found


def check_python(version: tuple[int, ...] | None = None, pyproject: Path = PROJECT / "pyproject.toml") -> Check:
    from packaging.specifiers import SpecifierSet

    spec = tomllib.loads(pyproject.read_text())["project"]["requires-python"]  # ">=3.11,<3.13"
    text = ".".join(map(str, version or sys.version_info[:3]))
    if text in SpecifierSet(spec):
        return Check("python", "ok", f"{text} ({spec})")
    return Check("python", "missing", f"{text}, the project needs {spec}",
                 f"install a Python {spec} and recreate .venv with it: PYTHON=python3.11 {SETUP}")


def check_packages(requirements: list[str], constraints: Path | None) -> list[Check]:
    """Each direct dependency: installed, its module found, its version against the constraints file."""
    from packaging.version import Version

    pinned = pins(constraints) if constraints and constraints.is_file() else {}
    modules: dict[str, list[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            modules.setdefault(_normal(dist), []).append(module)
    checks = []
    for spec in requirements:
        name = _requirement_name(spec)
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            fix = f"pip install -c requirements/cpu.txt '{spec}' (or {SETUP})"
            checks.append(Check(f"package {name}", "missing", f"not installed (needs {spec})", fix))
            continue
        importable = [m for m in modules.get(_normal(name), []) if not m.startswith("_") and util.find_spec(m)]
        if not importable:
            checks.append(Check(f"package {name}", "missing", f"{version} installed but none of its modules is "
                                                              "importable", f"pip install --force-reinstall '{spec}'"))
            continue
        want = pinned.get(_normal(name))
        if want and Version(want).public != Version(version).public:  # 2.13.0+cpu is the pinned 2.13.0
            checks.append(Check(f"package {name}", "warn", f"{version}, requirements/cpu.txt pins {want}",
                                f"pip install -c requirements/cpu.txt -e . (a GPU install may differ on purpose: "
                                "requirements/gpu.txt)"))
        else:
            checks.append(Check(f"package {name}", "ok", version + (" (pinned)" if want else "")))
    return checks


def check_git() -> Check:
    found = shutil.which("git")
    if found:
        return Check("git", "ok", found)
    return Check("git", "missing", "not on PATH (DVC and the runs' git.commit tags need it)",
                 "install git (apt-get install git)")


def check_postgres() -> Check:
    found = postgres.bindir()
    if found is None:
        return Check("postgresql", "warn", "no initdb/pg_ctl/postgres on PATH or in /usr/lib/postgresql/*/bin "
                                           "(needed only for `rlvr services up --backend postgres`)",
                     f"apt-get install postgresql, or point {services.BACKEND_URI_ENV} at an existing database")
    try:
        uid = postgres.server_uid()
    except postgres.PostgresError as error:
        return Check("postgresql", "warn", f"binaries in {found}, but {error}")
    import pwd

    user = f", runs as {pwd.getpwuid(uid).pw_name} (PostgreSQL refuses root)" if uid is not None else ""
    return Check("postgresql", "ok", f"binaries in {found}{user}")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((services.HOST, port)) == 0


def check_ports(root: Path, ports: dict[str, int]) -> list[Check]:
    """Each service port: free, held by the server `rlvr services up` recorded, or held by something else."""
    ours = {s.port: s for s in services.running(root).values()}
    checks = []
    for name, port in ports.items():
        if port in ours:
            checks.append(Check(f"port {name}", "ok", f"{services.HOST}:{port} is our {ours[port].name} "
                                                      f"(pid {ours[port].pid})"))
        elif _listening(port):
            checks.append(Check(f"port {name}", "warn", f"{services.HOST}:{port} is in use by another program",
                                f"stop it, or start with `rlvr services up --{name}-port N`"))
        else:
            checks.append(Check(f"port {name}", "ok", f"{services.HOST}:{port} is free"))
    return checks


def check_remote(root: Path) -> Check:
    """The default DVC remote, if one is configured: whether its location answers."""
    if not (root / ".dvc").is_dir():
        return Check("dvc remote", "ok", f"{root} is not a DVC project: nothing to check")
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            names = ", ".join(repo.config["remote"]) or "none"
            return Check("dvc remote", "ok", f"no default remote (configured: {names}); data stays on this machine",
                         "share data with `rlvr remote add URL` (docs/services.md)")
        try:
            remote = repo.cloud.get_remote(name)
            reachable = remote.fs.exists(remote.path)
        except Exception as error:  # noqa: BLE001 - any failure to reach the remote is the finding
            return Check("dvc remote", "warn", f"{name} ({repo.config['remote'][name].get('url')}) cannot be "
                                               f"reached: {type(error).__name__}: {str(error)[:200]}",
                         "check its URL and credentials (`dvc remote list`), and the matching DVC extra "
                         "(dvc[s3], dvc[gs], dvc[ssh])")
        url = repo.config["remote"][name].get("url")
        if reachable:
            return Check("dvc remote", "ok", f"{name} ({url}) reachable")
        return Check("dvc remote", "warn", f"{name} ({url}) does not exist yet",
                     "create it (a folder: mkdir -p; a bucket: with its provider), then `dvc push`")


def check_gpu() -> list[Check]:
    checks = []
    try:
        import torch

        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            checks.append(Check("cuda", "ok",
                                f"{torch.cuda.device_count()} GPU(s): {names} (torch {torch.__version__})"))
        else:
            checks.append(Check("cuda", "warn", f"no GPU visible to torch {torch.__version__}: training and sampling "
                                                "run on CPU (fine for the built-in default)",
                                "on a GPU machine: install the CUDA build of torch with requirements/gpu.txt"))
    except ImportError:
        checks.append(Check("cuda", "warn", "torch is not installed (see the package checks)"))
    if util.find_spec("vllm") is None:
        checks.append(Check("vllm", "warn", "not installed: sampling uses transformers (generation.backend)",
                            "on a GPU machine: pip install -c requirements/gpu.txt -e '.[gpu]'"))
    else:
        checks.append(Check("vllm", "ok", metadata.version("vllm")))
    return checks


def run(root: Path, ports: dict[str, int] | None = None) -> list[Check]:
    data = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    checks = [check_python(), check_git()]
    checks += check_packages(data["dependencies"], PROJECT / "requirements" / "cpu.txt")
    checks.append(check_postgres())
    checks += check_ports(root, ports or {"prefect": 4200, "mlflow": 5000})
    checks.append(check_remote(root))
    checks += check_gpu()
    return checks


def render(checks: list[Check]) -> str:
    label = {"ok": "ok", "warn": "warn", "missing": "MISSING"}
    width = max(len(c.name) for c in checks)
    lines = [f"{label[c.status]:8} {c.name:{width}}  {c.detail}" + (f"\n{'':8} {'':{width}}  fix: {c.fix}"
                                                                    if c.fix and c.status != "ok" else "")
             for c in checks]
    failed = [c.name for c in checks if c.failed]
    lines.append(f"\n{len(failed)} missing that the pipeline needs: {', '.join(failed)}" if failed else
                 "\nnothing the pipeline needs is missing" + (f" ({sum(c.status == 'warn' for c in checks)} warnings)"
                                                              if any(c.status == "warn" for c in checks) else ""))
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.failed for c in checks) else 0

