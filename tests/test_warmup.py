import json

import pytest
import torch

from rlvr import config, models
from stages import prepare, warmup
from tests.conftest import small_params_dict


@pytest.fixture
def prepared(small_params, in_tmp):
    prepare.main(small_params)
    return small_params


@pytest.mark.slow
def test_warmup_trains_every_parameter_and_saves_a_loadable_model(prepared, in_tmp):
    initial, _ = warmup.initial_model(prepared)
    metrics = warmup.main(prepared)
    assert metrics["steps"] == prepared.warmup.max_steps
    assert metrics["final_loss"] < metrics["first_loss"]
    trained, tokenizer = models.load_policy("models/warmup")
    before = dict(initial.named_parameters())
    for name, param in trained.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    assert tokenizer.decode(tokenizer("1+2=3\n\n\\boxed{3}")["input_ids"]) == "1+2=3\n\n\\boxed{3}"
    assert json.loads((in_tmp / "metrics/warmup.json").read_text()) == metrics


def test_disabled_warmup_passes_a_real_model_through(in_tmp):
    tokenizer = models.build_char_tokenizer()
    base = models.build_tiny_qwen2(tokenizer, 32, 1, 4, 2, 64, 128, seed=0)
    models.save_model(base, tokenizer, in_tmp / "base")
    raw = small_params_dict()
    raw["model"]["name"] = str(in_tmp / "base")
    raw["warmup"]["enabled"] = False
    metrics = warmup.main(config.from_dict(raw))
    assert metrics["enabled"] == 0
    assert not (in_tmp / "models/warmup/model.safetensors").exists()
    loaded, _ = models.load_policy(in_tmp / "models/warmup")
    assert torch.equal(loaded.lm_head.weight, base.lm_head.weight)


def test_disabled_warmup_with_missing_model_fails_clearly_and_keeps_old_output(in_tmp):
    (in_tmp / "models/warmup").mkdir(parents=True)
    (in_tmp / "models/warmup/keep.txt").write_text("earlier run")
    raw = small_params_dict()
    raw["model"]["name"] = "./no/such/model"
    raw["warmup"]["enabled"] = False
    with pytest.raises(models.ModelLoadError, match="no/such/model.*does not exist"):
        warmup.main(config.from_dict(raw))
    assert (in_tmp / "models/warmup/keep.txt").read_text() == "earlier run"


def test_missing_training_file_is_a_clear_error(small_params, in_tmp):
    with pytest.raises(FileNotFoundError, match="train.parquet"):
        warmup.run(small_params)
