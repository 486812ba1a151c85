"""params.yaml loading: the real file, every range / choice / cross-field rule, defaults, input paths."""

import copy
import dataclasses
import math
import re
import typing

import pytest
import torch
import yaml

from rlvr import config, data
from rlvr.config import ConfigError
from tests.conftest import ROOT, real_params_dict


def test_real_params_load():
    params = config.load(ROOT / "params.yaml")
    assert params.model.is_builtin
    assert params.warmup.enabled
    assert set(params.evaluate.benchmarks) <= {s.name for s in params.prepare.eval}
    assert params.grading == config.Grading(timeout_s=10.0, workers=2)


def test_real_params_pass_the_preflight_check():
    assert config.check(ROOT / "params.yaml", ROOT) == config.load(ROOT / "params.yaml")


def test_every_params_section_named_in_dvc_yaml_exists():
    params = config.load(ROOT / "params.yaml")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    named = [p for spec in stages.values() for p in spec.get("params", [])]
    assert named, "dvc.yaml declares no params"
    for dotted in named:
        value = params
        for part in dotted.split("."):
            assert hasattr(value, part), f"dvc.yaml names params section {dotted!r}, missing in params.yaml"
            value = getattr(value, part)


def test_every_stage_that_grades_depends_on_the_grading_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    grading = {name for name in stages if "params.grading." in (ROOT / f"stages/{name}.py").read_text()}
    assert grading == {"prepare", "rollout", "train", "evaluate"}
    for name, spec in stages.items():
        assert ("grading" in spec.get("params", [])) == (name in grading), name
        assert not [p for p in spec.get("params", []) if "grade_timeout" in p], name


# ------------------------------------------------------------------------------------------------
# One table of bad params: (changes, dotted key named, value named, what is allowed).

def _set(data: dict, dotted: str, value: object) -> None:
    """Set `a.b[2].c` in nested dicts and lists."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", dotted)]
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _with(changes: dict) -> dict:
    data = copy.deepcopy(real_params_dict())
    for dotted, value in changes.items():
        _set(data, dotted, value)
    return data


GRADES = r"use one of \['grpo'"
BAD = [
    # the cases issue 9 found, all accepted before
    ({"evaluate.batch_size": 0}, "evaluate.batch_size", 0, r"use a value >= 1"),
    ({"grading.timeout_s": 0.0}, "grading.timeout_s", 0.0, r"use a value > 0"),
    ({"warmup.max_length": 0}, "warmup.max_length", 0, r"use a value >= 1"),
    ({"train.max_completion_length": 0}, "train.max_completion_length", 0, r"use a value >= 1"),
    ({"train.max_completion_length": -1}, "train.max_completion_length", -1, r"use a value >= 1"),
    ({"train.loss_type": "dapoo"}, "train.loss_type", "dapoo", GRADES + r".*'dapo'"),
    ({"train.lr_scheduler": "cosin"}, "train.lr_scheduler", "cosin", r"use one of \[.*'cosine'"),
    ({"prepare.eval[2].preset": "gsm8kk"}, "prepare.eval[2].preset", "gsm8kk", r"use one of \[.*'gsm8k'"),
    ({"prof.remove": 6, "rollout.n_samples": 4}, "prof.remove", 6, r"below rollout\.n_samples \(4\)"),
    ({"train.gain_rl.n": -5.0}, "train.gain_rl.n", -5.0, r"fractions of N .* use a value in \(0, 1\]"),
    # grading
    ({"grading.timeout_s": -1.0}, "grading.timeout_s", -1.0, r"> 0"),
    ({"grading.workers": 0}, "grading.workers", 0, r">= 1"),
    # prepare
    ({"prepare.train[0].size": 0}, "prepare.train[0].size", 0, r"size: N > 0"),
    ({"prepare.eval[1].limit": 0}, "prepare.eval[1].limit", 0, r">= 1"),
    ({"prepare.eval[1].split": " "}, "prepare.eval[1].split", " ", r"name a split"),
    ({"prepare.decontamination.ngram": 0}, "prepare.decontamination.ngram", 0, r">= 1"),
    ({"prepare.decontamination.max_contaminated_frac": 1.5}, "prepare.decontamination.max_contaminated_frac", 1.5,
     r"\[0, 1\]"),
    ({"prepare.arith.max_digits": 10}, "prepare.arith.min_digits", (1, 10), r"max_digits <= 9"),
    # model
    ({"model.name": " "}, "model.name", " ", r"builtin, a model folder or a hub name"),
    ({"model.builtin.num_layers": 0}, "model.builtin.num_layers", 0, r">= 1"),
    ({"model.builtin.hidden_size": 130}, "model.builtin.hidden_size", 130, r"divisible by num_heads \(4\)"),
    ({"model.builtin.max_positions": 64}, "warmup.max_length", 128, r"model\.builtin\.max_positions \(64\)"),
    ({"evaluate.max_new_tokens": 2048}, "evaluate.max_new_tokens", 2048, r"below model\.builtin\.max_positions"),
    ({"seed": -1}, "seed", -1, r"\[0, 4294967295\]"),
    # warmup
    ({"warmup.max_steps": 0}, "warmup.max_steps", 0, r"at least 1 step"),
    ({"warmup.batch_size": 0}, "warmup.batch_size", 0, r">= 1"),
    ({"warmup.learning_rate": 0.0}, "warmup.learning_rate", 0.0, r"> 0"),
    ({"warmup.lr_scheduler": "cosine_with_min_lr"}, "warmup.lr_scheduler", "cosine_with_min_lr", r"use one of"),
    ({"warmup.warmup_ratio": 1.0}, "warmup.warmup_ratio", 1.0, r"\[0, 1\)"),
    ({"warmup.weight_decay": -0.1}, "warmup.weight_decay", -0.1, r">= 0"),
    ({"warmup.logging_steps": 0}, "warmup.logging_steps", 0, r">= 1"),
    # score
    ({"score.batch_size": 0}, "score.batch_size", 0, r">= 1"),
    ({"score.w_intra": -1.0}, "score.w_intra", -1.0, r">= 0"),
    ({"score.w_intra": 0.0, "score.w_inter": 0.0}, "score.w_intra + score.w_inter", 0.0, r"at least one weight"),
    ({"score.one_shot.question": ""}, "score.one_shot.question", "", r"non-empty"),
    # rollout
    ({"rollout.n_samples": 0}, "rollout.n_samples", 0, r">= 1"),
    ({"rollout.max_prompts": 0}, "rollout.max_prompts", 0, r"positive number or null"),
    ({"rollout.temperature": 0.0}, "rollout.temperature", 0.0, r"temperature > 0"),
    ({"rollout.top_p": 0.0}, "rollout.top_p", 0.0, r"\(0, 1\]"),
    ({"rollout.top_p": 1.5}, "rollout.top_p", 1.5, r"\(0, 1\]"),
    ({"rollout.max_new_tokens": 0}, "rollout.max_new_tokens", 0, r">= 1"),
    ({"rollout.batch_size": 0}, "rollout.batch_size", 0, r">= 1"),
    ({"rollout.chunk_size": 0}, "rollout.chunk_size", 0, r">= 1"),
    # prm, prof, filter
    ({"prm.name": ""}, "prm.name", "", r"arith or a model folder"),
    ({"prm.separator": ""}, "prm.separator", "", r"separator token"),
    ({"prm.batch_size": 0}, "prm.batch_size", 0, r">= 1"),
    ({"prm.max_length": 8}, "prm.max_length", 8, r"at least 16"),
    ({"prof.remove": -1}, "prof.remove", -1, r"k >= 0 or null"),
    ({"prof.remove": 5, "train.num_generations": 4}, "prof.remove", 5, r"below train\.num_generations \(4\)"),
    ({"prof.min_steps": 0}, "prof.min_steps", (0, 30), r"1 <= min_steps <= max_steps"),
    ({"prof.min_steps": 31}, "prof.min_steps", (31, 30), r"1 <= min_steps <= max_steps"),
    ({"filter.pass_rate_min": -0.1}, "filter.pass_rate_min", -0.1, r"\[0, 1\]"),
    ({"filter.pass_rate_max": 1.5}, "filter.pass_rate_max", 1.5, r"\[0, 1\]"),
    ({"filter.pass_rate_min": 0.8, "filter.pass_rate_max": 0.2}, "filter.pass_rate_min", (0.8, 0.2),
     r"pass_rate_min <= pass_rate_max"),
    # train
    ({"train.order": "hardest"}, "train.order", "hardest",
     r"use one of \['gain_rl', 'length', 'random', 'uniform', 'online_difficulty', 'dump'\]"),
    ({"train.prompts": "hard"}, "train.prompts", "hard", r"use one of \['all', 'band', 'one_shot'\]"),
    ({"train.filters": ["dapo"]}, "train.filters", ["dapo"], r"unknown \['dapo'\]"),
    ({"train.filters": ["prof", "dynamic_sampling"]}, "train.filters", ["prof", "dynamic_sampling"],
     r"put dynamic_sampling first"),
    ({"train.filters": ["prof"], "train.prof": True}, "train.filters", ["prof"], r"PROF is on twice"),
    ({"curation.dump.temperature": 0.0}, "curation.dump.temperature", 0.0, r"use a value > 0"),
    ({"curation.online_difficulty.high": 1.5}, "curation.online_difficulty.high", 1.5, r"in \[0, 1\]"),
    ({"curation.one_shot.m": 0}, "curation.one_shot.m", 0, r"integer >= 1"),
    ({"curation.dynamic_sampling.max_extra_rounds": -1}, "curation.dynamic_sampling.max_extra_rounds", -1,
     r"integer >= 0"),
    ({"train.reward": "process"}, "train.reward", "process", r"use one of \['accuracy', 'blend'\]"),
    ({"train.max_steps": -1}, "train.max_steps", -1, r"0 \(no training\) or more"),
    ({"train.prompts_per_step": 0}, "train.prompts_per_step", 0, r">= 1"),
    ({"train.num_generations": 1}, "train.num_generations", 1, r"at least 2 generations"),
    ({"train.learning_rate": 0.0}, "train.learning_rate", 0.0, r"> 0"),
    ({"train.learning_rate": math.inf}, "train.learning_rate", math.inf, r"expected a finite number"),
    ({"train.beta": -0.1}, "train.beta", -0.1, r">= 0"),
    ({"train.temperature": 0.0}, "train.temperature", 0.0, r"temperature > 0"),
    ({"train.top_p": 2.0}, "train.top_p", 2.0, r"\(0, 1\]"),
    ({"train.save_steps": 0}, "train.save_steps", 0, r">= 1"),
    ({"train.logging_steps": 0}, "train.logging_steps", 0, r">= 1"),
    ({"train.blend_weight": -1.0}, "train.blend_weight", -1.0, r">= 0"),
    ({"train.gain_rl.sigma": 0.0}, "train.gain_rl.sigma", 0.0, r"use a value in \(0, 1\]"),
    # the reference's rank positions, now rejected: sigma, n and the delta bounds are fractions of N
    ({"train.gain_rl.sigma": 1000.0}, "train.gain_rl.sigma", 1000.0,
     r"fractions of N \(the number of ranked prompts\) now, not rank positions; use a value in \(0, 1\]"),
    ({"train.gain_rl.n": 500.0}, "train.gain_rl.n", 500.0, r"fractions of N"),
    ({"train.gain_rl.delta_max": 1000.0}, "train.gain_rl.delta_max", 1000.0, r"fractions of N.*\[0, 1\]"),
    ({"train.gain_rl.delta_min": -0.1}, "train.gain_rl.delta_min", -0.1, r"fractions of N.*\[0, 1\]"),
    ({"train.gain_rl.at_end": "restart"}, "train.gain_rl.at_end", "restart", r"use one of \['stay', 'uniform'\]"),
    ({"train.gain_rl.alpha": 0.0}, "train.gain_rl.alpha", 0.0, r"> 0"),
    ({"train.gain_rl.beta": 1.5}, "train.gain_rl.beta", 1.5, r"\[0, 1\]"),
    ({"train.gain_rl.mu0": -1.0}, "train.gain_rl.mu0", -1.0, r">= 0"),
    ({"train.gain_rl.delta_min": 0.05, "train.gain_rl.delta_max": 0.02}, "train.gain_rl.delta_max", 0.02,
     r">= delta_min \(0\.05\)"),
    # evaluate
    ({"evaluate.benchmarks": []}, "evaluate.benchmarks", [], r"at least one"),
    ({"evaluate.benchmarks": ["arith", "arith"]}, "evaluate.benchmarks", ["arith", "arith"], r"each benchmark once"),
    ({"evaluate.benchmarks": ["aime24"]}, "evaluate.benchmarks", ["aime24"], r"not among prepare\.eval sources"),
    ({"evaluate.n_samples": 0}, "evaluate.n_samples", 0, r">= 1"),
    ({"evaluate.ks": [1, 16]}, "evaluate.ks", [1, 16], r"\[1, n_samples=8\]"),
    ({"evaluate.ks": [1, 1, 2]}, "evaluate.ks", [1, 1, 2], r"each k once"),
    ({"evaluate.temperature": math.nan}, "evaluate.temperature", math.nan, r"expected a finite number"),
    ({"evaluate.top_p": 0.0}, "evaluate.top_p", 0.0, r"\(0, 1\]"),
    ({"evaluate.subset_size": 0}, "evaluate.subset_size", 0, r"positive size or null"),
    ({"evaluate.backend": "tpu"}, "evaluate.backend", "tpu", r"use one of \['auto', 'transformers', 'vllm'\]"),
    ({"evaluate.n_bootstrap": 10}, "evaluate.n_bootstrap", 10, r"at least 100"),
    # retrain, tracking
    ({"retrain.benchmark": "gsm8kk"}, "retrain.benchmark", "gsm8kk", r"one of evaluate\.benchmarks"),
    ({"retrain.metric": "pass_at_16"}, "retrain.metric", "pass_at_16", r"use one of \['pass_at_1'"),
    ({"retrain.metric": "delta_pass_at_1", "evaluate.baseline": False}, "retrain.metric", "delta_pass_at_1",
     r"delta_pass_at_1 evaluate\.baseline"),
    ({"retrain.min_improvement": -0.1}, "retrain.min_improvement", -0.1, r">= 0"),
    ({"retrain.cron": "daily"}, "retrain.cron", "daily", r"five cron fields"),
    ({"retrain.timezone": "CET+1"}, "retrain.timezone", "CET+1", r"IANA time zone name"),
    ({"retrain.registered_model": "my model"}, "retrain.registered_model", "my model", r"letters, digits"),
    ({"retrain.deployment": ""}, "retrain.deployment", "", r"name the Prefect deployment"),
    ({"tracking.experiment": ""}, "tracking.experiment", "", r"name the MLflow experiment"),
    # types
    ({"evaluate.n_samples": "8"}, "evaluate.n_samples", "8", r"expected an integer"),
    ({"warmup.learning_rate": "2e-3"}, "warmup.learning_rate", "2e-3", r"expected a number"),
    ({"warmup.enabled": "yes"}, "warmup.enabled", "yes", r"expected true or false"),
    ({"grading.workers": 2.0}, "grading.workers", 2.0, r"expected an integer"),
    # model.dtype, train.vllm_*, launch (issue 11)
    ({"model.dtype": "fp16"}, "model.dtype", "fp16", r"use one of \['auto', 'bf16', 'fp32'\]"),
    ({"train.vllm_mode": "remote"}, "train.vllm_mode", "remote", r"use one of \['colocate', 'server'\]"),
    ({"train.vllm_server_host": " "}, "train.vllm_server_host", " ", r"name the vLLM server's host"),
    ({"train.vllm_server_port": 0}, "train.vllm_server_port", 0, r"TCP port in \[1, 65535\]"),
    ({"launch.processes": 0}, "launch.processes", 0, r"use a value >= 1"),
    ({"launch.machines": 0}, "launch.machines", 0, r"use a value >= 1"),
    ({"launch.main_port": 70000}, "launch.main_port", 70000, r"TCP port in \[1, 65535\]"),
    ({"launch.machines": 2}, "launch.main_port", None, r"launch\.machines = 2 needs a fixed rendezvous port"),
    ({"launch.main_address": ""}, "launch.main_address", "", r"or null to take it from \$MASTER_ADDR"),
    ({"launch.accelerate_config": "configs/accelerate/ddp"}, "launch.accelerate_config", "configs/accelerate/ddp",
     r"\.yaml, \.yml or \.json"),
    ({"launch.mixed_precision": "fp8"}, "launch.mixed_precision", "fp8", r"use one of \['auto', 'no', 'bf16', 'fp16'\]"),
    ({"launch.mixed_precision": "fp16"}, "launch.mixed_precision", "fp16", r"fp16 mixed precision needs fp32 weights"),
    ({"train.filters": ["dynamic_sampling"], "launch.processes": 2}, "train.filters", ["dynamic_sampling"],
     r"extra rounds run on one process only"),
]


def test_the_bad_params_table_is_big_enough():
    assert len(BAD) >= 40
    assert len({key for _, key, _, _ in BAD}) >= 40


@pytest.mark.parametrize(("changes", "key", "value", "allowed"), BAD, ids=[f"{k}={v!r}" for _, k, v, _ in BAD])
def test_bad_params_name_key_value_and_what_is_allowed(changes, key, value, allowed):
    with pytest.raises(ConfigError) as caught:
        config.from_dict(_with(changes))
    message = str(caught.value)
    assert message.startswith(f"{key} = {value!r}: "), message
    assert re.search(allowed, message), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["warmup"].update(max_step=3), r"^warmup\.max_step = 3: unknown key.*max_steps"),
        (lambda d: d.update(extra=1), r"^extra = 1: unknown key"),
        (lambda d: d["prepare"].update(grade_timeout_s=10.0), r"^prepare\.grade_timeout_s = 10\.0: unknown key"),
        (lambda d: d["evaluate"].update(grade_timeout_s=10.0), r"^evaluate\.grade_timeout_s = 10\.0: unknown key"),
        (lambda d: d.pop("evaluate"), r"^evaluate is missing: add it"),
        (lambda d: d.pop("grading"), r"^grading is missing: add it"),
        (lambda d: d["train"].pop("loss_type"), r"^train\.loss_type is missing: add it"),
        (lambda d: d["warmup"].update(enabled=False), r"^warmup\.enabled = False:.*builtin model"),
        (lambda d: d["prepare"]["train"].append({"name": "x", "path": "a.jsonl", "hub": "b"}),
         r"^prepare\.train\[1\] = \['path', 'hub'\]: set exactly one"),
        (lambda d: d["prepare"]["train"].append({"name": "Bad Name", "builtin": True, "size": 3}),
         r"^prepare\.train\[1\]\.name = 'Bad Name': use lowercase"),
        (lambda d: d["prepare"]["eval"].append({"name": "f", "path": "f.jsonl"}),
         r"^prepare\.eval\[3\]\.preset = 'generic': .*problem_field"),
        (lambda d: d["prepare"]["eval"].append({"name": "math500", "path": "f.jsonl", "preset": "math500"}),
         r"^prepare\.eval = .*source names must be unique"),
        (lambda d: d["prepare"].update(eval=[]), r"^prepare\.eval = \(\): list at least one"),
    ],
)
def test_structural_errors_name_the_key(change, message):
    raw = copy.deepcopy(real_params_dict())
    change(raw)
    with pytest.raises(ConfigError, match=message):
        config.from_dict(raw)


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_with({"evaluate.batch_size": 0})))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: evaluate\.batch_size = 0: "):
        config.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        config.load(tmp_path / "broken.yaml")
    assert "\n" not in str(caught.value)


def test_params_are_frozen():
    params = config.load(ROOT / "params.yaml")
    with pytest.raises(AttributeError):
        params.seed = 1


def test_flat_dict_names_sources():
    flat = config.to_flat_dict(config.load(ROOT / "params.yaml").prepare, "prepare.")
    assert flat["prepare.arith.max_ops"] == 3
    assert flat["prepare.eval.math500.path"].endswith("math500/test.jsonl")


# ------------------------------------------------------------------------------------------------
# Defaults: only genuinely optional keys have one, and none contradicts params.yaml.

# null / off / empty means "not used" or "derived"; everything else params.yaml must state.
OPTIONAL = {
    "model.trust_remote_code", "prompt.system", "prompt.suffix", "prm.trust_remote_code", "prof.remove",
    "tracking.uri",
}


def _defaults(cls: type, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default of every field of `cls` and its nested sections (not list items)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        assert f.default_factory is dataclasses.MISSING, f"{key}: a section is never optional"
        if f.default is not dataclasses.MISSING:
            out[key] = f.default
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_defaults(hints[f.name], f"{key}."))
    return out


def test_only_optional_keys_have_defaults():
    assert set(_defaults(config.Params)) == OPTIONAL


def test_defaults_equal_params_yaml_where_both_exist():
    raw = real_params_dict()
    for key, default in _defaults(config.Params).items():
        node = raw
        for part in key.split("."):
            node = node[part]
        assert node == default, f"{key}: dataclass default {default!r} but params.yaml has {node!r}"


def test_source_defaults_describe_an_absent_key():
    # list items: a default applies to a source that omits the key; it must mean "not set"
    defaults = {f.name: f.default for f in dataclasses.fields(config.Source) if f.name != "name"}
    assert defaults["builtin"] is False and defaults["preset"] == "generic" and defaults["split"] == "train"
    assert {k for k, v in defaults.items() if v is None} >= {"size", "path", "hub", "limit", "problem_field"}


# ------------------------------------------------------------------------------------------------
# Allowed values are defined once and match what the libraries accept.

def test_presets_are_the_data_dispatch_table():
    with pytest.raises(ConfigError, match=re.escape(str(sorted(data.PRESETS)))):
        config.from_dict(_with({"prepare.eval[1].preset": "nope"}))


def test_lr_schedulers_run_with_the_arguments_we_pass():
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    assert set(config.LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    for name in config.LR_SCHEDULERS:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        assert math.isfinite(scheduler.get_last_lr()[0]), name
    # left out on purpose: they need arguments params.yaml has no place for
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="min_lr"):
        get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=1, num_training_steps=10)


def test_loss_types_are_those_trl_supports():
    from trl import GRPOConfig

    help_text = next(f for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type").metadata["help"]
    supported = set(re.findall(r"'(\w+)'", help_text.split("Supported values are", 1)[1].split(". ", 1)[0]))
    assert set(config.LOSS_TYPES) <= supported, f"TRL no longer supports {set(config.LOSS_TYPES) - supported}"


# ------------------------------------------------------------------------------------------------
# Input paths (the pre-flight check).

@pytest.mark.parametrize(
    ("name", "local"),
    [("builtin", False), ("Qwen/Qwen2.5-Math-1.5B", False), ("gpt2", False), ("models/foo", True),
     ("./x", True), ("../x", True), ("/abs/model", True), ("~/model", True), ("a/b/c", True),
     ("org/name with space", True), ("data", True)],
)
def test_looks_like_local_path(name, local):
    # under ROOT, models/ and data/ exist, so models/foo is a local path and data is one
    assert config.looks_like_local_path(name, ROOT) is local


def _project(tmp_path, changes: dict) -> config.Params:
    (tmp_path / "models/warmup").mkdir(parents=True)
    (tmp_path / "models/warmup/config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/test.jsonl").write_text("{}\n")
    raw = _with({"prepare.eval[1].path": "data/test.jsonl", "prepare.eval[2].path": "data/test.jsonl", **changes})
    return config.from_dict(raw)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prepare.eval[2].path": "data/missing.jsonl"},
         r"^prepare\.eval\[2\]\.path = 'data/missing\.jsonl': no such file"),
        ({"model.name": "models/foo", "warmup.enabled": False}, r"^model\.name = 'models/foo': no such model folder"),
        ({"model.name": "./local", "warmup.enabled": False}, r"^model\.name = '\./local': no such model folder"),
        ({"model.name": "data", "warmup.enabled": False}, r"^model\.name = 'data': not a model folder"),
        ({"prm.name": "models/prm"}, r"^prm\.name = 'models/prm': no such model folder"),
    ],
)
def test_check_paths_names_the_missing_input(tmp_path, changes, message):
    params = _project(tmp_path, changes)
    with pytest.raises(ConfigError, match=message):
        config.check_paths(params, tmp_path)


def test_check_paths_accepts_existing_inputs_and_leaves_hub_ids_alone(tmp_path):
    config.check_paths(_project(tmp_path, {}), tmp_path)
    config.check_paths(_project(tmp_path / "b", {"model.name": "models/warmup", "warmup.enabled": False}),
                       tmp_path / "b")
    config.check_paths(_project(tmp_path / "c", {"model.name": "org/name", "warmup.enabled": False,
                                                 "prm.name": "Qwen/Qwen2.5-Math-PRM-7B"}), tmp_path / "c")


def test_check_names_the_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_with({"prepare.eval[1].path": "nowhere.jsonl"})))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: prepare\.eval\[1\]\.path = 'nowhere"):
        config.check(path, tmp_path)
