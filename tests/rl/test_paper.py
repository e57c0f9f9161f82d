"""The paper presets equal the official runs: every row of docs/PAPER.md's settings table is
what `+experiment=paper_bird` composes to for that method, and dphrl's loss with the preset's
beta equals the official micro-batch weighting on a toy step (the golden check)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dphrl import config as C
from dphrl.cli import CONF_DIR
from dphrl.rl import aggregation as rl_aggregation
from dphrl.rl import hybrid as rl_hybrid
from dphrl.rl.batching import Packed
from dphrl.rl.divergence import make_divergence
from dphrl.rl.policy_loss import make_policy_loss

PAPER = Path(__file__).resolve().parents[2] / "docs" / "PAPER.md"
METHODS = {  # docs/PAPER.md's first table: method -> the overrides next to the preset
    "js": ["divergence=js"],
    "forward_kl": ["divergence=forward_kl"],
    "alpha": ["divergence=alpha"],
    "grpo": ["divergence=none"],
    "reverse_kl": ["divergence=reverse_kl"],
    "dapo": ["divergence=reverse_kl", "algo=dapo"],
}


def _preset(method: str, tmp_path: Path) -> C.DphrlConfig:
    rows = tmp_path / "bird.jsonl"
    rows.write_text("")
    C.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["+experiment=paper_bird", f"task.path={rows}", *METHODS[method]])
    typed = OmegaConf.to_object(cfg)
    C.validate(typed)
    return typed


def _settings() -> list[tuple[str, str, str]]:
    """(method, dphrl key, dphrl value) of every settings row with a dphrl key."""
    out = []
    for line in PAPER.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] != "method" and not set(cells[0]) <= set("- "):
            if cells[4] != "-":
                out.append((cells[0], cells[4], cells[5]))
    return out


def _same(actual: object, written: str) -> bool:
    if isinstance(actual, bool) or written in ("True", "False"):
        return str(actual) == written
    if isinstance(actual, (int, float)):
        return actual == pytest.approx(float(written), rel=1e-9)
    return str(actual) == written


def test_paper_table_lists_every_method():
    rows = _settings()
    assert len(rows) > 40
    assert {m for m, _, _ in rows} == {"all", *METHODS}
    header = PAPER.read_text().split("## Settings")[0]
    for method, overrides in METHODS.items():
        assert re.search(
            rf"\| {method} \| .* \| `\+experiment=paper_bird {' '.join(overrides)}`", header
        )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_preset_has_the_values_docs_paper_lists(method, tmp_path):
    cfg = _preset(method, tmp_path)
    checked = 0
    for row_method, key, value in _settings():
        if row_method in ("all", method):
            actual = OmegaConf.select(OmegaConf.structured(cfg), key)
            assert _same(actual, value), f"{method}: {key} is {actual}, docs/PAPER.md says {value}"
            checked += 1
    assert checked >= 25


def test_the_8gpu_script_runs_each_method_with_its_preset():
    script = (PAPER.parents[1] / "scripts" / "paper_bird_8gpu.sh").read_text()
    runs = re.findall(r'^  "(\w+):([^"]+)"$', script, flags=re.M)
    assert sorted(o.split() for _, o in runs) == sorted(METHODS.values())


def test_every_experiment_file_is_a_tested_preset():
    shipped = {p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")}
    assert shipped == {"paper_bird"}, "a new preset needs its rows in docs/PAPER.md and a test"


# ---- the golden check ---------------------------------------------------------------------
def _toy_step(n_roll: int, n_ref: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = 32
    lengths = torch.randint(T - 2, T + 1, (n_roll + n_ref,), generator=g)  # 30 to 32 tokens
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).double()  # (N + M, T)
    logp = (-torch.rand(n_roll + n_ref, T, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(n_roll + n_ref, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.5 * torch.randn(n_roll + n_ref, T, generator=g, dtype=torch.float64)
    adv = torch.randn(n_roll, generator=g, dtype=torch.float64)
    return logp, old, ref, adv, mask


def test_golden_check_official_weighting(tmp_path):
    """docs/PAPER.md "Measured check": 2048 rollouts : 256 reference samples as 16 : 2."""
    cfg = _preset("js", tmp_path)
    a, d = cfg.algo, cfg.divergence
    n_roll, n_ref = 16, 2
    assert n_ref / n_roll == cfg.trainer.ref_batch_size / (a.prompts_per_step * a.group_size)
    logp, old, ref, adv, mask = _toy_step(n_roll, n_ref)
    policy_loss = make_policy_loss(
        a.loss,
        clip_low=a.clip_low,
        clip_high=a.clip_high,
        dual_clip=a.dual_clip,
        clamp_log_ratio=a.clamp_log_ratio,
    )
    divergence = make_divergence(d.name, alpha=d.alpha)

    # The official weighting, written out: micro-batches of 2 over [rollouts; reference
    # samples], each micro-batch's own token-mean, summed and divided by the gradient
    # accumulation (rollout micro-batches), reference ones x sft_loss_coeff.
    sft_loss_coeff, micro = 0.01, 2
    official = torch.zeros((), dtype=torch.float64)
    for start in range(0, n_roll + n_ref, micro):
        rows = slice(start, start + micro)
        m = mask[rows]
        if start < n_roll:
            tok, _ = policy_loss(logp[rows], old[rows], adv[rows], m)
            official = official + rl_aggregation.token_mean(tok, m)
        else:
            official = official + sft_loss_coeff * rl_aggregation.token_mean(
                divergence(logp[rows], ref[rows]), m
            )
    official = official / (n_roll // micro)
    (official_grad,) = torch.autograd.grad(official, logp)

    def packed(m: torch.Tensor) -> Packed:
        return Packed(torch.zeros(len(m), 1, dtype=torch.long), torch.ones(len(m), 1), m)

    batch = rl_hybrid.StepBatch(
        packed(mask[:n_roll]),
        adv,
        old_logp=old[:n_roll],
        store=packed(mask[n_roll:]),
        store_ref_logp=ref[n_roll:],
    )
    ours, _ = rl_hybrid.hybrid_loss(
        batch,
        logp[:n_roll],
        logp[n_roll:],
        beta=d.beta,
        divergence=divergence,
        policy_loss=policy_loss,
        loss_agg=a.loss_agg,
    )
    (our_grad,) = torch.autograd.grad(ours, logp)
    assert d.beta == pytest.approx(sft_loss_coeff * n_ref / n_roll)
    assert ours.item() == pytest.approx(official.item(), rel=0.02)
    assert (our_grad - official_grad).norm() <= 0.02 * official_grad.norm()
    # The divergence half is weighted alike: its gradient on the reference rows agrees too.
    ref_rows = slice(n_roll, None)
    assert (our_grad[ref_rows] - official_grad[ref_rows]).norm() <= 0.02 * official_grad[
        ref_rows
    ].norm()
    # The old preset's beta (sft_loss_coeff itself) weighs the reference rows 8x too much.
    old_way, _ = rl_hybrid.hybrid_loss(
        batch,
        logp[:n_roll],
        logp[n_roll:],
        beta=sft_loss_coeff,
        divergence=divergence,
        policy_loss=policy_loss,
    )
    (old_grad,) = torch.autograd.grad(old_way, logp)
    ratio = old_grad[ref_rows].norm() / official_grad[ref_rows].norm()
    assert ratio.item() == pytest.approx(n_roll / n_ref, rel=0.02)
    print(
        f"golden check: loss {ours.item():.6f} vs official {official.item():.6f}; gradient "
        f"rel. diff {((our_grad - official_grad).norm() / official_grad.norm()).item():.4f}"
    )


def test_epochs_budget_in_steps():
    from dphrl.training.sampler import steps_for_epochs

    # 5 epochs over 1000 D_exp prompts at 128 a step: 5000 / 128 = 39.06 -> 40 steps.
    assert steps_for_epochs(5, 1000, 128) == 40
    assert steps_for_epochs(1, 128, 128) == 1
    assert steps_for_epochs(0.01, 10, 128) == 1
