"""dphrl's GRPO update equals TRL's: one step from the same weights on the same batch.

Both sides start from the tiny random Llama with the real SmolLM2 tokenizer (`tiny_model_dir`)
and see the same 3 prompts x 4 fixed completions with fixed rewards (no sampling, no
verifier): TRL's `GRPOTrainer` gets them through its generation seam
(`_generate_single_turn`) and a reward function that returns the fixed list; dphrl's
`Trainer` gets them as a `Rollouts` and runs its own update path (`advantages` -> `batch` ->
`update`: the policy forward, `rl.hybrid_loss`, grad clip, AdamW).

What the two compute, and the settings made equal:

- advantage: GRPO's (r - mean_g) / (std_g + eps) per group of 4, std with Bessel's correction on
  both sides (TRL's `nanstd`, dphrl's `torch.std`). eps is not a setting on either side: TRL
  adds 1e-4, dphrl 1e-6. The rewards give every informative group the same std s, so TRL's
  advantages are dphrl's times k = (s + 1e-6) / (s + 1e-4) (1 - 1.7e-4 here), and so are its
  loss and gradient; the test checks TRL = k x dphrl. A group with equal rewards gets 0 on
  both sides (dphrl skips its forward; its tokens still count in the mean).
- loss: PPO-clip with epsilon 0.2 (TRL `epsilon=0.2`; dphrl `clip_low = clip_high = 0.2`, no
  dual-clip, no log-ratio clamp), one pass, so pi_old is the forward's own detached log-probs
  (ratio 1) on both; token-mean over every response token of the batch (TRL
  `loss_type="dapo"`: the sum over the batch's tokens / their count; dphrl `loss_agg=token-mean`,
  one minibatch); no KL / divergence term (TRL `beta=0`, dphrl `divergence=none`);
  temperature 1.
- update: one AdamW step, lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay, constant
  schedule, grad-norm clip 1.0, float32 on the CPU.
- layout: TRL forwards one left-padded row per response and passes no position ids, so a row
  padded on the left would see shifted positions; the prompts tokenize to equal lengths, so
  no prompt is padded (asserted). dphrl lays a group's responses after one copy of the
  prompt (`model.pack_tokens`): the same values up to float32 rounding.

Measured (the test prints it): loss -0.073916204 (TRL) vs k x -0.07392887 (dphrl), equal to
1e-7 relative; gradient norm 0.646348 vs k x 0.6464588; gradients elementwise within 6e-7 of
their largest value; parameter change: relative norm difference 7e-6, largest elementwise
difference 1.5e-6 at lr 1e-3, in elements whose gradient is near AdamW's eps (see the end).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_config

pytestmark = pytest.mark.slow

LR = 1e-3
GROUP = 4
PROMPTS = ["What is 12 + 34?", "What is 56 + 78?", "What is 90 + 13?"]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # last group: all equal
LENGTHS = [5, 9, 3, 12, 7, 4, 11, 6, 8, 2, 10, 5]


def _rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]


def _completions(tokenizer) -> list[list[int]]:
    """Fixed responses of LENGTHS ordinary tokens; every other one ends at EOS."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(100, len(tokenizer) - 100, (n,), generator=g).tolist()
        if i % 2 == 0:
            ids[-1] = tokenizer.eos_token_id
        out.append(ids)
    return out


def _trl_step(model_dir: str, out_dir: str) -> dict:
    """One GRPOTrainer step on the fixed batch: its loss, prompt ids, grad norm, new weights."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    completions = _completions(tokenizer)
    seen: dict = {}

    class Fixed(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            seen["prompt_ids"] = [list(p) for p in prompt_ids]
            return [list(c) for c in completions], None

        def compute_loss(self, model, inputs, **kwargs):
            loss = super().compute_loss(model, inputs, **kwargs)
            seen["loss"] = float(loss.detach())
            return loss

    class Grads(TrainerCallback):  # after the (here inactive) grad clip, before AdamW
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def fixed_reward(completions, **_):
        return list(REWARDS)

    args = GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=len(REWARDS),
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        num_iterations=1,
        max_completion_length=max(LENGTHS),
        temperature=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=1,
        shuffle_dataset=False,
        use_vllm=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        log_completions=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Fixed(
        model=model,
        reward_funcs=fixed_reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in _rows()]),
        processing_class=tokenizer,
        callbacks=[Grads()],
    )
    trainer.train()
    seen["grad_norm"] = next(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h)
    seen["weights"] = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return seen


def _dphrl_step(model_dir: str, run_dir, prompt_ids: list[list[int]]) -> dict:
    """dphrl's update path on the same batch: Trainer.advantages -> batch -> update."""
    from dphrl import dist
    from dphrl.engine import Completion
    from dphrl.rollout import Rollouts, Scored, render_rows
    from dphrl.tasks import Verdict
    from dphrl.training.trainer import Trainer

    cfg = compose_config(
        [
            "task=arith",
            "engine=hf",
            "divergence=none",
            f"model.path={model_dir}",
            f"algo.group_size={GROUP}",
            f"algo.prompts_per_step={len(PROMPTS)}",
            "algo.clip_low=0.2",
            "algo.clip_high=0.2",
            "algo.temperature=1.0",
            "algo.top_p=1.0",
            "algo.loss_agg=token-mean",
            "algo.minibatch_size=0",
            "algo.ppo_epochs=1",
            f"trainer.lr={LR}",
            "trainer.weight_decay=0.0",
            "trainer.adam_betas=[0.9,0.999]",
            "trainer.grad_clip=1.0",
            "trainer.schedule=constant",
            "trainer.warmup_steps=0",
            "trainer.tensorboard=false",
            f"trainer.run_dir={run_dir}",
        ]
    )
    assert cfg.algo.dual_clip is None and cfg.algo.clamp_log_ratio is None
    layout = dist.resolve_layout(cfg.layout)
    t = Trainer(cfg, run_dir, layout, _rows(), [], model_dir)
    ours, _ = render_rows(t.tokenizer, _rows(), cfg.model.max_prompt_len, "train")
    assert [p for p in ours for _ in range(GROUP)] == prompt_ids  # the same prompt tokens
    scored = [
        Scored(Completion("", ids, [0.0] * len(ids), "stop"), Verdict(r))
        for ids, r in zip(_completions(t.tokenizer), REWARDS)
    ]
    rollouts = Rollouts(prompt_ids, scored, GROUP)
    before = {k: v.detach().clone() for k, v in t.policy.named_parameters()}
    grads: dict = {}
    step = t.optimizer.step

    def step_seeing_grads(*args, **kwargs):  # the update frees the gradients after stepping
        grads.update({k: v.grad.detach().clone() for k, v in t.policy.named_parameters()})
        return step(*args, **kwargs)

    t.optimizer.step = step_seeing_grads
    stats = t.update(t.batch(rollouts, t.advantages(rollouts)))
    after = {k: v.detach().clone() for k, v in t.policy.named_parameters()}
    return {
        "loss": stats["pg_loss"],
        "grad_norm": stats["grad_norm"],
        "before": before,
        "weights": after,
        "grads": grads,
    }


def test_grpo_step_equals_trl(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    theirs = _trl_step(tiny_model_dir, str(tmp_path / "trl"))
    assert len({len(p) for p in theirs["prompt_ids"]}) == 1  # no left padding (see docstring)
    ours = _dphrl_step(tiny_model_dir, tmp_path / "dphrl", theirs["prompt_ids"])

    s = torch.tensor(REWARDS[:GROUP]).std().item()
    k = (s + 1e-6) / (s + 1e-4)  # TRL's advantage eps 1e-4 vs dphrl's 1e-6
    assert ours["loss"] != 0.0
    assert theirs["loss"] == pytest.approx(k * ours["loss"], rel=1e-5)
    assert theirs["grad_norm"] == pytest.approx(k * ours["grad_norm"], rel=1e-5)
    assert ours["grad_norm"] < 1.0  # the clip is inactive: the gradients compare unscaled

    names = sorted(ours["before"])
    assert names == sorted(theirs["weights"]) == sorted(theirs["grads"])

    def flat(values: dict) -> torch.Tensor:
        return torch.cat([values[n].flatten() for n in names])

    grad_ours, grad_trl = flat(ours["grads"]), flat(theirs["grads"])
    grad_diff = float((k * grad_ours - grad_trl).abs().max() / grad_trl.abs().max())
    before = flat(ours["before"])
    step_ours, step_trl = flat(ours["weights"]) - before, flat(theirs["weights"]) - before
    worst = float((step_ours - step_trl).abs().max())
    rel = float((step_ours - step_trl).norm() / step_trl.norm())
    print(
        f"TRL vs dphrl: loss {theirs['loss']:.8g} vs {ours['loss']:.8g} (k {k:.6f}); "
        f"grad norm {theirs['grad_norm']:.7g} vs {ours['grad_norm']:.7g}; gradient max abs "
        f"diff / max abs {grad_diff:.3g}; parameter change: max abs diff {worst:.3g} "
        f"(lr {LR}), rel. norm diff {rel:.3g}"
    )
    assert grad_diff <= 1e-5
    assert step_ours.abs().max() > 0.5 * LR  # the step moved the weights by about lr
    assert rel <= 1e-4
    # AdamW's first step is lr g / (|g| + 1e-8) per element: where |g| is near 1e-8 (a sum
    # over tokens that cancels), a float32 rounding of g of ~1e-10 moves it by ~1e-3 lr.
    assert worst <= 5e-3 * LR
