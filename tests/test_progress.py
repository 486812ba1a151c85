"""Progress lines (rlvr/progress.py): when they are written and what they say.

That they reach a Prefect flow run's logs is checked with a real stage and server in
tests/test_services.py (test_a_killed_stage_is_crashed_by_services_status_after_its_progress_reached_prefect).
"""

from __future__ import annotations

import logging

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from rlvr import progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_says_step_rate_eta_and_metrics():
    # 12 of 400 steps in 24 s: 0.5 step/s, 388 steps left -> 776 s = 12m56s
    text = progress.line("train", 12, 400, 24.0, "step", {"loss": 0.12345, "reward": 0.45})
    assert text == "train: step 12/400 (3%), 0.5 step/s, ETA 12m56s, loss 0.1235, reward 0.45"
    # resumed at step 10: only the 2 steps this process did count towards the rate (0.0833/s -> 4656 s)
    assert "0.0833 step/s, ETA 1h17m" in progress.line("train", 12, 400, 24.0, "step", start_done=10)
    assert progress.line("rollout", 0, None, 0.0, "sample") == "rollout: sample 0"


def test_lines_come_first_then_at_the_interval_then_last(caplog):
    clock = Clock()
    reporter = progress.Reporter("warmup", 10, "step", interval=30, clock=clock)
    written = []
    with caplog.at_level(logging.INFO, logger="rlvr.progress"):
        for step in range(1, 11):
            clock.now += 7  # 7 s a step: lines at steps 1, 6 (35 s after step 1), and 10 (the last)
            written.append(reporter.update(step))
    assert [s for s, w in zip(range(1, 11), written) if w] == [1, 6, 10]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "warmup: step 1/10 (10%)", "warmup: step 6/10 (60%)", "warmup: step 10/10 (100%)"]
    assert all(r.name == "rlvr.progress" for r in caplog.records)


@pytest.mark.parametrize(("raw", "expected"), [("", 30.0), ("0", 0.0), ("2.5", 2.5)])
def test_the_interval_comes_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv(progress.INTERVAL_ENV, raw)
    assert progress.interval_s() == expected


@pytest.mark.parametrize("raw", ["soon", "-1", "nan"])
def test_a_bad_interval_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv(progress.INTERVAL_ENV, raw)
    with pytest.raises(ValueError, match="RLVR_PROGRESS_SECONDS=.*expected a number of seconds >= 0"):
        progress.interval_s()


def test_the_bar_counts_and_reports_when_tqdm_draws_nothing(monkeypatch, caplog):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    with caplog.at_level(logging.INFO, logger="rlvr.progress"):
        with progress.ProgressBar(total=8, desc="rollout", unit="sample", disable=True) as bar:
            for _ in range(4):
                bar.update(2)
    assert bar.done == 8
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4 and messages[-1].startswith("rollout: sample 8/8 (100%)")


def test_the_trainer_callback_reports_the_latest_loss_and_reward(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = TrainerState(max_steps=4, global_step=0), TrainerControl()
    callback = progress.TrainerProgress("train")
    with caplog.at_level(logging.INFO, logger="rlvr.progress"):
        callback.on_train_begin(args, state, control)
        for step in range(1, 5):
            # as the Trainer does: on_step_end (should_log set on logging steps, here 2 and 4), then the log
            state.global_step, control.should_log = step, step % 2 == 0
            callback.on_step_end(args, state, control)
            if control.should_log:
                state.log_history.append({"loss": 1.0 / step, "reward": step / 4, "step": step})
                callback.on_log(args, state, control, logs=state.log_history[-1])
            if step == 2:
                state.log_history.append({"eval_pass_at_1": 0.5, "step": step})  # not a training entry
                callback.on_log(args, state, control, logs=state.log_history[-1])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert messages[0].startswith("train: step 1/4 (25%)") and "loss" not in messages[0]  # nothing logged yet
    assert messages[1].startswith("train: step 2/4 (50%)") and messages[1].endswith("loss 0.5, reward 0.5")
    assert messages[2].startswith("train: step 3/4") and messages[2].endswith("loss 0.5, reward 0.5")
    assert messages[3].endswith("loss 0.25, reward 1")  # the last step's own numbers
