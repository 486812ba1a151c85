"""configs/recipes and configs/accelerate: every recipe validates, dry-runs, and reaches DVC unchanged;
every accelerate preset loads with accelerate's own loader."""

from __future__ import annotations

import shutil

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

from flows import cli, launch, recipe
from rlvr import config
from stages.train import per_device_rollouts
from tests.conftest import ROOT

RECIPES = recipe.available(ROOT)
PRESETS = {"ddp": (DistributedType.MULTI_GPU, None), "zero2": (DistributedType.DEEPSPEED, 2),
           "zero3": (DistributedType.DEEPSPEED, 3), "fsdp2": (DistributedType.FSDP, None)}


def test_the_issue_s_layouts_are_all_there():
    assert len(RECIPES) >= 3
    layouts = {name: recipe.resolve(recipe.load(name, ROOT), ROOT / "params.yaml")[0] for name in RECIPES}
    launches = [(d["launch"], d["train"]) for d in layouts.values()]
    assert any(l["machines"] == 1 and l["processes"] == 8 and t["vllm_mode"] == "colocate" for l, t in launches)
    assert any(str(l["accelerate_config"]).endswith("zero3.yaml") and t["vllm_mode"] == "server" for l, t in launches)
    assert any(l["machines"] > 1 for l, _ in launches)
    assert sorted(p.name for p in (ROOT / "configs/recipes/slurm").iterdir()) == ["multinode.sbatch"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_accelerate_preset_loads_with_accelerate_s_loader(name):
    loaded = load_config_from_file(str(ROOT / f"configs/accelerate/{name}.yaml"))
    distributed, zero_stage = PRESETS[name]
    assert isinstance(loaded, ClusterConfig) and loaded.distributed_type == distributed
    assert loaded.mixed_precision == "bf16" and not loaded.use_cpu
    if zero_stage is not None:
        assert loaded.deepspeed_config["zero_stage"] == zero_stage
    if name == "fsdp2":
        assert loaded.fsdp_config["fsdp_version"] == 2


def test_there_is_no_preset_the_test_does_not_know():
    assert sorted(p.stem for p in (ROOT / "configs/accelerate").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_dry_runs_with_the_command_of_every_stage(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert cli.main(["recipe", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    print(out)  # pytest -s shows every recipe's dry run
    data, changes = recipe.resolve(recipe.load(name, ROOT), ROOT / "params.yaml")
    params = config.from_dict(data)
    assert f"recipe {name}: " in out and f"dvc exp run --name recipe-{name} -S " in out
    for key, _, _ in changes:
        assert f"  {key} " in out
    for stage in recipe.STAGES:
        line = next(line for line in out.splitlines() if line.startswith(f"  {stage} "))
        if stage in launch.STAGES:
            assert f"-m flows {stage} --params params.yaml --worker-result METRICS_FILE" in line
            assert f"--num_processes {params.launch.world_size} --num_machines {params.launch.machines}" in line
        else:
            assert line.endswith("(in-process)")
    # the accelerate file exists and the batch splits over the processes (checked again when train starts)
    assert (ROOT / params.launch.accelerate_config).is_file()
    t = params.train
    assert per_device_rollouts(t.prompts_per_step, t.num_generations, params.launch.world_size) >= 1
    # the data a recipe names is in the repository
    for source in (*params.prepare.train, *params.prepare.eval):
        assert source.path is None or (ROOT / source.path).is_file(), source.path


@pytest.mark.parametrize("name", RECIPES)
def test_dvc_applies_a_recipe_s_overrides_to_exactly_the_resolved_params(name, tmp_path):
    from dvc.utils.hydra import apply_overrides

    chosen = recipe.load(name, ROOT)
    copy = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", copy)
    apply_overrides(copy, recipe.overrides(chosen))  # what `dvc exp run -S ...` does to the experiment's params
    expected, _ = recipe.resolve(chosen, ROOT / "params.yaml")
    assert config.parse_yaml(copy.read_text()) == expected
    assert "# The single source of truth" in copy.read_text()  # comments survive


def _write_recipe(root, name, overrides):
    path = root / "configs/recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"description": "test", "set": overrides}, sort_keys=False))
    shutil.copyfile(ROOT / "params.yaml", root / "params.yaml")
    return recipe.load(name, root)


def test_strings_that_need_quoting_reach_dvc_unchanged(tmp_path):
    from dvc.utils.hydra import apply_overrides

    tricky = {"prompt.suffix": "Say \"it's done\" in \\boxed{} \\", "prompt.system": "true",
              "tracking.experiment": "a b: c, [d]", "retrain.deployment": "nightly-2.5"}
    chosen = _write_recipe(tmp_path, "tricky", tricky)
    apply_overrides(tmp_path / "params.yaml", recipe.overrides(chosen))
    applied = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert {k: applied[k.split(".")[0]][k.split(".")[1]] for k in tricky} == tricky


def test_apply_writes_params_yaml_keeping_comments(tmp_path, monkeypatch):
    chosen = _write_recipe(tmp_path, "small", {"train.max_steps": 7, "launch.processes": 2})
    before = config.load(tmp_path / "params.yaml")
    changes = recipe.apply(chosen, tmp_path / "params.yaml")
    assert changes == [("train.max_steps", before.train.max_steps, 7), ("launch.processes", 1, 2)]
    assert before.train.max_steps != 7
    text = (tmp_path / "params.yaml").read_text()
    params = config.load(tmp_path / "params.yaml")
    assert params.train.max_steps == 7 and params.launch.processes == 2
    assert "# The single source of truth" in text and "max_steps: 7" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "params.yaml"]  # no temp file left


def test_a_broken_recipe_fails_before_anything_runs_and_names_the_key(tmp_path):
    unknown = _write_recipe(tmp_path, "unknown", {"train.vllm_mod": "server"})
    with pytest.raises(recipe.RecipeError, match=r"unknown\.yaml: set\.train\.vllm_mod: params\.yaml has no key "
                                                 r"'train\.vllm_mod'"):
        recipe.resolve(unknown, tmp_path / "params.yaml")
    invalid = _write_recipe(tmp_path, "invalid", {"launch.machines": 2})
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(recipe.RecipeError, match=r"invalid\.yaml: applied to .*params\.yaml: launch\.main_port = "
                                                 r"None: launch\.machines = 2 needs a fixed rendezvous port"):
        recipe.apply(invalid, tmp_path / "params.yaml")
    assert (tmp_path / "params.yaml").read_text() == before
    with pytest.raises(recipe.RecipeError, match=r"no recipe 'nope' in .*; available: invalid, unknown"):
        recipe.load("nope", tmp_path)


def test_exp_runs_the_overrides_as_a_named_experiment():
    chosen = recipe.load(RECIPES[0], ROOT)
    cmd = recipe.exp_command(chosen, queue=True, dvc="dvc")
    assert cmd[:6] == ["dvc", "exp", "run", "--name", f"recipe-{chosen.name}", "--queue"]
    assert cmd[6::2] == ["-S"] * len(chosen.overrides)
    assert [item.split("=", 1)[0] for item in cmd[7::2]] == list(chosen.overrides)


def test_a_float_dvc_writes_without_a_dot_is_a_number(tmp_path):
    # DVC (YAML 1.2) writes 1e-06; PyYAML alone (YAML 1.1) would read it as the string '1e-06'
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", path)
    apply_overrides(path, ["train.learning_rate=1e-6"])
    assert "learning_rate: 1e-06" in path.read_text() and yaml.safe_load(path.read_text())["train"][
        "learning_rate"] == "1e-06"
    assert config.load(path).train.learning_rate == 1e-6
