"""SIGKILL of `python -m flows rollout` and `python -m flows evaluate` at chosen moments, then a rerun.

Each kill point is either seen from outside (a cache chunk appears, a log line is printed) and the
process is then killed with SIGKILL, or reached from inside: the child runs the same entry point with
`DataFrame.to_parquet` wrapped so that it truncates the file it just wrote to half and SIGKILLs its
own process, which is a kill in the middle of writing an output. After each kill the plain command
is rerun with no manual cleanup; the test checks what it reused, that its results equal those of an
uninterrupted run (timings aside) and that no temporary file is left. docs/failures.md lists the
kill points and what each rerun did. A fast test kills a process inside rlvr/io.py's atomic writes.

Not covered here: kills inside `train` (tests/test_train_kill.py), and DVC's own bookkeeping (a kill
between the stage's last write and DVC's dvc.lock update; see docs/failures.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rlvr import config, models
from rlvr.io import remove_orphans, write_json, write_text
from stages import evaluate, prepare, rollout
from tests.conftest import ROOT, small_params_dict

TIMINGS = {"seconds", "grade_seconds", "samples_per_second"}
ROLLOUT_CHUNKS = 8  # 40 prompts in chunks of 5

# Runs `python -m flows STAGE` with to_parquet wrapped: the COUNT-th write to a path containing MARKER
# is cut to half its bytes and the process SIGKILLs itself, before the temporary file is renamed.
KILL_WHILE_WRITING = """
import os, signal, sys
import pandas as pd
marker, count, stage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
write, seen = pd.DataFrame.to_parquet, []
def to_parquet(self, path, *args, **kwargs):
    write(self, path, *args, **kwargs)
    if marker in str(path):
        seen.append(path)
        if len(seen) == count:
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
pd.DataFrame.to_parquet = to_parquet
from flows.__main__ import main
sys.exit(main([stage]))
"""


def _raw() -> dict:
    raw = small_params_dict()
    raw["rollout"].update(max_prompts=5 * ROLLOUT_CHUNKS, chunk_size=5, n_samples=4, max_new_tokens=16,
                          batch_size=20)
    raw["evaluate"].update(baseline=False, max_new_tokens=16)
    return raw


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder with prepared data, a warm-up and a policy model, params.yaml and dvc.yaml."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    raw = _raw()
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (ws / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    prepare.main(config.from_dict(raw))
    tokenizer = models.build_char_tokenizer()
    models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 1024, seed=0), tokenizer, "models/warmup")
    models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 1024, seed=1), tokenizer, "models/policy")
    (ws / "logs").mkdir()
    return ws


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "DVC_"))}
    env["PYTHONPATH"] = str(ROOT)
    # Prefect's temporary server gets 20 s to start by default; a loaded CI machine can need more
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return env


def _start(ws: Path, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    log = ws / "logs" / f"{name}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ws, env=_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _reap(proc: subprocess.Popen) -> None:
    """Kill whatever the stage started in its session and left running (the test leaves no process)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_flow(ws: Path, stage: str, name: str) -> None:
    proc, log = _start(ws, name, ["-m", "flows", stage])
    try:
        code = proc.wait(timeout=900)
    finally:
        _reap(proc)
    assert code == 0, f"`python -m flows {stage}` failed:\n{log.read_text()[-4000:]}"


def kill_when(ws: Path, stage: str, name: str, ready) -> None:
    """Start the stage, SIGKILL it as soon as `ready()` holds (fail if it ends first)."""
    proc, log = _start(ws, name, ["-m", "flows", stage])
    try:
        deadline = time.monotonic() + 900
        while not ready():
            assert proc.poll() is None, f"the stage ended before the kill point:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        _reap(proc)


def kill_while_writing(ws: Path, stage: str, name: str, marker: str, count: int) -> None:
    proc, log = _start(ws, name, ["-c", KILL_WHILE_WRITING, marker, str(count), stage])
    try:
        code = proc.wait(timeout=900)
    finally:
        _reap(proc)
    assert code == -signal.SIGKILL, f"expected the self-kill, got exit code {code}:\n{log.read_text()[-4000:]}"


def leftovers(ws: Path) -> list[Path]:
    """Temporary files and folders (ours are `.<name>.<pid>.<random>.tmp|.old`) under the outputs."""
    return sorted(p for top in ("data", "metrics", "models") for p in (ws / top).rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


def without_timings(metrics: dict) -> dict:
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in metrics.items() if k not in TIMINGS}


def _chunk_files(cache: Path) -> dict[str, tuple[int, int]]:
    """Finished chunks: name -> (inode, mtime_ns), which change if the chunk is written again."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.parquet")}


# Writes `old` atomically, then starts rewriting file FILE and folder DIR with new content and
# SIGKILLs itself half-way through each (first the file, in a second process the folder).
KILL_INSIDE_ATOMIC = """
import os, signal, sys
from pathlib import Path
from rlvr.io import atomic_dir, atomic_path
kind, target = sys.argv[1], Path(sys.argv[2])
with (atomic_path if kind == "file" else atomic_dir)(target) as tmp:
    if kind == "file":
        tmp.write_text("half of the new")
    else:
        (tmp / "part.txt").write_text("half of the new")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_atomic_write_keeps_the_old_output_and_the_next_write_cleans_up(tmp_path):
    file, folder = tmp_path / "metrics.json", tmp_path / "evaluated"
    write_text(file, "old")
    (folder).mkdir()
    (folder / "old.txt").write_text("old")
    for kind, target in (("file", file), ("dir", folder)):
        proc = subprocess.run([sys.executable, "-c", KILL_INSIDE_ATOMIC, kind, str(target)], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert file.read_text() == "old" and [p.name for p in folder.iterdir()] == ["old.txt"]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(left) == 2 and left[0].startswith(".evaluated.") and left[1].startswith(".metrics.json.")

    # a temporary file of a writer that still runs (this test's process) is not touched
    running = tmp_path / f".metrics.json.{os.getpid()}.abc123.tmp"
    running.write_text("being written")
    write_json(file, {"new": 1})
    assert json.loads(file.read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [left[0], running.name]
    assert remove_orphans(tmp_path) == 1 and running.exists()  # the folder's leftover; ours stays


def test_atomic_outputs_get_the_umask_mode_and_secrets_stay_private(tmp_path):
    """mkstemp / mkdtemp make 0600 / 0700; outputs a team shares must get what open() / mkdir() give."""
    import stat

    from rlvr.io import atomic_dir

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "metrics.json", "{}")
        write_text(tmp_path / "secret", "pw", mode=0o600)
        with atomic_dir(tmp_path / "policy") as tmp:
            (tmp / "model.bin").write_bytes(b"w")
        os.umask(0o077)
        write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode)
             for name in ("metrics.json", "secret", "policy", "private.json")}
    assert modes == {"metrics.json": 0o644, "secret": 0o600, "policy": 0o755, "private.json": 0o600}


@pytest.mark.slow
def test_killed_rollouts_resume_from_finished_chunks_and_match_an_uninterrupted_run(workspace, tmp_path):
    cache = workspace / "data/rollout_cache"

    # kill point 1: from outside, as soon as the first chunk file appears (mid-sampling)
    kill_when(workspace, "rollout", "rollout-kill-1", lambda: any(cache.glob("*.parquet")))
    after_first = _chunk_files(cache)
    assert 1 <= len(after_first) < ROLLOUT_CHUNKS
    assert not (workspace / "data/rollouts").exists() and not (workspace / "metrics/rollout.json").exists()

    # kill point 2: from inside, half-way through writing the second chunk this run samples
    kill_while_writing(workspace, "rollout", "rollout-kill-2", "rollout_cache/.", 2)
    after_second = _chunk_files(cache)
    assert len(after_second) == len(after_first) + 1
    assert {n: after_second[n] for n in after_first} == after_first  # reused, not rewritten
    assert [p for p in cache.iterdir() if p.name.startswith(".")], "the cut temporary file should be there"

    # the rerun: no manual cleanup
    run_flow(workspace, "rollout", "rollout-rerun")
    metrics = json.loads((workspace / "metrics/rollout.json").read_text())
    assert metrics["chunks"] == ROLLOUT_CHUNKS and metrics["chunks_reused"] == len(after_second)
    assert metrics["chunks_sampled"] == ROLLOUT_CHUNKS - len(after_second) and metrics["chunks_invalid"] == 0
    final = _chunk_files(cache)
    assert len(final) == ROLLOUT_CHUNKS and {n: final[n] for n in after_second} == after_second
    assert not [p for p in cache.iterdir() if p.name.startswith(".")] and leftovers(workspace) == []

    # the same rollouts as one uninterrupted run into an empty cache
    reference, rates, ref_metrics = rollout.run(config.from_dict(_raw()), cache=tmp_path / "reference-cache")
    assert ref_metrics["chunks_sampled"] == ROLLOUT_CHUNKS
    pd.testing.assert_frame_equal(pd.read_parquet(workspace / "data/rollouts/rollouts.parquet"), reference)
    pd.testing.assert_frame_equal(pd.read_parquet(workspace / "data/rollouts/pass_rates.parquet"), rates)


def _evaluated(ws: Path) -> dict[str, pd.DataFrame]:
    folder = ws / "data/evaluated"
    return {p.relative_to(folder).as_posix(): pd.read_parquet(p) for p in sorted(folder.rglob("*.parquet"))}


def _same_frames(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key])


@pytest.mark.slow
def test_killed_evaluations_leave_the_last_results_and_the_rerun_reproduces_them(workspace):
    metrics_file = workspace / "metrics/eval.json"
    evaluate.main(config.from_dict(_raw()))  # the uninterrupted run: the last good results
    good_bytes, good_frames = metrics_file.read_bytes(), _evaluated(workspace)
    good = without_timings(json.loads(good_bytes))
    passk = (workspace / "metrics/passk/arith.csv").read_bytes()

    # kill point 1: from outside, once the first benchmark is graded (the second is being sampled)
    log = workspace / "logs/evaluate-kill-1.log"
    kill_when(workspace, "evaluate", "evaluate-kill-1", lambda: "evaluate policy on arith" in log.read_text())
    assert metrics_file.read_bytes() == good_bytes  # untouched: nothing is written before the end
    _same_frames(_evaluated(workspace), good_frames)
    run_flow(workspace, "evaluate", "evaluate-rerun-1")
    assert without_timings(json.loads(metrics_file.read_text())) == good
    _same_frames(_evaluated(workspace), good_frames)
    assert leftovers(workspace) == []

    # kill point 2: from inside, half-way through writing the first file of data/evaluated
    kill_while_writing(workspace, "evaluate", "evaluate-kill-2", "/.evaluated.", 1)
    assert [p.name for p in leftovers(workspace)], "the cut temporary folder should be there"
    _same_frames(_evaluated(workspace), good_frames)  # the previous complete folder is still in place
    assert without_timings(json.loads(metrics_file.read_text())) == good
    run_flow(workspace, "evaluate", "evaluate-rerun-2")
    assert without_timings(json.loads(metrics_file.read_text())) == good
    _same_frames(_evaluated(workspace), good_frames)
    assert (workspace / "metrics/passk/arith.csv").read_bytes() == passk
    assert leftovers(workspace) == []
