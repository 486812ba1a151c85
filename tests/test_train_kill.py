"""The train stage survives a SIGKILL: at each kill point the rerun needs no cleanup, resumes from the
right step and ends with exactly the policy of an uninterrupted run (bit-identical on CPU).

Every run is a subprocess running `stages.train.main` (driver below) on the same small params:
`order: gain_rl` (so the GAIN-RL mu and sampler RNG must survive) and `reward: blend`. The tiny
model's 24-token completions never reach a right answer or a right step, so every reward would be 0
and no parameter would move, and any two policies would be equal; the PRM is therefore replaced by
a deterministic test PRM whose step scores spread (`LengthPRM`), which gives every step real
gradients. The driver kills its own process group with SIGKILL at a chosen point, the way an
operator's `kill -9` of the stage would; the hooks that decide when live only in this test's driver.

Kill points (4 steps, a checkpoint every 2):
- between_checkpoints: at the start of step 3 (checkpoint-2 complete)
- inside_checkpoint: checkpoint-4's optimizer state half written (weights already there)
- after_last_checkpoint: checkpoint-4 complete, models/policy not yet written
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from rlvr import config, grpo
from stages import prepare, score, warmup
from tests.conftest import ROOT, small_params_dict

pytestmark = pytest.mark.slow

DRIVER = '''
import os, signal, sys
import torch
from rlvr import config, grpo, models, prof
from stages import train


class LengthPRM:
    """Test PRM: a deterministic step score with spread, so blend rewards differ inside a group."""

    def step_scores(self, problems, steps):
        return [[(len(step) % 5) / 4 for step in response] for response in steps]


def die():
    os.killpg(os.getpgid(0), signal.SIGKILL)


def arm(point):
    if point == "between_checkpoints":
        step = grpo.RLVRGRPOTrainer.training_step
        def training_step(self, *args, **kwargs):
            if self.state.global_step == 2:
                die()
            return step(self, *args, **kwargs)
        grpo.RLVRGRPOTrainer.training_step = training_step
    elif point == "inside_checkpoint":
        save = torch.save
        def half_save(obj, f, *args, **kwargs):
            if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
                with open(f, "wb") as out:
                    out.write(b"half an optimizer state")
                die()
            return save(obj, f, *args, **kwargs)
        torch.save = half_save
    elif point == "after_last_checkpoint":
        def save_model(*args, **kwargs):
            die()
        models.save_model = save_model
    elif point != "none":
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    prof.load_prm = lambda settings, progress=False: LengthPRM()
    arm(sys.argv[1])
    train.main(config.load("kill_params.yaml"))
'''

STEPS, SAVE_STEPS = 4, 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """prepare, warmup and score once (train.prompts: all needs no rollout or filter)."""
    path = tmp_path_factory.mktemp("train_kill")
    raw = small_params_dict()
    raw["train"].update(order="gain_rl", reward="blend", prompts="all", max_steps=STEPS, save_steps=SAVE_STEPS,
                        logging_steps=1)
    old = os.getcwd()
    os.chdir(path)
    try:
        params = config.from_dict(raw)
        prepare.main(params)
        warmup.main(params)
        score.main(params)
    finally:
        os.chdir(old)
    (path / "kill_params.yaml").write_text(yaml.safe_dump(raw))
    (path / "kill_driver.py").write_text(DRIVER)
    return path


def _train(workdir, point: str) -> subprocess.CompletedProcess:
    # One thread: the CPU is shared with other test runs; every run compared here uses the same setting.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(workdir / f"train-{point}.log", "w") as out:
        process = subprocess.Popen([sys.executable, "kill_driver.py", point], cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=900)
        finally:
            try:  # the grader's worker processes go with their killed parent
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = (workdir / f"train-{point}.log").read_text()
    return subprocess.CompletedProcess(process.args, process.returncode, log[-3000:])


def _fresh_start(workdir):
    """Before a scenario: no checkpoints and no policy from an earlier scenario (not the cleanup under test)."""
    for folder in ("models/checkpoints", "models/policy"):
        shutil.rmtree(workdir / folder, ignore_errors=True)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _curve(workdir):
    return pd.read_csv(workdir / "metrics/train_curve.csv").set_index("step")


@pytest.fixture(scope="module")
def uninterrupted(workdir, tmp_path_factory):
    """The reference: the same params, run without a kill."""
    _fresh_start(workdir)
    done = _train(workdir, "none")
    assert done.returncode == 0, done.stdout
    keep = tmp_path_factory.mktemp("reference")
    shutil.copytree(workdir / "models/policy", keep / "policy")
    warm = _weights(workdir / "models/warmup")
    policy = _weights(keep / "policy")
    assert any(not (policy[k] == warm[k]).all() for k in warm), "the reference run did not change the policy"
    return {"policy": policy, "curve": _curve(workdir), "metrics": json.loads((workdir / "metrics/train.json").read_text())}


# kill point -> (what the killed run leaves, the step the rerun resumes from)
SCENARIOS = {
    "between_checkpoints": (["checkpoint-2"], 2),
    "inside_checkpoint": (["checkpoint-2", "checkpoint-4 (incomplete)"], 2),
    "after_last_checkpoint": (["checkpoint-2", "checkpoint-4"], 4),
}


def _left_behind(checkpoints):
    return sorted(p.name + ("" if grpo.is_complete(p) else " (incomplete)")
                  for p in checkpoints.glob("checkpoint-*"))


@pytest.mark.parametrize("point", list(SCENARIOS))
def test_a_killed_run_reruns_without_cleanup_and_ends_with_the_uninterrupted_policy(workdir, uninterrupted, point):
    left, resume_step = SCENARIOS[point]
    _fresh_start(workdir)
    killed = _train(workdir, point)
    assert killed.returncode == -signal.SIGKILL, f"expected a SIGKILL at {point}:\n{killed.stdout}"
    checkpoints = workdir / "models/checkpoints"
    assert _left_behind(checkpoints) == left
    assert not (workdir / "models/policy").exists()

    rerun = _train(workdir, "none")  # nothing deleted or repaired by hand in between
    assert rerun.returncode == 0, rerun.stdout
    metrics = json.loads((workdir / "metrics/train.json").read_text())
    assert metrics["resumed_from_step"] == resume_step and metrics["steps"] == STEPS
    assert _left_behind(checkpoints) == ["checkpoint-2", "checkpoint-4"]  # the incomplete one was replaced
    state = json.loads((checkpoints / "checkpoint-4/trainer_state.json").read_text())
    assert state["global_step"] == STEPS == max(e["step"] for e in state["log_history"])  # no step past max_steps
    assert json.loads((checkpoints / "fingerprint.json").read_text())["finished"] is True

    # Bit-identical: the same weights, and the same GAIN-RL mu and rewards at every step.
    policy = _weights(workdir / "models/policy")
    reference = uninterrupted["policy"]
    assert policy.keys() == reference.keys()
    different = [k for k in reference if not (policy[k] == reference[k]).all()]
    assert not different, f"after a kill at {point} the policy differs from the uninterrupted run's in {different}"
    curve, ref_curve = _curve(workdir), uninterrupted["curve"]
    assert curve.index.tolist() == ref_curve.index.tolist() == list(range(1, STEPS + 1))
    for column in ("gain_rl/mu", "reward", "rewards/process_value/mean", "loss"):
        assert curve[column].tolist() == ref_curve[column].tolist(), column
    assert metrics["final_mu"] == uninterrupted["metrics"]["final_mu"]
