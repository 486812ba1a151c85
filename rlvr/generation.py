"""Prompt rendering and sampling backends.

Two backends behind one function, `sample`: in-process transformers generation (batched, left
padded; CPU or GPU) and vLLM (used when it is installed and chosen; GPU). Both return, per prompt,
a list of completion strings in the order requested, so graders and pass@k never see the backend.

Sampling pitfall: transformers applies `top_k=50` unless told otherwise, which is not the
distribution GRPO trains on; `top_k=0` is always passed explicitly.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr.config import ConfigError, Prompt
from rlvr.progress import ProgressBar

log = logging.getLogger(__name__)


def messages(problem: str, prompt: Prompt) -> list[dict[str, str]]:
    """The chat turns for one problem: optional system prompt, then the problem (+ suffix)."""
    turns = []
    if prompt.system:
        turns.append({"role": "system", "content": prompt.system})
    content = f"{problem} {prompt.suffix}".strip() if prompt.suffix else problem
    turns.append({"role": "user", "content": content})
    return turns


def render(tokenizer: PreTrainedTokenizerBase, problem: str, prompt: Prompt) -> str:
    """The prompt text with the generation prompt opened (what the model continues)."""
    return tokenizer.apply_chat_template(messages(problem, prompt), tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class SamplingSettings:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    greedy: bool = False
    seed: int = 0


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_backend(requested: str, key: str = "evaluate.backend") -> str:
    if requested == "auto":
        return "vllm" if vllm_available() else "transformers"
    if requested == "vllm" and not vllm_available():
        raise ConfigError(f"{key} = 'vllm' but vLLM is not installed or no CUDA device is visible: install the "
                          "GPU set (pip install -c requirements/gpu.txt -e '.[gpu]') on a GPU machine, or use auto")
    return requested


@torch.no_grad()
def sample_transformers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: SamplingSettings,
    batch_size: int,
    desc: str = "sampling",
    progress: tqdm | None = None,
) -> list[list[str]]:
    """`settings.n` completions per prompt with `model.generate`, `batch_size` sequences at a time.

    Each prompt is repeated n times inside a batch (rather than num_return_sequences) so that a
    batch is always exactly `batch_size` sequences, whatever n is. Progress goes to `progress` when
    the caller passes its own bar (one bar over several calls), else to a new bar named `desc`.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (tokenizer.padding_side = 'left')")
    model.eval()
    device = next(model.parameters()).device
    n = 1 if settings.greedy else settings.n
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    out: list[list[str]] = [[] for _ in prompts]
    generator_seed = settings.seed
    kwargs = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if settings.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    own_bar = progress is None
    bar = ProgressBar(total=len(flat), desc=desc, unit="seq", disable=None) if own_bar else progress
    try:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            enc = tokenizer([p for _, p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            torch.manual_seed(generator_seed + start)
            generated = model.generate(**enc, **kwargs)
            completions = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for (i, _), text in zip(chunk, completions):
                out[i].append(text)
            bar.update(len(chunk))
    finally:
        if own_bar:
            bar.close()
    return out


# model.dtype (as rlvr.models.torch_dtype resolves it) -> vLLM's dtype name.
VLLM_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def load_sampler(model_dir, backend: str, backend_key: str, seed: int, trust_remote_code: bool,
                 dtype_name: str) -> tuple:
    """(sampler, tokenizer) for a sampling stage: one vLLM engine for every call of the stage (the
    transformers weights are never loaded then), or the transformers model, on the GPU if there is one.
    `backend` is the stage's param (auto | transformers | vllm), named `backend_key` in errors."""
    from rlvr import models

    dtype = models.torch_dtype(dtype_name)
    if choose_backend(backend, backend_key) == "vllm":
        source = models.local_or_hub(model_dir)
        tokenizer = models.load_tokenizer(source, trust_remote_code=trust_remote_code)
        return vllm_engine(source, seed, trust_remote_code, dtype), tokenizer
    model, tokenizer = models.load_policy(model_dir, trust_remote_code=trust_remote_code, dtype=dtype)
    return (model.to("cuda") if torch.cuda.is_available() else model), tokenizer


def vllm_engine(model_path: str, seed: int, trust_remote_code: bool, dtype: torch.dtype):
    """vLLM's offline engine for one model (GPU only; needs the `gpu` dependency set). Building one
    loads the weights and reserves most of the GPU's memory for its KV cache, so a stage builds one per
    model and passes it to every `sample_vllm` call (every benchmark, every chunk)."""
    from vllm import LLM

    return LLM(model=model_path, seed=seed, trust_remote_code=trust_remote_code, dtype=VLLM_DTYPES[dtype])


def vllm_sampling_params(settings: SamplingSettings):
    """Our sampling settings as vLLM's SamplingParams; the per-request seed makes a call's samples
    independent of what the engine sampled before."""
    from vllm import SamplingParams

    if settings.greedy:
        return SamplingParams(n=1, temperature=0.0, max_tokens=settings.max_new_tokens)
    return SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p, top_k=-1,
                          max_tokens=settings.max_new_tokens, seed=settings.seed)


def sample_vllm(llm, prompts: list[str], settings: SamplingSettings) -> list[list[str]]:
    """The same contract as `sample_transformers`, with an engine from `vllm_engine`."""
    results = llm.generate(prompts, vllm_sampling_params(settings))
    return [[c.text for c in r.outputs] for r in results]
