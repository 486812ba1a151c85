"""rlvr.curation's interface and registry, and the adapters of the existing methods: the same draws,
mu values and keep masks as the code paths RLVRGRPOTrainer runs today (rlvr.grpo, rlvr.prof)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlvr import curation, grpo, prof
from rlvr.config import ConfigError
from rlvr.curation import Context, Groups, StepStats
from rlvr.curation.existing import GainRLSampler, PlanSampler, ProfFilter
from tests.conftest import small_params_dict

nan = float("nan")
ORDERING = [7, 3, 9, 0, 5, 1, 8, 2, 6, 4, 11, 10]


def _context(**kw):
    base = dict(n_rows=12, prompts_per_step=4, group_size=4, steps=7, seed=3, ordering=tuple(ORDERING),
                labels=tuple("AAAABBBBCCCC"), prior_pass_rate=tuple([0.5] * 6 + [nan] * 6))
    return Context(**{**base, **kw})


# ---- the interface ------------------------------------------------------------------------------

def test_groups_from_trl_layout_and_back():
    g = Groups.from_flat([5, 5, 2, 2], [1.0, None, 0.0, 1.0], group_size=2, advantages=[0.5, 0, -1, 1],
                         info={"completion": ["a", "b", "c", "d"]})
    assert g.prompts == (5, 2) and g.group_size == 2 and math.isnan(g.rewards[0, 1])
    assert g.select([1]).info["completion"] == ["c", "d"] and g.select([1]).advantages.tolist() == [[-1, 1]]
    both = Groups.concat([g.select([1]), g.select([0])])
    assert both.prompts == (2, 5) and both.info["completion"] == ["c", "d", "a", "b"]
    with pytest.raises(ValueError, match="the same row for a whole group"):
        Groups.from_flat([5, 2, 2, 2], [1, 0, 1, 0], group_size=2)
    with pytest.raises(ValueError, match="one per rollout"):
        Groups((1,), np.zeros((1, 2)), info={"completion": ["a"]})


def test_every_registered_method_builds_from_params_and_checkpoints_to_json():
    raw = small_params_dict()
    sections = {
        "gain_rl": raw["train"]["gain_rl"],
        "online_difficulty": {"low": 0.1, "high": 0.9, "prior_samples": 8, "explore": 0.25},
        "dump": {"by": "source", "bucket_edges": [], "window": 300, "temperature": 0.1},
    }
    context = _context()
    for name in curation.SAMPLERS:
        a = curation.build_sampler(name, sections.get(name), context)
        b = curation.build_sampler(name, sections.get(name), context)
        assert [a.draw(4) for _ in range(3)] == [b.draw(4) for _ in range(3)], name  # every rank agrees
        state = json.loads(json.dumps(a.state_dict()))
        c = curation.build_sampler(name, sections.get(name), context)
        c.load_state_dict(state)
        assert a.draw(4) == c.draw(4), name  # resumes exactly
        assert a.offline == (name in ("uniform", "length", "random"))
    filters = curation.build_filters(["dynamic_sampling", "prof"], {"dynamic_sampling": {"max_extra_rounds": 2},
                                                                   "prof": raw["prof"]},
                                     context, resources={"prm": prof.ArithStepChecker()})
    assert [type(f).__name__ for f in filters] == ["DynamicSamplingFilter", "ProfFilter"]


def test_registry_errors_are_one_line_and_name_the_param():
    with pytest.raises(ConfigError, match=r"train.order = 'curriculum': use one of"):
        curation.build_sampler("curriculum", {}, _context())
    with pytest.raises(ConfigError, match=r"train.filters = \['dapo'\]: unknown \['dapo'\]"):
        curation.build_filters(["dapo"], {}, _context())
    with pytest.raises(ConfigError, match=r"curation.length: unknown key\(s\) \['seed'\]"):
        curation.build_sampler("length", {"seed": 1}, _context())
    with pytest.raises(ConfigError, match=r"train.gain_rl.beta"):
        curation.build_sampler("gain_rl", {**small_params_dict()["train"]["gain_rl"], "beta": 2.0}, _context())
    with pytest.raises(ValueError, match="needs a distribution label for each of the 12"):
        curation.build_sampler("dump", {"by": "source", "bucket_edges": [], "window": 3, "temperature": 0.1},
                               _context(labels=()))
    with pytest.raises(ValueError, match="resources\\['prm'\\]"):
        curation.build_filters(["prof"], {"prof": small_params_dict()["prof"]}, _context())


# ---- adapters: exactly the existing code paths -----------------------------------------------------

@pytest.mark.parametrize("order", ["uniform", "length", "random"])
def test_plan_orders_draw_exactly_the_prompt_plan(order):
    context = _context()
    sampler = curation.build_sampler(order, None, context)
    expected = grpo.prompt_plan(order, ORDERING if order != "uniform" else [], 12, 4, 7, 3)
    assert sampler.plan(7) == expected  # what the trainer hands TRL today
    drawn = [row for _ in range(7) for row in sampler.draw(4)]
    assert drawn == expected
    with pytest.raises(ValueError, match="all of them are drawn"):
        sampler.draw(4)
    resumed = PlanSampler(order, ORDERING, context)
    resumed.load_state_dict({"method": order, "position": 8})
    assert resumed.draw(4) == expected[8:12]


def test_gain_rl_adapter_moves_mu_and_draws_exactly_as_the_schedule():
    g = small_params_dict()["train"]["gain_rl"]
    ranking = [int(i) for i in np.random.default_rng(0).permutation(60)]
    context = _context(n_rows=60, ordering=tuple(ranking), labels=(), prior_pass_rate=())
    adapter = curation.build_sampler("gain_rl", g, context)
    assert isinstance(adapter, GainRLSampler)
    reference = grpo.GainRLSchedule(ranking, sigma=g["sigma"], mu0=g["mu0"], n=g["n"], alpha=g["alpha"],
                                    beta=g["beta"], delta_min=g["delta_min"], delta_max=g["delta_max"], seed=3,
                                    at_end=g["at_end"])
    rng = np.random.default_rng(1)
    for step in range(8):
        rows = adapter.draw(4)
        assert rows == reference.draw(4)
        rewards = rng.choice([0.0, 1.0, nan], size=(4, 4), p=[0.3, 0.6, 0.1])
        ang = float(rng.uniform(0.1, 0.6))
        metrics = adapter.update(StepStats(Groups(tuple(rows), rewards), {"ang": ang}))
        # acc as RLVRGRPOTrainer._gain_rl_after_grading computes it from the gathered accuracy rewards
        accuracy = torch.tensor(rewards.reshape(-1), dtype=torch.float32)
        valid = ~torch.isnan(accuracy)
        acc = float((accuracy[valid] >= 1.0).float().mean())
        delta = reference.update(acc, ang)
        assert metrics["gain_rl/acc"] == acc and metrics["gain_rl/delta"] == delta
        assert metrics["gain_rl/mu"] == reference.sampler.mu
    assert adapter.state_dict() == reference.sampler.state_dict()
    with pytest.raises(ValueError, match=r"stats.scalars\['ang'\]"):
        adapter.update(StepStats(Groups((0,), np.ones((1, 4)))))


class _ValuePRM:
    """Step score = a value fixed per completion text (each completion is one step, no blank lines)."""

    def __init__(self, values):
        self.values = values

    def step_scores(self, problems, steps):
        return [[self.values["\n\n".join(s)]] * len(s) for s in steps]


def test_prof_adapter_keeps_exactly_what_prof_in_the_loop_keeps():
    rng = np.random.default_rng(4)
    n_groups, size = 5, 8
    completions = [f"step {i}\n\nmore {i}\n\n\\boxed{{{i}}}" for i in range(n_groups * size)]
    values = {c: float(v) for c, v in zip(completions, rng.choice([0.0, 0.25, 0.5, 1.0], size=len(completions)))}
    rewards = rng.choice([0.0, 1.0, nan], size=(n_groups, size), p=[0.45, 0.45, 0.1])
    problems = [f"problem {g}" for g in range(n_groups) for _ in range(size)]
    groups = Groups(tuple(range(n_groups)), rewards, info={"problem": problems, "completion": completions})
    prm = _ValuePRM(values)
    raw = small_params_dict()["prof"]
    adapter = curation.build_filters(["prof"], {"prof": raw}, _context(), resources={"prm": prm})[0]
    assert isinstance(adapter, ProfFilter)
    result = adapter.apply(groups)
    # the trainer's path: correct = accuracy >= 1 over the flat gathered rewards (NaN is not correct)
    correct = (torch.tensor(rewards.reshape(-1)) >= 1.0).tolist()
    loop = grpo.ProfInLoop(prm, raw["remove"], raw["min_steps"], raw["max_steps"])
    n_steps, values = loop.score(problems, completions)
    kept = loop.decide(correct, values, n_steps, size)
    assert result.keep.reshape(-1).tolist() == kept
    # and group by group it is rlvr.prof's rule: k = n // 2 removed from every group
    assert result.keep.sum(axis=1).tolist() == [size - size // 2] * n_groups
    kept_t, correct_t = torch.tensor(kept), torch.tensor(correct)
    assert result.stats["prof/kept_frac"] == float(kept_t.float().mean())
    assert result.stats["prof/dropped_correct"] == float((~kept_t & correct_t).sum())
    assert result.stats["prof/nan_values"] == 0.0
    with pytest.raises(ValueError, match="problem and completion"):
        adapter.apply(Groups((0,), np.ones((1, 2))))


def test_filters_compose_with_the_trainers_advantages():
    # dynamic sampling keeps whole groups; kept_advantages (the trainer's PROF path) gives 0 to the rest
    rewards = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    result = curation.FILTERS["dynamic_sampling"]({"max_extra_rounds": 0}, _context()).apply(
        Groups((0, 1), rewards))
    adv = grpo.kept_advantages(torch.tensor(rewards.reshape(-1), dtype=torch.float32),
                               torch.tensor(result.keep.reshape(-1)), num_generations=4)
    assert adv[:4].tolist() == [0.0] * 4 and adv[4] > 0 > adv[5]
    assert result.kept_groups.tolist() == [1]


def test_gain_rl_acc_is_the_trainers_float32_fraction():
    from rlvr.curation.existing import accuracy

    for n in (3, 7, 24, 96, 1000):
        for c in range(n + 1):
            rewards = np.array([1.0] * c + [0.0] * (n - c) + [nan])
            t = torch.tensor(rewards, dtype=torch.float32)
            assert accuracy(rewards) == float((t[~torch.isnan(t)] >= 1.0).float().mean()), (n, c)
    with pytest.raises(ValueError, match="every reward of this step is NaN"):
        accuracy(np.array([[nan, nan]]))
