"""Data curation for GRPO behind one small interface (rlvr/curation/base.py).

A *sampler* decides which prompts a step sees (an offline plan, or an online draw with state); a
*filter* decides which rollouts of a step count. A method is one module with one class and one
entry in `SAMPLERS` or `FILTERS` below: the params value names the class, and every class is
built the same way, `Class.from_settings(values, context, resources)`, where `values` is its
params section, `context` the run's shape (rlvr.curation.base.Context) and `resources` objects
the trainer loads (a PRM).

    value                     kind               module              method
    uniform, length, random   sampler (offline)  existing            baselines (rlvr.grpo.prompt_plan)
    gain_rl                   sampler            existing            GAIN-RL, Wang et al. 2025
    online_difficulty         sampler            online_difficulty   running pass-rate band
    dump                      sampler            dump                DUMP, Wang et al. 2025
    prof                      filter             existing            PROF, Ye et al. 2025
    dynamic_sampling          filter             dynamic_sampling    DAPO dynamic sampling, Yu et al. 2025

1-shot RLVR (rlvr/curation/one_shot.py) chooses the training set before training (an offline
selection written as a prompt set), so it is neither a sampler nor a filter.

docs/curation.md describes each method, its params and how to add one.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from rlvr.config import ConfigError
from rlvr.curation import dump, dynamic_sampling, online_difficulty
from rlvr.curation.base import Context, FilterResult, GroupFilter, Groups, Sampler, StepStats
from rlvr.curation.existing import GainRLSampler, PlanSampler, ProfFilter

SAMPLERS = {
    "uniform": partial(PlanSampler.from_order, "uniform"),
    "length": partial(PlanSampler.from_order, "length"),
    "random": partial(PlanSampler.from_order, "random"),
    "gain_rl": GainRLSampler.from_settings,
    online_difficulty.NAME: online_difficulty.OnlineDifficultySampler.from_settings,
    dump.NAME: dump.DumpSampler.from_settings,
}

FILTERS = {
    "prof": ProfFilter.from_settings,
    dynamic_sampling.NAME: dynamic_sampling.DynamicSamplingFilter.from_settings,
}

__all__ = ["Context", "FilterResult", "GroupFilter", "Groups", "Sampler", "StepStats", "SAMPLERS", "FILTERS",
           "build_sampler", "build_filters"]


def build_sampler(name: str, values: Mapping[str, Any] | None, context: Context,
                  resources: Mapping[str, Any] | None = None) -> Sampler:
    """The sampler that params name (`train.order`), built from its settings."""
    if name not in SAMPLERS:
        raise ConfigError(f"train.order = {name!r}: use one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](values, context, resources)


def build_filters(names: list[str], sections: Mapping[str, Mapping[str, Any] | None], context: Context,
                  resources: Mapping[str, Any] | None = None) -> list[GroupFilter]:
    """The filters that params name (`train.filters`, applied in that order), each from
    `sections[name]`, its settings."""
    unknown = [n for n in names if n not in FILTERS]
    if unknown:
        raise ConfigError(f"train.filters = {names!r}: unknown {unknown}; use names from {sorted(FILTERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.filters = {names!r}: a filter is named twice")
    return [FILTERS[n](sections.get(n), context, resources) for n in names]
