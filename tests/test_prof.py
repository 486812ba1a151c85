import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForTokenClassification

from rlvr import config, models, prof

NAN = float("nan")

# DESIGN.md: for n = 8, k = 4, (correct, incorrect) -> kept (correct, incorrect)
TABLE_8_4 = {(8, 0): (4, 0), (7, 1): (3, 1), (6, 2): (2, 2), (5, 3): (2, 2), (4, 4): (2, 2),
             (3, 5): (2, 2), (2, 6): (2, 2), (1, 7): (1, 3), (0, 8): (0, 4)}


@pytest.mark.parametrize(("counts", "kept"), sorted(TABLE_8_4.items()))
def test_the_n8_k4_table(counts, kept):
    p, n = counts
    correct = [True] * p + [False] * n
    values = [0.1 * i for i in range(8)]
    decision = prof.filter_group(correct, values, [3] * 8)
    kept_correct = sum(k and c for k, c in zip(decision.kept, correct))
    kept_incorrect = sum(k and not c for k, c in zip(decision.kept, correct))
    assert (kept_correct, kept_incorrect) == kept
    assert sum(decision.kept) == 4


def test_removal_split_rounds_half_to_even():
    # P - N + k = 3 -> 1.5 rounds to 2; = 1 -> 0.5 rounds to 0 (then k comes from the incorrect side)
    assert prof.removal_split(3, 2, 2) == (2, 0)
    assert prof.removal_split(2, 3, 2) == (0, 2)
    assert prof.removal_split(4, 3, 3) == (2, 1)  # (4 - 3 + 3) / 2 = 2


def test_correct_lose_lowest_values_and_incorrect_lose_highest():
    correct = [True, True, True, True, False, False, False, False]
    values = [0.9, 0.2, 0.5, 0.1, 0.8, 0.3, 0.95, 0.0]
    decision = prof.filter_group(correct, values, [3] * 8)
    # 4/4 -> remove 2 correct (0.1 at 3, 0.2 at 1) and 2 incorrect (0.95 at 6, 0.8 at 4)
    assert decision.kept == [True, False, True, False, False, True, False, True]
    assert decision.reasons[1] == decision.reasons[3] == prof.LOW_VALUE
    assert decision.reasons[4] == decision.reasons[6] == prof.HIGH_VALUE


def test_ties_remove_the_earlier_response_first():
    decision = prof.filter_group([True] * 4, [0.5] * 4, [2] * 4)  # 4/0, k = 2: remove 2 correct
    assert decision.kept == [False, False, True, True]
    decision = prof.filter_group([False] * 4, [0.5] * 4, [2] * 4)
    assert decision.kept == [False, False, True, True]


def test_odd_n_and_explicit_k():
    # n = 5, k defaults to 2; 3/2: k_pos = min(2, round(1.5) = 2) -> remove 2 correct
    decision = prof.filter_group([True, True, True, False, False], [0.9, 0.1, 0.5, 0.2, 0.7], [3] * 5)
    assert decision.kept == [True, False, False, True, True]
    # n = 7, k = 3; 2/5: k_pos = round(0) = 0 -> remove 3 incorrect, highest values first
    values = [0.5, 0.5, 0.9, 0.1, 0.8, 0.7, 0.2]
    decision = prof.filter_group([True, True, False, False, False, False, False], values, [3] * 7, k=3)
    assert decision.kept == [True, True, False, True, False, False, True]
    assert prof.filter_group([True, False, True], [0.1, 0.2, 0.3], [3] * 3, k=0).kept == [True] * 3


def test_all_correct_and_all_incorrect_groups():
    assert prof.filter_group([True] * 6, [0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [2] * 6).kept == [True] * 3 + [False] * 3
    assert prof.filter_group([False] * 6, [0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [2] * 6).kept == [False] * 3 + [True] * 3


def test_nan_value_is_worst_in_its_side():
    correct = [True, True, False, False]
    decision = prof.filter_group(correct, [0.1, NAN, NAN, 0.9], [3] * 4)  # 2/2, k = 2: one from each side
    assert decision.kept == [True, False, False, True]
    assert decision.reasons[1] == decision.reasons[2] == prof.NAN_VALUE


def test_responses_with_0_1_and_31_steps_go_first():
    empty, one, long = "", "\\boxed{3}", "\n\n".join(["1+1=2"] * 30 + ["\\boxed{2}"])
    counts = [len(prof.split_steps(t)) for t in (empty, one, long)]
    assert counts == [1, 1, 31]  # an empty response is one (empty) step
    correct = [True] * 4 + [False] * 4
    n_steps = [1, 3, 31, 3, 3, 1, 3, 3]
    values = [0.99, 0.1, 0.99, 0.2, 0.0, 0.0, 0.5, 0.6]
    decision = prof.filter_group(correct, values, n_steps)  # 4/4: remove 2 and 2
    # correct: the 1-step and 31-step ones go although their values are the best
    assert decision.kept[:4] == [False, True, False, True]
    assert decision.reasons[0] == decision.reasons[2] == prof.STEP_COUNT
    # incorrect: the 1-step one, then the highest value (0.6)
    assert decision.kept[4:] == [True, False, True, False]
    assert decision.reasons[5] == prof.STEP_COUNT and decision.reasons[7] == prof.HIGH_VALUE
    bounds = prof.filter_group(correct, values, n_steps, min_steps=1, max_steps=40)
    assert bounds.kept[:4] == [True, False, True, False]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        prof.filter_group([True, False], [0.1], [2, 2])
    with pytest.raises(ValueError, match="k must be"):
        prof.filter_group([True, False], [0.1, 0.2], [2, 2], k=3)


def test_process_value():
    assert prof.process_value([1.0, 0.0, 1.0, 1.0], max_steps=30) == 0.75
    assert prof.process_value([1.0, 0.0, 1.0, 1.0], max_steps=2) == 0.5
    assert math.isnan(prof.process_value([1.0, NAN], max_steps=30))
    assert math.isnan(prof.process_value([], max_steps=30))


def test_arith_checker_scores_steps_exactly():
    prm = prof.ArithStepChecker()
    problem = "Compute 12+5-3."
    right = "12+5=17\n\n17-3=14\n\n\\boxed{14}"
    lucky = "12+5=18\n\n18-3=14\n\n\\boxed{14}"  # right answer, wrong steps
    n_steps, scores, values = prof.score_responses(prm, [problem, problem, "What is pi?"],
                                                   [right, lucky, "3.14"], max_steps=30)
    assert n_steps == [3, 3, 1]
    assert scores[0] == [1.0, 1.0, 1.0] and scores[1] == [0.0, 0.0, 1.0]
    assert values[:2] == [1.0, pytest.approx(1 / 3)]
    assert math.isnan(values[2])  # not a built-in problem: the exact checker cannot judge it


@pytest.fixture(scope="module")
def tiny_prm_dir(tmp_path_factory):
    tokenizer = models.build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         num_labels=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(config)
    path = tmp_path_factory.mktemp("prm") / "tiny-prm"
    models.save_model(model, tokenizer, path)
    return path


def test_transformers_prm_scores_the_same_batched_and_one_by_one(tiny_prm_dir):
    prm = prof.TransformersPRM(str(tiny_prm_dir), batch_size=4)
    problems = ["Compute 1+2.", "Compute 12+5-3.", "Compute 9-1.", "Compute 40+2+7."]
    steps = [["1+2=3", "\\boxed{3}"], ["12+5=17", "17-3=14", "\\boxed{14}"], ["\\boxed{8}"],
             ["40+2=42", "42+7=49", "\\boxed{49}", "extra"]]
    batched = prm.step_scores(problems, steps)
    single = [prm.step_scores([p], [s])[0] for p, s in zip(problems, steps)]
    assert [len(s) for s in batched] == [2, 3, 1, 4]
    for b, s in zip(batched, single):
        assert all(0.0 <= x <= 1.0 for x in b)
        torch.testing.assert_close(torch.tensor(b), torch.tensor(s), rtol=1e-5, atol=1e-6)
    assert len({round(x, 6) for row in batched for x in row}) > 1  # not a constant


def test_transformers_prm_marks_cut_steps_nan(tiny_prm_dir):
    prm = prof.TransformersPRM(str(tiny_prm_dir))
    two_steps = len(prm.tokenizer(prm.render("Compute 1+2.", ["1+2=3"] * 2), add_special_tokens=False)["input_ids"])
    prm.max_length = two_steps + 3  # room for the first two steps and part of the third
    scores = prm.step_scores(["Compute 1+2."], [["1+2=3"] * 20])[0]
    assert len(scores) == 20
    assert not any(math.isnan(x) for x in scores[:2]) and all(math.isnan(x) for x in scores[2:])


def _prm(**changes) -> config.PRM:
    return config.PRM(**{"separator": "<extra_0>", "system": None, "batch_size": 8, "max_length": 4096, **changes})


def test_transformers_prm_errors(tiny_prm_dir, tmp_path):
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        prof.load_prm(_prm(name=str(tmp_path / "missing")))
    with pytest.raises(models.ModelLoadError, match="separator"):
        prof.TransformersPRM(str(tiny_prm_dir), separator="<no_such_token>")
    assert isinstance(prof.load_prm(_prm(name="arith")), prof.ArithStepChecker)
    assert isinstance(prof.load_prm(_prm(name=str(tiny_prm_dir))), prof.TransformersPRM)
