"""params.yaml -> frozen, validated dataclasses: the single source of truth for every stage.

Loading is strict: an unknown key, a value of the wrong type or an impossible combination raises
`ConfigError` with the dotted key, the value found and what to do instead. Cross-field rules live in
each section's `__post_init__`. Stages receive the whole `Params` object and read their section.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class ConfigError(ValueError):
    pass


def _require(condition: bool, key: str, value: object, fix: str) -> None:
    if not condition:
        raise ConfigError(f"params: {key} = {value!r}: {fix}")


@dataclass(frozen=True)
class BuiltinModel:
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 2048

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0, "model.builtin.hidden_size", self.hidden_size,
                 f"must be divisible by num_heads ({self.num_heads})")
        _require(self.num_heads % self.num_kv_heads == 0, "model.builtin.num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads ({self.num_heads})")
        _require(self.num_layers >= 1, "model.builtin.num_layers", self.num_layers, "use at least 1 layer")


@dataclass(frozen=True)
class Model:
    # "builtin" builds the tiny Qwen2 + character tokenizer in warmup; anything else is a local
    # model folder or a hub name (which needs network access or a populated cache).
    name: str = "builtin"
    trust_remote_code: bool = False
    builtin: BuiltinModel = field(default_factory=BuiltinModel)

    @property
    def is_builtin(self) -> bool:
        return self.name == "builtin"


@dataclass(frozen=True)
class Prompt:
    system: str | None = None
    # Appended to every problem, e.g. "Please reason step by step, and put your final answer
    # within \\boxed{}." for instruction-tuned models. Empty for the built-in model.
    suffix: str = ""


@dataclass(frozen=True)
class Source:
    """One data source: exactly one of `builtin`, `path` or `hub`."""

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
    limit: int | None = None

    def __post_init__(self) -> None:
        key = f"source {self.name!r}"
        _require(bool(_NAME_RE.match(self.name)), f"{key}.name", self.name,
                 "use lowercase letters, digits and underscores (it becomes a file name)")
        kinds = [k for k, v in (("builtin", self.builtin), ("path", self.path), ("hub", self.hub)) if v]
        _require(len(kinds) == 1, key, kinds, "set exactly one of builtin: true, path: FILE or hub: NAME")
        if self.builtin:
            _require(self.size is not None and self.size > 0, f"{key}.size", self.size,
                     "a builtin source needs size: N > 0")
        else:
            _require(self.size is None, f"{key}.size", self.size, "size applies to builtin sources only; use limit")
        _require(self.limit is None or self.limit > 0, f"{key}.limit", self.limit, "use a positive limit or null")
        if self.preset == "generic" and not self.builtin:
            _require(bool(self.problem_field and self.answer_field), f"{key}.preset", self.preset,
                     "the generic preset needs problem_field and answer_field")


@dataclass(frozen=True)
class Arith:
    min_ops: int = 1
    max_ops: int = 3
    min_digits: int = 1
    max_digits: int = 2

    def __post_init__(self) -> None:
        _require(1 <= self.min_ops <= self.max_ops, "prepare.arith.min_ops", (self.min_ops, self.max_ops),
                 "need 1 <= min_ops <= max_ops")
        _require(1 <= self.min_digits <= self.max_digits <= 9, "prepare.arith.min_digits",
                 (self.min_digits, self.max_digits), "need 1 <= min_digits <= max_digits <= 9")


@dataclass(frozen=True)
class Decontamination:
    ngram: int = 13
    # The stage fails when more than this fraction of the train set overlaps an eval set: that
    # much overlap means the wrong files were configured, not a few stray near-duplicates.
    max_contaminated_frac: float = 0.05

    def __post_init__(self) -> None:
        _require(self.ngram >= 1, "prepare.decontamination.ngram", self.ngram, "use n >= 1")
        _require(0.0 <= self.max_contaminated_frac <= 1.0, "prepare.decontamination.max_contaminated_frac",
                 self.max_contaminated_frac, "use a fraction in [0, 1]")


@dataclass(frozen=True)
class Prepare:
    train: tuple[Source, ...]
    eval: tuple[Source, ...]
    arith: Arith = field(default_factory=Arith)
    decontamination: Decontamination = field(default_factory=Decontamination)
    grade_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _require(len(self.train) > 0, "prepare.train", self.train, "list at least one training source")
        _require(len(self.eval) > 0, "prepare.eval", self.eval, "list at least one evaluation source")
        for key, sources in (("prepare.train", self.train), ("prepare.eval", self.eval)):
            names = [s.name for s in sources]
            _require(len(set(names)) == len(names), key, names, "source names must be unique")
            builtin = [s.name for s in sources if s.builtin]
            _require(len(builtin) <= 1, key, builtin, "use at most one builtin source per list")


@dataclass(frozen=True)
class Warmup:
    # Off: the base model passes through unchanged (the usual choice for a real checkpoint).
    enabled: bool = True
    max_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 128
    logging_steps: int = 50

    def __post_init__(self) -> None:
        _require(self.max_steps >= 1, "warmup.max_steps", self.max_steps, "use at least 1 step or enabled: false")
        _require(self.batch_size >= 1, "warmup.batch_size", self.batch_size, "use a positive batch size")
        _require(self.learning_rate > 0, "warmup.learning_rate", self.learning_rate, "use a positive rate")
        _require(0 <= self.warmup_ratio < 1, "warmup.warmup_ratio", self.warmup_ratio, "use a value in [0, 1)")


@dataclass(frozen=True)
class OneShot:
    question: str
    answer: str


@dataclass(frozen=True)
class Score:
    """GAIN-RL offline ranking: chat rendering for the angle pass, and the score weights."""

    system: str | None = None
    one_shot: OneShot | None = None
    batch_size: int = 64
    w_intra: float = 1.0
    w_inter: float = 1.0

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "score.batch_size", self.batch_size, "use a positive batch size")


@dataclass(frozen=True)
class GainRL:
    """Online GAIN-RL. null for sigma, n, delta_max: the reference values (1000, 500, 1000, tuned for
    about 5,000 prompts) scaled by N / 5000 for a set of N prompts."""

    sigma: float | None = None
    n: float | None = None
    alpha: float = 2.0
    beta: float = 0.5
    delta_min: float = 0.0
    delta_max: float | None = None
    mu0: float = 0.0

    def __post_init__(self) -> None:
        _require(self.sigma is None or self.sigma > 0, "train.gain_rl.sigma", self.sigma, "use sigma > 0 or null")
        _require(self.delta_max is None or self.delta_max >= self.delta_min, "train.gain_rl.delta_max",
                 self.delta_max, f"must be >= delta_min ({self.delta_min})")


@dataclass(frozen=True)
class Rollout:
    """Rollouts of the current policy over the training prompts (for difficulty and PROF)."""

    n_samples: int = 8
    # How many training prompts to roll out (the first ones in file order); null = all of them.
    max_prompts: int | None = 2000
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 256
    # Prompts per cached chunk: a killed run redoes at most one chunk.
    chunk_size: int = 250

    def __post_init__(self) -> None:
        _require(self.n_samples >= 1, "rollout.n_samples", self.n_samples, "use at least 1 sample")
        _require(self.max_prompts is None or self.max_prompts >= 1, "rollout.max_prompts", self.max_prompts,
                 "use a positive number or null for every training prompt")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "sampling needs temperature > 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "use a value in (0, 1]")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "use at least 1")
        _require(self.batch_size >= 1, "rollout.batch_size", self.batch_size, "use a positive batch size")
        _require(self.chunk_size >= 1, "rollout.chunk_size", self.chunk_size, "use a positive chunk size")


@dataclass(frozen=True)
class PRM:
    """The process reward model PROF uses (in `filter` and in `train`)."""

    # arith: the built-in task's exact step checker; otherwise a local folder or hub name of a
    # model in the Qwen2.5-Math-PRM format.
    name: str = "arith"
    trust_remote_code: bool = False
    separator: str = "<extra_0>"
    system: str | None = "Please reason step by step, and put your final answer within \\boxed{}."
    batch_size: int = 8
    max_length: int = 4096

    def __post_init__(self) -> None:
        _require(bool(self.name), "prm.name", self.name, "use arith or a model folder / hub name")
        _require(self.batch_size >= 1, "prm.batch_size", self.batch_size, "use a positive batch size")
        _require(self.max_length >= 16, "prm.max_length", self.max_length, "use at least 16 tokens")


@dataclass(frozen=True)
class Prof:
    """The PROF consistency rule (rlvr/prof.py): remove k of every group of n rollouts."""

    remove: int | None = None  # k; null = n // 2
    min_steps: int = 2
    max_steps: int = 30

    def __post_init__(self) -> None:
        _require(self.remove is None or self.remove >= 0, "prof.remove", self.remove, "use k >= 0 or null (n // 2)")
        _require(1 <= self.min_steps <= self.max_steps, "prof.min_steps", (self.min_steps, self.max_steps),
                 "need 1 <= min_steps <= max_steps")


@dataclass(frozen=True)
class Filter:
    """Which training prompts `train` uses: those whose rollout pass rate lies in the band."""

    pass_rate_min: float = 0.0
    pass_rate_max: float = 1.0

    def __post_init__(self) -> None:
        _require(0.0 <= self.pass_rate_min <= self.pass_rate_max <= 1.0, "filter.pass_rate_min",
                 (self.pass_rate_min, self.pass_rate_max), "need 0 <= pass_rate_min <= pass_rate_max <= 1")


TRAIN_ORDERS = ("gain_rl", "length", "random", "uniform")


@dataclass(frozen=True)
class Train:
    # gain_rl: GAIN-RL dynamic sampling over the `score` ranking; length: shortest question first;
    # random: a seeded fixed permutation; uniform: TRL's default reshuffling.
    order: str = "uniform"
    max_steps: int = 150
    prompts_per_step: int = 32
    num_generations: int = 8
    learning_rate: float = 5e-5
    lr_scheduler: str = "constant"
    beta: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 48
    loss_type: str = "dapo"
    save_steps: int = 50
    logging_steps: int = 5
    use_vllm: bool = False
    gain_rl: GainRL = field(default_factory=GainRL)
    # all: every training prompt; band: those the `filter` stage kept (pass rate in its band).
    prompts: str = "all"
    # PROF inside the GRPO loop: filter each group before advantages (rule and PRM: prof, prm).
    prof: bool = False
    # accuracy: the grader's 1/0; blend: accuracy + blend_weight x process value (PROF's baseline).
    reward: str = "accuracy"
    blend_weight: float = 0.8

    def __post_init__(self) -> None:
        _require(self.order in TRAIN_ORDERS, "train.order", self.order, f"use one of {list(TRAIN_ORDERS)}")
        _require(self.num_generations >= 2, "train.num_generations", self.num_generations,
                 "GRPO needs at least 2 generations per prompt to compute group advantages")
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, "use 0 (no training) or more steps")
        _require(self.prompts_per_step >= 1, "train.prompts_per_step", self.prompts_per_step, "use at least 1")
        _require(self.learning_rate >= 0, "train.learning_rate", self.learning_rate, "use a rate >= 0")
        _require(self.temperature > 0, "train.temperature", self.temperature, "sampling needs temperature > 0")
        _require(self.save_steps >= 1, "train.save_steps", self.save_steps, "use a positive interval")
        _require(self.prompts in ("all", "band"), "train.prompts", self.prompts, "use all or band")
        _require(self.reward in ("accuracy", "blend"), "train.reward", self.reward, "use accuracy or blend")
        _require(self.blend_weight >= 0, "train.blend_weight", self.blend_weight, "use a weight >= 0")


@dataclass(frozen=True)
class Evaluate:
    benchmarks: tuple[str, ...] = ("arith",)
    n_samples: int = 8
    ks: tuple[int, ...] = (1, 2, 4, 8)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 256
    # Per benchmark other than the built-in one: a fixed subset of this many problems (chosen by a
    # hash of the problem id, so it does not move when files are reordered); null = the full set.
    subset_size: int | None = 32
    greedy: bool = True
    # Also evaluate the warm-up model with the same settings and report the paired difference.
    baseline: bool = True
    n_bootstrap: int = 1000
    backend: str = "auto"
    grade_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _require(self.n_samples >= 1, "evaluate.n_samples", self.n_samples, "use at least 1 sample")
        _require(len(self.ks) > 0 and all(1 <= k <= self.n_samples for k in self.ks), "evaluate.ks",
                 self.ks, f"every k must be in [1, n_samples={self.n_samples}]")
        _require(self.temperature > 0, "evaluate.temperature", self.temperature,
                 "sampling needs temperature > 0 (greedy accuracy is reported by greedy: true)")
        _require(0 < self.top_p <= 1, "evaluate.top_p", self.top_p, "use a value in (0, 1]")
        _require(self.max_new_tokens >= 1, "evaluate.max_new_tokens", self.max_new_tokens, "use at least 1")
        _require(self.subset_size is None or self.subset_size >= 1, "evaluate.subset_size", self.subset_size,
                 "use a positive size or null for the full sets")
        _require(self.backend in ("auto", "transformers", "vllm"), "evaluate.backend", self.backend,
                 "use auto, transformers or vllm")
        _require(self.n_bootstrap >= 100, "evaluate.n_bootstrap", self.n_bootstrap, "use at least 100 resamples")


@dataclass(frozen=True)
class Retrain:
    """Scheduled retraining (flows/retrain.py): what is compared, and when it runs."""

    registered_model: str = "rlvr-policy"
    benchmark: str = "arith"
    metric: str = "pass_at_1"       # a key of metrics/eval.json[benchmark]
    min_improvement: float = 0.01   # the champion alias moves only for at least this gain
    cron: str = "0 3 * * *"         # five-field cron, server time zone
    deployment: str = "nightly"

    def __post_init__(self) -> None:
        _require(bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.registered_model)), "retrain.registered_model",
                 self.registered_model, "use letters, digits, '.', '_' or '-'")
        _require(len(self.cron.split()) == 5, "retrain.cron", self.cron,
                 "use five cron fields: minute hour day-of-month month day-of-week")
        _require(self.min_improvement >= 0, "retrain.min_improvement", self.min_improvement, "use a value >= 0")


@dataclass(frozen=True)
class Tracking:
    experiment: str = "rlvr-pipeline"
    # null: SQLite under the project root (mlruns/mlflow.db); MLFLOW_TRACKING_URI overrides both.
    uri: str | None = None


@dataclass(frozen=True)
class Params:
    seed: int
    model: Model
    prompt: Prompt
    prepare: Prepare
    warmup: Warmup
    score: Score
    train: Train
    evaluate: Evaluate
    rollout: Rollout = field(default_factory=Rollout)
    prm: PRM = field(default_factory=PRM)
    prof: Prof = field(default_factory=Prof)
    filter: Filter = field(default_factory=Filter)
    tracking: Tracking = field(default_factory=Tracking)
    retrain: Retrain = field(default_factory=Retrain)

    def __post_init__(self) -> None:
        eval_names = {s.name for s in self.prepare.eval}
        unknown = [b for b in self.evaluate.benchmarks if b not in eval_names]
        _require(not unknown, "evaluate.benchmarks", list(self.evaluate.benchmarks),
                 f"{unknown} not among prepare.eval sources {sorted(eval_names)}")
        _require(self.retrain.benchmark in self.evaluate.benchmarks, "retrain.benchmark", self.retrain.benchmark,
                 f"must be one of evaluate.benchmarks {list(self.evaluate.benchmarks)}")
        known = [f"pass_at_{k}" for k in self.evaluate.ks] + ["greedy_accuracy", "delta_pass_at_1"]
        _require(self.retrain.metric in known, "retrain.metric", self.retrain.metric, f"use one of {known}")
        _require(self.prof.remove is None or self.prof.remove <= self.train.num_generations, "prof.remove",
                 self.prof.remove, f"cannot remove more than train.num_generations ({self.train.num_generations})")
        _require(self.warmup.enabled or not self.model.is_builtin, "warmup.enabled", self.warmup.enabled,
                 "the builtin model starts untrained; keep warmup enabled or set model.name to a real model")


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
            raise ConfigError(f"params: {key + '.' if key else ''}{name} is missing: add it to params.yaml")
    return cls(**kwargs)


def from_dict(data: dict) -> Params:
    return _build(Params, data, "")


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    try:
        return from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


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
