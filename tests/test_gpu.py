"""Checks that need CUDA: the GRPO step in bf16 on a GPU, angle scoring on a GPU, vLLM sampling.

Skipped on machines without CUDA (CI has none); run them on a GPU box with
`python -m pytest -m gpu tests/test_gpu.py`.
"""

import pytest
import torch
from datasets import Dataset

from rlvr import config, gain_rl, models
from rlvr.generation import SamplingSettings, messages, render
from rlvr.grading import Grader
from rlvr.grpo import RewardFunction, RLVRGRPOTrainer
from stages import train
from tests.conftest import small_params_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROBLEMS = ["Compute 1+2.", "Compute 5-3.", "Compute 2+2.", "Compute 9-1."]
ANSWERS = ["3", "2", "4", "8"]


def _tiny(seed=0):
    tokenizer = models.build_char_tokenizer()
    return models.build_tiny_qwen2(tokenizer, 64, 2, 4, 2, 128, 256, seed=seed), tokenizer


def test_grpo_step_on_cuda_uses_bf16_and_changes_every_parameter(tmp_path):
    raw = small_params_dict()
    raw["train"].update(order="uniform", max_steps=2, prompts_per_step=4, num_generations=4,
                        max_completion_length=16, learning_rate=1e-2, logging_steps=1)
    params = config.from_dict(raw)
    args = train.grpo_config(params, str(tmp_path))
    assert args.bf16 and not args.use_cpu, "the same params must select bf16 on a GPU"
    model, tokenizer = _tiny()
    dataset = Dataset.from_dict({"prompt": [messages(p, params.prompt) for p in PROBLEMS], "answer": ANSWERS,
                                 "id": list("abcd")})

    def varied(prompts, completions, **kwargs):  # spread inside every group: no zero advantages
        return [float(len(c[-1]["content"]) % 3) for c in completions]

    with Grader(workers=1, timeout_s=5) as grader:
        trainer = RLVRGRPOTrainer(model=model, reward_funcs=[varied, RewardFunction(grader)], args=args,
                                  train_dataset=dataset, processing_class=tokenizer)
        before = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
        trainer.train()
    assert next(trainer.model.parameters()).device.type == "cuda"
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach().float().cpu(), before[name]), f"{name} unchanged after GRPO on CUDA"
    logged = [e for e in trainer.state.log_history if "reward" in e]
    assert logged and all(torch.isfinite(torch.tensor(e["reward"])) for e in logged)


def test_angle_scores_on_cuda_match_cpu():
    model, tokenizer = _tiny(seed=1)
    questions = [f"Compute {a}+{b}-{a % 7}." for a, b in zip(range(10, 40), range(3, 33))]
    ids = [f"q{i:02d}" for i in range(len(questions))]
    kwargs = dict(system="Compute step by step.", one_shot=("Compute 1+1.", "1+1=2\n\n\\boxed{2}"), batch_size=8)
    on_cpu = gain_rl.score_prompts(model, tokenizer, ids, questions, **kwargs)
    on_gpu = gain_rl.score_prompts(model.cuda(), tokenizer, ids, questions, **kwargs)
    torch.testing.assert_close(torch.tensor(on_gpu["c_intra"].to_numpy()), torch.tensor(on_cpu["c_intra"].to_numpy()),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(on_gpu["c_inter"].to_numpy()), torch.tensor(on_cpu["c_inter"].to_numpy()),
                               rtol=1e-4, atol=1e-4)


def test_vllm_sampling_follows_the_sampling_contract(tmp_path):
    pytest.importorskip("vllm")
    from rlvr.generation import sample_vllm, vllm_engine

    model, tokenizer = _tiny(seed=2)
    models.save_model(model, tokenizer, tmp_path / "tiny")
    prompt = config.from_dict(small_params_dict()).prompt
    prompts = [render(tokenizer, p, prompt) for p in PROBLEMS]
    settings = SamplingSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8, greedy=False, seed=0)
    engine = vllm_engine(str(tmp_path / "tiny"), seed=0, trust_remote_code=False, dtype=torch.float32)
    out = sample_vllm(engine, prompts, settings)
    assert [len(row) for row in out] == [3] * len(prompts)
    assert all(isinstance(text, str) for row in out for text in row)
