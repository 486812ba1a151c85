"""Cost of GAIN-RL offline angle scoring: the reference way against `rlvr.gain_rl`.

Three ways to get C_intra and C_inter for a batch of prompts, on a model shaped like Qwen2.5-0.5B
(hidden 896, 14 heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings; random weights,
`--layers` decoder layers):

  a  reference   full forward pass (logits computed), hidden states captured at the last MLP's
                 input, then per prompt the L x L cosine matrix and the means of its Q x Q and
                 Q x P blocks.
  b  gain_rl     `gain_rl.mlp_inputs(stop_early=True)` (the last MLP, final norm and LM head never
                 run) + `gain_rl.angle_concentration` (O(L * d), no L x L matrix).
  c  full+fast   full forward pass (logits computed) + the O(L * d) formula: separates the saving
                 of stopping early (c / b) from the saving of the formula (a / c).

Each prompt is L random token ids: P = the first 40 %, Q = the next 50 %, the last 10 % trailing
(excluded), no padding. The script checks that a, b and c give the same numbers.

Timing: wall clock of the whole computation (forward + angles), median of `--repeats` runs after
one warm-up run, torch's default intra-op threads (all cores). All methods at one length run in one
process, interleaved in rotating order, so that load from other processes on a shared machine
slows every method alike (the 1-minute load average is recorded with each length). The table also
gives the ratio of the fastest runs (load from elsewhere can only slow a run down, so the fastest
run is the least disturbed one).

Peak memory: every (method, length) runs in its own fresh Python subprocess. On CPU (Linux) it is the
process's resident-set high-water mark, VmHWM in /proc/self/status, which the kernel keeps for every
page torch touches (unlike `tracemalloc`, which sees only Python's allocator). Building the model
has its own, higher peak (initialisation temporaries), so after the build the script frees what it
can (gc, glibc `malloc_trim`), resets the high-water mark (writing 5 to /proc/self/clear_refs) and
reports the peak during the warm-up and timed runs, and the peak minus
the resident size at the reset ("working" memory: activations, logits, cosine matrices). Where the
reset is refused it falls back to `ru_maxrss` and says so ("memory_method"); that number includes
the build. RSS is page-granular and includes pages the allocator keeps, so differences of a few MB
are noise. On CUDA it uses `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`,
minus the memory allocated once the model is built.

`--layers` defaults to 4 (Qwen2.5-0.5B has 24) so that the whole run takes a few minutes on 2 CPU
cores; the LM head (896 x 151936, the largest single matmul) does not depend on the depth, so fewer
layers make the early-stop saving look larger than on the full 24-layer model (the 20 missing
layers would be paid by both a and b). Pass `--layers 24` for the real depth.

Run: python benchmarks/angle_scoring.py [--layers 4] [--lengths 128 256 512] [--batch 4]
                                       [--repeats 3] [--out benchmarks/results/angle_scoring.json]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlvr import gain_rl  # noqa: E402

METHODS = ("reference", "gain_rl", "full_fast")
QWEN25_05B_SHAPE = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def build_model(layers: int, device: str, dtype: torch.dtype) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(num_hidden_layers=layers, **QWEN25_05B_SHAPE)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def make_batch(batch: int, length: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    p_end, q_end = int(0.4 * length), int(0.9 * length)
    positions = torch.arange(length).expand(batch, length)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
        "p_mask": (positions < p_end).to(device),
        "q_mask": ((positions >= p_end) & (positions < q_end)).to(device),
    }


def reference_angles(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Full forward (logits kept, as a plain forward returns them), then per prompt the L x L cosines."""
    captured = []
    handle = model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].float()))
    try:
        with torch.inference_mode():
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            intra, inter = [], []
            for hidden, q, p in zip(captured[0], batch["q_mask"], batch["p_mask"]):
                unit = torch.nn.functional.normalize(hidden, dim=-1)
                cosines = unit @ unit.T
                intra.append(cosines[q][:, q].mean())
                inter.append(cosines[q][:, p].mean())
            del output
    finally:
        handle.remove()
    return torch.stack(intra), torch.stack(inter)


def fast_angles(model, batch, stop_early: bool) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = gain_rl.mlp_inputs(model, batch["input_ids"], batch["attention_mask"], stop_early=stop_early)
    return gain_rl.angle_concentration(hidden, batch["q_mask"], batch["p_mask"])


COMPUTE = {
    "reference": reference_angles,
    "gain_rl": lambda model, batch: fast_angles(model, batch, stop_early=True),
    "full_fast": lambda model, batch: fast_angles(model, batch, stop_early=False),
}


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024.0


def reset_cpu_peak() -> tuple[str, float]:
    """Free build leftovers and restart the RSS high-water mark; returns (method, baseline MB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass  # not glibc: nothing to trim
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return "ru_maxrss (includes the model build)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return "VmHWM after reset", _status_mb("VmRSS")


def cpu_peak_mb(memory_method: str) -> float:
    if memory_method.startswith("ru_maxrss"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
    return _status_mb("VmHWM")


def _timed(method: str, model, batch, cuda: bool) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    start = time.perf_counter()
    result = COMPUTE[method](model, batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def measure_times(length: int, layers: int, batch_size: int, repeats: int, device: str) -> dict:
    """Times of all methods at `length`, interleaved in one process so that load from other
    processes hits every method alike; one warm-up run each first."""
    cuda = device.startswith("cuda")
    model = build_model(layers, device, torch.float32)
    batch = make_batch(batch_size, length, model.config.vocab_size, device)
    values = {}
    for method in METHODS:
        _, (c_intra, c_inter) = _timed(method, model, batch, cuda)
        values[method] = {"c_intra": c_intra.cpu().tolist(), "c_inter": c_inter.cpu().tolist()}
    times = {method: [] for method in METHODS}
    for round_index in range(repeats):
        for shift in range(len(METHODS)):  # rotate the order every round
            method = METHODS[(round_index + shift) % len(METHODS)]
            times[method].append(_timed(method, model, batch, cuda)[0])
    return {"length": length, "times_s": times, "values": values, "loadavg_1min_after": os.getloadavg()[0]}


def measure_memory(method: str, length: int, layers: int, batch_size: int, device: str) -> dict:
    """Peak memory of `method` at `length` in this (fresh) process: a warm-up run and one more."""
    cuda = device.startswith("cuda")
    model = build_model(layers, device, torch.float32)
    batch = make_batch(batch_size, length, model.config.vocab_size, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory_method, base_mb = "cuda max_memory_allocated", torch.cuda.memory_allocated() / 2**20
    else:
        memory_method, base_mb = reset_cpu_peak()
    for _ in range(2):
        _timed(method, model, batch, cuda)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else cpu_peak_mb(memory_method)
    return {"method": method, "length": length, "peak_mb": peak_mb, "base_mb": base_mb,
            "working_mb": peak_mb - base_mb, "memory_method": memory_method}


def run_worker(args: argparse.Namespace, worker: str, length: int, method: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--lengths", str(length), "--layers", str(args.layers),
               "--batch", str(args.batch), "--repeats", str(args.repeats), "--device", args.device]
    if method is not None:
        command += ["--method", method]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def ratios(timings: list[dict], memory: list[dict]) -> list[dict]:
    rows = []
    for timing in timings:
        length = timing["length"]
        t = {method: statistics.median(timing["times_s"][method]) for method in METHODS}
        fastest = {method: min(timing["times_s"][method]) for method in METHODS}
        m = {r["method"]: r for r in memory if r["length"] == length}
        reference = timing["values"]["reference"]
        agreement = max(
            abs(x - y)
            for method in ("gain_rl", "full_fast")
            for key in ("c_intra", "c_inter")
            for x, y in zip(reference[key], timing["values"][method][key])
        )
        a, b, c = (m[method] for method in METHODS)
        rows.append({
            "length": length,
            "time_a_s": t["reference"], "time_b_s": t["gain_rl"], "time_c_s": t["full_fast"],
            "time_a_over_b": t["reference"] / t["gain_rl"],
            "time_c_over_b": t["full_fast"] / t["gain_rl"],
            "time_a_over_c": t["reference"] / t["full_fast"],
            # ratio of the fastest runs: less sensitive to load from other processes than the medians
            "min_time_a_over_b": fastest["reference"] / fastest["gain_rl"],
            "peak_a_mb": a["peak_mb"], "peak_b_mb": b["peak_mb"], "peak_c_mb": c["peak_mb"],
            "working_a_mb": a["working_mb"], "working_b_mb": b["working_mb"], "working_c_mb": c["working_mb"],
            "peak_a_over_b": a["peak_mb"] / b["peak_mb"],
            "working_a_over_b": a["working_mb"] / max(b["working_mb"], 1.0),
            "max_abs_diff_vs_reference": agreement,
            "loadavg_1min_after": timing["loadavg_1min_after"],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("| L | a ref (s) | b gain_rl (s) | c full+fast (s) | time a/b | time c/b | time a/c | min-time a/b "
              "| peak a / b / c (MB) | working a / b / c (MB) | working a/b | max abs diff |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['time_a_s']:.3f} | {r['time_b_s']:.3f} | {r['time_c_s']:.3f} "
            f"| {r['time_a_over_b']:.2f} | {r['time_c_over_b']:.2f} | {r['time_a_over_c']:.2f} "
            f"| {r['min_time_a_over_b']:.2f} "
            f"| {r['peak_a_mb']:.0f} / {r['peak_b_mb']:.0f} / {r['peak_c_mb']:.0f} "
            f"| {r['working_a_mb']:.0f} / {r['working_b_mb']:.0f} / {r['working_c_mb']:.0f} "
            f"| {r['working_a_over_b']:.1f} | {r['max_abs_diff_vs_reference']:.1e} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    if args.worker == "time":
        print(json.dumps(measure_times(args.lengths[0], args.layers, args.batch, args.repeats, args.device)))
        return {}
    if args.worker == "memory":
        print(json.dumps(measure_memory(args.method, args.lengths[0], args.layers, args.batch, args.device)))
        return {}
    timings, memory = [], []
    for length in args.lengths:
        timings.append(run_worker(args, "time", length))
        medians = {k: round(statistics.median(v), 3) for k, v in timings[-1]["times_s"].items()}
        print(f"L={length} median s: {medians}", file=sys.stderr)
        for method in METHODS:
            memory.append(run_worker(args, "memory", length, method))
            print(f"L={length} {method}: peak {memory[-1]['peak_mb']:.0f} MB", file=sys.stderr)
    rows = ratios(timings, memory)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": args.device,
                    "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "config": {"model": "Qwen2.5-0.5B shape, random weights", "layers": args.layers, "batch": args.batch,
                   "lengths": args.lengths, "repeats": args.repeats, "dtype": "float32",
                   "memory": sorted({r["memory_method"] for r in memory})},
        "timings": timings,
        "memory": memory,
        "ratios": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen2.5-0.5B has 24)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/angle_scoring.json")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
