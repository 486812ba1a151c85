"""GAIN-RL: segments from chat templates, the hook point, O(L*d) angle formulas against direct
pairwise computations, ranking, the Gaussian sampler and its checkpointing, TRL layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from rlvr import gain_rl
from rlvr.models import build_char_tokenizer, build_tiny_qwen2

SYSTEM = "Compute step by step."
ONE_SHOT = ("Compute 12+5-3.", "12+5=17\n\n17-3=14\n\n\\boxed{14}")
QUESTIONS = ["Compute 7+8.", "Compute 31-4+9.", "Compute 1+1+1+1+1+1.", "Compute 120-7."]

# A Llama-3-like template (header tokens, trimmed content, BOS in the text) and a Llama-2-like one
# (system folded into the first user turn, no generation prompt at all), on the same characters.
LLAMA3_LIKE = (
    "<|begin_of_text|>{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_LIKE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>{{ message['content'] }}<</SYS>>\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}</s>{% endif %}"
    "{% endfor %}"
)


def char_tokenizer(template: str | None = None, padding_side: str = "left") -> PreTrainedTokenizerFast:
    tokenizer = build_char_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.padding_side = padding_side
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    policy = build_tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=64, max_positions=512, seed=0)
    return policy.eval()


def direct_concentration(hidden, q_mask, p_mask):
    """The definition with the full L x L cosine matrix, one sequence at a time."""
    intra, inter = [], []
    for h, q, p in zip(hidden, q_mask, p_mask):
        u = torch.nn.functional.normalize(h.double(), dim=-1)
        cos = u @ u.T
        intra.append(cos[q][:, q].mean() if q.any() else torch.tensor(float("nan")))
        inter.append(cos[q][:, p].mean() if q.any() and p.any() else torch.tensor(float("nan")))
    return torch.stack(intra).float(), torch.stack(inter).float()


def direct_causal(hidden, mask):
    """The spec's definition with the explicit L x L matrix: per sequence, the valid tokens' cosine
    matrix, masked to its lower triangle (j <= i, diagonal included), and the mean over those pairs."""
    out = []
    for h, m in zip(hidden, mask):
        u = torch.nn.functional.normalize(h[m].double(), dim=-1)
        if len(u) == 0:
            out.append(float("nan"))
            continue
        lower = torch.tril(torch.ones(len(u), len(u), dtype=torch.bool))
        out.append(float((u @ u.T)[lower].mean()))
    return torch.tensor(out, dtype=torch.float32)


def per_token_mean_causal(hidden, mask):
    """The formula used before: each token's mean cosine with the tokens up to it, averaged over tokens."""
    out = []
    for h, m in zip(hidden, mask):
        u = torch.nn.functional.normalize(h[m].double(), dim=-1)
        per_token = [float((u[: i + 1] @ u[i]).sum()) / (i + 1) for i in range(len(u))]
        out.append(sum(per_token) / len(per_token))
    return torch.tensor(out, dtype=torch.float32)


def random_masks(generator, batch, length):
    """Per row a contiguous valid window (left- or right-padded) split into P, Q and a tail."""
    valid = torch.zeros(batch, length, dtype=torch.bool)
    q_mask, p_mask = valid.clone(), valid.clone()
    for b in range(batch):
        n = int(torch.randint(3, length + 1, (1,), generator=generator))
        first = length - n if b % 2 == 0 else 0
        p_end = int(torch.randint(1, n - 1, (1,), generator=generator))
        q_end = int(torch.randint(p_end + 1, n + 1, (1,), generator=generator))
        valid[b, first:first + n] = True
        p_mask[b, first:first + p_end] = True
        q_mask[b, first + p_end:first + q_end] = True
    return valid, q_mask, p_mask


# --------------------------------------------------------------------------------------------
# angle formulas


def test_angle_concentration_equals_direct_pairwise_means_with_padding_on_either_side():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 15, 8, generator=generator) + 0.5  # offset: cosines far from 0
    valid, q_mask, p_mask = random_masks(generator, 6, 15)
    hidden[~valid] = float("nan")  # padding rows must not leak in, whatever they hold
    c_intra, c_inter = gain_rl.angle_concentration(hidden, q_mask, p_mask)
    want_intra, want_inter = direct_concentration(torch.nan_to_num(hidden), q_mask, p_mask)
    assert c_intra.dtype == torch.float32 and c_intra.shape == (6,)
    torch.testing.assert_close(c_intra, want_intra, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_inter, want_inter, atol=1e-5, rtol=0)


def test_angle_concentration_empty_question_is_nan_and_empty_prefix_nans_only_inter():
    hidden = torch.randn(2, 4, 3)
    q_mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    p_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    c_intra, c_inter = gain_rl.angle_concentration(hidden, q_mask, p_mask)
    assert math.isnan(c_intra[0]) and math.isnan(c_inter[0])
    assert math.isfinite(c_intra[1]) and math.isnan(c_inter[1])


def test_identical_rows_have_concentration_one():
    row = torch.randn(5)
    hidden = row.expand(1, 6, 5).clone() * torch.arange(1, 7).view(1, 6, 1)  # same direction, any norm
    q = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    c_intra, c_inter = gain_rl.angle_concentration(hidden, q, ~q)
    torch.testing.assert_close(c_intra, torch.ones(1))
    torch.testing.assert_close(c_inter, torch.ones(1))


def test_causal_angle_equals_the_explicit_lower_triangle_mean_with_padding_on_both_sides():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 11, 6, generator=generator) + 0.3
    valid, _, _ = random_masks(generator, 8, 11)  # even rows left-padded, odd rows right-padded
    valid[6] = False
    valid[6, 4] = True  # L = 1 in the middle of padding: its only pair is (1, 1), cosine 1
    valid[7] = False  # no valid token at all
    hidden[~valid] = float("nan")  # padding rows must not leak in, whatever they hold
    got = gain_rl.causal_angle(hidden, valid)
    want = direct_causal(torch.nan_to_num(hidden), valid)
    assert got.dtype == torch.float32 and got.shape == (8,)
    torch.testing.assert_close(got[:7], want[:7], atol=1e-5, rtol=0)
    assert got[6] == pytest.approx(1.0)
    assert math.isnan(got[7]) and math.isnan(want[7])  # no tokens, no pairs: NaN, never 0


def test_causal_angle_hand_worked_pair_mean_differs_from_the_per_token_mean():
    # u1 = u2 = e1, u3 = e2. Pairs j <= i: (1,1) 1, (2,1) 1, (2,2) 1, (3,1) 0, (3,2) 0, (3,3) 1
    # -> pair mean 4 / 6 = 2/3. The per-token mean (1 + (1+1)/2 + (0+0+1)/3) / 3 = 7/9 gives the
    # single pair of token 1 weight 1/3 and each of token 3's pairs only 1/9.
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert float(gain_rl.causal_angle(hidden, mask)[0]) == pytest.approx(2 / 3)
    assert float(per_token_mean_causal(hidden, mask)[0]) == pytest.approx(7 / 9)


def test_the_old_per_token_mean_overweights_early_tokens_on_random_states():
    # Random states whose first tokens point one way and later ones spread out (as a shared prompt
    # prefix followed by varied text would): the per-token mean leans on the early, concentrated
    # tokens, so it is clearly larger than the pair mean, which the new code computes.
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 40, 16, generator=generator)
    hidden[:, :8] += 4.0  # the first 8 tokens share a direction
    mask = torch.ones(4, 40, dtype=torch.bool)
    new = gain_rl.causal_angle(hidden, mask)
    old = per_token_mean_causal(hidden, mask)
    torch.testing.assert_close(new, direct_causal(hidden, mask), atol=1e-5, rtol=0)
    assert torch.all(old > 1.5 * new)


def test_causal_angle_same_sequence_left_or_right_padded_gives_same_value():
    sequence = torch.randn(7, 4)
    pad = torch.full((3, 4), 123.0)
    left = torch.cat([pad, sequence]).unsqueeze(0)
    right = torch.cat([sequence, pad]).unsqueeze(0)
    left_mask = torch.tensor([[False] * 3 + [True] * 7])
    right_mask = torch.tensor([[True] * 7 + [False] * 3])
    alone = gain_rl.causal_angle(sequence.unsqueeze(0), torch.ones(1, 7, dtype=torch.bool))
    torch.testing.assert_close(gain_rl.causal_angle(left, left_mask), alone)
    torch.testing.assert_close(gain_rl.causal_angle(right, right_mask), alone)
    assert math.isnan(gain_rl.causal_angle(left, torch.zeros_like(left_mask))[0])


# --------------------------------------------------------------------------------------------
# hook point on a real (tiny) Qwen2


def batch_of(tokenizer, texts):
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")


def test_mlp_inputs_stopped_equals_post_attention_norm_of_a_full_forward_and_skips_lm_head(model, tokenizer):
    texts = [gain_rl.render_for_angles(tokenizer, q, SYSTEM, None) for q in QUESTIONS]
    batch = batch_of(tokenizer, texts)
    norm_outputs, head_calls = [], []
    norm_hook = model.model.layers[-1].post_attention_layernorm.register_forward_hook(
        lambda module, args, output: norm_outputs.append(output.detach().clone()))
    head_hook = model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
        assert len(norm_outputs) == 1 and len(head_calls) == 1
        stopped = gain_rl.mlp_inputs(model, batch["input_ids"], batch["attention_mask"], stop_early=True)
        assert len(head_calls) == 1  # the LM head never ran in the stopped pass
        unstopped = gain_rl.mlp_inputs(model, batch["input_ids"], batch["attention_mask"], stop_early=False)
        assert len(head_calls) == 2
    finally:
        norm_hook.remove()
        head_hook.remove()
    valid = batch["attention_mask"].bool()
    assert stopped.dtype == torch.float32 and stopped.shape == (len(texts), valid.shape[1], 32)
    torch.testing.assert_close(stopped[valid], norm_outputs[0][valid])
    torch.testing.assert_close(unstopped[valid], norm_outputs[0][valid])
    assert not model.model.layers[-1].mlp._forward_pre_hooks  # capture hook removed


def test_mlp_inputs_removes_its_hook_when_the_forward_fails(model):
    out_of_vocab = torch.full((1, 4), 10_000)
    with pytest.raises(IndexError):
        gain_rl.mlp_inputs(model, out_of_vocab, torch.ones(1, 4, dtype=torch.long))
    assert not model.model.layers[-1].mlp._forward_pre_hooks


def test_angle_concentration_on_model_hidden_states_equals_direct(model, tokenizer):
    texts = [gain_rl.render_for_angles(tokenizer, q, SYSTEM, ONE_SHOT) for q in QUESTIONS]
    batch = batch_of(tokenizer, texts)
    hidden = gain_rl.mlp_inputs(model, batch["input_ids"], batch["attention_mask"])
    q_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    p_mask = q_mask.clone()
    width = q_mask.shape[1]
    for row, (text, question) in enumerate(zip(texts, QUESTIONS)):
        _, q_start, q_end = gain_rl.encode_with_segments(tokenizer, text, question)
        p_end = q_start  # P is everything before Q
        n_tokens = int(batch["attention_mask"][row].sum())
        first = width - n_tokens  # left padding
        p_mask[row, first:first + p_end] = True
        q_mask[row, first + q_start:first + q_end] = True
    got = gain_rl.angle_concentration(hidden, q_mask, p_mask)
    want = direct_concentration(torch.nan_to_num(hidden), q_mask, p_mask)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_model_causal_angle_is_the_same_left_or_right_padded(model):
    left, right = char_tokenizer(padding_side="left"), char_tokenizer(padding_side="right")
    texts = ["Compute 7+8.\n\n7+8=15", "Compute 1+2+3+4+5+6+7.\n\n1+2=3"]
    values = []
    for tok in (left, right):
        batch = batch_of(tok, texts)
        hidden = gain_rl.mlp_inputs(model, batch["input_ids"], batch["attention_mask"])
        values.append(gain_rl.causal_angle(hidden, batch["attention_mask"].bool()))
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# segments


@pytest.mark.parametrize("template", [None, LLAMA3_LIKE, LLAMA2_LIKE], ids=["builtin", "llama3_like", "llama2_like"])
@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no_system", "system"])
@pytest.mark.parametrize("one_shot", [None, ONE_SHOT], ids=["zero_shot", "one_shot"])
def test_segments_decode_to_prefix_question_and_trailer(template, system, one_shot):
    tokenizer = char_tokenizer(template)
    question = "Compute 31-4+9."
    text = gain_rl.render_for_angles(tokenizer, question, system, one_shot)
    _, q_start, q_end = gain_rl.encode_with_segments(tokenizer, text, question)
    p_end = q_start  # P is everything before Q
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    before, _, after = text.rpartition(question)
    assert tokenizer.decode(ids[q_start:q_end]) == question
    assert tokenizer.decode(ids[:p_end]) == before
    assert tokenizer.decode(ids[q_end:]) == after
    if system:
        assert SYSTEM in tokenizer.decode(ids[:p_end])
    if one_shot:
        assert ONE_SHOT[1] in tokenizer.decode(ids[:p_end])


def test_segments_take_the_last_occurrence_when_the_one_shot_repeats_the_question(tokenizer):
    question = ONE_SHOT[0]
    text = gain_rl.render_for_angles(tokenizer, question, None, ONE_SHOT)
    _, q_start, q_end = gain_rl.encode_with_segments(tokenizer, text, question)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert question in tokenizer.decode(ids[:q_start])  # the one-shot copy stays in P
    assert tokenizer.decode(ids[q_start:q_end]) == question


def merging_tokenizer(texts):
    """Word-level tokens where a newline merges with the following word, so a token can start in
    the role header and end inside the question."""
    pattern = Regex(r"\n?[A-Za-z]+|<\|[a-z_]+\|>|[\s\S]")
    splitter = pre_tokenizers.Split(pattern, behavior="isolated")
    pieces = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", *pieces])}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = build_char_tokenizer().chat_template
    return tokenizer


def test_a_token_straddling_the_question_start_belongs_to_the_question():
    question = "What is 2+3?"
    rendered = build_char_tokenizer().apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    tokenizer = merging_tokenizer([rendered])
    text = gain_rl.render_for_angles(tokenizer, question, None, None)
    _, q_start, q_end = gain_rl.encode_with_segments(tokenizer, text, question)
    p_end = q_start  # P is everything before Q
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    char_start = text.rfind(question)
    first_start, first_end = encoding["offset_mapping"][q_start]
    assert first_start < char_start < first_end  # "\nWhat" straddles the boundary
    assert tokenizer.decode(encoding["input_ids"][q_start:q_end]) == "\n" + question
    assert tokenizer.decode(encoding["input_ids"][:p_end]) == text[:char_start - 1]


def test_segments_errors_name_the_problem(tokenizer):
    text = gain_rl.render_for_angles(tokenizer, "Compute 1+2.", None, None)
    with pytest.raises(ValueError, match="not found"):
        gain_rl.encode_with_segments(tokenizer, text, "Compute 9+9.")
    with pytest.raises(ValueError, match="empty"):
        gain_rl.encode_with_segments(tokenizer, text, "")

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        gain_rl.encode_with_segments(SlowTokenizer(), text, "Compute 1+2.")


# --------------------------------------------------------------------------------------------
# ranking


def test_score_prompts_ranks_deterministically_with_ties_by_id_and_invalid_rows_last(model, tokenizer):
    # "q-b", "q-a" and "q-c" share one question, so their scores tie exactly; "q-empty" has no Q.
    ids = ["q-b", "q-x", "q-a", "q-empty", "q-y", "q-c", "q-z"]
    questions = ["Compute 7+8.", QUESTIONS[1], "Compute 7+8.", "", QUESTIONS[2], "Compute 7+8.", QUESTIONS[3]]
    frame = gain_rl.score_prompts(model, tokenizer, ids, questions, SYSTEM, ONE_SHOT, batch_size=3)
    assert list(frame.columns) == ["id", "c_intra", "c_inter", "score", "rank", "question_length", "valid"]
    assert sorted(frame["rank"]) == list(range(len(ids))) and list(frame["rank"]) == list(range(len(ids)))
    assert sorted(frame["id"]) == sorted(ids)

    last = frame.iloc[-1]
    assert last["id"] == "q-empty" and not last["valid"] and math.isnan(last["score"])
    assert int((~frame["valid"]).sum()) == 1 and last["question_length"] == 0

    valid = frame[frame["valid"]]
    assert valid["score"].is_monotonic_decreasing
    np.testing.assert_allclose(valid["score"], valid["c_intra"] + valid["c_inter"], rtol=0, atol=1e-12)
    tied = frame[frame["id"].isin(["q-a", "q-b", "q-c"])]
    assert tied["score"].nunique() == 1
    assert tied["id"].tolist() == ["q-a", "q-b", "q-c"] and np.all(np.diff(tied["rank"]) == 1)
    assert dict(zip(frame["id"], frame["question_length"]))["q-b"] == len("Compute 7+8.")  # char tokens

    # the same call, and the same items in another input order and batch size, give the same ranking
    again = gain_rl.score_prompts(model, tokenizer, ids, questions, SYSTEM, ONE_SHOT, batch_size=3)
    assert again.equals(frame)
    reordered = gain_rl.score_prompts(model, tokenizer, ids[::-1], questions[::-1], SYSTEM, ONE_SHOT, batch_size=7)
    assert reordered["id"].tolist() == frame["id"].tolist()
    np.testing.assert_allclose(reordered["score"], frame["score"], atol=1e-6)


def test_score_prompts_does_not_depend_on_the_padding_side(model):
    ids = [f"p{i}" for i in range(len(QUESTIONS))]
    left = gain_rl.score_prompts(model, char_tokenizer(padding_side="left"), ids, QUESTIONS, SYSTEM, None, 4)
    right = gain_rl.score_prompts(model, char_tokenizer(padding_side="right"), ids, QUESTIONS, SYSTEM, None, 4)
    np.testing.assert_allclose(left.sort_values("id")["score"], right.sort_values("id")["score"], atol=1e-5)


def test_zero_weight_drops_its_term_and_both_zero_is_an_error(model):
    tokenizer = char_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # nothing before Q
    frame = gain_rl.score_prompts(model, tokenizer, ["a", "b"], QUESTIONS[:2], None, None, 2, w_inter=0.0)
    assert frame["valid"].all() and frame["c_inter"].isna().all()
    np.testing.assert_allclose(frame["score"], frame["c_intra"])
    with pytest.raises(ValueError, match="both 0"):
        gain_rl.score_prompts(model, tokenizer, ["a"], QUESTIONS[:1], None, None, 2, w_intra=0.0, w_inter=0.0)
    with pytest.raises(ValueError, match="unique"):
        gain_rl.score_prompts(model, tokenizer, ["a", "a"], QUESTIONS[:2], None, None, 2)


def test_spearman_hand_worked_and_ties_use_average_ranks():
    # y ranks with the tie 7, 7 sharing (3 + 4) / 2: [1, 2, 3.5, 5, 3.5]; x ranks [1..5].
    # centred: dx = [-2, -1, 0, 1, 2], dy = [-2, -1, 0.5, 2, 0.5]
    # rho = sum(dx dy) / sqrt(sum dx^2 * sum dy^2) = (4 + 1 + 0 + 2 + 1) / sqrt(10 * 9.5) = 8 / sqrt(95)
    assert gain_rl.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert gain_rl.spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)
    assert gain_rl.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(gain_rl.spearman([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="NaN"):
        gain_rl.spearman([1, float("nan")], [1, 2])


def test_spearman_agrees_with_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 40), rng.integers(0, 6, 40)  # many ties
    assert gain_rl.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_order_positions_for_the_ablation():
    frame = pd.DataFrame({"id": ["d", "a", "c", "b"], "rank": [2, 0, 3, 1], "question_length": [5, 9, 5, 2]})
    assert gain_rl.order_positions(frame, "gain_rl", seed=0) == ["a", "b", "d", "c"]
    assert gain_rl.order_positions(frame, "length", seed=0) == ["b", "c", "d", "a"]  # 5, 5 tie: c before d
    shuffled = gain_rl.order_positions(frame, "random", seed=3)
    assert sorted(shuffled) == ["a", "b", "c", "d"]
    assert gain_rl.order_positions(frame.iloc[::-1], "random", seed=3) == shuffled
    assert len({tuple(gain_rl.order_positions(frame, "random", seed=s)) for s in range(10)}) > 1
    with pytest.raises(ValueError, match="unknown order"):
        gain_rl.order_positions(frame, "uniform", seed=0)


# --------------------------------------------------------------------------------------------
# online schedule


@pytest.mark.parametrize(
    "acc, ang, n, delta_min, delta_max, want_delta",
    [
        # 500 tanh(2 (0.75 - 0.5)) + 500 tanh(2 * 0.1) = 500 tanh(0.5) + 500 tanh(0.2)
        #   = 231.058578630 + 98.687660112 = 329.746238742 (inside [0, 1000])
        (0.75, 0.1, 500, 0.0, 1000.0, 329.746238742),
        # 1000 tanh(1) + 1000 tanh(0.6) = 761.594156 + 537.049567 = 1298.64 -> clipped to 1000
        (1.0, 0.3, 1000, 0.0, 1000.0, 1000.0),
        # 500 tanh(-1) + 500 tanh(0) = -380.797078 -> clipped to delta_min 0 (mu never moves back)
        (0.0, 0.0, 500, 0.0, 1000.0, 0.0),
        # 500 tanh(-0.5) + 500 tanh(0.1) = -231.058579 + 49.833997 = -181.224582 (delta_min -1000)
        (0.25, 0.05, 500, -1000.0, 1000.0, -181.224582),
    ],
)
def test_mu_update_hand_worked(acc, ang, n, delta_min, delta_max, want_delta):
    new_mu, delta = gain_rl.mu_update(1000.0, 5000, acc, ang, n, 2.0, 0.5, delta_min, delta_max)
    assert delta == pytest.approx(want_delta, abs=1e-6)
    assert new_mu == pytest.approx(1000.0 + want_delta, abs=1e-6)


@pytest.mark.parametrize(
    "mu, delta_min, delta_max, want_mu",
    [
        (3000.0, 0.0, 1000.0, 3355.0),  # 3000 + 1000 = 4000 > N - 1 = 3355: clipped (issue 10's 3,355)
        (3355.0, 0.0, 1000.0, 3355.0),  # already at the end: stays, never above
        (50.0, -1000.0, -1000.0, 0.0),  # 50 - 1000 < 0: clipped at the first position
    ],
)
def test_mu_update_clips_mu_itself_to_the_ranking(mu, delta_min, delta_max, want_mu):
    new_mu, delta = gain_rl.mu_update(mu, 3356, 1.0, 0.3, 1000, 2.0, 0.5, delta_min, delta_max)
    assert new_mu == want_mu and delta == delta_max


def test_mu_update_rejects_bad_inputs():
    with pytest.raises(ValueError, match="delta_min"):
        gain_rl.mu_update(0.0, 10, 0.5, 0.0, 500, 2, 0.5, 10.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        gain_rl.mu_update(0.0, 10, float("nan"), 0.0, 500, 2, 0.5, 0.0, 1000.0)
    with pytest.raises(ValueError, match="NaN"):
        gain_rl.mu_update(float("nan"), 10, 0.5, 0.0, 500, 2, 0.5, 0.0, 1000.0)


def test_sampler_draws_distinct_sorted_positions_and_caps_at_n():
    sampler = gain_rl.GaussianSampler(n_items=50, sigma=5.0, mu0=10.0, seed=0)
    for _ in range(20):
        drawn = sampler.draw(8)
        assert len(drawn) == 8 and len(set(drawn.tolist())) == 8 and np.all(np.diff(drawn) > 0)
        assert drawn.min() >= 0 and drawn.max() < 50
    small = gain_rl.GaussianSampler(n_items=5, sigma=1.0, mu0=0.0, seed=0)
    assert small.draw(12).tolist() == [0, 1, 2, 3, 4]
    assert sampler.draws == 20 and small.draws == 1


def spec_weights(sampler: gain_rl.GaussianSampler) -> np.ndarray:
    """The design's w_i = exp(-((i - mu) / sigma)^2 / 2) over positions 0..N-1, normalised: written
    here from the spec, independently of the sampler's code."""
    z = (np.arange(sampler.n_items) - sampler.mu) / sampler.sigma
    log_w = -0.5 * z * z
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


@pytest.mark.parametrize(
    "mu0, sigma, peak", [(1e12, 3.0, 99), (1e12, 1e-6, 99), (float("inf"), 3.0, 99), (99.0, 3.0, 99)]
)
def test_sampler_clips_mu0_to_the_ranking_and_draws_with_finite_weights(mu0, sigma, peak):
    sampler = gain_rl.GaussianSampler(n_items=100, sigma=sigma, mu0=mu0, seed=0)
    assert sampler.mu == 99.0 and sampler.end_update == 0  # at the end before any update
    weights = spec_weights(sampler)
    assert np.all(np.isfinite(weights)) and weights.sum() == pytest.approx(1.0)
    assert int(np.argmax(weights)) == peak
    drawn = sampler.draw(10)  # more than the Gaussian's effective width when sigma is tiny
    assert len(set(drawn.tolist())) == 10 and peak in drawn
    with pytest.raises(ValueError, match="NaN"):
        gain_rl.GaussianSampler(n_items=100, sigma=sigma, mu0=float("nan"), seed=0)


def test_sampler_weights_concentrate_near_mu_and_draw_frequencies_follow_them():
    sampler = gain_rl.GaussianSampler(n_items=1000, sigma=10.0, mu0=500.0, seed=0)
    weights = spec_weights(sampler)
    assert int(np.argmax(weights)) == 500
    assert weights[470:531].sum() > 0.99  # +-3 sigma
    assert np.all(np.abs(sampler.draw(20) - 500) <= 60)

    small = gain_rl.GaussianSampler(n_items=5, sigma=1.0, mu0=2.0, seed=1)
    counts = np.bincount([small.draw(1)[0] for _ in range(20_000)], minlength=5)
    np.testing.assert_allclose(counts / 20_000, spec_weights(small), atol=0.015)


def test_sampler_is_identical_on_two_ranks_and_resumes_exactly_from_json():
    rank0 = gain_rl.GaussianSampler(n_items=200, sigma=20.0, mu0=0.0, seed=7, at_end="uniform")
    rank1 = gain_rl.GaussianSampler(n_items=200, sigma=20.0, mu0=0.0, seed=7, at_end="uniform")
    for step in range(5):
        assert rank0.draw(16).tolist() == rank1.draw(16).tolist()
        assert rank0.update(0.6, 0.05, 10, 2, 0.5, 0, 20) == rank1.update(0.6, 0.05, 10, 2, 0.5, 0, 20)
    checkpoint = json.dumps(rank0.state_dict())
    uninterrupted = []
    for _ in range(12):  # 12 steps of the maximum delta 20 take mu past the end: uniform draws follow
        uninterrupted.append(rank0.draw(16).tolist())
        rank0.update(0.9, 0.5, 10, 2, 0.5, 20, 20)
    assert rank0.end_update is not None and rank0.end_update < rank0.updates

    resumed = gain_rl.GaussianSampler(n_items=200, sigma=20.0, mu0=0.0, seed=999, at_end="uniform")
    resumed.load_state_dict(json.loads(checkpoint))
    assert resumed.mu == rank1.mu and resumed.draws == 5 and resumed.updates == 5 and resumed.end_update is None
    replayed = []
    for _ in range(12):
        replayed.append(resumed.draw(16).tolist())
        resumed.update(0.9, 0.5, 10, 2, 0.5, 20, 20)
    assert replayed == uninterrupted and resumed.mu == rank0.mu and resumed.end_update == rank0.end_update

    for other, key in ((gain_rl.GaussianSampler(n_items=201, sigma=20.0, mu0=0.0, seed=7, at_end="uniform"), "n_items"),
                       (gain_rl.GaussianSampler(n_items=200, sigma=20.0, mu0=0.0, seed=7, at_end="stay"), "at_end")):
        with pytest.raises(ValueError, match=key):
            other.load_state_dict(json.loads(checkpoint))
    outside = {**json.loads(checkpoint), "mu": 3355.0}  # an unclipped mu from before issue 10
    with pytest.raises(ValueError, match="outside the ranking"):
        resumed.load_state_dict(outside)


def test_sampler_update_clips_mu_and_records_the_first_update_at_the_end():
    sampler = gain_rl.GaussianSampler(n_items=10, sigma=2.0, mu0=1.0, seed=0)
    # 4 tanh(2 * 0.25) + 4 tanh(2 * 0.1) = 1.848469 + 0.789501 = 2.637970 (bounds [0, 5])
    delta = sampler.update(0.75, 0.1, 4.0, 2.0, 0.5, 0.0, 5.0)
    assert delta == pytest.approx(2.637970, abs=1e-6) and sampler.mu == pytest.approx(3.637970, abs=1e-6)
    assert sampler.end_update is None
    delta = sampler.update(0.75, 0.1, 500.0, 2.0, 0.5, 0.0, 1000.0)  # a large delta: 329.75
    assert delta == pytest.approx(329.746238742) and sampler.mu == 9.0  # N - 1, never above
    assert sampler.end_update == 2 and sampler.updates == 2
    sampler.update(1.0, 1.0, 500.0, 2.0, 0.5, 0.0, 1000.0)
    assert sampler.mu == 9.0 and sampler.end_update == 2  # the first update at the end, not the latest
    assert sampler.state_dict()["mu"] == 9.0
    assert int(np.argmax(spec_weights(sampler))) == 9


def test_at_end_stay_keeps_the_gaussian_at_the_last_rank():
    sampler = gain_rl.GaussianSampler(n_items=1000, sigma=10.0, mu0=0.0, seed=0, at_end="stay")
    sampler.update(1.0, 1.0, 5000.0, 2.0, 0.5, 0.0, 5000.0)
    assert sampler.mu == 999.0 and sampler.end_update == 1
    for _ in range(20):
        assert sampler.draw(16).min() >= 999 - 60  # within 6 sigma of the end, every time


def test_at_end_uniform_draws_k_distinct_prompts_from_all_n_with_the_sampler_rng():
    n_items, k = 50, 8
    sampler = gain_rl.GaussianSampler(n_items=n_items, sigma=2.0, mu0=0.0, seed=5, at_end="uniform")
    before = sampler.draw(k)
    assert before.max() < 15  # before the end: Gaussian around mu = 0
    sampler.update(1.0, 1.0, 100.0, 2.0, 0.5, 0.0, 100.0)
    assert sampler.mu == n_items - 1 and sampler.end_update == 1
    # the same draws as a numpy Generator in the sampler's state would make: rng.choice without replacement
    twin = np.random.Generator(np.random.PCG64(0))
    twin.bit_generator.state = sampler.state_dict()["rng"]
    counts = np.zeros(n_items)
    for _ in range(2000):
        drawn = sampler.draw(k)
        assert drawn.tolist() == sorted(twin.choice(n_items, size=k, replace=False).tolist())
        assert len(set(drawn.tolist())) == k and np.all(np.diff(drawn) > 0)
        counts[drawn] += 1
    # uniform: each position in a draw with probability k / N = 0.16, so about 320 times in 2000 draws
    assert counts.min() > 250 and counts.max() < 400
    assert gain_rl.GaussianSampler(5, 1.0, 4.0, seed=0, at_end="uniform").draw(12).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at_end"):
        gain_rl.GaussianSampler(5, 1.0, 0.0, seed=0, at_end="restart")


def test_reference_constants_are_the_published_ones():
    assert gain_rl.REFERENCE == {"sigma": 1000.0, "n": 500.0, "alpha": 2.0, "beta": 0.5, "delta_min": 0.0,
                                 "delta_max": 1000.0, "mu0": 0.0}


def test_expand_for_trl_matches_the_repeat_sampler_layout():
    assert gain_rl.expand_for_trl(np.array([3, 1]), num_generations=2, repeat_count=3) == [3, 3, 1, 1] * 3
    assert gain_rl.expand_for_trl([5], 4, 1) == [5, 5, 5, 5]
    drawn = gain_rl.GaussianSampler(20, 4.0, 0.0, seed=0).draw(6)
    expanded = gain_rl.expand_for_trl(drawn, 8, 2)
    assert len(expanded) == 6 * 8 * 2 and all(isinstance(i, int) for i in expanded)
    with pytest.raises(ValueError):
        gain_rl.expand_for_trl([1], 0, 1)
