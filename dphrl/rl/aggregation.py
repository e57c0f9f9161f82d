"""How a per-token loss `# (N, T)` becomes a scalar: `algo.loss_agg`, through `AGGREGATIONS`.

Each mode divides a masked sum by a count (tokens or responses); `denom` replaces that count
with the one over every micro-batch and rank, so gradients add up to the global batch's mean.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def token_mean(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Sum over every unmasked token of the batch / number of such tokens (DAPO, the default).

    Long responses weigh in proportion to their length. `denom` overrides the token count, e.g.
    with the count over all micro-batches and ranks, so gradients add up to the full-batch mean.
    """
    total = (values * mask).sum()
    return total / (mask.sum().clamp(min=1) if denom is None else denom)


def seq_mean_token_sum(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Sum over each response's tokens, mean over responses (Dr. GRPO's unnormalised length)."""
    per_seq = (values * mask).sum(dim=-1)  # (N,)
    return per_seq.sum() / (_num_seqs(mask) if denom is None else denom)


def seq_mean_token_mean(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Mean over each response's tokens, then mean over responses (the original GRPO)."""
    per_seq = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (N,)
    return per_seq.sum() / (_num_seqs(mask) if denom is None else denom)


def seq_mean_token_sum_norm(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Each response's token sum over a constant L, then the mean over responses (Dr. GRPO, Liu
    et al. 2025, arXiv 2503.20783): sum / (responses * L), so no response's tokens weigh more for
    being short. `denom` is that product (the trainer passes the responses on all ranks times
    `model.max_new_tokens`); without it L is the mask's width."""
    per_seq = (values * mask).sum(dim=-1)  # (N,)
    return per_seq.sum() / (_num_seqs(mask) * mask.shape[-1] if denom is None else denom)


def _num_seqs(mask: Tensor) -> Tensor:
    """Responses with at least one unmasked token: a fully masked one (e.g. overlong) counts 0."""
    return (mask.sum(dim=-1) > 0).sum().clamp(min=1)


Aggregation = Callable[[Tensor, Tensor, float | None], Tensor]

# `algo.loss_agg` -> (values (N, T), mask (N, T), denom) -> scalar.
AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def agg_count(mask: Tensor, mode: str, max_len: int) -> float:
    """What `mode` divides by on these rows: tokens (token-mean) or responses (seq-mean-*),
    times `max_len` for Dr. GRPO's seq-mean-token-sum-norm. Summed over ranks, it is the
    `denom` that makes the rank-average of gradients the gradient of the global mean."""
    count = float(mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum())
    return count * max_len if mode == "seq-mean-token-sum-norm" else count


def aggregate(
    values: Tensor, mask: Tensor, mode: str = "token-mean", denom: float | None = None
) -> Tensor:
    """Reduce per-token values `# (N, T)` under `mask` `# (N, T)` to a scalar by `mode`."""
    if mode not in AGGREGATIONS:
        raise KeyError(f"unknown loss aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[mode](values, mask, denom)
