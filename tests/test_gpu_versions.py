"""requirements/gpu-libs-cpu.txt: the GPU set's library versions for the CPU test environment
(scripts/test_gpu_versions.sh), kept in step with requirements/gpu.txt and pyproject.toml."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_libs_constraints", ROOT / "scripts" / "gpu_libs_constraints.py")
gpu_libs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_libs)

REGENERATE = "regenerate it: python scripts/gpu_libs_constraints.py"
NOT_ON_CPU = {"vllm", "torchvision", "torchaudio", "deepspeed"}  # the GPU extra and vLLM's companions


def pins(path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[re.sub(r"[-_.]+", "-", name).lower()] = version.split(",")[0]
    return found


def test_the_derived_constraints_are_in_step_with_gpu_txt_and_pyproject():
    assert gpu_libs.recorded_digest() == gpu_libs.source_digest(), (
        f"requirements/gpu.txt or pyproject.toml's dependencies changed since {gpu_libs.OUT.name} was written; "
        f"{REGENERATE}")


def test_every_gpu_pin_the_cpu_set_installs_has_the_gpu_version():
    gpu, cpu = pins(ROOT / "requirements" / "gpu.txt"), pins(gpu_libs.OUT)
    assert not NOT_ON_CPU & set(cpu), f"{gpu_libs.OUT.name} pins {NOT_ON_CPU & set(cpu)}, which the CPU set leaves out"
    assert cpu["torch"] == gpu["torch"]
    differ = {name: (version, cpu.get(name)) for name, version in gpu.items()
              if name not in NOT_ON_CPU and cpu.get(name) != version}
    assert not differ, f"(gpu.txt, gpu-libs-cpu.txt) versions differ: {differ}; {REGENERATE}"
    # the libraries the issue names, at the versions vLLM's caps give (not the CPU set's newer ones)
    assert {"transformers", "trl", "accelerate", "prefect", "mlflow"} <= set(cpu)
    assert not any(name.startswith(("nvidia-", "cuda-")) or name == "triton" for name in cpu)


def _item(name, version, requires=(), extras=None):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "requested_extras": extras}


def test_closure_keeps_what_the_project_needs_without_the_gpu_extra():
    report = {"environment": {"python_version": "3.11", "platform_system": "Linux", "sys_platform": "linux"},
              "install": [
                  _item("rlvr-pipeline", "0.1.0", ["torch>=2.6", "mlflow[auth]>=3", "pytest; extra == 'dev'",
                                                   "vllm; extra == 'gpu'", "deepspeed; extra == 'gpu'"]),
                  _item("torch", "2.13.0", ["filelock", "nvidia-nccl-cu13==2; platform_system == 'Linux'",
                                            "triton==3; platform_system == 'Linux'", "cuda-bindings<14"]),
                  _item("mlflow", "3.17.2", ["flask-wtf; extra == 'auth'", "gunicorn; platform_system != 'Windows'",
                                             "waitress; platform_system == 'Windows'"]),
                  _item("vllm", "0.31.0", ["xgrammar"]), _item("deepspeed", "0.19.8"), _item("xgrammar", "0.2.7"),
                  _item("filelock", "4.3.1"), _item("Flask_WTF", "1.3.0"), _item("gunicorn", "26.2.0"),
                  _item("pytest", "9.2.0"), _item("nvidia-nccl-cu13", "2"), _item("triton", "3"),
                  _item("cuda-bindings", "13"),
              ]}
    assert gpu_libs.closure(report) == {"filelock": "4.3.1", "flask-wtf": "1.3.0", "gunicorn": "26.2.0",
                                        "mlflow": "3.17.2", "pytest": "9.2.0", "torch": "2.13.0"}


def test_closure_names_a_package_missing_from_the_resolution():
    report = {"install": [_item("rlvr-pipeline", "0.1.0", ["numpy"])]}
    with pytest.raises(SystemExit, match="numpy is needed but not in the GPU resolution"):
        gpu_libs.closure(report)


def test_ci_runs_the_fast_suite_again_with_the_gpu_versions():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    main = next(i for i, line in enumerate(lines) if line.startswith("bash scripts/test.sh"))
    second = next(i for i, line in enumerate(lines)
                  if line.startswith("bash scripts/test_gpu_versions.sh") and "--install-only" not in line)
    install = next(i for i, line in enumerate(lines) if "test_gpu_versions.sh --install-only" in line)
    assert install < main < second and lines[install].endswith("&")  # the install overlaps the main suite
    script = (ROOT / "scripts" / "test_gpu_versions.sh").read_text()
    assert '-c "$constraints"' in script and 'pytest -m "not slow"' in script
    assert ".venv-gpulibs/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("config_name", ["GRPOConfig", "SFTConfig"])
def test_checkpointing_is_off_without_a_deprecation_warning_in_either_transformers(tmp_path, config_name):
    """stages/train.py and stages/warmup.py turn TRL's default activation checkpointing off with the name the
    installed transformers uses (5.24: activation_checkpointing; 5.17, the GPU set: gradient_checkpointing)."""
    import warnings

    import trl

    from rlvr import models

    config_class = getattr(trl, config_name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                           **models.checkpointing_off(config_class))
    assert cfg.gradient_checkpointing is False and getattr(cfg, "activation_checkpointing", False) is False
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]
