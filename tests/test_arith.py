import pytest

from rlvr import arith
from rlvr.grading import grade_one


def test_solution_format_and_answer():
    chain = arith.Chain(operands=(37, 12, 8), ops=("+", "-"))
    assert chain.problem() == "Compute 37+12-8."
    assert chain.solution() == "37+12=49\n\n49-8=41\n\n\\boxed{41}"
    assert chain.answer == 41
    assert arith.parse_problem(chain.problem()) == chain


def test_generate_is_deterministic_and_split_dependent():
    kwargs = dict(min_ops=1, max_ops=3, min_digits=1, max_digits=2)
    a = arith.generate(50, seed=3, split="train", **kwargs)
    assert a == arith.generate(50, seed=3, split="train", **kwargs)
    assert a != arith.generate(50, seed=4, split="train", **kwargs)
    assert [r["problem"] for r in a] != [r["problem"] for r in arith.generate(50, seed=3, split="eval", **kwargs)]
    assert len({r["id"] for r in a}) == 50


def test_difficulty_params_are_respected():
    records = arith.generate(200, seed=0, split="train", min_ops=2, max_ops=4, min_digits=3, max_digits=3)
    for r in records:
        chain = arith.parse_problem(r["problem"])
        assert 2 <= len(chain.ops) <= 4 and r["meta"]["n_ops"] == len(chain.ops)
        assert all(x < 1000 for x in chain.operands)
        assert len(arith.split_steps(r["solution"])) == len(chain.ops) + 1
    assert {r["meta"]["n_ops"] for r in records} == {2, 3, 4}
    with pytest.raises(ValueError, match="min_ops"):
        arith.generate(1, 0, "train", min_ops=3, max_ops=2, min_digits=1, max_digits=1)


def test_worked_solutions_grade_correct_and_all_steps_right():
    for r in arith.generate(100, seed=1, split="train", min_ops=1, max_ops=3, min_digits=1, max_digits=2):
        assert grade_one(r["solution"], r["answer"]) == 1.0
        assert all(arith.check_step_list(r["problem"], arith.split_steps(r["solution"])))


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("37+12=49\n\n49-8=41\n\n\\boxed{41}", [True, True, True]),
        # right answer, wrong first step: the process reward sees it
        ("37+12=50\n\n49-8=41\n\n\\boxed{41}", [False, True, True]),
        # arithmetic true but not this problem's chain
        ("37+13=50\n\n50-8=42\n\n\\boxed{42}", [False, False, False]),
        # wrong operator order, wrong final
        ("37-12=25\n\n25+8=33\n\n\\boxed{33}", [False, False, False]),
        ("37+12=49\n\n49-8=41", [True, True]),
        ("37+12=49\n\n49-8=41\n\n\\boxed{41}\n\nextra", [True, True, True, False]),
        ("", [False]),
        ("  37+12=49 \n \n49-8=41\n\n\n\\boxed{41}", [True, True, True]),
    ],
)
def test_check_steps(completion, expected):
    assert arith.check_step_list("Compute 37+12-8.", arith.split_steps(completion)) == expected


def test_split_steps():
    assert arith.split_steps("a\n\nb\n\n\nc") == ["a", "b", "c"]
    assert arith.split_steps("one step") == ["one step"]
    assert arith.split_steps("\n\n") == [""]


def test_parse_problem_rejects_other_text():
    with pytest.raises(ValueError, match="not a built-in"):
        arith.parse_problem("What is 2+2?")
