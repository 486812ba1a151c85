"""params.yaml -> frozen, validated dataclasses: the single source of truth for every stage.

Loading is strict: an unknown key, a missing key, a value of the wrong type, a number out of its
range, a choice outside its allowed values or an impossible combination raises `ConfigError` with
the dotted key, the value found and what is allowed. Ranges and choices are checked in each
section's `__post_init__`; rules that span sections in `Params.__post_init__`. Every allowed-values
set is a module-level constant here (or the dispatch table it comes from), used by the validation
and by the code that acts on the value. docs/configuration.md lists the rules.

Keys that params.yaml always sets have no dataclass default (a default would be a second source
of truth); defaults remain only for genuinely optional keys (source fields, `prompt`, null-means-
derived values, `trust_remote_code`, `tracking.uri`), and tests/test_config.py checks that each
one equals params.yaml wherever both exist.

`check_paths` checks the inputs params name (source files, local model folders) so that
`rlvr run` / `python -m flows check` fail before DVC starts a stage. What is not covered: hub
names (whether a hub model or data set exists needs the network) and the content of the files.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlvr.errors import RlvrError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
# A hub id is "name" or "org/name" of letters, digits, "-", "_" and "."; anything else is a path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# Allowed values of every choice in params.yaml.
# train.order: which prompts a step sees (rlvr/curation: one sampler class per value).
TRAIN_ORDERS = ("gain_rl", "length", "random", "uniform", "online_difficulty", "dump")
# train.prompts: every training prompt, the filter stage's band, or the one_shot stage's selection.
TRAIN_PROMPTS = ("all", "band", "one_shot")
# train.filters: which rollouts of a step count (rlvr/curation: one filter class per value).
TRAIN_FILTERS = ("dynamic_sampling", "prof")
# curation.dump.by: how DUMP groups the training prompts into distributions.
DUMP_BY = ("source", "difficulty")
TRAIN_REWARDS = ("accuracy", "blend")
# What GAIN-RL samples once mu has reached the end of the ranking (rlvr/gain_rl.py reads this tuple).
GAIN_RL_AT_END = ("stay", "uniform")
EVAL_BACKENDS = ("auto", "transformers", "vllm")  # evaluate.backend and rollout.backend
# model.dtype: the weights' dtype in every stage that loads the policy (and vLLM's). auto: bf16 on a
# GPU that supports it, else fp32 (rlvr/models.py resolves it). fp16 is left out: training fp16
# weights fails in the gradient scaler, and bf16 covers every GPU vLLM's recipes target.
MODEL_DTYPES = ("auto", "bf16", "fp32")
# train.vllm_mode: TRL's GRPOConfig.vllm_mode values (colocate: an engine inside each training process;
# server: `trl vllm-serve` on other GPUs, reached at vllm_server_host:vllm_server_port).
VLLM_MODES = ("colocate", "server")
# launch.mixed_precision: accelerate's values plus auto (bf16 on a GPU that supports it, else no).
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# What an accelerate config file may be (accelerate's loader reads .json as JSON, anything else as YAML).
ACCELERATE_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Where a source's gold answer comes from: its answer field as it is, or the last \boxed{} in it
# (for sources that ship only a worked solution). rlvr/data.py reads this tuple.
ANSWER_FROM = ("field", "last_boxed")
# TRL 1.16 GRPOConfig.loss_type; every one works with our trainer (none needs another config field).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# transformers' SchedulerType values that run with the arguments we pass (no lr_scheduler_kwargs,
# no evaluation during training). Left out on purpose: cosine_with_min_lr and
# cosine_warmup_with_min_lr (need min_lr), warmup_stable_decay (needs num_decay_steps),
# reduce_lr_on_plateau and greedy (step on an evaluation metric we never compute).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")
# The built-in PRM (exact step checker); any other prm.name is a model folder or hub name.
ARITH_PRM = "arith"
BUILTIN_MODEL = "builtin"
# numpy's generators take seeds in [0, 2**32); torch and Python accept those too.
MAX_SEED = 2**32 - 1


class ConfigError(RlvrError, ValueError):
    pass


def _require(condition: bool, key: str, value: object, fix: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r}: {fix}")


def _at_least(key: str, value: int | float, low: int | float) -> None:
    _require(value >= low, key, value, f"use a value >= {low}")


def _positive(key: str, value: int | float) -> None:
    _require(value > 0, key, value, "use a value > 0")


def _fraction(key: str, value: float) -> None:
    _require(0.0 <= value <= 1.0, key, value, "use a value in [0, 1]")


def _top_p(key: str, value: float) -> None:
    _require(0.0 < value <= 1.0, key, value, "use a value in (0, 1]")


def _one_of(key: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    _require(value in allowed, key, value, f"use one of {allowed}")


def _port(key: str, value: int) -> None:
    _require(1 <= value <= 65535, key, value, "use a TCP port in [1, 65535]")


def _optional(check, key: str, value, *args) -> None:
    """Apply `check` unless the value is null (null keeps its documented meaning)."""
    if value is not None:
        check(key, value, *args)


def looks_like_local_path(name: str, root: Path | str = ".") -> bool:
    """Whether a model name means a folder on this machine rather than a hub id ("name", "org/name").

    A path is anything that is not a valid hub id (starts with ".", "/" or "~", has two slashes, a
    space, ...), anything that exists under `root`, and "dir/name" when `dir` is a folder under
    `root` (`models/foo` while models/ exists): those are reported as missing local folders
    instead of being looked up on the hub.
    """
    if not _HUB_ID_RE.match(name):
        return True
    base = Path(root)
    return (base / name).exists() or ("/" in name and (base / name.split("/")[0]).is_dir())


@dataclass(frozen=True)
class BuiltinModel:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int

    def __post_init__(self) -> None:
        _at_least("model.builtin.hidden_size", self.hidden_size, 1)
        _at_least("model.builtin.num_layers", self.num_layers, 1)
        _at_least("model.builtin.num_heads", self.num_heads, 1)
        _at_least("model.builtin.num_kv_heads", self.num_kv_heads, 1)
        _at_least("model.builtin.intermediate_size", self.intermediate_size, 1)
        _at_least("model.builtin.max_positions", self.max_positions, 1)
        _require(self.hidden_size % self.num_heads == 0, "model.builtin.hidden_size", self.hidden_size,
                 f"must be divisible by num_heads ({self.num_heads})")
        _require(self.num_heads % self.num_kv_heads == 0, "model.builtin.num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads ({self.num_heads})")


@dataclass(frozen=True)
class Model:
    # "builtin" builds the tiny Qwen2 + character tokenizer in warmup; anything else is a local
    # model folder or a hub name (which needs network access or a populated cache).
    name: str
    builtin: BuiltinModel
    # auto: bf16 on a GPU that supports it, else fp32; bf16 or fp32 force one (rlvr.models.torch_dtype).
    dtype: str
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model.name", self.name,
                 f"use {BUILTIN_MODEL}, a model folder or a hub name (org/name)")
        _one_of("model.dtype", self.dtype, MODEL_DTYPES)

    @property
    def is_builtin(self) -> bool:
        return self.name == BUILTIN_MODEL


@dataclass(frozen=True)
class Prompt:
    system: str | None = None
    # Appended to every problem, e.g. "Please reason step by step, and put your final answer
    # within \\boxed{}." for instruction-tuned models. Empty for the built-in model.
    suffix: str = ""


@dataclass(frozen=True)
class Source:
    """One data source: exactly one of `builtin`, `path` or `hub`. Checked by `Prepare`, which knows
    the source's dotted key (`prepare.eval[1]`)."""

    name: str
    builtin: bool = False
    size: int | None = None
    path: str | None = None
    hub: str | None = None
    preset: str = "generic"
    split: str = "train"
    subset: str | None = None
    problem_field: str | None = None
    answer_field: str | None = None
    solution_field: str | None = None
    answer_from: str = "field"
    limit: int | None = None

    def validate(self, key: str) -> None:
        # The preset dispatch table in rlvr/data.py is the one list of presets. Imported here rather
        # than at the top so that rlvr/data.py may import this module.
        from rlvr.data import PRESETS

        _require(bool(_NAME_RE.match(self.name)), f"{key}.name", self.name,
                 "use lowercase letters, digits and underscores (it becomes a file name)")
        kinds = [k for k, v in (("builtin", self.builtin), ("path", self.path), ("hub", self.hub)) if v]
        _require(len(kinds) == 1, key, kinds, "set exactly one of builtin: true, path: FILE or hub: NAME")
        if self.builtin:
            _require(self.size is not None and self.size > 0, f"{key}.size", self.size,
                     "a builtin source needs size: N > 0")
        else:
            _require(self.size is None, f"{key}.size", self.size, "size applies to builtin sources only; use limit")
        _optional(_at_least, f"{key}.limit", self.limit, 1)
        _one_of(f"{key}.preset", self.preset, sorted(PRESETS))
        _one_of(f"{key}.answer_from", self.answer_from, ANSWER_FROM)
        _require(not (self.builtin and self.answer_from != "field"), f"{key}.answer_from", self.answer_from,
                 "a builtin source has no answer field to read; remove answer_from")
        _require(bool(self.split.strip()), f"{key}.split", self.split, "name a split, e.g. train or test")
        if self.preset == "generic" and not self.builtin:
            _require(bool(self.problem_field and self.answer_field), f"{key}.preset", self.preset,
                     "the generic preset needs problem_field and answer_field")


@dataclass(frozen=True)
class Arith:
    min_ops: int
    max_ops: int
    min_digits: int
    max_digits: int

    def __post_init__(self) -> None:
        _require(1 <= self.min_ops <= self.max_ops, "prepare.arith.min_ops", (self.min_ops, self.max_ops),
                 "need 1 <= min_ops <= max_ops")
        _require(1 <= self.min_digits <= self.max_digits <= 9, "prepare.arith.min_digits",
                 (self.min_digits, self.max_digits), "need 1 <= min_digits <= max_digits <= 9")


@dataclass(frozen=True)
class Decontamination:
    ngram: int
    # The stage fails when more than this fraction of the train set overlaps an eval set: that
    # much overlap means the wrong files were configured, not a few stray near-duplicates.
    max_contaminated_frac: float

    def __post_init__(self) -> None:
        _at_least("prepare.decontamination.ngram", self.ngram, 1)
        _fraction("prepare.decontamination.max_contaminated_frac", self.max_contaminated_frac)


@dataclass(frozen=True)
class Prepare:
    train: tuple[Source, ...]
    eval: tuple[Source, ...]
    arith: Arith
    decontamination: Decontamination

    def __post_init__(self) -> None:
        _require(len(self.train) > 0, "prepare.train", self.train, "list at least one training source")
        _require(len(self.eval) > 0, "prepare.eval", self.eval, "list at least one evaluation source")
        for key, sources in (("prepare.train", self.train), ("prepare.eval", self.eval)):
            for i, source in enumerate(sources):
                source.validate(f"{key}[{i}]")
            names = [s.name for s in sources]
            _require(len(set(names)) == len(names), key, names, "source names must be unique")
            builtin = [s.name for s in sources if s.builtin]
            _require(len(builtin) <= 1, key, builtin, "use at most one builtin source per list")


@dataclass(frozen=True)
class Grading:
    """The one grader of every stage that grades (prepare, rollout, train, evaluate)."""

    # Per-item limit: a pathological answer costs this much and grades 0.0 (or None for gold).
    timeout_s: float
    # Grading processes; each holds a math-verify worker.
    workers: int

    def __post_init__(self) -> None:
        _positive("grading.timeout_s", self.timeout_s)
        _at_least("grading.workers", self.workers, 1)


@dataclass(frozen=True)
class Warmup:
    # Off: the base model passes through unchanged (the usual choice for a real checkpoint).
    enabled: bool
    max_steps: int
    batch_size: int
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_length: int
    logging_steps: int

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, "warmup.max_steps", self.max_steps, "use at least 1 step or enabled: false")
        _at_least("warmup.batch_size", self.batch_size, 1)
        _positive("warmup.learning_rate", self.learning_rate)
        _one_of("warmup.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _require(0 <= self.warmup_ratio < 1, "warmup.warmup_ratio", self.warmup_ratio, "use a value in [0, 1)")
        _at_least("warmup.weight_decay", self.weight_decay, 0)
        _at_least("warmup.max_length", self.max_length, 1)
        _at_least("warmup.logging_steps", self.logging_steps, 1)


@dataclass(frozen=True)
class OneShot:
    question: str
    answer: str

    def __post_init__(self) -> None:
        _require(bool(self.question.strip()), "score.one_shot.question", self.question, "use a non-empty question")
        _require(bool(self.answer.strip()), "score.one_shot.answer", self.answer, "use a non-empty answer")


@dataclass(frozen=True)
class Score:
    """GAIN-RL offline ranking: chat rendering for the angle pass, and the score weights."""

    system: str | None
    one_shot: OneShot | None
    batch_size: int
    w_intra: float
    w_inter: float

    def __post_init__(self) -> None:
        _at_least("score.batch_size", self.batch_size, 1)
        _at_least("score.w_intra", self.w_intra, 0)
        _at_least("score.w_inter", self.w_inter, 0)
        _require(self.w_intra + self.w_inter > 0, "score.w_intra + score.w_inter", self.w_intra + self.w_inter,
                 "at least one weight must be > 0, or the score ranks nothing (paper: 1 and 1)")


def _fraction_of_n(key: str, value: float, zero_allowed: bool) -> None:
    low = "[0" if zero_allowed else "(0"
    _require((value >= 0 if zero_allowed else value > 0) and value <= 1, key, value,
             f"sigma, n, delta_min and delta_max are fractions of N (the number of ranked prompts) now, not rank "
             f"positions; use a value in {low}, 1]")


@dataclass(frozen=True)
class GainRL:
    """Online GAIN-RL. sigma, n, delta_min and delta_max are fractions of N, the number of ranked
    prompts (the reference release's rank-position constants are in rlvr.gain_rl.REFERENCE)."""

    sigma: float
    n: float
    alpha: float
    beta: float
    delta_min: float
    delta_max: float
    mu0: float  # the starting rank position (clipped to N - 1)
    # stay: keep sampling around the last rank (reference); uniform: K prompts uniformly from all N.
    at_end: str

    def __post_init__(self) -> None:
        _fraction_of_n("train.gain_rl.sigma", self.sigma, zero_allowed=False)
        _fraction_of_n("train.gain_rl.n", self.n, zero_allowed=False)
        _fraction_of_n("train.gain_rl.delta_min", self.delta_min, zero_allowed=True)
        _fraction_of_n("train.gain_rl.delta_max", self.delta_max, zero_allowed=True)
        _positive("train.gain_rl.alpha", self.alpha)
        _fraction("train.gain_rl.beta", self.beta)
        _at_least("train.gain_rl.mu0", self.mu0, 0)
        _require(self.delta_max >= self.delta_min, "train.gain_rl.delta_max", self.delta_max,
                 f"must be >= delta_min ({self.delta_min})")
        _one_of("train.gain_rl.at_end", self.at_end, GAIN_RL_AT_END)


@dataclass(frozen=True)
class Rollout:
    """Rollouts of the current policy over the training prompts (for difficulty and PROF)."""

    n_samples: int
    # How many training prompts to roll out (the first ones in file order); null = all of them.
    max_prompts: int | None
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    # Prompts per cached chunk: a killed run redoes at most one chunk.
    chunk_size: int
    # auto: vLLM when it is installed and a GPU is visible, else transformers.
    backend: str

    def __post_init__(self) -> None:
        _one_of("rollout.backend", self.backend, EVAL_BACKENDS)
        _at_least("rollout.n_samples", self.n_samples, 1)
        _require(self.max_prompts is None or self.max_prompts >= 1, "rollout.max_prompts", self.max_prompts,
                 "use a positive number or null for every training prompt")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "sampling needs temperature > 0")
        _top_p("rollout.top_p", self.top_p)
        _at_least("rollout.max_new_tokens", self.max_new_tokens, 1)
        _at_least("rollout.batch_size", self.batch_size, 1)
        _at_least("rollout.chunk_size", self.chunk_size, 1)


@dataclass(frozen=True)
class PRM:
    """The process reward model PROF uses (in `filter` and in `train`)."""

    # arith: the built-in task's exact step checker; otherwise a local folder or hub name of a
    # model in the Qwen2.5-Math-PRM format.
    name: str
    separator: str
    system: str | None
    batch_size: int
    max_length: int
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "prm.name", self.name, f"use {ARITH_PRM} or a model folder / hub name")
        _require(bool(self.separator), "prm.separator", self.separator, "use the PRM's step separator token")
        _at_least("prm.batch_size", self.batch_size, 1)
        _require(self.max_length >= 16, "prm.max_length", self.max_length, "use at least 16 tokens")


@dataclass(frozen=True)
class Prof:
    """The PROF consistency rule (rlvr/prof.py): remove k of every group of n rollouts."""

    min_steps: int
    max_steps: int
    remove: int | None = None  # k; null = n // 2

    def __post_init__(self) -> None:
        _require(self.remove is None or self.remove >= 0, "prof.remove", self.remove, "use k >= 0 or null (n // 2)")
        _require(1 <= self.min_steps <= self.max_steps, "prof.min_steps", (self.min_steps, self.max_steps),
                 "need 1 <= min_steps <= max_steps")


@dataclass(frozen=True)
class Filter:
    """Which training prompts `train` uses: those whose rollout pass rate lies in the band."""

    pass_rate_min: float
    pass_rate_max: float

    def __post_init__(self) -> None:
        _fraction("filter.pass_rate_min", self.pass_rate_min)
        _fraction("filter.pass_rate_max", self.pass_rate_max)
        _require(self.pass_rate_min <= self.pass_rate_max, "filter.pass_rate_min",
                 (self.pass_rate_min, self.pass_rate_max), "need pass_rate_min <= pass_rate_max")


@dataclass(frozen=True)
class Train:
    # gain_rl: GAIN-RL dynamic sampling over the `score` ranking; length: shortest question first;
    # random: a seeded fixed permutation; uniform: TRL's default reshuffling.
    order: str
    # The training seed: GRPO sampling, the prompt plan and GAIN-RL's draws. Separate from the top-level
    # `seed` (data and warm-up), so seed replicates of training share one warm-up model.
    seed: int
    max_steps: int
    prompts_per_step: int
    num_generations: int
    learning_rate: float
    lr_scheduler: str
    beta: float
    temperature: float
    top_p: float
    max_completion_length: int
    loss_type: str
    save_steps: int
    logging_steps: int
    use_vllm: bool
    gain_rl: GainRL
    # all: every training prompt; band: those the `filter` stage kept (pass rate in its band).
    prompts: str
    # PROF inside the GRPO loop: filter each group before advantages (rule and PRM: prof, prm).
    prof: bool
    # Filters applied to each step's graded groups, in order: dynamic_sampling (DAPO; first if named) and
    # prof (the same as train.prof: true). Settings in the `curation` section.
    filters: tuple[str, ...]
    # accuracy: the grader's 1/0; blend: accuracy + blend_weight x process value (PROF's baseline).
    reward: str
    blend_weight: float
    # The held-out curve (rlvr/heldout.py): evaluate the policy at step 0, every eval_steps optimizer
    # steps and at the last step (0 = off) on data/prepared/eval/<eval_set>.parquet, with eval_n_samples
    # samples per problem (train.temperature, train.top_p) of up to eval_max_new_tokens, plus greedy.
    eval_steps: int
    eval_set: str
    eval_n_samples: int
    eval_max_new_tokens: int
    # With use_vllm: colocate (an engine in each training process) or server (`trl vllm-serve` at
    # vllm_server_host:vllm_server_port, on GPUs the training processes do not use).
    vllm_mode: str
    vllm_server_host: str
    vllm_server_port: int

    def __post_init__(self) -> None:
        _one_of("train.order", self.order, TRAIN_ORDERS)
        _one_of("train.vllm_mode", self.vllm_mode, VLLM_MODES)
        _require(bool(self.vllm_server_host.strip()), "train.vllm_server_host", self.vllm_server_host,
                 "name the vLLM server's host, e.g. 127.0.0.1")
        _port("train.vllm_server_port", self.vllm_server_port)
        _require(0 <= self.seed <= MAX_SEED, "train.seed", self.seed, f"use an integer in [0, {MAX_SEED}]")
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, "use 0 (no training) or more steps")
        _at_least("train.prompts_per_step", self.prompts_per_step, 1)
        _require(self.num_generations >= 2, "train.num_generations", self.num_generations,
                 "GRPO needs at least 2 generations per prompt to compute group advantages")
        _positive("train.learning_rate", self.learning_rate)
        _one_of("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _at_least("train.beta", self.beta, 0)
        _require(self.temperature > 0, "train.temperature", self.temperature, "sampling needs temperature > 0")
        _top_p("train.top_p", self.top_p)
        _at_least("train.max_completion_length", self.max_completion_length, 1)
        _one_of("train.loss_type", self.loss_type, LOSS_TYPES)
        _at_least("train.save_steps", self.save_steps, 1)
        _at_least("train.logging_steps", self.logging_steps, 1)
        _one_of("train.prompts", self.prompts, TRAIN_PROMPTS)
        unknown = [f for f in self.filters if f not in TRAIN_FILTERS]
        _require(not unknown, "train.filters", list(self.filters), f"unknown {unknown}; use names from "
                 f"{list(TRAIN_FILTERS)}")
        _require(len(set(self.filters)) == len(self.filters), "train.filters", list(self.filters),
                 "a filter is named twice")
        _require("dynamic_sampling" not in self.filters or self.filters[0] == "dynamic_sampling", "train.filters",
                 list(self.filters), "put dynamic_sampling first: it decides which groups the step has")
        _require(not (self.prof and "prof" in self.filters), "train.filters", list(self.filters),
                 "PROF is on twice (train.prof: true and prof in train.filters); use one of them")
        _one_of("train.reward", self.reward, TRAIN_REWARDS)
        _at_least("train.blend_weight", self.blend_weight, 0)
        _require(self.eval_steps >= 0, "train.eval_steps", self.eval_steps,
                 "use 0 (no held-out curve) or a number of steps between evaluations")
        _at_least("train.eval_n_samples", self.eval_n_samples, 1)
        _at_least("train.eval_max_new_tokens", self.eval_max_new_tokens, 1)

    @property
    def filter_names(self) -> tuple[str, ...]:
        """The filters the trainer applies, in order: train.filters, with prof where train.prof is true."""
        return self.filters + (("prof",) if self.prof else ())


# ---- curation methods (rlvr/curation/; docs/curation.md) ------------------------------------------


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO dynamic sampling (train.filters: [dynamic_sampling])."""

    # extra generation rounds allowed per step (0: drop only, never generate more)
    max_extra_rounds: int

    def __post_init__(self) -> None:
        _require(isinstance(self.max_extra_rounds, int) and not isinstance(self.max_extra_rounds, bool)
                 and self.max_extra_rounds >= 0, "curation.dynamic_sampling.max_extra_rounds",
                 self.max_extra_rounds, "use an integer >= 0")


@dataclass(frozen=True)
class OnlineDifficulty:
    """Online difficulty filtering (train.order: online_difficulty)."""

    low: float            # the band's lower edge, inclusive
    high: float           # the band's upper edge, inclusive
    prior_samples: float  # weight of the rollout stage's pass rate, in rollouts (0: no prior)
    explore: float        # fraction of every step's prompts drawn from outside the pool

    def __post_init__(self) -> None:
        key = "curation.online_difficulty"
        for name in ("low", "high", "explore"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"{key}.{name}", value,
                     "use a value in [0, 1]")
        _require(self.low <= self.high, f"{key}.low", (self.low, self.high), "need low <= high")
        _require(isinstance(self.prior_samples, (int, float)) and self.prior_samples >= 0,
                 f"{key}.prior_samples", self.prior_samples, "use a number of rollouts >= 0 (0: no prior)")


@dataclass(frozen=True)
class Dump:
    """DUMP (train.order: dump)."""

    # how prompts are grouped into distributions: the prepared set's `source`, or a difficulty bucket of
    # the rollout stage's pass rate cut at `bucket_edges`
    by: str
    bucket_edges: tuple[float, ...]
    window: int          # absolute advantages kept per distribution (reference code: 300)
    temperature: float   # softmax temperature tau over UCB scores (reference code: 0.1)

    def __post_init__(self) -> None:
        key = "curation.dump"
        _require(self.by in DUMP_BY, f"{key}.by", self.by, f"use one of {list(DUMP_BY)}")
        edges = tuple(float(e) for e in self.bucket_edges)
        object.__setattr__(self, "bucket_edges", edges)
        _require(all(0.0 < e < 1.0 for e in edges) and list(edges) == sorted(set(edges)), f"{key}.bucket_edges",
                 list(edges), "use increasing pass rates strictly between 0 and 1")
        _require(self.by != "difficulty" or len(edges) >= 1, f"{key}.bucket_edges", list(edges),
                 "by: difficulty needs at least one edge (two buckets)")
        _require(isinstance(self.window, int) and self.window >= 1, f"{key}.window", self.window,
                 "use an integer >= 1")
        _require(isinstance(self.temperature, (int, float)) and self.temperature > 0, f"{key}.temperature",
                 self.temperature, "use a value > 0")


@dataclass(frozen=True)
class OneShotSelection:
    """1-shot RLVR selection (the one_shot stage; train.prompts: one_shot)."""

    m: int                 # prompts to keep (1: the paper's 1-shot setting)
    min_observations: int  # a prompt needs this many accuracy values to have a variance

    def __post_init__(self) -> None:
        key = "curation.one_shot"
        _require(isinstance(self.m, int) and self.m >= 1, f"{key}.m", self.m, "use an integer >= 1 (1: 1-shot)")
        _require(isinstance(self.min_observations, int) and self.min_observations >= 2, f"{key}.min_observations",
                 self.min_observations, "use an integer >= 2 (a variance needs two values)")


@dataclass(frozen=True)
class Curation:
    """Settings of the curation methods that have no section of their own (GAIN-RL: train.gain_rl;
    PROF: prof, prm)."""

    dynamic_sampling: DynamicSampling
    online_difficulty: OnlineDifficulty
    dump: Dump
    one_shot: OneShotSelection


@dataclass(frozen=True)
class Evaluate:
    benchmarks: tuple[str, ...]
    n_samples: int
    ks: tuple[int, ...]
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    # Per benchmark other than the built-in one: a fixed subset of this many problems (chosen by a
    # hash of the problem id, so it does not move when files are reordered); null = the full set.
    subset_size: int | None
    greedy: bool
    # Also evaluate the warm-up model with the same settings and report the paired difference.
    baseline: bool
    n_bootstrap: int
    backend: str

    def __post_init__(self) -> None:
        _require(len(self.benchmarks) > 0, "evaluate.benchmarks", list(self.benchmarks),
                 "list at least one prepare.eval source")
        _require(len(set(self.benchmarks)) == len(self.benchmarks), "evaluate.benchmarks", list(self.benchmarks),
                 "list each benchmark once")
        _at_least("evaluate.n_samples", self.n_samples, 1)
        _require(len(self.ks) > 0 and all(1 <= k <= self.n_samples for k in self.ks), "evaluate.ks",
                 list(self.ks), f"every k must be in [1, n_samples={self.n_samples}]")
        _require(len(set(self.ks)) == len(self.ks), "evaluate.ks", list(self.ks), "list each k once")
        _require(self.temperature > 0, "evaluate.temperature", self.temperature,
                 "sampling needs temperature > 0 (greedy accuracy is reported by greedy: true)")
        _top_p("evaluate.top_p", self.top_p)
        _at_least("evaluate.max_new_tokens", self.max_new_tokens, 1)
        _at_least("evaluate.batch_size", self.batch_size, 1)
        _require(self.subset_size is None or self.subset_size >= 1, "evaluate.subset_size", self.subset_size,
                 "use a positive size or null for the full sets")
        _one_of("evaluate.backend", self.backend, EVAL_BACKENDS)
        _require(self.n_bootstrap >= 100, "evaluate.n_bootstrap", self.n_bootstrap, "use at least 100 resamples")


@dataclass(frozen=True)
class Retrain:
    """Scheduled retraining (flows/retrain.py): what is compared, and when it runs."""

    registered_model: str
    benchmark: str
    metric: str             # a key of metrics/eval.json[benchmark]
    min_improvement: float  # the champion alias moves only for at least this gain
    cron: str               # five-field cron, read in `timezone`
    deployment: str
    timezone: str           # IANA time zone of the cron (params.yaml: UTC)

    def __post_init__(self) -> None:
        _require(bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.registered_model)), "retrain.registered_model",
                 self.registered_model, "use letters, digits, '.', '_' or '-'")
        _require(len(self.cron.split()) == 5, "retrain.cron", self.cron,
                 "use five cron fields: minute hour day-of-month month day-of-week")
        _at_least("retrain.min_improvement", self.min_improvement, 0)
        _require(bool(self.deployment.strip()), "retrain.deployment", self.deployment, "name the Prefect deployment")
        _require(self.timezone in zoneinfo.available_timezones(), "retrain.timezone", self.timezone,
                 "use an IANA time zone name such as UTC or Europe/Berlin")


@dataclass(frozen=True)
class Tracking:
    experiment: str
    # null: SQLite under the project root (mlruns/mlflow.db); MLFLOW_TRACKING_URI overrides both.
    uri: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "name the MLflow experiment")


@dataclass(frozen=True)
class Launch:
    """How score, rollout, train and evaluate run (flows/launch.py): in the stage's own process when
    processes x machines is 1, else as a distributed job the stage's flow starts with torchrun
    (accelerate_config null) or `accelerate launch --config_file accelerate_config`."""

    processes: int              # per machine: usually its GPU count
    machines: int
    # Several machines: the host of machine 0 (the one running the pipeline); null = $MASTER_ADDR.
    main_address: str | None
    # Several machines: machine 0's rendezvous port. Null on one machine: a free port at launch.
    main_port: int | None
    accelerate_config: str | None  # an accelerate config file (configs/accelerate/*.yaml); null = torchrun
    mixed_precision: str        # auto | no | bf16 | fp16: GRPOConfig's bf16/fp16 and accelerate's --mixed_precision

    def __post_init__(self) -> None:
        _at_least("launch.processes", self.processes, 1)
        _at_least("launch.machines", self.machines, 1)
        _optional(_port, "launch.main_port", self.main_port)
        _require(self.main_address is None or bool(self.main_address.strip()), "launch.main_address",
                 self.main_address, "name machine 0's host, or null to take it from $MASTER_ADDR")
        _require(self.machines == 1 or self.main_port is not None, "launch.main_port", self.main_port,
                 f"launch.machines = {self.machines} needs a fixed rendezvous port every machine knows, e.g. 29500")
        if self.accelerate_config is not None:
            _require(Path(self.accelerate_config).suffix in ACCELERATE_CONFIG_SUFFIXES, "launch.accelerate_config",
                     self.accelerate_config, "name an accelerate config file (.yaml, .yml or .json), e.g. "
                     "configs/accelerate/ddp.yaml, or null for torchrun")
        _one_of("launch.mixed_precision", self.mixed_precision, MIXED_PRECISION)

    @property
    def world_size(self) -> int:
        return self.processes * self.machines

    @property
    def distributed(self) -> bool:
        """Whether the launched stages run as a multi-process job (else in-process, as with no launch section)."""
        return self.world_size > 1


@dataclass(frozen=True)
class Params:
    seed: int
    model: Model
    prompt: Prompt
    prepare: Prepare
    grading: Grading
    warmup: Warmup
    score: Score
    rollout: Rollout
    prm: PRM
    prof: Prof
    filter: Filter
    train: Train
    curation: Curation
    evaluate: Evaluate
    tracking: Tracking
    retrain: Retrain
    launch: Launch

    def __post_init__(self) -> None:
        _require(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"use an integer in [0, {MAX_SEED}]")
        eval_names = {s.name for s in self.prepare.eval}
        unknown = [b for b in self.evaluate.benchmarks if b not in eval_names]
        _require(not unknown, "evaluate.benchmarks", list(self.evaluate.benchmarks),
                 f"{unknown} not among prepare.eval sources {sorted(eval_names)}")
        _require(self.train.eval_set in eval_names, "train.eval_set", self.train.eval_set,
                 f"use the name of a prepare.eval source: one of {sorted(eval_names)}")
        _require(self.retrain.benchmark in self.evaluate.benchmarks, "retrain.benchmark", self.retrain.benchmark,
                 f"must be one of evaluate.benchmarks {list(self.evaluate.benchmarks)}")
        known = [f"pass_at_{k}" for k in self.evaluate.ks]
        known += ["greedy_accuracy"] if self.evaluate.greedy else []
        known += ["delta_pass_at_1"] if self.evaluate.baseline else []
        _require(self.retrain.metric in known, "retrain.metric", self.retrain.metric,
                 f"use one of {known} (greedy_accuracy needs evaluate.greedy, delta_pass_at_1 evaluate.baseline)")
        # PROF must keep at least one rollout of every group it filters.
        for key, n in (("rollout.n_samples", self.rollout.n_samples),
                       ("train.num_generations", self.train.num_generations)):
            _require(self.prof.remove is None or self.prof.remove < n, "prof.remove", self.prof.remove,
                     f"must be below {key} ({n}) so that every group keeps a rollout; or null for n // 2")
        _require("dynamic_sampling" not in self.train.filters or not self.launch.distributed, "train.filters",
                 list(self.train.filters), "dynamic sampling's extra rounds run on one process only; drop "
                 "dynamic_sampling or set launch.processes and launch.machines to 1")
        _require(self.launch.mixed_precision != "fp16" or self.model.dtype == "fp32", "launch.mixed_precision",
                 self.launch.mixed_precision, f"fp16 mixed precision needs fp32 weights (model.dtype = "
                 f"{self.model.dtype!r}); set model.dtype: fp32, or use bf16")
        _require(self.warmup.enabled or not self.model.is_builtin, "warmup.enabled", self.warmup.enabled,
                 "the builtin model starts untrained; keep warmup enabled or set model.name to a real model")
        if self.model.is_builtin:
            limit = self.model.builtin.max_positions
            _require(self.warmup.max_length <= limit, "warmup.max_length", self.warmup.max_length,
                     f"must not exceed model.builtin.max_positions ({limit})")
            for key, length in (("rollout.max_new_tokens", self.rollout.max_new_tokens),
                                ("train.max_completion_length", self.train.max_completion_length),
                                ("train.eval_max_new_tokens", self.train.eval_max_new_tokens),
                                ("evaluate.max_new_tokens", self.evaluate.max_new_tokens)):
                _require(length < limit, key, length,
                         f"must be below model.builtin.max_positions ({limit}), which also holds the prompt")


def _convert(tp: object, value: object, key: str) -> object:
    """Check `value` against the annotation `tp` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _convert(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        _require(isinstance(value, list), key, value, "expected a list")
        (item_type, _) = typing.get_args(tp)
        return tuple(_convert(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, key, value, "expected a number")
        # No param means anything at nan or inf, and every range check would pass inf.
        _require(math.isfinite(value), key, value, "expected a finite number")
        return float(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "expected an integer")
        return value
    if tp is bool:
        _require(isinstance(value, bool), key, value, "expected true or false")
        return value
    if tp is str:
        _require(isinstance(value, str), key, value, "expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, data: object, key: str):
    _require(isinstance(data, dict), key or "params", data, "expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        _require(name in fields, f"{key}.{name}".lstrip("."), data[name],
                 f"unknown key; valid keys here are {sorted(fields)}")
    kwargs = {}
    for name, spec in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{key}.{name}".lstrip("."))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key + '.' if key else ''}{name} is missing: add it (docs/configuration.md lists "
                              "every key)")
    return cls(**kwargs)


def from_dict(data: dict) -> Params:
    return _build(Params, data, "")


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's exponent floats without a dot (`1e-06`). PyYAML reads YAML
    1.1, where `1e-06` is a string; DVC writes floats that way (`dvc exp run -S train.learning_rate=1e-6`,
    `rlvr recipe --apply`), and DVC itself reads them back as numbers."""


_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def parse_yaml(text: str) -> object:
    """params.yaml text as Python data, numbers read as DVC reads them (see `_ParamsLoader`)."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    try:
        return from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def _check_model_folder(key: str, name: str, root: Path) -> None:
    """A model named by a local path must be a folder with a config.json; hub ids are not checked."""
    if not looks_like_local_path(name, root):
        return
    folder = root / Path(name).expanduser()
    _require(folder.is_dir(), key, name, f"no such model folder under {root.resolve()}; give an existing "
             "folder or a hub id (org/name)")
    _require((folder / "config.json").is_file(), key, name, "not a model folder (no config.json)")


def check_paths(params: Params, root: str | Path = ".") -> None:
    """The inputs params name exist under `root`: source files and local model / PRM folders.

    Raises ConfigError naming the first missing one. Hub data sets and hub models are not checked
    (that needs the network); whether a file's content is usable is the stage's check.
    """
    base = Path(root)
    for role, sources in (("train", params.prepare.train), ("eval", params.prepare.eval)):
        for i, source in enumerate(sources):
            if source.path is not None:
                _require((base / Path(source.path).expanduser()).exists(), f"prepare.{role}[{i}].path",
                         source.path, f"no such file under {base.resolve()}")
    if not params.model.is_builtin:
        _check_model_folder("model.name", params.model.name, base)
    if params.prm.name != ARITH_PRM:
        _check_model_folder("prm.name", params.prm.name, base)
    if params.launch.accelerate_config is not None:
        _require((base / Path(params.launch.accelerate_config).expanduser()).is_file(), "launch.accelerate_config",
                 params.launch.accelerate_config, f"no such file under {base.resolve()}; name one of "
                 "configs/accelerate/*.yaml or your own accelerate config")


def check(path: str | Path = "params.yaml", root: str | Path = ".") -> Params:
    """The pre-flight check (`rlvr check`, `rlvr run`): load and validate params, then `check_paths`."""
    params = load(path)
    try:
        check_paths(params, root)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    return params


def to_flat_dict(obj: object, prefix: str = "") -> dict[str, object]:
    """Flatten a section to dotted keys (for MLflow params)."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, object] = {}
        for f in dataclasses.fields(obj):
            out.update(to_flat_dict(getattr(obj, f.name), f"{prefix}{f.name}."))
        return out
    if isinstance(obj, tuple) and obj and dataclasses.is_dataclass(obj[0]):
        out = {}
        for item in obj:
            out.update(to_flat_dict(item, f"{prefix}{getattr(item, 'name', '')}."))
        return out
    return {prefix.rstrip("."): obj}
