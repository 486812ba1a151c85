"""rlvr.compare: seed replicates aggregated per variant, paired against a baseline, rendered and logged."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from rlvr import compare, passk
from rlvr.compare import CompareError, RunResult

IDS = ["a", "b", "c", "d"]
N_SAMPLES = 4


def matrix(counts: list[int], n: int = N_SAMPLES) -> np.ndarray:
    """A (problems x n) correctness matrix whose row i has counts[i] correct samples."""
    return np.array([[j < c for j in range(n)] for c in counts])


def curve(points: dict[int, float], greedy: dict[int, float] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"step": list(points), "pass_at_1": list(points.values())})
    if greedy is not None:
        frame["greedy_accuracy"] = [greedy.get(s, math.nan) for s in points]
    return frame


def run(variant: str, seed: int, counts: list[int], points: dict[int, float] | None = None, ids=IDS,
        warmup: list[int] | None = None, **kwargs) -> RunResult:
    return RunResult(name=kwargs.pop("name", f"{variant}-{seed}"), variant=variant, seed=seed,
                     curve=curve(points or {0: 0.1}, kwargs.pop("greedy", None)), problem_ids=list(ids),
                     correct=matrix(counts), baseline_correct=None if warmup is None else matrix(warmup), **kwargs)


# Final pass@1 (mean of counts / 4 over the 4 problems):
#   base seed 1 [1,2,0,1] -> 0.25   seed 2 [2,2,1,1] -> 0.375   seed 4 [0,0,0,0] -> 0
#   new  seed 1 [2,2,1,3] -> 0.5    seed 2 [3,2,1,2] -> 0.5     seed 3 [4,4,4,4] -> 1.0
# Paired by seed: seeds 1 and 2, differences 0.25 and 0.125; seed 3 (new only) and 4 (base only) left out.
BASE = {1: [1, 2, 0, 1], 2: [2, 2, 1, 1], 4: [0, 0, 0, 0]}
NEW = {1: [2, 2, 1, 3], 2: [3, 2, 1, 2], 3: [4, 4, 4, 4]}
WARMUP = [1, 2, 0, 1]  # warm-up correct counts on the same problems


def paired_runs() -> list[RunResult]:
    runs = [run("base", s, c) for s, c in BASE.items()]
    runs += [run("new", s, c, warmup=WARMUP) for s, c in NEW.items()]
    return runs


# ----------------------------------------------------------------------------------------- statistics


def test_t_quantile_table_values():
    # Printed tables of t(0.975; dof): 12.706 (1), 4.303 (2), 2.776 (4), 2.228 (10), 2.042 (30).
    assert compare.t_quantile_95(1) == pytest.approx(12.706, abs=5e-4)
    assert compare.t_quantile_95(2) == pytest.approx(4.303, abs=5e-4)
    assert compare.t_quantile_95(4) == pytest.approx(2.776, abs=5e-4)
    assert compare.t_quantile_95(10) == pytest.approx(2.228, abs=5e-4)
    assert compare.t_quantile_95(30) == pytest.approx(2.042, abs=5e-4)
    # beyond the table it decreases towards the normal quantile 1.960
    beyond = [compare.t_quantile_95(d) for d in (31, 60, 120, 10_000)]
    assert beyond == sorted(beyond, reverse=True) and beyond[-1] == pytest.approx(1.9602, abs=1e-4)
    with pytest.raises(ValueError, match="dof >= 1"):
        compare.t_quantile_95(0)


def test_t_quantile_agrees_with_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for dof in [*range(1, 41), 50, 75, 100, 1000]:
        assert compare.t_quantile_95(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-6)


def test_mean_ci_of_three_numbers():
    # mean 0.42, sd 0.02, se 0.02 / sqrt(3) = 0.0115470, half-width 4.302653 * 0.0115470 = 0.0496828
    est = compare.mean_ci([0.40, 0.42, 0.44])
    assert est.n == 3
    assert est.mean == pytest.approx(0.42)
    assert est.ci_low == pytest.approx(0.370317, abs=1e-6)
    assert est.ci_high == pytest.approx(0.469683, abs=1e-6)


def test_mean_ci_with_one_or_no_value():
    one = compare.mean_ci([0.3])
    assert one.mean == 0.3 and one.n == 1 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    none = compare.mean_ci([])
    assert none.n == 0 and math.isnan(none.mean)
    same = compare.mean_ci([0.5, 0.5])
    assert (same.ci_low, same.ci_high) == (0.5, 0.5)


def test_two_level_bootstrap_contains_estimate_and_shrinks_with_problems():
    rng = np.random.default_rng(3)
    widths = []
    for n_problems in (50, 2000):
        diffs = rng.normal(0.05, 0.3, size=(3, n_problems))
        low, high = compare.two_level_bootstrap_ci(diffs, n_boot=1000, seed=0)
        assert low < diffs.mean() < high
        widths.append(high - low)
    # the problem part of the spread goes as 1/sqrt(problems): 40x the problems, about 1/6 the width
    assert widths[1] < widths[0] / 3


def test_two_level_bootstrap_counts_the_spread_over_seeds():
    # Seeds differ by -0.1, 0, +0.1 with almost no spread over problems: resampling problems alone sees
    # almost nothing, resampling seeds too sees the seed-to-seed spread.
    rng = np.random.default_rng(0)
    diffs = np.array([-0.1, 0.0, 0.1])[:, None] + rng.normal(0, 0.01, size=(3, 1000))
    low, high = compare.two_level_bootstrap_ci(diffs, n_boot=1000, seed=0)
    p_low, p_high = passk.bootstrap_ci(diffs.mean(axis=0), n_boot=1000, seed=0)
    assert high - low > 0.08
    assert p_high - p_low < 0.01


def test_two_level_bootstrap_edge_cases():
    assert compare.two_level_bootstrap_ci(np.full((2, 5), 0.25)) == (0.25, 0.25)
    a = compare.two_level_bootstrap_ci(np.arange(12.0).reshape(3, 4), n_boot=200, seed=7)
    assert a == compare.two_level_bootstrap_ci(np.arange(12.0).reshape(3, 4), n_boot=200, seed=7)
    with pytest.raises(ValueError, match="seeds x problems"):
        compare.two_level_bootstrap_ci(np.zeros(4))


# ------------------------------------------------------------------------------------------ RunResult


@pytest.mark.parametrize("change, message", [
    (dict(correct=matrix([1, 2, 3])), "3 rows but problem_ids has 4"),
    (dict(correct=np.full((4, 4), 2)), "booleans or 0/1"),
    (dict(baseline_correct=matrix([1, 1])), "baseline_correct has 2 rows"),
    (dict(problem_ids=["a", "a", "b", "c"]), "repeated id"),
    (dict(curve=pd.DataFrame({"step": [0]})), r"lacks column\(s\) \['pass_at_1'\]"),
    (dict(curve=curve({0: 0.1, 5: 1.5})), r"must lie in \[0, 1\]"),
    (dict(curve=pd.DataFrame({"step": [0, 0], "pass_at_1": [0.1, 0.2]})), "repeated steps"),
    (dict(seed="1"), "seed must be an int"),
])
def test_run_result_rejects_bad_input_naming_the_run(change, message):
    fields = dict(name="exp-1", variant="v", seed=1, curve=curve({0: 0.1}), problem_ids=IDS, correct=matrix(BASE[1]))
    fields.update(change)
    with pytest.raises(CompareError, match=message) as error:
        RunResult(**fields)
    assert "exp-1" in str(error.value) and "\n" not in str(error.value)


def test_run_result_sorts_its_curve_and_fills_missing_greedy():
    r = run("v", 1, BASE[1], points={20: 0.3, 0: 0.1, 10: 0.2})
    assert r.curve["step"].tolist() == [0, 10, 20]
    assert r.curve["pass_at_1"].tolist() == [0.1, 0.2, 0.3]
    assert r.curve["greedy_accuracy"].isna().all()
    assert r.final_pass_at_1() == 0.25


# ------------------------------------------------------------------------------------------- compare


def test_final_pass_at_1_mean_and_ci_over_seeds():
    report = compare.compare(paired_runs(), "base", n_boot=500)
    new = report.variant("new").final_pass_at_1
    # [0.5, 0.5, 1.0]: mean 2/3, sd 0.288675, se 0.166667, half-width 4.302653 * 0.166667 = 0.717109
    assert new.n == 3 and new.mean == pytest.approx(2 / 3)
    assert (new.ci_low, new.ci_high) == pytest.approx((-0.050442, 1.383775), abs=1e-6)
    assert report.variant("base").final_pass_at_1.mean == pytest.approx((0.25 + 0.375 + 0) / 3)
    assert [v.variant for v in report.variants] == ["base", "new"]  # the baseline first
    assert {r.name: r.final_pass_at_1 for r in report.runs}["new-3"] == 1.0


def test_difference_is_paired_by_seed_and_unmatched_seeds_are_reported():
    report = compare.compare(paired_runs(), "base", n_boot=500)
    d = report.variant("new").diff_vs_baseline
    assert d.seeds == (1, 2) and d.n_pairs == 2 and d.n_problems == 4
    assert d.unmatched_seeds == (3,) and d.baseline_only_seeds == (4,)
    assert d.mean == pytest.approx((0.25 + 0.125) / 2)
    # over seeds: [0.25, 0.125], sd 0.0883883, se 0.0625, half-width 12.706205 * 0.0625 = 0.794138
    assert (d.seeds_ci_low, d.seeds_ci_high) == pytest.approx((-0.606638, 0.981638), abs=1e-6)
    assert d.ci_low <= d.mean <= d.ci_high
    per_run = {r.name: r.diff_vs_baseline for r in report.runs}
    assert per_run == {"base-1": None, "base-2": None, "base-4": None, "new-1": 0.25, "new-2": 0.125, "new-3": None}
    assert report.variant("base").diff_vs_baseline is None
    notes = "\n".join(report.notes)
    assert "new: seed(s) [3] have no base run" in notes and "base seed(s) [4] have no new run" in notes


def test_problems_are_matched_by_id_not_position():
    runs = paired_runs()
    reordered = [RunResult(name=r.name, variant=r.variant, seed=r.seed, curve=r.curve, problem_ids=r.problem_ids[::-1],
                           correct=r.correct[::-1], baseline_correct=r.baseline_correct[::-1])
                 if r.name == "new-1" else r for r in runs]
    a = compare.compare(runs, "base", n_boot=300).variant("new").diff_vs_baseline
    b = compare.compare(reordered, "base", n_boot=300).variant("new").diff_vs_baseline
    assert a == b


def test_paired_runs_on_different_problems_are_an_error():
    runs = paired_runs()
    runs[4] = run("new", 2, NEW[2], ids=["a", "b", "c", "e"])  # new-2 has "e" where base-2 has "d"
    with pytest.raises(CompareError, match="different held-out problems") as error:
        compare.compare(runs, "base")
    message = str(error.value)
    assert "'new-2'" in message and "'base-1'" in message and "['e']" in message and "['d']" in message


def test_compare_rejects_ambiguous_input():
    with pytest.raises(CompareError, match=r"baseline variant 'nope' is not among the runs' variants \['base'\]"):
        compare.compare([run("base", 1, BASE[1])], "nope")
    with pytest.raises(CompareError, match="both variant 'base' with seed 1"):
        compare.compare([run("base", 1, BASE[1], name="x"), run("base", 1, BASE[2], name="y")], "base")
    with pytest.raises(CompareError, match="named 'x'"):
        compare.compare([run("base", 1, BASE[1], name="x"), run("new", 1, BASE[2], name="x")], "base")
    with pytest.raises(CompareError, match="at least one run"):
        compare.compare([], "base")


def test_curve_mean_and_ci_per_step_with_a_missing_step():
    runs = [run("v", 1, BASE[1], points={0: 0.2, 10: 0.4, 20: 0.5}, greedy={0: 0.3, 10: 0.5, 20: 0.6}),
            run("v", 2, BASE[2], points={0: 0.4, 20: 0.7})]  # no step 10, no greedy accuracy
    points = {p.step: p for p in compare.compare(runs, "v").variant("v").curve}
    assert sorted(points) == [0, 10, 20]
    # step 0: [0.2, 0.4] -> mean 0.3, se 0.1, half-width 12.706205 * 0.1
    assert points[0].pass_at_1.mean == pytest.approx(0.3)
    assert (points[0].pass_at_1.ci_low, points[0].pass_at_1.ci_high) == pytest.approx((-0.9706205, 1.5706205))
    assert points[10].pass_at_1.n == 1 and points[10].pass_at_1.mean == 0.4 and math.isnan(points[10].pass_at_1.ci_low)
    assert points[20].pass_at_1.mean == pytest.approx(0.6)
    assert points[0].greedy_accuracy.n == 1 and points[0].greedy_accuracy.mean == 0.3
    assert any("step(s) [10] comes from fewer than its 2 seeds" in n for n in compare.compare(runs, "v").notes)


def test_steps_to_reach_the_baselines_final_pass_at_1():
    # target: mean of the baseline's last curve points (0.30 at step 20, 0.34 at step 30) = 0.32
    runs = [run("base", 1, BASE[1], points={0: 0.1, 20: 0.30}),
            run("base", 2, BASE[2], points={0: 0.1, 30: 0.34}),
            run("new", 1, NEW[1], points={0: 0.1, 10: 0.31, 20: 0.33}),  # reaches at 20
            run("new", 2, NEW[2], points={0: 0.1, 10: 0.35}),  # reaches at 10
            run("new", 3, NEW[3], points={0: 0.1, 10: 0.2, 20: 0.3})]  # never
    report = compare.compare(runs, "base", n_boot=200)
    assert report.target_pass_at_1 == pytest.approx(0.32)
    steps = {r.name: r.steps_to_target for r in report.runs}
    assert steps == {"base-1": None, "base-2": 30, "new-1": 20, "new-2": 10, "new-3": None}
    new = report.variant("new").steps_to_target
    assert (new.n_reached, new.n) == (2, 3)
    # over the runs that reached it: [20, 10], mean 15, se 5, half-width 12.706205 * 5 = 63.531025
    assert new.mean == 15 and (new.ci_low, new.ci_high) == pytest.approx((-48.531025, 78.531025))
    base = report.variant("base").steps_to_target
    assert (base.n_reached, base.n, base.mean) == (1, 2, 30) and math.isnan(base.ci_low)
    text = compare.markdown(report)
    assert "| 15.0 [-48.5, 78.5] | 2/3 |" in text and "| never |" in text


def test_steps_to_reach_counts_a_point_equal_to_the_target():
    target = np.mean([0.1, 0.2, 0.3])  # 0.20000000000000004
    assert compare.steps_to_reach(curve({0: 0.1, 5: 0.2, 9: 0.25}), target) == 5
    assert compare.steps_to_reach(curve({0: 0.1, 5: 0.19}), target) is None
    assert compare.steps_to_reach(curve({0: 0.3, 5: math.nan}), 0.25) == 0


def test_gain_over_warmup_per_run_and_per_variant():
    report = compare.compare(paired_runs(), "base", n_boot=400, seed=5)
    gains = {r.name: r.gain_over_warmup for r in report.runs}
    assert gains["base-1"] is None
    # new-1: [2,2,1,3]/4 - [1,2,0,1]/4 = [0.25, 0, 0.25, 0.5] -> 0.25, bootstrap as stages/evaluate.paired_delta
    per_problem = np.array([0.25, 0.0, 0.25, 0.5])
    assert gains["new-1"].mean == pytest.approx(0.25) and gains["new-1"].n == 4
    assert (gains["new-1"].ci_low, gains["new-1"].ci_high) == passk.bootstrap_ci(per_problem, n_boot=400, seed=5)
    # new-2: [0.5, 0, 0.25, 0.25] -> 0.25; new-3: [0.75, 0.5, 1, 0.75] -> 0.75
    variant = report.variant("new").gain_over_warmup
    assert variant.n == 3 and variant.mean == pytest.approx((0.25 + 0.25 + 0.75) / 3)
    assert report.variant("base").gain_over_warmup is None
    assert any("base seed 1 (base-1): no warm-up matrix" in n for n in report.notes)


def test_one_seed_has_no_interval_and_says_so():
    report = compare.compare([run("base", 1, BASE[1], points={0: 0.1, 10: 0.3})], "base")
    final = report.variant("base").final_pass_at_1
    assert final.n == 1 and math.isnan(final.ci_low)
    assert "base: 1 seed, so no interval over seeds (n/a)" in report.notes
    data = report.to_dict()
    assert data["variants"][0]["final_pass_at_1"]["ci_low"] is None
    json.dumps(data, allow_nan=False)  # NaN does not reach the JSON
    assert "0.250 [n/a]" in compare.markdown(report)


# ---------------------------------------------------------------------------------------- rendering


def test_markdown_shows_the_numbers():
    text = compare.markdown(compare.compare(paired_runs(), "base", n_boot=300))
    new_row = next(line for line in text.splitlines() if line.startswith("| new |"))
    assert "| 3 (1, 2, 3) |" in new_row
    assert "0.667 [-0.050, 1.384]" in new_row
    assert "+0.188 [-0.607, +0.982]" in new_row  # the per-seed differences 0.25 and 0.125, t over seeds
    assert "(2 pairs)" in new_row
    assert "| new | 1 | new-1 | 0.500 | +0.250 |" in text
    assert "| new | 3 | new-3 | 1.000 | unpaired |" in text
    assert "## Notes" in text and "seed(s) [3]" in text


def test_markdown_escapes_pipes_in_labels():
    text = compare.markdown(compare.compare([run("a|b", 1, BASE[1])], "a|b"))
    assert "| a\\|b |" in text


def test_plot_writes_a_png_atomically(tmp_path):
    runs = paired_runs()
    out = compare.plot(compare.compare(runs, "base", n_boot=100), tmp_path / "plots" / "compare.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]  # no temporary file left


def test_write_report_writes_markdown_png_and_json(tmp_path):
    report = compare.compare(paired_runs(), "base", n_boot=100)
    paths = compare.write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    data = json.loads(paths["json"].read_text())
    assert data["baseline_variant"] == "base"
    assert data["variants"][1]["diff_vs_baseline"]["unmatched_seeds"] == [3]
    assert paths["markdown"].read_text() == compare.markdown(report)


# ------------------------------------------------------------------------------------------- MLflow


def test_metric_key_keeps_only_characters_mlflow_accepts():
    assert compare.metric_key("train.order=gain_rl") == "train.order_gain_rl"
    assert compare.metric_key("train.order=gain_rl,train.lr=1e-5") == "train.order_gain_rl_train.lr_1e-5"
    assert compare.metric_key("..") == "variant"
    report = compare.compare([run("a=b", 1, BASE[1]), run("a_b", 1, BASE[2])], "a=b")
    with pytest.raises(CompareError, match="same MLflow name"):
        compare.summary_metrics(report)


@pytest.mark.slow  # a fresh SQLite store and MLflow imports: about 15 s
def test_log_to_mlflow_parent_and_children(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base, new = "train.order=uniform", "train.order=gain_rl"
    runs = [run(base, s, c, points={0: 0.1, 10: 0.2 + 0.1 * s}, warmup=WARMUP, params={"train": {"order": "uniform",
                                                                                              "seed": s}})
            for s, c in ((1, BASE[1]), (2, BASE[2]))]
    runs += [run(new, s, c, points={0: 0.1, 5: 0.3, 10: 0.5}, greedy={0: 0.2, 5: 0.4, 10: 0.6}, warmup=WARMUP,
                 params={"train.order": "gain_rl", "train.seed": s}) for s, c in ((1, NEW[1]), (2, NEW[2]))]
    report = compare.compare(runs, base, n_boot=200)
    parent_id = compare.log_to_mlflow(report, runs, "compare-test", tracking_uri=uri,
                                      artifact_location=(tmp_path / "artifacts").as_uri())

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "compare"
    metrics = parent.data.metrics
    assert metrics["train.order_gain_rl.final_pass_at_1_mean"] == pytest.approx(0.5)
    assert metrics["train.order_gain_rl.diff_vs_baseline"] == pytest.approx((0.25 + 0.125) / 2)
    assert metrics["target_pass_at_1"] == pytest.approx(0.35)  # last points 0.3 and 0.4
    assert metrics == compare.summary_metrics(report) | {
        k: v for k, v in metrics.items() if ".heldout_pass_at_1" in k}
    history = client.get_metric_history(parent_id, "train.order_gain_rl.heldout_pass_at_1_mean")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.1), (5, 0.3), (10, 0.5)]
    assert parent.data.params["baseline_variant"] == base
    assert sorted(a.path for a in client.list_artifacts(parent_id)) == ["compare.json", "compare.md", "compare.png"]

    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(r.name for r in runs)
    child = next(c for c in children if c.info.run_name == f"{new}-2")
    assert child.info.status == "FINISHED"
    assert child.data.tags["compare.variant"] == new and child.data.tags["compare.seed"] == "2"
    assert child.data.params == {"train.order": "gain_rl", "train.seed": "2"}
    assert child.data.metrics["final_pass_at_1"] == 0.5
    assert child.data.metrics["diff_vs_baseline"] == pytest.approx(0.125)
    assert child.data.metrics["gain_over_warmup"] == pytest.approx(0.25)
    greedy = client.get_metric_history(child.info.run_id, "heldout/greedy_accuracy")
    assert sorted((m.step, m.value) for m in greedy) == [(0, 0.2), (5, 0.4), (10, 0.6)]
    passed = client.get_metric_history(child.info.run_id, "heldout/pass_at_1")
    assert sorted((m.step, m.value) for m in passed) == [(0, 0.1), (5, 0.3), (10, 0.5)]
    base_child = next(c for c in children if c.info.run_name == f"{base}-1")
    assert base_child.data.params == {"train.order": "uniform", "train.seed": "1"}
    assert "diff_vs_baseline" not in base_child.data.metrics


def test_log_to_mlflow_needs_the_reports_runs(tmp_path):
    runs = paired_runs()
    report = compare.compare(runs, "base", n_boot=50)
    with pytest.raises(CompareError, match=r"missing \['new-3'\]"):
        compare.log_to_mlflow(report, runs[:-1], "x", tracking_uri=f"sqlite:///{tmp_path / 'db'}")


def test_a_baseline_that_learned_nothing_is_named_in_the_notes():
    """Steps to the baseline's final pass@1 mean nothing when that is no higher than where it started."""
    flat = [run("base", s, [1, 1, 1, 1], points={0: 0.40, 20: 0.35, 40: 0.39}) for s in (0, 1)]
    flat += [run("new", s, [1, 1, 1, 1], points={0: 0.40, 40: 0.41}) for s in (0, 1)]
    report = compare.compare(flat, "base")
    note = [n for n in report.notes if "no higher than it starts" in n]
    assert note == ["the baseline base ends (0.390) no higher than it starts (0.400, its first curve point): "
                    "steps to target then measure no learning, and a run reaches the target at its first point"]
    assert {r.steps_to_target for r in report.runs} == {0}

    learned = [run("base", s, [1, 1, 1, 1], points={0: 0.30, 40: 0.39}) for s in (0, 1)] + flat[2:]
    assert not [n for n in compare.compare(learned, "base").notes if "no higher than it starts" in n]
