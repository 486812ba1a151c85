import numpy as np
import pandas as pd
import pytest

from rlvr import config, prof
from stages import filter as filter_stage
from tests.conftest import small_params_dict

RIGHT = "12+5=17\n\n17-3=14\n\n\\boxed{14}"
LUCKY = "12+5=18\n\n18-4=14\n\n\\boxed{14}"     # right answer, wrong steps (value 1/3)
WRONG_LOOKS_OK = "12+5=17\n\n17-3=13\n\n\\boxed{13}"  # wrong answer, first step right (value 1/3)
WRONG = "12+5=16\n\n16-3=12\n\n\\boxed{12}"     # value 0
SHORT = "\\boxed{14}"                              # right answer, one (wrong) step


def _rollouts():
    problem = "Compute 12+5-3."
    # prompt a: 4 correct (RIGHT, LUCKY, RIGHT, SHORT) / 4 incorrect; prompt b: 1 correct / 7 incorrect
    a = [RIGHT, LUCKY, WRONG, WRONG_LOOKS_OK, RIGHT, WRONG, SHORT, WRONG]
    b = [WRONG_LOOKS_OK, WRONG, LUCKY, WRONG, WRONG, WRONG_LOOKS_OK, WRONG, WRONG]
    rows = []
    for pid, completions in (("a", a), ("b", b)):
        for i, text in enumerate(completions):
            rows.append({"id": pid, "problem": problem, "answer": "14", "sample": i, "completion": text,
                         "reward": 1.0 if text.endswith("{14}") else 0.0})
    return pd.DataFrame(rows)


def _params(**filter_band):
    raw = small_params_dict()
    raw["filter"].update(filter_band)
    return config.from_dict(raw)


def test_filter_keeps_exactly_the_expected_rollouts(in_tmp):
    rolls = _rollouts()
    rolls.to_parquet("rollouts.parquet")
    pd.DataFrame({"id": ["a", "b"], "pass_rate": [0.5, 0.125]}).to_parquet("rates.parquet")
    filtered, prompts, metrics = filter_stage.run(_params(pass_rate_min=0.2, pass_rate_max=0.9),
                                                  rollouts_path=in_tmp / "rollouts.parquet",
                                                  rates_path=in_tmp / "rates.parquet")
    a = filtered[filtered["id"] == "a"].sort_values("sample")
    b = filtered[filtered["id"] == "b"].sort_values("sample")
    # a (4/4 -> 2/2): correct lose SHORT (1 step) then LUCKY (1/3); incorrect lose WRONG_LOOKS_OK (1/3),
    # then the earliest WRONG (tie at 0)
    assert a["kept"].tolist() == [True, False, False, False, True, True, False, True]
    assert a["reason"].tolist() == ["", prof.LOW_VALUE, prof.HIGH_VALUE, prof.HIGH_VALUE, "", "", prof.STEP_COUNT, ""]
    # b (1/7 -> 1/3): the one correct stays although its steps are wrong; the two plausible-looking
    # wrong answers go first, then the earliest plain ones
    assert b["kept"].tolist() == [False, False, True, False, True, False, True, True]
    assert a["value"].tolist()[:2] == [1.0, pytest.approx(1 / 3)]
    assert metrics["kept_correct"] == 3 and metrics["kept_incorrect"] == 5
    # LUCKY in a and b, and SHORT (its one step is not the chain's first step)
    assert metrics["right_answer_wrong_steps"] == 3
    assert metrics["right_answer_wrong_steps_removed"] == 2 and metrics["right_answer_wrong_steps_kept"] == 1
    assert metrics["dropped_for_step_count"] == 1
    assert prompts["id"].tolist() == ["a"] and metrics["band_prompts"] == 1
    assert metrics["mean_value_kept_correct"] == pytest.approx((1.0 + 1.0 + 1 / 3) / 3)
    table = filter_stage.keep_table(filtered)
    assert table.to_dict("list") == {"correct_before": [1, 4], "groups": [1, 1], "kept_correct": [1.0, 2.0],
                                     "kept_incorrect": [3.0, 2.0]}


def test_filter_errors(in_tmp):
    rolls = _rollouts()
    rolls.assign(problem="What is pi?").to_parquet("other.parquet")
    pd.DataFrame({"id": ["a", "b"], "pass_rate": [0.5, 0.125]}).to_parquet("rates.parquet")
    with pytest.raises(ValueError, match="could not score any rollout"):
        filter_stage.run(_params(), rollouts_path=in_tmp / "other.parquet", rates_path=in_tmp / "rates.parquet")
    rolls.to_parquet("rollouts.parquet")
    with pytest.raises(ValueError, match="widen the filter band"):
        filter_stage.run(_params(pass_rate_min=0.9, pass_rate_max=1.0), rollouts_path=in_tmp / "rollouts.parquet",
                         rates_path=in_tmp / "rates.parquet")
    rolls.drop(columns="completion").to_parquet("broken.parquet")
    with pytest.raises(Exception, match="completion"):
        filter_stage.run(_params(), rollouts_path=in_tmp / "broken.parquet", rates_path=in_tmp / "rates.parquet")
