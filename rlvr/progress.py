"""Progress lines for long stages (warmup, rollout, train, evaluate): step, rate, ETA, key metrics.

The lines go to the `rlvr.progress` logger. Inside a stage's flow, Prefect sends the `rlvr` loggers to
the flow run's logs (flows/__init__.py), so the Prefect UI shows how far a stage is while it runs; on a
terminal they appear next to tqdm's bar, which only a TTY shows.

A line is written for the first unit of work, then at most once every RLVR_PROGRESS_SECONDS seconds
(default 30: a few lines a minute, readable in the UI, and no flood of API calls at small steps), and for
the last unit. The interval is an environment variable rather than a param on purpose: it changes no
result, so changing it must not make DVC rerun a stage.

Two hooks, both public surfaces: `ProgressBar`, a tqdm bar that also logs (rollout and the sampler
used by evaluate pass it where they made a bar), and `TrainerProgress`, a transformers
TrainerCallback (warmup's SFTTrainer, train's GRPO trainer). On several processes only the main one
logs.
"""

from __future__ import annotations

import logging
import math
import os
import time

from tqdm.auto import tqdm
from transformers import TrainerCallback

log = logging.getLogger("rlvr.progress")

INTERVAL_ENV = "RLVR_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 30.0
TRAINER_METRICS = ("loss", "reward", "reward_std", "kl")  # reported when the trainer logs them


def interval_s() -> float:
    """Seconds between two progress lines, from RLVR_PROGRESS_SECONDS (0: a line per unit)."""
    raw = os.environ.get(INTERVAL_ENV, "")
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0 (e.g. 30)")
    return value


def duration(seconds: float) -> str:
    """`1h02m`, `4m05s`, `12s`: short enough for a log line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def line(label: str, done: int, total: int | None, elapsed_s: float, unit: str,
         metrics: dict[str, float] | None = None, start_done: int = 0) -> str:
    """`train: step 12/400 (3%), 0.52 step/s, ETA 12m25s, loss 0.1234, reward 0.4500`.

    The rate counts only the units done since this process started (`done - start_done`), so a resumed
    run does not claim the steps it loaded from a checkpoint."""
    parts = [f"{label}: {unit} {done}" + (f"/{total} ({100 * done / total:.0f}%)" if total else "")]
    rate = (done - start_done) / elapsed_s if elapsed_s > 0 else 0.0
    if rate > 0:
        parts.append(f"{rate:.3g} {unit}/s")
        if total:
            parts.append(f"ETA {duration((total - done) / rate)}")
    parts += [f"{key} {value:.4g}" for key, value in (metrics or {}).items()]
    return ", ".join(parts)


class Reporter:
    """Decides when a progress line is due and writes it: the first unit, every `interval` seconds, the last."""

    def __init__(self, label: str, total: int | None, unit: str, interval: float | None = None,
                 start_done: int = 0, clock=time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.interval = interval_s() if interval is None else interval
        self.start_done, self.clock = start_done, clock
        self.started = clock()
        self.last: float | None = None
        self.lines = 0

    def update(self, done: int, metrics: dict[str, float] | None = None) -> bool:
        """Report `done` units of `total` when a line is due; returns whether one was written."""
        now = self.clock()
        last_unit = self.total is not None and done >= self.total
        if self.last is not None and not last_unit and now - self.last < self.interval:
            return False
        self.last = now
        self.lines += 1
        log.info(line(self.label, done, self.total, now - self.started, self.unit, metrics, self.start_done))
        return True


class ProgressBar(tqdm):
    """tqdm's bar (drawn only on a TTY, as before) that also writes progress lines. It counts by itself:
    a disabled tqdm counts nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reporter = Reporter(kwargs.get("desc") or "progress", kwargs.get("total"), kwargs.get("unit") or "it")
        self.done = 0

    def update(self, n: float = 1):
        self.done += int(n)
        self.reporter.update(self.done)
        return super().update(n)


def latest_metrics(log_history: list[dict]) -> dict[str, float]:
    """The TRAINER_METRICS of the last training entry of a trainer's log history (held-out entries skipped)."""
    latest: dict[str, float] = {}
    for entry in reversed(log_history[-8:]):  # the last training entry is among the last few
        for key in TRAINER_METRICS:
            value = entry.get(key)
            if key not in latest and isinstance(value, (int, float)) and math.isfinite(value):
                latest[key] = float(value)
        if "loss" in latest:
            break
    return {key: latest[key] for key in TRAINER_METRICS if key in latest}


class TrainerProgress(TrainerCallback):
    """A progress line after a training step when one is due, with the trainer's latest loss (and
    reward, for GRPO). The Trainer logs a step after `on_step_end`: on a step it logs (the default flow
    callback, which runs first, has set `control.should_log`), the line waits for `on_log`, so that it
    carries that step's numbers rather than the previous log's."""

    def __init__(self, label: str, interval: float | None = None):
        self.label, self.interval = label, interval
        self.reporter: Reporter | None = None
        self.waiting: int | None = None  # the step whose line waits for the trainer's log

    def on_train_begin(self, args, state, control, **kwargs):
        self.reporter = Reporter(self.label, state.max_steps or None, "step", self.interval,
                                 start_done=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter is None or not state.is_world_process_zero:
            return
        if control.should_log:
            self.waiting = state.global_step
        else:
            self.reporter.update(state.global_step, latest_metrics(state.log_history))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.reporter is None or self.waiting != state.global_step or not state.is_world_process_zero:
            return
        self.waiting = None
        self.reporter.update(state.global_step, latest_metrics(state.log_history))
