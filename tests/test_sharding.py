"""rlvr/sharding.py and the sampling stages split across processes: the outputs do not depend on how many ran.

The fast tests split in one process (each rank's share computed in turn, the gather stood in for);
the slow test runs `score`, `rollout` and `evaluate` for real with 1 process and as a 2-process
torchrun job (gloo) and compares every output.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from flows import launch
from rlvr import config, gain_rl, models, sharding
from rlvr.generation import SamplingSettings, render, sample_transformers
from stages import evaluate
from tests.conftest import ROOT, small_params_dict


def test_shares_are_round_robin_and_cover_every_unit_once():
    units = list(range(7))
    shares = [sharding.Ranks(rank, 3).share(units) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sharding.ONE.share(units) == units and sharding.ONE.gather("part") == ["part"]


def test_merge_puts_units_back_in_order_and_refuses_gaps_and_doubles():
    assert sharding.merge([{0: "a", 2: "c"}, {1: "b"}], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="1 of 3 units came back from no rank"):
        sharding.merge([{0: "a"}, {2: "c"}], 3)
    with pytest.raises(RuntimeError, match="unit 1 came back from two ranks"):
        sharding.merge([{0: "a", 1: "b"}, {1: "b"}], 2)


@pytest.mark.parametrize(("n_problems", "n", "batch_size", "sizes"), [
    (10, 4, 8, [2, 2, 2, 2, 2]),   # 8 // 4 = 2 problems fill a batch
    (5, 4, 10, [2, 2, 1]),         # 10 // 4 = 2: a batch never spans a part of a problem
    (3, 8, 4, [1, 1, 1]),          # n > batch_size: one problem per unit, in two batches
    (0, 4, 8, []),
])
def test_evaluation_units_are_runs_of_whole_problems_filling_one_batch(n_problems, n, batch_size, sizes):
    work = evaluate.units(n_problems, n, batch_size)
    assert [len(unit) for unit in work] == sizes
    assert [i for unit in work for i in unit] == list(range(n_problems))


@dataclass(frozen=True)
class StandInRanks(sharding.Ranks):
    """Rank `rank` of `world` in this one process: `gather` records the part, and on rank 0 returns the
    parts recorded before (run the other ranks first)."""

    parts: dict = field(default_factory=dict)

    def gather(self, part):
        self.parts[self.rank] = part
        return [self.parts[r] for r in range(self.world)] if self.main else None


def _tiny():
    tokenizer = models.build_char_tokenizer()
    return models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 256, seed=0), tokenizer


def test_evaluate_samples_the_same_split_or_not_and_as_one_call_when_batches_align():
    raw = small_params_dict()
    raw["evaluate"].update(batch_size=8, n_samples=4, max_new_tokens=8)
    params = config.from_dict(raw)
    model, tokenizer = _tiny()
    prompts = [render(tokenizer, f"{i} + {i} =", params.prompt) for i in range(7)]
    settings = SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    alone = evaluate.generate(params, prompts, settings, "one", (model, tokenizer))
    parts: dict = {}
    assert evaluate.generate(params, prompts, settings, "rank 1", (model, tokenizer), StandInRanks(1, 2, parts)) is None
    split = evaluate.generate(params, prompts, settings, "rank 0", (model, tokenizer), StandInRanks(0, 2, parts))
    assert split == alone and len(alone) == 7 and all(len(row) == 4 for row in alone)
    assert len({text for row in alone for text in row}) > 1  # sampled, not one repeated string
    # batch_size 8 is a multiple of n = 4: the units are the batches one call over every prompt makes
    assert alone == sample_transformers(model, tokenizer, prompts, settings, 8)


def test_scoring_batches_split_across_ranks_give_the_same_angles():
    model, tokenizer = _tiny()
    ids = [f"q{i}" for i in range(9)]
    questions = [f"What is {i} times {i + 3}?" + " and more" * (i % 4) for i in range(9)]
    alone = gain_rl.score_prompts(model, tokenizer, ids, questions, "Be brief.", None, 2)
    parts: dict = {}
    for rank in (2, 1):
        assert gain_rl.score_prompts(model, tokenizer, ids, questions, "Be brief.", None, 2, rank=rank, world=3,
                                     gather=StandInRanks(rank, 3, parts).gather) is None
    split = gain_rl.score_prompts(model, tokenizer, ids, questions, "Be brief.", None, 2, rank=0, world=3,
                                  gather=StandInRanks(0, 3, parts).gather)
    pd.testing.assert_frame_equal(split, alone)
    assert all(len(part) > 0 for part in parts.values())


# ------------------------------------------------------------------------------------------------
# The real stages, 1 process and a 2-process torchrun job

TIMINGS = ("seconds", "grade_seconds", "samples_per_second", "prompts_per_second")


def _without_timings(metrics):
    if isinstance(metrics, dict):
        return {k: _without_timings(v) for k, v in metrics.items() if k not in TIMINGS}
    return metrics


OUTPUTS = {"score": "data/curated", "rollout": "data/rollouts", "evaluate": "data/evaluated"}


def _outputs(stage: str) -> dict[str, pd.DataFrame]:
    return {str(path): pd.read_parquet(path) for path in sorted(Path(OUTPUTS[stage]).rglob("*.parquet"))}


@pytest.fixture
def one_thread():
    """torch on one thread, as every rank of the 2-process job (OMP_NUM_THREADS=1): the same float sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_score_rollout_and_evaluate_give_the_same_outputs_with_1_and_2_processes(in_tmp, monkeypatch, one_thread):
    from flows.stages import MAINS
    from stages import prepare

    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    raw = small_params_dict()
    raw["prepare"]["train"] = [{"name": "arith", "builtin": True, "size": 20}]
    raw["prepare"]["eval"][0]["size"] = 8
    raw["rollout"].update(max_prompts=14, chunk_size=3, n_samples=4, max_new_tokens=8, batch_size=8)
    # batch_size 8 with n = 4: units of 2 problems, so each benchmark's units land on both ranks
    raw["evaluate"].update(batch_size=8, max_new_tokens=8, subset_size=4)
    one = config.from_dict(raw)  # launch.processes = 1: the stage runs in its flow's own process
    raw["launch"].update(processes=2)
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    params = config.load("params.yaml")
    prepare.main(params)
    model, tokenizer = _tiny()
    for folder in ("models/warmup", "models/policy"):
        models.save_model(model, tokenizer, folder)

    for stage in ("score", "evaluate", "rollout"):
        one_metrics = MAINS[stage](one)
        outputs = _outputs(stage)
        shutil.rmtree(OUTPUTS[stage])  # what the 2-process job leaves is its own
        shutil.rmtree("data/rollout_cache", ignore_errors=True)  # the 2-process rollout samples every chunk
        two_metrics = launch.run_job(params, stage, "params.yaml")
        two = _outputs(stage)
        assert sorted(two) == sorted(outputs) and outputs, stage
        for path in outputs:
            pd.testing.assert_frame_equal(two[path], outputs[path], obj=path)
        assert _without_timings(two_metrics) == _without_timings(one_metrics), stage
        assert "--nproc_per_node 2" in (in_tmp / f"logs/{stage}.launch.log").read_text().splitlines()[0]
        if stage == "evaluate":
            assert one_metrics["arith"]["n_problems"] == 8 and "warmup" in one_metrics["arith"]

    # rollout again on 2 processes with one chunk lost from the cache: only that chunk is sampled
    chunks = sorted(Path("data/rollout_cache").glob("*.parquet"))
    assert len(chunks) == 5  # 14 prompts in chunks of 3, each written once by the rank that sampled it
    chunks[2].unlink()
    before = _outputs("rollout")
    metrics = launch.run_job(params, "rollout", "params.yaml")
    assert (metrics["chunks_reused"], metrics["chunks_sampled"]) == (4, 1)
    after = _outputs("rollout")
    for path in before:
        pd.testing.assert_frame_equal(after[path], before[path], obj=path)
