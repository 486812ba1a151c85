"""GAIN-RL ("Angles Don't Lie", Wang et al. 2025): angle-concentration ranking and Gaussian sampling.

Offline (the `score` stage), with the current policy and the prompt prefill only:

1. `render_for_angles` renders a question as chat: optional system prompt, optional fixed one-shot
   exchange, then the question, with the generation prompt opened.
2. `segments` finds, from the tokenizer's offsets (never hard-coded token counts), the prefix
   P = every token before the question and the question Q = the tokens covering the question's
   characters in the last user turn. Trailing tokens (end of turn, generation prompt) are in neither.
3. `mlp_inputs` captures X = the input of the last decoder layer's MLP (the output of its
   post-attention RMSNorm), per token, in fp32, and by default stops the forward pass right there, so
   the last MLP, the final norm and the LM head (the largest matmul and the (B, L, vocab) logits)
   never run.
4. `angle_concentration` gives C_intra (mean cosine over Q x Q) and C_inter (mean cosine over Q x P)
   in O(L * d): with U the unit rows of X, the mean cosine over A x B is <sum_A U, sum_B U> / (|A| |B|),
   so no L x L matrix is ever formed.
5. `score_prompts` ranks: score = w_intra * C_intra + w_inter * C_inter, descending, ties by id;
   rows without a score (empty question) are ranked last, flagged `valid = False` and so counted.
   `spearman` gives the correlation of the score with question length: the reference release's
   rankings are almost exactly shortest-prompt-first, so `order_positions(..., "length", ...)` is a
   required baseline next to "gain_rl" and "random".

Online (the `train` stage; one GAIN-RL "epoch" = one batch of K prompts = one optimizer step, K
counted over all processes together):

6. `GaussianSampler` puts weights w_i = exp(-((i - mu) / sigma)^2 / 2) on rank positions
   i = 0..N-1 and draws min(K, N) distinct positions. After each step `mu_update` moves mu by
   delta = n tanh(alpha (acc - beta)) + n tanh(alpha ang), clipped to [delta_min, delta_max], and
   clips mu itself to [0, N-1]: the clipped mu is the one stored, drawn around, logged and
   checkpointed. acc is the step's fraction of correct rollouts, ang the mean over rollouts of
   `causal_angle` (the mean cosine over the lower triangle of each rollout's own cosine matrix, at
   the same hook point). The sampler records the update at which mu first reached N-1; from then
   on `at_end = "stay"` keeps drawing around N-1 (the reference), `"uniform"` draws K prompts
   uniformly from all N. Its state (mu, RNG, counts) is JSON-serialisable for checkpoints; every
   rank builds it with the same seed and so draws the same positions.
7. `expand_for_trl` lays drawn indices out the way TRL's RepeatSampler does.

`REFERENCE` holds the reference release's constants (in rank positions, for N from about 3,000 to
40,000 and 200 epochs). Here sigma, n and the delta bounds are fractions of N instead
(`rlvr.grpo.GainRLSchedule` converts them), calibrated on the built-in task (docs/algorithms.md,
benchmarks/gain_rl_calibration.py).

Not covered: models whose decoder is not at `model.model.layers` (the Qwen2/Llama layout of
transformers causal LMs); stopping a forward with an exception inside engines that gather sharded
parameters around the forward (DeepSpeed ZeRO-3) - use `stop_early=False` there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr.config import GAIN_RL_AT_END

# The reference release's online constants, in rank positions; it used them unchanged for N from
# about 3,000 to 40,000 prompts and 200 epochs. Kept for the record and the docs: this project sets
# sigma, n and the delta bounds as fractions of N (train.gain_rl), so a set of any size is walked at
# the pace of its own step budget.
REFERENCE = {"sigma": 1000.0, "n": 500.0, "alpha": 2.0, "beta": 0.5, "delta_min": 0.0, "delta_max": 1000.0,
             "mu0": 0.0}

# Rows of X whose norm is below this are treated as zero vectors (cosine 0 with everything) instead
# of dividing by zero; real hidden states after an RMSNorm are nowhere near it.
_NORM_EPS = 1e-12

ORDERS = ("gain_rl", "length", "random")


# ---------------------------------------------------------------------------------------------
# Rendering and segments


def render_for_angles(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    system: str | None,
    one_shot: tuple[str, str] | None,
) -> str:
    """The chat text scored for one question: [system], [one-shot user + assistant], user question,
    with the generation prompt opened (what the policy would continue)."""
    turns = []
    if system:
        turns.append({"role": "system", "content": system})
    if one_shot is not None:
        shot_question, shot_answer = one_shot
        turns.append({"role": "user", "content": shot_question})
        turns.append({"role": "assistant", "content": shot_answer})
    turns.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def encode_with_segments(
    tokenizer: PreTrainedTokenizerBase, text: str, question: str
) -> tuple[list[int], int, int]:
    """Token ids of `text` and the question's token range [q_start, q_end) inside it.

    P = tokens [0, q_start): everything before the question (system prompt, one-shot exchange, the
    role header of the final user turn). Q = tokens [q_start, q_end): the tokens overlapping the
    question's characters at its LAST occurrence in `text` (the final user turn). Tokens from q_end on
    (end of turn, generation prompt) are excluded. Ids are `tokenizer(text, add_special_tokens=False)`.
    Raises ValueError for a slow tokenizer, an empty question or a question that the template did not
    reproduce verbatim.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"segments need a fast tokenizer (offset mapping); got {type(tokenizer).__name__}. "
            "Load it with use_fast=True."
        )
    if not question:
        raise ValueError("the question is empty: it has no tokens to score")
    char_start = text.rfind(question)
    if char_start < 0:
        raise ValueError(
            f"question not found in the rendered text (the chat template may rewrite content, e.g. "
            f"trim whitespace): question={question[:80]!r}, text ends {text[-160:]!r}"
        )
    char_end = char_start + len(question)
    # The chat template writes every special token itself (BOS included), as TRL tokenizes prompts.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # A token belongs to Q when its character span overlaps the question's; one that straddles the
    # boundary (e.g. a merged "\nWhat") is therefore in Q.
    inside = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < char_end and b > char_start]
    if not inside:
        raise ValueError(f"no token covers the question's characters {char_start}..{char_end}: {question[:80]!r}")
    return list(encoding["input_ids"]), inside[0], inside[-1] + 1




# ---------------------------------------------------------------------------------------------
# Hidden states at the hook point


class _StopForward(Exception):
    """Raised by the capture hook to abandon the rest of the forward pass."""


def mlp_inputs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    stop_early: bool = True,
) -> torch.Tensor:
    """X = the input of `model.model.layers[-1].mlp` (post-attention RMSNorm output), (B, L, d) fp32.

    With `stop_early` the hook raises after capturing, so the last MLP, the final norm and the LM
    head never run. Padding may be on either side; `attention_mask` marks real tokens and positions
    are the model's own (rotary attention is relative, so a constant left-padding shift does not
    change the real tokens' states). Rows at padding positions are unspecified (can be NaN).
    The values are the model's dtype upcast to fp32 (a bf16 model gives bf16-precision values).
    """
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().float())
        if stop_early:
            raise _StopForward

    device = next(model.parameters()).device
    handle = model.model.layers[-1].mlp.register_forward_pre_hook(capture)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the last MLP to run once per forward, it ran {len(captured)} times")
    return captured[0]


# ---------------------------------------------------------------------------------------------
# Angle statistics, O(L * d)


def _unit_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of `hidden` scaled to unit norm (zero rows stay zero), and zero where `mask` is False."""
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"need hidden (B, L, d) and mask (B, L); got {tuple(hidden.shape)} and {tuple(mask.shape)}")
    x = hidden.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    # where, not multiply: padding rows may hold NaN (fully masked attention rows) and NaN * 0 = NaN.
    return torch.where(mask.bool().unsqueeze(-1), unit, torch.zeros((), dtype=unit.dtype, device=unit.device))


def angle_concentration(
    hidden: torch.Tensor, q_mask: torch.Tensor, p_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, C_intra = mean cos over Q x Q and C_inter = mean cos over Q x P.

    Means run over all ordered pairs, i == j included, so C_intra = |sum_Q u|^2 / |Q|^2 and
    C_inter = <sum_Q u, sum_P u> / (|Q| |P|) with u the unit rows: O(L * d) time and memory, no
    L x L matrix. fp32. A row with an empty Q gets NaN for both; an empty P gives C_inter NaN.
    """
    q_mask, p_mask = q_mask.bool(), p_mask.bool()
    unit = _unit_rows(hidden, q_mask | p_mask)
    sum_q = torch.einsum("bl,bld->bd", q_mask.float(), unit)
    sum_p = torch.einsum("bl,bld->bd", p_mask.float(), unit)
    n_q = q_mask.sum(-1).float()
    n_p = p_mask.sum(-1).float()
    nan = torch.tensor(float("nan"), device=unit.device)
    c_intra = torch.where(n_q > 0, (sum_q * sum_q).sum(-1) / n_q.clamp_min(1) ** 2, nan)
    c_inter = torch.where((n_q > 0) & (n_p > 0), (sum_q * sum_p).sum(-1) / (n_q * n_p).clamp_min(1), nan)
    return c_intra, c_inter


def causal_angle(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Causal angle concentration of each sequence's own tokens, (B,) fp32.

    Number the valid tokens (mask True) of a sequence 1..L in order, with unit rows u_1..u_L. The
    value is the mean cosine over the pairs (i, j) with j <= i, the lower triangle of the L x L
    cosine matrix, diagonal included:

        ang = (sum_i <u_i, S_i>) / (L (L + 1) / 2),   S_i = u_1 + ... + u_i,

    so every pair weighs the same, in O(L * d) with prefix sums. (A mean of per-token means,
    (1/L) sum_i <u_i, S_i> / i, is not the same: it gives the pairs of token i the weight 1/(L i),
    so the first tokens' few pairs count far more than the last tokens' many. The reference code's
    mask also takes the pair j = i + 1, an off-by-one left out here.) Padding is skipped
    wherever it sits (left, right or inside). One valid token gives 1 (its cosine with itself); a
    zero row counts as cosine 0 with everything; a sequence without valid tokens gives NaN.
    """
    mask = mask.bool()
    unit = _unit_rows(hidden, mask)  # padding rows are zero, so they add nothing to the prefix sums
    prefix_sums = unit.cumsum(dim=1)
    lower_triangle_sum = torch.linalg.vecdot(unit, prefix_sums).sum(-1)
    n_valid = mask.sum(-1).float()
    n_pairs = n_valid * (n_valid + 1) / 2
    nan = torch.tensor(float("nan"), device=unit.device)
    return torch.where(n_valid > 0, lower_triangle_sum / n_pairs.clamp_min(1), nan)


# ---------------------------------------------------------------------------------------------
# Offline ranking


def score_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[str],
    questions: list[str],
    system: str | None,
    one_shot: tuple[str, str] | None,
    batch_size: int,
    w_intra: float = 1.0,
    w_inter: float = 1.0,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[dict], list[dict] | None] | None = None,
) -> pd.DataFrame | None:
    """Rank questions by angle concentration with the current policy (prefill only, stopped early).

    Returns one row per id, sorted by `rank` (0 = first to train on), with columns id, c_intra,
    c_inter, score, rank, question_length (Q tokens), valid. Order: valid rows by score descending,
    ties by id ascending; then rows without a finite score (empty question, or a template leaving no
    prefix while w_inter != 0) by id, with valid = False so the caller can count them. A zero weight
    drops its term (so a NaN C_inter does not poison a pure-C_intra score).

    Sequences are batched in order of token length (less padding) and padded on
    `tokenizer.padding_side`; the ranking does not depend on the input order (scores may differ in
    the last float bits when a different order puts a row in a different batch).

    Several processes (rlvr/sharding.py): every rank builds the same batches, rank `rank` of `world`
    runs batches rank, rank + world, ...; `gather` sends its {row: (C_intra, C_inter)} to rank 0 and
    returns every rank's there (None elsewhere). The batches do not depend on `world`, so neither do
    the scores. Returns None on ranks other than 0.
    """
    if len(ids) != len(questions):
        raise ValueError(f"ids and questions differ in length: {len(ids)} vs {len(questions)}")
    if not all(isinstance(i, str) for i in ids):
        raise ValueError("ids must be strings (ties are broken by string order)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"ids must be unique; {len(ids) - len(set(ids))} duplicates found")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before scoring")
    if w_intra == 0 and w_inter == 0:
        raise ValueError("w_intra and w_inter are both 0: the score would not rank anything")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, world = {world})")
    if world > 1 and gather is None:
        raise ValueError("world > 1 needs `gather`: without it rank 0 would rank only its own batches")

    n_rows = len(ids)
    c_intra = np.full(n_rows, np.nan)
    c_inter = np.full(n_rows, np.nan)
    question_length = np.zeros(n_rows, dtype=np.int64)
    encoded: dict[int, tuple[list[int], int, int]] = {}
    for row, question in enumerate(questions):
        if not question:
            continue  # no Q tokens: ranked last, valid = False
        text = render_for_angles(tokenizer, question, system, one_shot)
        encoded[row] = encode_with_segments(tokenizer, text, question)
        question_length[row] = encoded[row][2] - encoded[row][1]

    by_length = sorted(encoded, key=lambda row: (len(encoded[row][0]), row))
    batches = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    mine: dict[int, tuple[float, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches[rank::world], desc="angles", disable=not progress):
            padded = tokenizer.pad({"input_ids": [encoded[row][0] for row in batch]}, return_tensors="pt")
            attention_mask = padded["attention_mask"].bool()
            q_mask = torch.zeros_like(attention_mask)
            p_mask = torch.zeros_like(attention_mask)
            for slot, row in enumerate(batch):
                first = int(attention_mask[slot].nonzero()[0])  # where this row's tokens begin
                _, q_start, q_end = encoded[row]
                p_mask[slot, first : first + q_start] = True
                q_mask[slot, first + q_start : first + q_end] = True
            hidden = mlp_inputs(model, padded["input_ids"], padded["attention_mask"], stop_early=True)
            intra, inter = angle_concentration(hidden, q_mask.to(hidden.device), p_mask.to(hidden.device))
            for row, a, b in zip(batch, intra.cpu().double().tolist(), inter.cpu().double().tolist()):
                mine[row] = (a, b)
    finally:
        model.train(was_training)
    parts = [mine] if gather is None else gather(mine)
    if parts is None:
        return None
    for part in parts:
        for row, (a, b) in part.items():
            c_intra[row], c_inter[row] = a, b

    score = np.zeros(n_rows)
    if w_intra != 0:
        score = score + w_intra * c_intra
    if w_inter != 0:
        score = score + w_inter * c_inter
    valid = np.isfinite(score)
    order = sorted(range(n_rows), key=lambda r: (not valid[r], -score[r] if valid[r] else 0.0, ids[r]))
    frame = pd.DataFrame(
        {
            "id": [ids[r] for r in order],
            "c_intra": c_intra[order],
            "c_inter": c_inter[order],
            "score": score[order],
            "rank": np.arange(n_rows, dtype=np.int64),
            "question_length": question_length[order],
            "valid": valid[order],
        }
    )
    return frame


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1])
    ends = np.concatenate([starts[1:], [len(values)]])
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson correlation of the average ranks (ties share their mean
    rank). NaN when either side is constant or has fewer than 2 values; NaN inputs are an error."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D sequences of the same length, got {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("spearman got NaN values; keep only rows with a score (frame['valid'])")
    if len(a) < 2:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def _by_rank(frame: pd.DataFrame, seed: int) -> list[str]:
    return frame.sort_values("rank", kind="stable")["id"].tolist()


def _by_length(frame: pd.DataFrame, seed: int) -> list[str]:
    return [i for _, i in sorted(zip(frame["question_length"].tolist(), frame["id"].tolist()))]


def _by_seeded_permutation(frame: pd.DataFrame, seed: int) -> list[str]:
    ids = sorted(frame["id"].tolist())  # independent of the frame's row order
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]


_ORDERINGS = {"gain_rl": _by_rank, "length": _by_length, "random": _by_seeded_permutation}


def order_positions(frame: pd.DataFrame, order: str, seed: int) -> list[str]:
    """Ids in training order: "gain_rl" by rank (invalid rows last), "length" shortest question first
    (ties by id), "random" a permutation seeded by `seed`. Every id appears exactly once."""
    if order not in _ORDERINGS:
        raise ValueError(f"unknown order {order!r}; use one of {list(ORDERS)}")
    return _ORDERINGS[order](frame, seed)


# ---------------------------------------------------------------------------------------------
# Online schedule


def clip_mu(mu: float, n_items: int) -> float:
    """mu clipped to the ranking, [0, N-1]; NaN is an error."""
    if math.isnan(mu):
        raise ValueError("mu is NaN")
    return min(max(float(mu), 0.0), n_items - 1.0)


def mu_update(
    mu: float,
    n_items: int,
    acc: float,
    ang: float,
    n: float,
    alpha: float,
    beta: float,
    delta_min: float,
    delta_max: float,
) -> tuple[float, float]:
    """One GAIN-RL step of mu over a ranking of `n_items` positions; returns (new mu, delta).

    delta = n * tanh(alpha * (acc - beta)) + n * tanh(alpha * ang), clipped to [delta_min, delta_max],
    and the new mu = min(max(mu + delta, 0), N - 1): mu itself is clipped, so it never runs past
    the end of the ranking (n, delta_min and delta_max are in rank positions here).
    """
    if delta_min > delta_max:
        raise ValueError(f"delta_min ({delta_min}) must be <= delta_max ({delta_max})")
    if not (math.isfinite(acc) and math.isfinite(ang)):
        raise ValueError(f"acc and ang must be finite, got acc={acc}, ang={ang}")
    raw = n * math.tanh(alpha * (acc - beta)) + n * math.tanh(alpha * ang)
    delta = min(max(raw, delta_min), delta_max)
    return clip_mu(float(mu) + delta, n_items), delta


class GaussianSampler:
    """Draws rank positions around mu with Gaussian weights; mu moves with training progress.

    mu is always inside [0, N-1] (clipped at construction, on every update and on load). `end_update`
    is the number of the update at which mu first reached N-1 (0 when mu0 is already there, None
    until then); with `at_end="uniform"` every draw after it is K positions uniformly from all N,
    with `"stay"` (the reference) the Gaussian stays centred at N-1.

    Draws use the sampler's own numpy Generator (PCG64, seeded), so every rank built with the same
    seed draws the same positions, and `state_dict` / `load_state_dict` (JSON-serialisable) resume
    a run exactly.
    """

    def __init__(self, n_items: int, sigma: float, mu0: float, seed: int, at_end: str = "stay") -> None:
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if at_end not in GAIN_RL_AT_END:
            raise ValueError(f"at_end must be one of {list(GAIN_RL_AT_END)}, got {at_end!r}")
        self.n_items = int(n_items)
        self.sigma = float(sigma)
        self.at_end = at_end
        self.mu = clip_mu(mu0, self.n_items)
        self.draws = 0
        self.updates = 0
        self.end_update: int | None = 0 if self.at_last_position else None
        self._rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def at_last_position(self) -> bool:
        return self.mu >= self.n_items - 1

    def _log_weights(self) -> np.ndarray:
        """Unnormalised log weights with maximum 0 (finite for any sigma > 0)."""
        z = (np.arange(self.n_items, dtype=np.float64) - self.mu) / self.sigma
        log_w = -0.5 * z * z
        return log_w - log_w.max()

    def draw(self, k: int) -> np.ndarray:
        """min(k, N) distinct positions drawn without replacement, ascending.

        Gaussian weights: Gumbel-top-k, the k largest of log w_i + Gumbel noise are a draw without
        replacement proportional to w. Log weights never underflow to -inf, so far-from-mu positions
        can still fill a draw larger than the Gaussian's effective width. After the end of the
        ranking with at_end "uniform": a uniform draw without replacement from the same RNG.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        size = min(k, self.n_items)
        if self.at_end == "uniform" and self.end_update is not None:
            chosen = self._rng.choice(self.n_items, size=size, replace=False)
        else:
            keys = self._log_weights() + self._rng.gumbel(size=self.n_items)
            chosen = np.argsort(-keys, kind="stable")[:size]
        self.draws += 1
        return np.sort(chosen)

    def update(
        self, acc: float, ang: float, n: float, alpha: float, beta: float, delta_min: float, delta_max: float
    ) -> float:
        """Move mu by `mu_update` (clipped to [0, N-1]); returns delta."""
        self.mu, delta = mu_update(self.mu, self.n_items, acc, ang, n, alpha, beta, delta_min, delta_max)
        self.updates += 1
        if self.end_update is None and self.at_last_position:
            self.end_update = self.updates
        return delta

    def state_dict(self) -> dict:
        return {
            "n_items": self.n_items,
            "sigma": self.sigma,
            "at_end": self.at_end,
            "mu": self.mu,
            "draws": self.draws,
            "updates": self.updates,
            "end_update": self.end_update,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_items", "sigma", "at_end"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"checkpointed sampler has {key}={state.get(key)!r}, this run has {getattr(self, key)!r}; "
                    "resume with the same ranking and train.gain_rl params"
                )
        mu = float(state["mu"])
        if not 0.0 <= mu <= self.n_items - 1:
            raise ValueError(f"checkpointed sampler has mu={mu}, outside the ranking [0, {self.n_items - 1}]")
        self.mu = mu
        self.draws = int(state["draws"])
        self.updates = int(state["updates"])
        self.end_update = None if state["end_update"] is None else int(state["end_update"])
        self._rng.bit_generator.state = state["rng"]


def expand_for_trl(indices: Sequence[int], num_generations: int, repeat_count: int) -> list[int]:
    """TRL RepeatSampler layout for one chunk: each index num_generations times in a row, the whole
    chunk repeated repeat_count times, e.g. [a, b], 2, 2 -> [a, a, b, b, a, a, b, b]."""
    if num_generations < 1 or repeat_count < 1:
        raise ValueError(f"num_generations and repeat_count must be >= 1, got {num_generations}, {repeat_count}")
    chunk = [int(i) for i in indices for _ in range(num_generations)]
    return chunk * repeat_count
