"""Rollout / trainer mismatch metrics and corrections against hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch

from dphrl.rl import mismatch as mm

LN2 = math.log(2.0)


def _case():
    """log w = old - engine: row 0: 0, ln 3, -ln 4; row 1: 0.1, [masked 9], -0.1."""
    engine = torch.zeros(2, 3, dtype=torch.float64)
    old = torch.tensor([[0.0, math.log(3), -math.log(4)], [0.1, 9.0, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 1]], dtype=torch.float64)
    return old, engine, mask


def test_mismatch_stats_by_hand():
    old, engine, mask = _case()
    s = mm.mismatch_stats(old, engine, mask)
    lw = [0.0, math.log(3), -math.log(4), 0.1, -0.1]
    assert s["mismatch_abs_mean"].item() == pytest.approx(sum(abs(x) for x in lw) / 5)
    assert s["mismatch_abs_max"].item() == pytest.approx(math.log(4))
    k3 = sum(math.exp(x) - 1 - x for x in lw) / 5
    assert s["mismatch_kl_k3"].item() == pytest.approx(k3)
    assert s["mismatch_frac_large"].item() == pytest.approx(2 / 5)  # ratios 3 and 1/4


def test_no_mismatch_gives_zeros_and_unit_weights():
    logp = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    s = mm.mismatch_stats(logp, logp.clone(), mask)
    assert all(v.item() == 0.0 for v in s.values())
    for name in mm.ROLLOUT_CORRECTIONS:
        w, m, stats = mm.correct(name, logp, logp.clone(), mask, 0.5, 2.0)
        assert torch.equal(w, torch.ones_like(w)) and torch.equal(m, mask)
        assert stats["rc_frac_masked"] == 0 and stats["rc_frac_truncated"] == 0


def test_tis_truncates_at_c():
    old, engine, mask = _case()
    w, m, s = mm.correct("tis", old, engine, mask, 0.5, 2.0)
    expected = torch.tensor(
        [[1.0, 2.0, 0.25], [math.exp(0.1), 2.0, math.exp(-0.1)]], dtype=torch.float64
    )
    torch.testing.assert_close(w, expected)
    assert torch.equal(m, mask)
    assert s["rc_frac_truncated"].item() == pytest.approx(1 / 5)  # the masked 9 does not count
    assert s["rc_weight_max"].item() == pytest.approx(2.0)
    mean = (1 + 2 + 0.25 + math.exp(0.1) + math.exp(-0.1)) / 5
    assert s["rc_weight_mean"].item() == pytest.approx(mean)


def test_tis_weight_is_detached():
    old = torch.tensor([[0.5]], requires_grad=True)
    w, _, _ = mm.correct("tis", old, torch.zeros(1, 1), torch.ones(1, 1), 0.5, 2.0)
    assert not w.requires_grad


def test_mis_token_masks_tokens_outside_the_range():
    old, engine, mask = _case()
    w, m, s = mm.correct("mis_token", old, engine, mask, 0.5, 2.0)
    assert torch.equal(w, torch.ones_like(w))
    torch.testing.assert_close(m, torch.tensor([[1.0, 0, 0], [1, 0, 1]], dtype=torch.float64))
    assert s["rc_frac_masked"].item() == pytest.approx(2 / 5)


def test_mis_seq_masks_whole_responses_by_geometric_mean():
    # Row 0: mean log w = (0 + ln 3 - ln 4) / 3 = ln(3/4) / 3 -> ratio 0.9086: outside
    # [0.95, 1.05], dropped. Row 1: mean (0.1 - 0.1) / 2 = 0 -> 1: kept (the masked 9 is out).
    old, engine, mask = _case()
    w, m, s = mm.correct("mis_seq", old, engine, mask, 0.95, 1.05)
    torch.testing.assert_close(m, torch.tensor([[0.0, 0, 0], [1, 0, 1]], dtype=torch.float64))
    assert s["rc_frac_masked"].item() == pytest.approx(3 / 5)
    _, m, _ = mm.correct("mis_seq", old, engine, mask, 0.9, 1.1)  # 0.9086 is inside
    assert torch.equal(m, mask)


def test_unknown_correction_names_the_known_ones():
    with pytest.raises(KeyError, match="tis"):
        mm.correct("is", torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.5, 2.0)


def test_config_names_match_the_registry():
    from dphrl.algo_config import ROLLOUT_CORRECTION_NAMES

    assert tuple(mm.ROLLOUT_CORRECTIONS) == ROLLOUT_CORRECTION_NAMES


def _step_batch(engine_logp):
    """Three responses of two tokens, A = +1, -1, 0, under a policy with log-prob -1 each."""
    from dphrl.rl.batching import Packed
    from dphrl.rl.hybrid import StepBatch

    mask = torch.ones(3, 2, dtype=torch.float64)
    packed = Packed(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4), mask)
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    return StepBatch(packed, adv, engine_logp=engine_logp)


def test_hybrid_loss_weighs_tokens_by_tis_and_reports_over_live_rows():
    # log w = old - engine: [0, ln 4], [0, -ln 2], [5, 5] (the A = 0 row: no part in the stats).
    # TIS weights at C = 2: [1, 2], [1, 1/2]; PPO-clip at ratio 1 is -A: [-1, -2], [1, 1/2], [0, 0].
    from dphrl.rl.hybrid import hybrid_loss

    logp = torch.full((3, 2), -1.0, dtype=torch.float64, requires_grad=True)
    engine = torch.tensor([[-1, -1 - LN2 * 2], [-1, -1 + LN2], [-6, -6]], dtype=torch.float64)
    loss, stats = hybrid_loss(
        _step_batch(engine), logp, None, beta=0.0, correction=mm.make_correction("tis", 0.5, 2.0)
    )
    assert loss.item() == pytest.approx((-1 - 2 + 1 + 0.5) / 6)  # token-mean over all 6 tokens
    loss.backward()
    grad = torch.tensor([[-1, -2], [1, 0.5], [0, 0]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, grad)
    assert stats["mismatch_abs_mean"] == pytest.approx(3 * LN2 / 4)
    assert stats["mismatch_abs_max"] == pytest.approx(2 * LN2)
    assert stats["rc_frac_truncated"] == pytest.approx(1 / 4)
    assert stats["rc_weight_mean"] == pytest.approx((1 + 2 + 1 + 0.5) / 4)


def test_hybrid_loss_masks_tokens_with_mis_token():
    # w = 1, 4, 1, 1/2 on the live rows: only the 4 leaves [1/2, 2]; the denominator keeps it.
    from dphrl.rl.hybrid import hybrid_loss

    logp = torch.full((3, 2), -1.0, dtype=torch.float64, requires_grad=True)
    engine = torch.tensor([[-1, -1 - LN2 * 2], [-1, -1 + LN2], [-6, -6]], dtype=torch.float64)
    loss, stats = hybrid_loss(
        _step_batch(engine), logp, None, beta=0.0, correction=mm.make_correction("mis_token")
    )
    assert loss.item() == pytest.approx((-1 + 0 + 1 + 1) / 6)
    assert stats["rc_frac_masked"] == pytest.approx(1 / 4)
    assert stats["mismatch_frac_large"] == pytest.approx(1 / 4)
