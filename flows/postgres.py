"""A local PostgreSQL cluster for MLflow's tracking store, on the machine's own PostgreSQL binaries.

`rlvr services up --backend postgres` uses these helpers (flows/services.py starts and records the
server like the other services):

- the cluster lives in .services/postgres/data, created once by `initdb` with one role (`rlvr`) whose
  password is random and kept only in .services/postgres/pgpass (mode 0600, libpq's password-file
  format), which MLflow and the health check read through PGPASSFILE; nothing else has it;
- the server listens on 127.0.0.1 only (TCP, password required: scram-sha-256), with no Unix socket;
- PostgreSQL refuses to run as root: as root, initdb, postgres and pg_ctl run as the unprivileged user
  RLVR_POSTGRES_USER (default `postgres`) through `setpriv`, and the data folder belongs to that user.

Binaries: the `pg_ctl` on PATH, else the newest /usr/lib/postgresql/*/bin (Debian and Ubuntu keep
them off PATH). Not covered: Windows; a cluster of another major version than the binaries (initdb's
files say which version made them; delete .services/postgres to start over, which deletes the runs).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

HOST = "127.0.0.1"
DIR = Path(".services/postgres")
DATA = DIR / "data"
PASSFILE = DIR / "pgpass"
ROLE = "rlvr"
DRIVER = "postgresql+psycopg2"
DATABASE = "mlflow"
USER_ENV = "RLVR_POSTGRES_USER"
PROGRAMS = ("initdb", "pg_ctl", "postgres")
SEARCH = Path("/usr/lib/postgresql")  # Debian/Ubuntu: one <major version>/bin per installed server


class PostgresError(RuntimeError):
    pass


def _version(folder: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in folder.parent.name.split(".") if part.isdigit())


def bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres of one installation, or None."""
    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(SEARCH.glob("*/bin"), key=_version, reverse=True)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in PROGRAMS):
            return folder
    return None


def require_bindir() -> Path:
    found = bindir()
    if found is None:
        raise PostgresError("no PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH or in "
                            "/usr/lib/postgresql/*/bin: "
                            "install the server package (Debian/Ubuntu: apt-get install postgresql), or use an "
                            "existing database through RLVR_MLFLOW_BACKEND_URI")
    return found


def run_as(uid: int | None) -> list[str]:
    """The prefix that runs a PostgreSQL program as user `uid` (for root, which PostgreSQL refuses);
    [] when no switch is needed."""
    if uid is None or uid == os.geteuid():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PostgresError("PostgreSQL refuses to run as root and `setpriv` (util-linux) is missing to run it as "
                            "another user: install util-linux, or run `rlvr services up` as an unprivileged user")
    return [setpriv, f"--reuid={uid}", f"--regid={pwd.getpwuid(uid).pw_gid}", "--init-groups", "--"]


def server_uid() -> int | None:
    """The user the cluster runs as: this one, or, for root, RLVR_POSTGRES_USER (default postgres)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(USER_ENV) or "postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PostgresError(f"PostgreSQL refuses to run as root and there is no user {name!r} to run it as: create "
                            f"one (`useradd --system {name}`) or name an existing unprivileged user in {USER_ENV}") \
            from None
    if entry.pw_uid == 0:
        raise PostgresError(f"{USER_ENV}={name} is root; PostgreSQL needs an unprivileged user")
    return entry.pw_uid


def owner_uid(root: Path) -> int | None:
    """For an existing cluster, the user that owns it (whom pg_ctl must run as)."""
    try:
        return (root / DATA).stat().st_uid
    except OSError:
        return None


def initialised(root: Path) -> bool:
    return (root / DATA / "PG_VERSION").is_file()


def init(root: Path, bindir_: Path, uid: int | None) -> None:
    """Create the cluster and the password file, once. A failed initdb leaves nothing behind."""
    from rlvr.io import write_text

    data, passfile = root / DATA, root / PASSFILE
    if initialised(root):
        if not passfile.is_file():
            raise PostgresError(f"{data} exists but its password file {passfile} does not: restore it, or delete "
                                f"{root / DIR} to start a new cluster (this deletes the MLflow runs stored in it)")
        return
    if data.exists():
        raise PostgresError(f"{data} exists but holds no cluster (an interrupted initdb?): delete it and run "
                            "`rlvr services up --backend postgres` again")
    (root / DIR).mkdir(parents=True, exist_ok=True)
    (root / DIR).chmod(0o711)  # the server's user must reach data/, nobody may list or read the password file
    data.mkdir(mode=0o700)
    prefix = run_as(uid)
    password = secrets.token_urlsafe(24)
    pwfile = root / DIR / "initdb-password"
    try:
        write_text(pwfile, password + "\n", mode=0o600)
        if uid is not None:
            os.chown(data, uid, -1)
            os.chown(pwfile, uid, -1)
            if subprocess.run([*prefix, "test", "-w", str(data)], capture_output=True).returncode != 0:
                name = pwd.getpwuid(uid).pw_name
                raise PostgresError(f"PostgreSQL runs as user {name} (it refuses root), who cannot reach {data}: every "
                                    f"folder above it must be searchable by {name} (chmod o+x), or put the project "
                                    f"elsewhere, or set {USER_ENV} to a user who can")
        result = subprocess.run([*prefix, str(bindir_ / "initdb"), "-D", str(data), "-U", ROLE, f"--pwfile={pwfile}",
                                 "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                                 "--locale=C", "--no-instructions"], capture_output=True, text=True)
        if result.returncode != 0:
            raise PostgresError(f"initdb failed in {data}:\n{(result.stdout + result.stderr)[-2000:]}")
        write_text(passfile, f"{HOST}:*:*:{ROLE}:{password}\n", mode=0o600)
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)
        raise
    finally:
        pwfile.unlink(missing_ok=True)


def server_command(bindir_: Path, root: Path, port: int) -> list[str]:
    """The postmaster's command line: TCP on 127.0.0.1 only, no Unix socket."""
    return [str(bindir_ / "postgres"), "-D", str(root / DATA), "-p", str(port), "-c", f"listen_addresses={HOST}",
            "-c", "unix_socket_directories="]


def uri(port: int, database: str = DATABASE) -> str:
    """The SQLAlchemy URI of the local database; the password comes from PGPASSFILE."""
    return f"{DRIVER}://{ROLE}@{HOST}:{port}/{database}"


def with_driver(uri_: str) -> str:
    """`postgresql://...` with the driver this project installs: SQLAlchemy 2.1 reads a bare
    `postgresql://` as psycopg 3, which is not installed (psycopg2-binary is)."""
    return DRIVER + uri_[len("postgresql"):] if uri_.startswith("postgresql://") else uri_


def client_env(root: Path) -> dict[str, str]:
    return {"PGPASSFILE": str(root / PASSFILE)}


def connect(root: Path, port: int, database: str = "postgres", timeout_s: int = 3):
    import psycopg2

    return psycopg2.connect(host=HOST, port=port, user=ROLE, dbname=database, passfile=str(root / PASSFILE),
                            connect_timeout=timeout_s)


def ready(root: Path, port: int) -> bool:
    """Whether the server accepts a login (the health check)."""
    import psycopg2

    try:
        connect(root, port).close()
    except psycopg2.Error:
        return False
    return True


def create_database(root: Path, port: int, database: str = DATABASE) -> None:
    connection = connect(root, port)
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{database}"')
    finally:
        connection.close()


def stop(root: Path, bindir_: Path, mode: str, timeout_s: float) -> tuple[bool, str]:
    """`pg_ctl stop -m MODE` on the project's cluster (as the user who owns it); (stopped, output)."""
    command = [*run_as(owner_uid(root)), str(bindir_ / "pg_ctl"), "stop", "-D", str(root / DATA), "-m", mode, "-w",
               "-t", str(max(1, int(timeout_s)))]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def redact(uri_: str) -> str:
    """A database URI without its password, for status lines and records."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri_)
    if parts.password is None:
        return uri_
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))
