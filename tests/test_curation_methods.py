"""rlvr.curation's new methods on hand-worked cases: DAPO dynamic sampling, online difficulty
filtering, DUMP, 1-shot RLVR selection (pure numpy / pandas, no torch)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from rlvr.config import ConfigError
from rlvr.curation import dump, dynamic_sampling, one_shot, online_difficulty
from rlvr.curation.base import Context, Groups, StepStats

nan = float("nan")


def groups(rows, rewards, advantages=None):
    return Groups(tuple(rows), np.array(rewards, dtype=float),
                  None if advantages is None else np.array(advantages, dtype=float))


# ---- DAPO dynamic sampling -------------------------------------------------------------------

# A tiny group table, G = 4. Informative = graded rewards not all equal (at least 2 graded).
ROUND_0 = [[1, 1, 1, 1],      # all correct: dropped
           [1, 0, 0, 0],      # kept
           [0, 0, 0, 0],      # all wrong: dropped
           [nan, 1, nan, nan]]  # one grade: no spread, dropped
ROUND_1 = [[0, 1, 1, 0],      # kept
           [1, 1, 1, 1],      # dropped
           [0, 0, 1, 0],      # kept
           [0, 1, 0, 0]]      # kept (surplus when the target is 3)


def test_informative_groups_follow_the_dapo_constraint():
    assert dynamic_sampling.informative(np.array(ROUND_0)).tolist() == [False, True, False, False]
    assert dynamic_sampling.informative(np.array([[nan, 0, 1, nan], [nan, nan, nan, nan]])).tolist() == [True, False]
    result = dynamic_sampling.DynamicSamplingFilter(dynamic_sampling.DynamicSamplingSettings(2)).apply(
        groups([10, 11, 12, 13], ROUND_0))
    assert result.keep.tolist() == [[False] * 4, [True] * 4, [False] * 4, [False] * 4]
    assert result.stats == {"dynamic_sampling/dropped": 3.0, "dynamic_sampling/dropped_all_correct": 1.0,
                            "dynamic_sampling/dropped_all_wrong": 1.0, "dynamic_sampling/dropped_other_equal": 0.0,
                            "dynamic_sampling/dropped_ungraded": 1.0, "dynamic_sampling/dropped_frac": 0.75}


def _generator(rounds):
    calls = []

    def generate(round_index):
        calls.append(round_index)
        return groups([100 * round_index + g for g in range(4)], rounds[round_index])
    return generate, calls


def test_collect_generates_until_the_step_has_its_informative_groups():
    generate, calls = _generator([ROUND_0, ROUND_1, ROUND_0])
    out = dynamic_sampling.collect(generate, target=3, max_extra_rounds=5)
    assert calls == [0, 1]  # round 0 gives 1 informative group, round 1 three more: stop at 4 >= 3
    assert out.groups.prompts == (1, 100, 102)  # the first 3 informative, in generation order; 103 is surplus
    assert out.counts.tolist() == [True, True, True]
    assert out.stats == {"dynamic_sampling/dropped_frac": 4 / 8,  # 3 dropped in round 0, 1 in round 1
                         "dynamic_sampling/extra_rounds": 1.0, "dynamic_sampling/extra_groups": 4.0,
                         "dynamic_sampling/short": 0.0, "dynamic_sampling/surplus": 1.0}


def test_collect_stops_at_the_cap_and_fills_the_step_with_groups_that_do_not_count():
    generate, calls = _generator([ROUND_0, ROUND_1])
    out = dynamic_sampling.collect(generate, target=3, max_extra_rounds=0)
    assert calls == [0]
    # 1 informative group; short by 2, filled with the first dropped groups (rows 0 and 2), not counted
    assert out.groups.prompts == (1, 0, 2)
    assert out.counts.tolist() == [True, False, False]
    assert out.groups.rewards.tolist()[1:] == [[1, 1, 1, 1], [0, 0, 0, 0]]
    assert out.stats["dynamic_sampling/short"] == 2.0 and out.stats["dynamic_sampling/extra_groups"] == 0.0
    assert out.stats["dynamic_sampling/dropped_frac"] == 0.75


def test_collect_goes_on_while_another_process_still_needs_groups():
    # this process has its 1 group after round 0, but `enough` (the minimum over processes) says go on
    generate, calls = _generator([ROUND_0, ROUND_1, ROUND_0])
    others = iter([False, True])
    out = dynamic_sampling.collect(generate, target=1, max_extra_rounds=5, enough=lambda n: next(others))
    assert calls == [0, 1] and out.groups.prompts == (1,) and out.stats["dynamic_sampling/surplus"] == 3.0


def test_dynamic_sampling_settings_errors_name_the_param():
    with pytest.raises(ConfigError, match=r"curation.dynamic_sampling.max_extra_rounds = -1"):
        dynamic_sampling.DynamicSamplingSettings(-1)
    context = Context(n_rows=4, prompts_per_step=2, group_size=4, steps=1, seed=0)
    with pytest.raises(ConfigError, match=r"curation.dynamic_sampling: unknown key\(s\) \['rounds'\]"):
        dynamic_sampling.DynamicSamplingFilter.from_settings({"rounds": 2}, context)


# ---- online difficulty filtering --------------------------------------------------------------

def _band_sampler(explore=0.0, prior=(0.5, 0.9, nan), seed=0):
    settings = online_difficulty.OnlineDifficultySettings(low=0.2, high=0.8, prior_samples=4, explore=explore)
    return online_difficulty.OnlineDifficultySampler(settings, n_rows=3, seed=seed, prior_pass_rate=np.array(prior))


def test_a_prompt_leaves_the_band_and_returns_to_it():
    s = _band_sampler()
    # prior worth 4 rollouts: row 0 2/4 = 0.5 (in), row 1 3.6/4 = 0.9 (out), row 2 unknown (in)
    assert s.in_pool.tolist() == [True, False, True]
    m = s.update(StepStats(groups([0], [[1, 1, 1, 1]])))  # row 0: 6/8 = 0.75, still in
    assert (m["online_difficulty/pool_size"], m["online_difficulty/left"], m["online_difficulty/returned"]) == (2, 0, 0)
    m = s.update(StepStats(groups([0, 2], [[1, 1, 1, 1], [1, 0, 0, nan]])))  # row 0: 10/12 = 0.833 -> out
    assert s.pass_rate()[0] == pytest.approx(10 / 12) and s.pass_rate()[2] == pytest.approx(1 / 3)  # NaN not counted
    assert s.in_pool.tolist() == [False, False, True]
    assert (m["online_difficulty/pool_size"], m["online_difficulty/left"], m["online_difficulty/returned"]) == (1, 1, 0)
    m = s.update(StepStats(groups([0], [[0, 0, 0, 0]])))  # row 0: 10/16 = 0.625 -> back in
    assert s.in_pool.tolist() == [True, False, True]
    assert (m["online_difficulty/pool_size"], m["online_difficulty/left"], m["online_difficulty/returned"]) == (2, 0, 1)


def test_draws_come_from_the_pool_plus_the_explore_share():
    s = _band_sampler(explore=0.5)  # pool {0, 2}, outside {1}
    for _ in range(5):
        rows = s.draw(2)  # round(0.5 * 2) = 1 slot from outside: row 1; one from the pool
        assert 1 in rows and len(set(rows)) == 2
    pure = _band_sampler(explore=0.0)
    assert all(1 not in pure.draw(2) for _ in range(5))
    assert pure.draw(3) == [0, 1, 2]  # a pool of 2 cannot fill K = 3: filled from outside
    m = pure.update(StepStats(groups([0], [[1, 0, 1, 0]])))
    assert m["online_difficulty/filled"] == 1.0 and m["online_difficulty/explored"] == 0.0


def test_online_difficulty_state_resumes_exactly_and_every_rank_agrees():
    a, b = _band_sampler(explore=0.4, seed=3), _band_sampler(explore=0.4, seed=3)
    assert [a.draw(2) for _ in range(4)] == [b.draw(2) for _ in range(4)]  # same seed, same draws
    a.update(StepStats(groups([0, 1], [[1, 1, 1, 1], [0, 0, 1, 0]])))
    state = json.loads(json.dumps(a.state_dict()))
    c = _band_sampler(explore=0.4, seed=99)
    c.load_state_dict(state)
    assert [a.draw(2) for _ in range(6)] == [c.draw(2) for _ in range(6)]
    assert c.pass_rate()[1] == pytest.approx((3.6 + 1) / 8)
    with pytest.raises(ValueError, match="explore"):
        _band_sampler(explore=0.3).load_state_dict(state)


def test_online_difficulty_settings_errors():
    with pytest.raises(ConfigError, match=r"curation.online_difficulty.low"):
        online_difficulty.OnlineDifficultySettings(low=0.9, high=0.1, prior_samples=0, explore=0)
    with pytest.raises(ConfigError, match=r"curation.online_difficulty.explore = 1.5"):
        online_difficulty.OnlineDifficultySettings(low=0.1, high=0.9, prior_samples=0, explore=1.5)
    with pytest.raises(ConfigError, match=r"curation.online_difficulty.prior_samples"):
        online_difficulty.OnlineDifficultySettings(low=0.1, high=0.9, prior_samples=-1, explore=0)


# ---- DUMP -------------------------------------------------------------------------------------

def _dump(labels=("A", "A", "B", "B"), window=3, temperature=0.1, seed=0):
    settings = dump.DumpSettings(by="source", bucket_edges=(), window=window, temperature=temperature)
    return dump.DumpSampler(settings, list(labels), seed)


def test_dump_ucb_update_worked_by_hand():
    s = _dump()
    assert s.probabilities().tolist() == [0.5, 0.5]  # nothing drawn yet: every bonus infinite
    s.update(StepStats(groups([0, 2], [[1, 0, 1, 0], [0, 0, 0, 0]],
                              advantages=[[1, -1, 0.5, -0.5], [0, 0, 0, 0]])))
    # A: window = last 3 of |adv| = [1, 0.5, 0.5], mean 2/3, n_A = 4; B: mean 0, n_B = 4; total 8
    # UCB_A = 2/3 + sqrt(2 ln 8 / 4), UCB_B = sqrt(2 ln 8 / 4): the bonuses cancel in the softmax,
    # P(A) = 1 / (1 + exp(-(2/3) / 0.1)) = 0.99873
    assert s.mean_abs_advantage().tolist() == pytest.approx([2 / 3, 0.0])
    assert s.scores() == pytest.approx([2 / 3 + math.sqrt(math.log(8) / 2), math.sqrt(math.log(8) / 2)])
    assert s.probabilities()[0] == pytest.approx(1 / (1 + math.exp(-(2 / 3) / 0.1)))
    assert s.probabilities()[0] == pytest.approx(0.998729, abs=1e-6)
    m = s.update(StepStats(groups([1], [[1, 0, 1, 0]], advantages=[[0.2, -0.2, 0.2, -0.2]])))
    # A: window [0.2, 0.2, 0.2] (the older values slid out), mean 0.2, n_A = 8; B unchanged; total 12
    # UCB_A = 0.2 + sqrt(2 ln 12 / 8) = 0.98818, UCB_B = sqrt(2 ln 12 / 4) = 1.11465
    # P(B) = 1 / (1 + exp(-(1.11465 - 0.98818) / 0.1)) = 0.77984: the less-drawn B now wins on its bonus
    assert s.counts.tolist() == [8, 4]
    assert s.scores() == pytest.approx([0.2 + math.sqrt(2 * math.log(12) / 8), math.sqrt(2 * math.log(12) / 4)])
    assert s.probabilities()[1] == pytest.approx(0.779842, abs=1e-6)
    assert m["dump/p/B"] == pytest.approx(0.779842, abs=1e-6) and m["dump/abs_adv/A"] == pytest.approx(0.2)


def test_dump_tries_every_distribution_before_exploiting():
    s = _dump(labels=("A", "B", "C"))
    s.update(StepStats(groups([0, 1], [[1, 0], [0, 1]], advantages=[[0.7, -0.7], [0.7, -0.7]])))
    assert s.probabilities().tolist() == [0.0, 0.0, 1.0]  # C never drawn: infinite bonus
    assert s.draw(4) == [2, 2, 2, 2]  # C has one row: drawn with replacement beyond its size


def test_dump_draws_follow_the_probabilities_and_resume_exactly():
    s = _dump(labels=["A"] * 50 + ["B"] * 50, seed=5)
    s.update(StepStats(groups([0, 50], [[1, 0], [1, 1]], advantages=[[1.0, -1.0], [0.0, 0.0]])))
    p_a = s.probabilities()[0]  # 1 / (1 + exp(-10)): almost all A
    rows = [r for _ in range(20) for r in s.draw(8)]
    assert p_a > 0.9999 and sum(r < 50 for r in rows) >= 159
    state = json.loads(json.dumps(s.state_dict()))
    t = _dump(labels=["A"] * 50 + ["B"] * 50, seed=1)
    t.load_state_dict(state)
    assert [s.draw(8) for _ in range(3)] == [t.draw(8) for _ in range(3)]


def test_difficulty_buckets_and_dump_settings_errors():
    assert dump.difficulty_buckets([0.0, 0.2, 0.5, 0.99, nan], [0.2, 0.8]) == [
        "pass_rate_lt_0.2", "pass_rate_lt_0.8", "pass_rate_lt_0.8", "pass_rate_ge_0.8", "pass_rate_unknown"]
    with pytest.raises(ConfigError, match=r"curation.dump.temperature = 0"):
        dump.DumpSettings(by="source", bucket_edges=(), window=300, temperature=0)
    with pytest.raises(ConfigError, match=r"curation.dump.by = 'level'"):
        dump.DumpSettings(by="level", bucket_edges=(), window=300, temperature=0.1)
    with pytest.raises(ConfigError, match=r"curation.dump.bucket_edges"):
        dump.DumpSettings(by="difficulty", bucket_edges=(), window=300, temperature=0.1)
    with pytest.raises(ValueError, match="advantages"):
        _dump().update(StepStats(groups([0], [[1, 0]])))


# ---- 1-shot RLVR ------------------------------------------------------------------------------

HISTORY = pd.DataFrame(
    [(step, pid, acc) for pid, accs in {
        "a": [0.0, 1.0, 0.0, 1.0],      # mean 0.5, var 0.25
        "b": [0.5, 0.5, 0.5, 0.5],      # var 0
        "c": [0.0, 0.25, 0.5, 1.0],     # mean 0.4375, var (0.19140625 + 0.03515625 + 0.00390625 + 0.31640625) / 4
        "d": [1.0, None, 0.0, None],    # seen at 2 steps: mean 0.5, var 0.25 (ties with a; a first by id)
        "e": [1.0, None, None, None],   # one value: no variance, never selected
    }.items() for step, acc in enumerate(accs) if acc is not None],
    columns=["step", "id", "accuracy"])


def test_one_shot_ranks_prompts_by_the_variance_of_their_accuracy():
    ranking = one_shot.rank_by_variance(one_shot.accuracy_history(HISTORY))
    assert ranking["id"].tolist() == ["a", "d", "c", "b", "e"]
    assert ranking["variance"].tolist()[:4] == pytest.approx([0.25, 0.25, 0.546875 / 4, 0.0])
    assert ranking["eligible"].tolist() == [True, True, True, True, False]
    assert ranking["n_observations"].tolist() == [4, 2, 4, 4, 1]
    assert one_shot.select(HISTORY, {"m": 1, "min_observations": 2})["id"].tolist() == ["a"]  # the paper's pi_1
    assert one_shot.select(HISTORY, {"m": 3, "min_observations": 3})["id"].tolist() == ["a", "c", "b"]


def test_one_shot_selection_is_written_atomically_as_a_prompt_set(tmp_path):
    selection = one_shot.select(HISTORY, {"m": 2, "min_observations": 2})
    path = tmp_path / "curated" / "one_shot.parquet"
    one_shot.write_selection(path, selection)
    written = pd.read_parquet(path)
    assert written["id"].tolist() == ["a", "d"] and list(written.columns) == list(one_shot.SELECTION_COLUMNS)
    assert [p.name for p in path.parent.iterdir()] == ["one_shot.parquet"]  # no temporary file left


def test_step_accuracy_rows_feed_the_history():
    g = groups([2, 0, 2, 1], [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, nan, nan], [nan, nan, nan, nan]])
    rows = one_shot.step_accuracy(5, g, ["p0", "p1", "p2"])
    # p2 drawn twice: (3 + 2) correct of (4 + 2) graded; p1 has no grade, so no row
    assert rows.to_dict("list") == {"step": [5, 5], "id": ["p2", "p0"], "accuracy": [5 / 6, 0.0]}
    history = one_shot.accuracy_history(pd.concat([rows, one_shot.step_accuracy(6, g.select([1]), ["p0", "p1", "p2"])]))
    assert history.loc[6, "p0"] == 0.0 and math.isnan(history.loc[6, "p2"])


def test_one_shot_errors():
    with pytest.raises(ValueError, match=r"curation.one_shot.m = 5: only 4 prompts"):
        one_shot.select(HISTORY, {"m": 5, "min_observations": 2})
    with pytest.raises(ConfigError, match=r"curation.one_shot.m = 0"):
        one_shot.settings({"m": 0, "min_observations": 2})
    with pytest.raises(ValueError, match="more than one row for step 0"):
        one_shot.accuracy_history(pd.concat([HISTORY, HISTORY.head(1)]))
    with pytest.raises(ValueError, match="missing"):
        one_shot.accuracy_history(HISTORY.drop(columns="accuracy"))
