"""`rlvr grid` / `rlvr compare`: expanding -S options into named DVC experiments."""

import pytest

from flows import grid


def test_sets_expand_to_the_cartesian_product_first_key_slowest():
    parsed = grid.parse_sets(["train.order=gain_rl,uniform", "train.seed=0,1,2"])
    assert parsed == [("train.order", ["gain_rl", "uniform"]), ("train.seed", ["0", "1", "2"])]
    combos = grid.combinations(parsed)
    assert len(combos) == 6
    assert combos[0] == {"train.order": "gain_rl", "train.seed": "0"}
    assert combos[2] == {"train.order": "gain_rl", "train.seed": "2"}
    assert combos[3] == {"train.order": "uniform", "train.seed": "0"}


def test_commas_inside_brackets_are_part_of_a_value():
    parsed = grid.parse_sets(["evaluate.benchmarks=[arith,gsm8k],[arith]"])
    assert parsed == [("evaluate.benchmarks", ["[arith,gsm8k]", "[arith]"])]


@pytest.mark.parametrize("bad, says", [
    (["train.seed"], "expected key=value"),
    (["=1,2"], "expected key=value"),
    (["train.seed=0,,1"], "empty value"),
    (["train.seed=0", "train.seed=1"], "given twice"),
    ([], "no -S options"),
])
def test_bad_sets_are_one_clear_error(bad, says):
    with pytest.raises(grid.GridError, match=says):
        grid.parse_sets(bad)


def test_experiment_names_are_readable_and_valid_ref_names():
    assert grid.experiment_name("ord", {"train.order": "gain_rl", "train.seed": "2"}) == "ord-gain_rl-2"
    assert grid.experiment_name("g", {"train.learning_rate": "5e-5"}) == "g-5e_5"
    assert grid.experiment_name("g", {"evaluate.benchmarks": "[arith, gsm8k]"}) == "g-arith_gsm8k"


def test_flatten_gives_dotted_keys():
    from rlvr.compare import flatten

    assert flatten({"train": {"order": "uniform", "gain_rl": {"n": 0.01}}, "seed": 0}) == {
        "train.order": "uniform", "train.gain_rl.n": 0.01, "seed": 0}


def test_a_bad_grid_name_is_refused_before_anything_is_queued(tmp_path, capsys, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(grid.GridError, match="--name"):
        grid.queue(tmp_path, "bad name/with slash", ["train.seed=0"])


def test_compare_of_an_unknown_grid_is_one_line(tmp_path, capsys, monkeypatch):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(grid.GridError, match="no finished experiments named nothing-"):
        grid.collect(tmp_path, "nothing")


def test_a_grid_without_its_own_baseline_takes_the_given_warmup_evaluation(tmp_path, monkeypatch):
    """evaluate.baseline=false experiments get the RL gain from --warmup-eval, only on the same problems."""
    import numpy as np
    import pandas as pd
    import yaml

    from rlvr.io import write_parquet

    warmup_file = tmp_path / "warmup_arith.parquet"
    write_parquet(warmup_file, pd.DataFrame({"id": ["a", "b"], "correct": [[True, False], [False, False]]}))
    params = {"train": {"order": "uniform", "seed": 0}}
    monkeypatch.setattr(grid, "experiments", lambda root, name: {"g-0": "rev0", "g-1": "rev1"})
    monkeypatch.setattr(grid, "_git_text", lambda root, rev, path: (
        yaml.safe_dump({"train": {**params["train"], "seed": int(rev[-1])}}) if path == "params.yaml"
        else "step,pass_at_1,greedy_accuracy\n0,0.25,0.5\n"))
    policies = {"rev0": (["a", "b"], np.array([[True, True], [True, False]])),
                "rev1": (["a", "c"], np.array([[True, True], [False, False]]))}
    monkeypatch.setattr(grid, "_correct_matrix",
                        lambda root, rev, model, eval_set: policies[rev] if model == "policy" else None)
    runs = {r.name: r for r in grid.collect(tmp_path, "g", warmup_eval=warmup_file)}
    assert runs["g-0"].baseline_correct.tolist() == [[True, False], [False, False]]
    assert runs["g-1"].baseline_correct is None  # other problems: no gain rather than a wrong one
    assert {r.name: r.baseline_correct for r in grid.collect(tmp_path, "g")}["g-0"] is None


def test_dvc_runs_started_by_rlvr_have_mlflow_telemetry_off_unless_the_user_set_it(monkeypatch):
    from flows import services

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    assert services.dvc_env()["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the user's choice wins
    assert services.dvc_env()["MLFLOW_DISABLE_TELEMETRY"] == "false"
