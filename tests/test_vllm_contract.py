"""Every vLLM and TRL call the project makes, checked against the installed versions' signatures.

vLLM runs only in the GPU environment (requirements/gpu.txt), so its half is skipped, with the reason,
where `vllm` is not importable; run it there with `python -m pytest tests/test_vllm_contract.py`.
The TRL half runs everywhere: the keyword arguments stages/train.py and stages/warmup.py pass to
TRL's configs (read from the source, so a new one is checked without editing this file), and the
`trl vllm-serve` options the recipes tell people to use.

The vLLM calls (rlvr/generation.py): `LLM(model=, seed=, trust_remote_code=, dtype=)`,
`SamplingParams(n=, temperature=, top_p=, top_k=, max_tokens=, seed=)` and
`LLM.generate(prompts, sampling_params)`; names checked against the vLLM docs for v0.22.1 and latest
(requirements/gpu.txt pins 0.31.0, the newest trl 1.16 accepts).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect

import pytest
import trl
from trl import GRPOConfig, SFTConfig
from trl.scripts.vllm_serve import ScriptArguments

from tests.conftest import ROOT

TRL = f"the installed TRL {trl.__version__}"
VLLM_MISSING = importlib.util.find_spec("vllm") is None
needs_vllm = pytest.mark.skipif(VLLM_MISSING, reason="vllm is not importable here: it installs only in the GPU "
                                                     "environment (pip install -c requirements/gpu.txt -e '.[gpu,dev]')")

LLM_KWARGS = ("model", "seed", "trust_remote_code", "dtype")
SAMPLING_KWARGS = ("n", "temperature", "top_p", "top_k", "max_tokens", "seed")
# The `trl vllm-serve` options configs/recipes/*-vllm-server.yaml and docs/scaling.md use.
VLLM_SERVE_OPTIONS = ("model", "data_parallel_size", "tensor_parallel_size", "host", "port", "dtype")


def keywords_of_call(path: str, callee: str) -> set[str]:
    """The keyword names passed to `callee(...)` anywhere in `path`."""
    tree = ast.parse((ROOT / path).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == callee:
            names.update(k.arg for k in node.keywords if k.arg)
    assert names, f"{path} no longer calls {callee}(...)"
    return names


@pytest.mark.parametrize(("path", "config"), [("stages/train.py", GRPOConfig), ("stages/warmup.py", SFTConfig)])
def test_every_trl_config_field_the_project_sets_exists(path, config):
    missing = sorted(keywords_of_call(path, config.__name__) - set(config.__dataclass_fields__))
    assert not missing, f"{path} passes {missing} to {config.__name__}, which {TRL} does not have"


def test_trl_accepts_our_vllm_modes():
    from rlvr.config import VLLM_MODES

    help_text = GRPOConfig.__dataclass_fields__["vllm_mode"].metadata["help"]
    assert all(f"'{mode}'" in help_text or f"`{mode}`" in help_text or mode in help_text for mode in VLLM_MODES), (
        f"{TRL}'s GRPOConfig.vllm_mode no longer documents {VLLM_MODES}: {help_text}")


def test_trl_vllm_serve_has_the_options_the_recipes_use():
    missing = [o for o in VLLM_SERVE_OPTIONS if o not in ScriptArguments.__dataclass_fields__]
    assert not missing, f"`trl vllm-serve` in {TRL} has no {missing}"


def _parameters(obj) -> set[str]:
    fields = getattr(obj, "__struct_fields__", None)  # SamplingParams is a msgspec Struct in recent vLLM
    return set(fields) if fields else set(inspect.signature(obj).parameters)


@needs_vllm
def test_vllm_llm_takes_the_arguments_we_pass():
    import vllm
    from vllm import LLM

    missing = [k for k in LLM_KWARGS if k not in _parameters(LLM.__init__)]
    assert not missing, f"vllm {vllm.__version__} LLM() has no {missing} (rlvr/generation.py vllm_engine)"
    generate = inspect.signature(LLM.generate).parameters
    assert list(generate)[1:3] == ["prompts", "sampling_params"], (
        f"vllm {vllm.__version__} LLM.generate{inspect.signature(LLM.generate)}: rlvr/generation.py passes "
        "(prompts, sampling_params) positionally")


@needs_vllm
def test_vllm_sampling_params_take_the_fields_we_set():
    import vllm
    from vllm import SamplingParams

    missing = [k for k in SAMPLING_KWARGS if k not in _parameters(SamplingParams)]
    assert not missing, f"vllm {vllm.__version__} SamplingParams has no {missing} (rlvr/generation.py)"
    # top_k=-1 (no top-k) and temperature=0 (greedy) are the values we rely on; construction validates them
    SamplingParams(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4, seed=0)
    SamplingParams(n=1, temperature=0.0, max_tokens=4)
