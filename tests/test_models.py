import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from rlvr import models
from rlvr.config import Prompt
from rlvr.errors import RlvrError
from rlvr.generation import SamplingSettings, render, sample_transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = models.build_char_tokenizer()
    model = models.build_tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_positions=256, seed=0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    models.save_model(model, tokenizer, path)
    return model, tokenizer, path


TEXTS = ["Compute 37+12-8.", "a  b\n\nc\td", "\\boxed{\\frac{1}{2}}", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text_after_save_and_load(tiny, text):
    _, _, path = tiny
    loaded = models.load_tokenizer(str(path))
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text


def test_special_tokens_are_single_tokens(tiny):
    _, tokenizer, _ = tiny
    ids = tokenizer("<|im_start|>x<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("x"),
                   tokenizer.eos_token_id]


def test_auto_tokenizer_pitfall_is_real_and_avoided(tiny):
    # AutoTokenizer maps a qwen2 config to Qwen2Tokenizer, which drops whitespace from our vocabulary.
    _, _, path = tiny
    auto = AutoTokenizer.from_pretrained(path)
    text = "a b\n\nc"
    if auto.decode(auto(text, add_special_tokens=False)["input_ids"]) != text:
        with pytest.raises(models.ModelLoadError, match="round-trip"):
            models.check_roundtrip(auto, str(path))
    assert models.load_tokenizer(str(path)).decode(models.load_tokenizer(str(path))(text)["input_ids"]) == text


def test_chat_template_prefix_property(tiny):
    _, tokenizer, _ = tiny
    prompt = [{"role": "user", "content": "Compute 1+2."}]
    with_answer = prompt + [{"role": "assistant", "content": "1+2=3\n\n\\boxed{3}"}]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(with_answer, tokenize=False)
    assert head == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
    assert full.startswith(head)
    assert render(tokenizer, "Compute 1+2.", Prompt(system="Be brief.", suffix="Box it.")) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1+2. Box it.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_saved_model_loads_with_same_weights_and_is_qwen2(tiny):
    model, _, path = tiny
    loaded, tokenizer = models.load_policy(path)
    assert loaded.config.model_type == "qwen2"
    assert hasattr(loaded.model.layers[-1], "mlp")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.padding_side == "left"


def test_pass_through_reference(tiny, tmp_path):
    _, _, path = tiny
    models.write_model_ref(tmp_path / "warmup", str(path))
    assert json.loads((tmp_path / "warmup" / models.MODEL_REF).read_text()) == {"model": str(path)}
    assert models.resolve(tmp_path / "warmup") == str(path)
    loaded, _ = models.load_policy(tmp_path / "warmup")
    assert loaded.config.model_type == "qwen2"


@pytest.mark.parametrize("missing", ["./no/such/model", "/definitely/not/here", "a/b/c", "models/foo", "./x",
                                     "my model"])
def test_missing_model_path_is_a_clear_error(missing, tmp_path, monkeypatch):
    # models/ exists here, so models/foo is a missing local folder, never a hub lookup
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.ModelLoadError, match=rf"^{re.escape(missing)}: model folder does not exist"):
        models.load_policy(missing)


def test_a_path_object_is_never_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.ModelLoadError, match="^warmup: model folder does not exist"):
        models.load_policy(Path("warmup"))  # "warmup" alone would be a valid hub id


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        models.load_policy(tmp_path)


def _copy(tiny, tmp_path) -> Path:
    _, _, path = tiny
    return Path(shutil.copytree(path, tmp_path / "model"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file_is_named(tiny, tmp_path, damage):
    folder = _copy(tiny, tmp_path)
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes({"truncate": content[: len(content) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    with pytest.raises(models.ModelLoadError, match=rf"^{re.escape(str(weights))}: weights file is truncated or "
                                                    "corrupt") as caught:
        models.load_policy(folder)
    assert "\n" not in str(caught.value)
    # the PRM loader goes through the same check
    with pytest.raises(models.ModelLoadError, match="weights file is truncated"):
        models.local_or_hub(str(folder))


def test_missing_tokenizer_is_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(models.ModelLoadError, match=rf"^{re.escape(str(folder))}: no tokenizer \(none of "
                                                    r"tokenizer\.json"):
        models.load_policy(folder)


def test_corrupt_tokenizer_file_is_named(tiny, tmp_path):
    folder = _copy(tiny, tmp_path)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(models.ModelLoadError, match=rf"^{re.escape(str(folder / 'tokenizer.json'))}.*cannot load "
                                                    "the tokenizer"):
        models.load_policy(folder)


def test_model_errors_are_expected_errors():
    assert issubclass(models.ModelLoadError, RlvrError)


def test_sampling_is_seeded_and_diverse(tiny):
    model, tokenizer, _ = tiny
    prompts = [render(tokenizer, "Compute 1+2.", Prompt()), render(tokenizer, "Compute 10-3.", Prompt())]
    settings = SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=7)
    first = sample_transformers(model, tokenizer, prompts, settings, batch_size=3)
    again = sample_transformers(model, tokenizer, prompts, settings, batch_size=3)
    assert first == again
    assert [len(x) for x in first] == [4, 4]
    # an untrained model at temperature 1 over ~100 tokens: a group of samples is not all identical
    assert len(set(first[0])) > 1
    greedy = sample_transformers(model, tokenizer, prompts, SamplingSettings(1, 1.0, 1.0, 8, greedy=True), 8)
    assert [len(x) for x in greedy] == [1, 1]


def test_generation_needs_left_padding(tiny):
    model, _, _ = tiny
    tokenizer = models.build_char_tokenizer()
    tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="left"):
        sample_transformers(model, tokenizer, ["x"], SamplingSettings(1, 1.0, 1.0, 2), 1)


def test_left_padded_batches_match_one_by_one_greedy(tiny):
    model, tokenizer, _ = tiny
    prompts = [render(tokenizer, p, Prompt()) for p in ("Compute 1+2.", "Compute 10-3+45-6.", "Compute 7.")]
    settings = SamplingSettings(1, 1.0, 1.0, 12, greedy=True)
    batched = sample_transformers(model, tokenizer, prompts, settings, batch_size=3)
    single = [sample_transformers(model, tokenizer, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == single
