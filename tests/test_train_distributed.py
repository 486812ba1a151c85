"""GRPO training on 2 processes (torchrun, gloo on CPU): what each rank does, checked rank by rank.

Every run here is a real 2-process job of the train stage on a tiny model (4 steps, a checkpoint every
2, K = 3 prompts x G = 4 rollouts per step, so 6 rollouts per rank and the second prompt's group spans
both ranks). Most runs start `stages.train.main` under torchrun through a driver (below) that records,
per rank, what the rank did: the GAIN-RL draws and every mu update, PROF's inputs, decision and the
advantages and masks it left in the rank's batch, the prompts each generation step saw, and which rank
wrote what (resume point, checkpoint markers, policy). The record hooks wrap functions and change
nothing they return. One run goes through the real entry point (`python -m flows train` with
`launch.processes: 2`: Prefect flow, launcher, MLflow) and is compared with the driver's run.

The tiny model's completions are never right, so every accuracy reward is 0; as in test_train_kill.py
a deterministic test PRM (`LengthPRM`) with `reward: blend` gives the groups spread, hence real
advantages and gradients, and gives PROF values to decide on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlvr import config, grpo, models
from stages import prepare, score
from tests.conftest import ROOT, small_params_dict

pytestmark = pytest.mark.slow

STEPS, SAVE_STEPS, K, G, PROCESSES = 4, 2, 3, 4, 2

DRIVER = '''
import json, os, signal, sys
from rlvr import config, grpo, models, prof
from stages import train

RANK = int(os.environ["RANK"])
RECORD = {"draws": [], "updates": [], "prof": [], "rollout_ids": [], "resume_points": [], "markers": [],
          "policies": []}


class LengthPRM:
    """Test PRM: a deterministic step score with spread, so blend rewards differ inside a group."""

    def step_scores(self, problems, steps):
        return [[(len(step) % 5) / 4 for step in response] for response in steps]


def wrap(owner, name, after):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        after(result, *args, **kwargs)
        return result
    setattr(owner, name, wrapped)


def record():
    wrap(grpo.GainRLSchedule, "draw", lambda rows, self, k: RECORD["draws"].append([int(r) for r in rows]))
    wrap(grpo.GainRLSchedule, "update", lambda delta, self, acc, ang: RECORD["updates"].append(
        {"acc": acc, "ang": ang, "mu": self.sampler.mu}))
    wrap(grpo.ProfInLoop, "decide", lambda kept, self, correct, values, n_steps, g: RECORD["prof"].append(
        {"correct": correct, "values": values, "n_steps": n_steps, "kept": kept}))
    wrap(grpo.RLVRGRPOTrainer, "_prof_step", lambda _, self, output, problems, completions, rewards: RECORD[
        "prof"][-1].update(local_rewards=rewards.tolist(), advantages=output["advantages"].tolist(),
                           masked=(output["completion_mask"].sum(dim=1) == 0).tolist()))
    wrap(grpo.RLVRGRPOTrainer, "_gain_rl_inputs", lambda rows, self, local: RECORD["rollout_ids"].append(
        [r["id"] for r in rows]))
    generate = grpo.RLVRGRPOTrainer._generate_and_score_completions
    def generate_and_record(self, inputs):
        if self.model.training and self.order != "gain_rl":
            RECORD["rollout_ids"].append([r["id"] for r in inputs])
        return generate(self, inputs)
    grpo.RLVRGRPOTrainer._generate_and_score_completions = generate_and_record
    wrap(train, "resume_point", lambda found, checkpoints, expected: RECORD["resume_points"].append(
        None if found is None else str(found)))
    wrap(grpo, "mark_complete", lambda _, folder: RECORD["markers"].append(folder.name))
    wrap(models, "save_model", lambda _, model, tokenizer, path, state_dict=None: RECORD["policies"].append(str(path)))


def die():
    os.killpg(os.getpgid(0), signal.SIGKILL)


def arm(point):
    if point == "between_checkpoints":  # rank 1 at the start of step 3: checkpoint-2 is complete
        step = grpo.RLVRGRPOTrainer.training_step
        def training_step(self, *args, **kwargs):
            if self.state.global_step == 2 and RANK == 1:
                die()
            return step(self, *args, **kwargs)
        grpo.RLVRGRPOTrainer.training_step = training_step
    elif point != "none":
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    point, params_file, tag = sys.argv[1:4]
    prof.load_prm = lambda settings, progress=False: LengthPRM()
    arm(point)
    record()
    train.main(config.load(params_file))
    with open(f"record-{tag}-rank{RANK}.json", "w") as out:
        json.dump(RECORD, out)
'''


def _raw(**train_values) -> dict:
    raw = small_params_dict()
    raw["prepare"]["train"] = [{"name": "arith", "builtin": True, "size": 40}]
    raw["train"].update(order="gain_rl", prof=True, reward="blend", prompts="all", max_steps=STEPS,
                        save_steps=SAVE_STEPS, prompts_per_step=K, num_generations=G, logging_steps=1,
                        eval_steps=0)
    # beta 0: with every accuracy 0, mu moves by n x tanh(alpha x ang) alone (the default beta 0.5 keeps it
    # at 0), so the mu of every step depends on the gathered ang of the policy being trained
    raw["train"]["gain_rl"].update(beta=0.0)
    raw["train"].update(train_values)
    raw["launch"].update(processes=PROCESSES)
    return raw


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Prepared data, a tiny random 'warm-up' model and its angle ranking (score), once for the module."""
    path = tmp_path_factory.mktemp("train_distributed")
    old = os.getcwd()
    os.chdir(path)
    try:
        params = config.from_dict(_raw())
        prepare.main(params)
        tokenizer = models.build_char_tokenizer()
        models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 256, seed=0), tokenizer,
                          "models/warmup")
        score.main(params)
    finally:
        os.chdir(old)
    (path / "driver.py").write_text(DRIVER)
    (path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    return path


def _env() -> dict:
    # One thread per rank: the CPU is shared; every run compared here uses the same setting. The
    # project's state (MLflow store, Prefect's temporary server) lives in the work folder.
    env = {k: v for k, v in os.environ.items()
           if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(workdir: Path, cmd: list[str], log_name: str) -> subprocess.CompletedProcess:
    with open(workdir / log_name, "w") as out:
        process = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=900)
        finally:
            try:  # ranks and grader workers of a killed job go with it
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = (workdir / log_name).read_text()
    return subprocess.CompletedProcess(process.args, process.returncode, text[-4000:])


def _driver(workdir: Path, tag: str, point: str = "none", **train_values) -> subprocess.CompletedProcess:
    (workdir / f"{tag}.yaml").write_text(yaml.safe_dump(_raw(**train_values)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
           "driver.py", point, f"{tag}.yaml", tag]
    return _run(workdir, cmd, f"{tag}-{point}.log")


def _records(workdir: Path, tag: str) -> list[dict]:
    return [json.loads((workdir / f"record-{tag}-rank{r}.json").read_text()) for r in range(PROCESSES)]


def _fresh_start(workdir: Path) -> None:
    for folder in ("models/checkpoints", "models/policy", "metrics", "logs", "mlruns"):
        shutil.rmtree(workdir / folder, ignore_errors=True)


def _outputs(workdir: Path) -> dict:
    """What a finished run left: policy weights, curve, metrics (read now: the next run overwrites them)."""
    return {"policy": load_file(str(workdir / "models/policy/model.safetensors")),
            "curve": pd.read_csv(workdir / "metrics/train_curve.csv").set_index("step"),
            "metrics": json.loads((workdir / "metrics/train.json").read_text())}


def _complete_checkpoints(workdir: Path) -> list[str]:
    return sorted(p.name + ("" if grpo.is_complete(p) else " (incomplete)")
                  for p in (workdir / "models/checkpoints").glob("checkpoint-*"))


def _models_folder_is_clean(workdir: Path) -> None:
    """No temporary or moved-aside folders of atomic writes are left next to the policy."""
    assert sorted(p.name for p in (workdir / "models").iterdir()) == ["checkpoints", "policy", "warmup"]


@pytest.fixture(scope="module")
def gain_rl_prof(workdir):
    """The reference 2-process run: order gain_rl, PROF in the loop, blend reward; uninterrupted."""
    _fresh_start(workdir)
    done = _driver(workdir, "gain_rl_prof")
    assert done.returncode == 0, done.stdout
    _models_folder_is_clean(workdir)
    return {"records": _records(workdir, "gain_rl_prof"), "checkpoints": _complete_checkpoints(workdir),
            "workdir": workdir,
            **_outputs(workdir)}


def test_every_rank_draws_the_same_gain_rl_prompts_and_holds_the_same_mu(gain_rl_prof):
    rank0, rank1 = gain_rl_prof["records"]
    assert len(rank0["draws"]) == len(rank0["updates"]) == STEPS
    assert rank0["draws"] == rank1["draws"] and all(len(d) == K for d in rank0["draws"])
    assert rank0["updates"] == rank1["updates"]  # acc, ang and mu after every step, bit for bit
    mus = [u["mu"] for u in rank0["updates"]]
    assert len(set(mus)) > 1, f"mu never moved: {mus}"
    # what rank 0 logged (train_curve.csv; MLflow gets the same rows) is the mu every rank held
    assert gain_rl_prof["curve"]["gain_rl/mu"].tolist() == mus
    assert gain_rl_prof["metrics"]["final_mu"] == mus[-1]
    # each rank generated for its half of the step's K x G rollouts: the drawn rows, each G times in a row
    ids = pd.read_parquet(gain_rl_prof["workdir"] / "data/prepared/train.parquet")["id"].tolist()
    for step, rows in enumerate(rank0["draws"]):
        assert len(rank0["rollout_ids"][step]) == len(rank1["rollout_ids"][step]) == K * G // PROCESSES
        assert rank0["rollout_ids"][step] + rank1["rollout_ids"][step] == [ids[r] for r in rows for _ in range(G)]


def test_prof_decides_on_every_rank_s_groups_and_each_rank_keeps_its_slice(gain_rl_prof):
    rank0, rank1 = gain_rl_prof["records"]
    assert len(rank0["prof"]) == len(rank1["prof"]) == STEPS
    n_local = K * G // PROCESSES
    dropped = kept = 0
    for step, (mine, theirs) in enumerate(zip(rank0["prof"], rank1["prof"])):
        # one decision over all K x G rollouts, the same on both ranks, from the same gathered numbers
        for key in ("kept", "correct", "n_steps"):
            assert mine[key] == theirs[key], (step, key)
        assert json.dumps(mine["values"]) == json.dumps(theirs["values"])  # NaN-safe equality
        assert len(mine["kept"]) == K * G
        # the gathered rewards are rank 0's rows then rank 1's (TRL's layout); the advantages over the
        # kept rollouts of every group (grpo.kept_advantages), of which each rank holds its slice
        rewards = torch.tensor(mine["local_rewards"] + theirs["local_rewards"])
        weight = _raw()["train"]["blend_weight"]
        total = (rewards * torch.tensor([1.0, weight])).nansum(dim=1)  # accuracy + blend_weight x value
        expected = grpo.kept_advantages(total, torch.tensor(mine["kept"]), G, "group")
        for rank, record in enumerate((mine, theirs)):
            part = slice(rank * n_local, (rank + 1) * n_local)
            torch.testing.assert_close(torch.tensor(record["advantages"]), expected[part], rtol=0, atol=1e-6)
            assert record["masked"] == [not k for k in mine["kept"][part]], (step, rank)
        dropped += mine["kept"].count(False)
        kept += mine["kept"].count(True)
    assert dropped and kept, "PROF kept or dropped everything: the slicing was not exercised"
    assert any(a != 0 for record in rank0["prof"] + rank1["prof"] for a in record["advantages"])


def test_checkpoints_markers_and_the_policy_are_written_once_by_rank_0(gain_rl_prof):
    rank0, rank1 = gain_rl_prof["records"]
    assert rank0["resume_points"] == [None] and rank1["resume_points"] == []
    assert rank0["markers"] == ["checkpoint-2", "checkpoint-4"] and rank1["markers"] == []
    assert rank0["policies"] == ["models/policy"] and rank1["policies"] == []
    assert gain_rl_prof["checkpoints"] == ["checkpoint-2", "checkpoint-4"]


def test_a_killed_two_process_run_resumes_on_two_processes_to_the_same_policy(workdir, gain_rl_prof):
    _fresh_start(workdir)
    killed = _driver(workdir, "gain_rl_prof_killed", "between_checkpoints")
    assert killed.returncode != 0, f"expected the job to die at step 3:\n{killed.stdout}"
    assert _complete_checkpoints(workdir) == ["checkpoint-2"]
    assert not (workdir / "models/policy").exists()

    rerun = _driver(workdir, "gain_rl_prof_rerun")  # the same params: nothing cleaned up in between
    assert rerun.returncode == 0, rerun.stdout
    rank0, rank1 = _records(workdir, "gain_rl_prof_rerun")
    assert rank0["resume_points"] == [str(Path("models/checkpoints/checkpoint-2"))] and rank1["resume_points"] == []
    assert rank0["draws"] == rank1["draws"] == gain_rl_prof["records"][0]["draws"][SAVE_STEPS:]
    assert rank0["updates"] == rank1["updates"] == gain_rl_prof["records"][0]["updates"][SAVE_STEPS:]
    result = _outputs(workdir)
    assert result["metrics"]["resumed_from_step"] == SAVE_STEPS and result["metrics"]["steps"] == STEPS
    reference = gain_rl_prof["policy"]
    different = [k for k in reference if not torch.equal(result["policy"][k], reference[k])]
    assert not different, f"the resumed 2-process policy differs from the uninterrupted one in {different}"
    for column in ("gain_rl/mu", "reward", "loss", "prof/kept_frac"):
        assert result["curve"][column].tolist() == gain_rl_prof["curve"][column].tolist(), column
    assert _complete_checkpoints(workdir) == ["checkpoint-2", "checkpoint-4"]
    _models_folder_is_clean(workdir)


def test_uniform_order_splits_each_step_s_plan_rows_between_the_ranks(workdir):
    _fresh_start(workdir)
    done = _driver(workdir, "uniform", order="uniform", prof=False)
    assert done.returncode == 0, done.stdout
    rank0, rank1 = _records(workdir, "uniform")
    assert rank0["draws"] == rank1["draws"] == [] and rank0["prof"] == []
    ids = pd.read_parquet(workdir / "data/prepared/train.parquet")["id"].tolist()
    plan = grpo.prompt_plan("uniform", [], len(ids), K, STEPS, small_params_dict()["train"]["seed"])
    assert len(rank0["rollout_ids"]) == len(rank1["rollout_ids"]) == STEPS
    for step in range(STEPS):
        rows = plan[step * K:(step + 1) * K]
        assert rank0["rollout_ids"][step] + rank1["rollout_ids"][step] == [ids[r] for r in rows for _ in range(G)]
    assert rank0["policies"] == ["models/policy"] and rank1["policies"] == []
    _models_folder_is_clean(workdir)


def test_the_train_stage_launched_through_its_flow_matches_the_worker_run(workdir):
    """`python -m flows train` with launch.processes 2: Prefect flow -> torchrun -> 2 ranks -> MLflow.

    The stage cannot take the test PRM, so it runs without PROF and with the accuracy reward; its
    GAIN-RL mu (what rank 0 logged to MLflow) must equal a driver run of the same params, rank by rank.
    """
    _fresh_start(workdir)
    (workdir / "params.yaml").write_text(yaml.safe_dump(_raw(prof=False, reward="accuracy")))
    done = _run(workdir, [sys.executable, "-m", "flows", "train", "--params", "params.yaml"], "flow.log")
    assert done.returncode == 0, done.stdout
    launch_log = (workdir / "logs/train.launch.log").read_text()
    assert "--nproc_per_node 2" in launch_log.splitlines()[0]
    assert "[default1]:" in launch_log
    _models_folder_is_clean(workdir)
    assert _complete_checkpoints(workdir) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((workdir / "models/checkpoints/fingerprint.json").read_text())["finished"] is True
    curve = pd.read_csv(workdir / "metrics/train_curve.csv").set_index("step")
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'train'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "gain_rl/mu")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, STEPS + 1))
    assert logged == curve["gain_rl/mu"].tolist()
    final_mu = json.loads((workdir / "metrics/train.json").read_text())["final_mu"]

    _fresh_start(workdir)
    worker = _driver(workdir, "flow_twin", prof=False, reward="accuracy")
    assert worker.returncode == 0, worker.stdout
    rank0, rank1 = _records(workdir, "flow_twin")
    assert rank0["updates"] == rank1["updates"]
    assert [u["mu"] for u in rank0["updates"]] == logged and logged[-1] == final_mu
