"""Policy models and tokenizers: the built-in tiny Qwen2, local Hugging Face folders, hub names.

The built-in model is a real `Qwen2ForCausalLM` (rotary attention, RMSNorm, SwiGLU MLP,
`model.layers[-1].mlp` as in Qwen2.5) with a character-level tokenizer built here with the
`tokenizers` library and a Qwen-style chat template, so every code path that serves a real
checkpoint (chat rendering, generation, hooks, saving and loading) is exercised offline.

Loading pitfall handled here (measured with transformers 5): `AutoTokenizer` on a folder whose
`config.json` says ``qwen2`` builds a `Qwen2Tokenizer` from our `tokenizer.json` and silently drops
spaces and newlines. A folder that declares a generic fast tokenizer is therefore loaded with
`PreTrainedTokenizerFast`, and every loaded tokenizer must round-trip a probe text exactly.

A pass-through reference (`model_ref.json`, written when warm-up is switched off for a real base
model) lets a stage output name a model without copying its weights.

Load errors are `ModelLoadError` (an expected `RlvrError`) naming the folder or file: a path that
does not exist (a `Path`, or a string that is not a hub id "org/name" or whose first folder exists,
like `models/foo`) is a missing local folder and is never looked up on the hub; a folder without
config.json or without tokenizer files; a safetensors file that is truncated or corrupt (its header
is read before transformers loads it); a hub id that is neither cached nor reachable. Not covered: a
corrupt `pytorch_model.bin` (only safetensors headers are checked).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlvr.config import looks_like_local_path
from rlvr.errors import RlvrError, one_line
from rlvr.io import atomic_dir, write_json

log = logging.getLogger(__name__)

PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, UNK)
# Printable ASCII plus newline and tab covers the built-in task and the LaTeX of the benchmarks;
# anything else maps to <unk> (the tiny model cannot solve those problems anyway).
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")
# Qwen-style turns; the generation prompt opens the assistant turn, and a conversation that ends
# with an assistant turn renders as the generation prompt followed by the answer, so TRL can mask
# prompt tokens by prefix.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL_REF = "model_ref.json"
ROUNDTRIP_PROBE = "Compute 12+3.\n\n12+3=15\n\n\\boxed{15} x  y\tz"
_GENERIC_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}
# A tokenizer folder has at least one of these (fast tokenizer, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


class ModelLoadError(RlvrError, RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names the folder or file and the fix."""


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with Qwen's special tokens and a Qwen-style chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, unk_token=UNK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_qwen2(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_positions: int,
    seed: int,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized for CPU training."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def check_roundtrip(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    ids = tokenizer(ROUNDTRIP_PROBE, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids)
    if decoded != ROUNDTRIP_PROBE:
        raise ModelLoadError(
            f"{where}: tokenizer does not round-trip text (decode(encode(x)) != x): "
            f"{ROUNDTRIP_PROBE!r} -> {decoded!r}. Whitespace would be lost in prompts and rewards."
        )


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike,
               state_dict: dict | None = None) -> None:
    """Save model and tokenizer atomically: `path` holds either the old or the new complete model.
    `state_dict`: the weights to write when the model's own are sharded (gathered by the caller)."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def write_model_ref(path: str | os.PathLike, name_or_path: str) -> None:
    """Make `path` a pass-through folder that names another model instead of copying it."""
    with atomic_dir(path) as tmp:
        write_json(Path(tmp) / MODEL_REF, {"model": name_or_path})


def resolve(name_or_path: str | os.PathLike) -> str:
    """Follow pass-through references; return a local folder or a hub name."""
    seen = set()
    current = str(name_or_path)
    while (Path(current) / MODEL_REF).is_file():
        if current in seen:
            raise ModelLoadError(f"{name_or_path}: {MODEL_REF} references form a cycle")
        seen.add(current)
        current = json.loads((Path(current) / MODEL_REF).read_text())["model"]
    return current


def check_weights(folder: Path) -> None:
    """Read the header of every safetensors file in `folder`: a truncated or corrupt file is named
    here instead of failing inside transformers with a message that names no file."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"{path}: weights file is truncated or corrupt ({one_line(error)}); restore it "
                                 "(dvc checkout) or save the model again") from error


def local_or_hub(name_or_path: str | os.PathLike) -> str:
    """A checked local model folder, or a hub id. A `Path`, or a string that looks like a path
    (`config.looks_like_local_path`), that does not exist is an error here, never a hub lookup."""
    source = resolve(name_or_path)
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local}: not a model folder (no config.json)")
        check_weights(local)
        return str(local)
    # A Path the caller gave (not a hub id reached through a model_ref.json) is always local.
    given_as_path = isinstance(name_or_path, os.PathLike) and source == os.fspath(name_or_path)
    if given_as_path or looks_like_local_path(source) or local.exists():
        raise ModelLoadError(f"{source}: model folder does not exist (relative to {Path.cwd()}); give an "
                             "existing folder, or a hub id org/name")
    return source


def _tokenizer_files(folder: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (folder / name).is_file()]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    source = resolve(name_or_path)
    folder = Path(source)
    present = _tokenizer_files(folder) if folder.is_dir() else []
    if folder.is_dir() and not present:
        raise ModelLoadError(f"{folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
                             "next to the model (tokenizer.save_pretrained)")
    config_file = folder / "tokenizer_config.json"
    files = ", ".join(str(folder / name) for name in present + ["tokenizer_config.json"]
                      if (folder / name).is_file()) or source
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
        if declared in _GENERIC_TOKENIZER_CLASSES:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise ModelLoadError(f"{files}: cannot load the tokenizer ({one_line(error)})") from error
    check_roundtrip(tokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(
    name_or_path: str | os.PathLike,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder, a pass-through folder or a hub name.

    Hub names need network access or a populated Hugging Face cache.
    """
    source = local_or_hub(name_or_path)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(f"{source}: cannot load model ({one_line(error)})") from error
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# model.dtype -> torch dtype; "auto" is resolved by `torch_dtype`.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """model.dtype as a torch dtype: auto is bf16 on a GPU that supports it, else fp32 (CPUs: fp32, as before)."""
    if name == "auto":
        return torch.bfloat16 if bf16_available() else torch.float32
    return DTYPES[name]


def mixed_precision(name: str) -> str:
    """launch.mixed_precision resolved: auto is bf16 on a GPU that supports it, else no."""
    if name == "auto":
        return "bf16" if bf16_available() else "no"
    return name


def checkpointing_off(config_class: type) -> dict[str, bool]:
    """The keyword that turns activation checkpointing off in a TRL config (TRL turns it on by default).
    transformers 5.24 (the CPU set) calls it activation_checkpointing and warns (FutureWarning) on the
    old name; 5.17 (the GPU set, capped by vLLM) knows only gradient_checkpointing."""
    fields = config_class.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": False}
