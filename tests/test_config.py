import copy

import pytest
import yaml

from rlvr import config
from rlvr.config import ConfigError
from tests.conftest import ROOT, real_params_dict


def test_real_params_load():
    params = config.load(ROOT / "params.yaml")
    assert params.model.is_builtin
    assert params.warmup.enabled
    assert set(params.evaluate.benchmarks) <= {s.name for s in params.prepare.eval}


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


def _with(change) -> dict:
    data = copy.deepcopy(real_params_dict())
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["warmup"].update(max_step=3), r"warmup\.max_step.*unknown key.*max_steps"),
        (lambda d: d.update(extra=1), r"extra.*unknown key"),
        (lambda d: d["evaluate"].update(ks=[1, 16]), r"evaluate\.ks.*n_samples=8"),
        (lambda d: d["evaluate"].update(temperature=0), r"evaluate\.temperature"),
        (lambda d: d["evaluate"].update(benchmarks=["aime24"]), r"evaluate\.benchmarks.*aime24"),
        (lambda d: d["evaluate"].update(n_samples="8"), r"evaluate\.n_samples.*expected an integer"),
        (lambda d: d["warmup"].update(learning_rate="2e-3"), r"warmup\.learning_rate.*expected a number"),
        (lambda d: d["warmup"].update(enabled=False), r"warmup\.enabled.*builtin model"),
        (lambda d: d["prepare"]["train"].append({"name": "x", "path": "a.jsonl", "hub": "b"}), r"exactly one"),
        (lambda d: d["prepare"]["train"].append({"name": "Bad Name", "builtin": True, "size": 3}), r"lowercase"),
        (lambda d: d["prepare"]["eval"].append({"name": "f", "path": "f.jsonl"}), r"problem_field"),
        (lambda d: d["prepare"]["arith"].update(min_ops=4), r"prepare\.arith\.min_ops"),
        (lambda d: d["model"]["builtin"].update(num_heads=3), r"hidden_size.*num_heads"),
        (lambda d: d.pop("evaluate"), r"evaluate is missing"),
        (lambda d: d["prepare"].update(eval=[]), r"prepare\.eval"),
        (lambda d: d["filter"].update(pass_rate_min=0.8, pass_rate_max=0.2), r"filter\.pass_rate_min"),
        (lambda d: d["prof"].update(remove=9), r"prof\.remove.*num_generations"),
        (lambda d: d["prof"].update(min_steps=0), r"prof\.min_steps"),
        (lambda d: d["train"].update(reward="process"), r"train\.reward.*accuracy or blend"),
        (lambda d: d["train"].update(prompts="hard"), r"train\.prompts"),
        (lambda d: d["rollout"].update(max_prompts=0), r"rollout\.max_prompts"),
    ],
)
def test_bad_params_name_key_value_and_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict(_with(change))


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_with(lambda d: d["warmup"].update(max_step=3))))
    with pytest.raises(ConfigError, match=str(bad)):
        config.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "broken.yaml")


def test_params_are_frozen():
    params = config.load(ROOT / "params.yaml")
    with pytest.raises(AttributeError):
        params.seed = 1


def test_flat_dict_names_sources():
    flat = config.to_flat_dict(config.load(ROOT / "params.yaml").prepare, "prepare.")
    assert flat["prepare.arith.max_ops"] == 3
    assert flat["prepare.eval.math500.path"].endswith("math500/test.jsonl")
