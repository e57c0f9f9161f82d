"""`dphrl train`: the hybrid objective of DPH-RL, and the baselines it is compared with.

Per step (`Trainer.step`, which reads like the algorithm):

    rollouts  = G responses for each of a batch of D_exp prompts, from the engine
    rewards   = the task's verifier on each response
    A         = GRPO group advantages (DAPO: drop all-equal groups and refill)
    old logp  = the trainer's own forward pass before the update
    L         = PPO-clip(rollouts, A)                                  on D_exp
              + beta * mean_token f(pi_theta / pi_ref)                 on a ref-store batch (D_pef)
              [+ beta * reverse-KL estimator vs an online reference  for divergence=reverse_kl]
    AdamW step with gradient clipping and the lr schedule, then the new weights go to the engine.

With a ref-store divergence (forward_kl, js, js_full, alpha) the RL part sees only D_exp; the
baselines (`none`, `reverse_kl`) train on every prompt, as in the paper.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dphrl import dist
from dphrl.batching import Packed, pack, repad
from dphrl.divergence import POLICY_SAMPLE_TERMS, REVERSE_KL_ESTIMATORS, make_divergence
from dphrl.engine import Sampling, engine_from_config
from dphrl.logprobs import batch_logprobs
from dphrl.metrics import MetricsLogger, Timer
from dphrl.rl import aggregate, group_advantages, informative_groups, overlong_filter, ppo_clip_loss
from dphrl.rollout import Scored, render_rows, score_outputs
from dphrl.sampler import EpochSampler
from dphrl.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class Rollouts:
    """One step's D_exp groups: G responses per prompt, laid out group by group."""

    prompt_ids: list[list[int]]  # one per response  (B*G,)
    scored: list[Scored]  # (B*G,)
    group_size: int

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([s.verdict.reward for s in self.scored], dtype=torch.float32)  # (B*G,)


def lr_lambda(warmup: int, schedule: str, max_steps: int):
    """Multiplier of the base lr at a step: linear warm-up, then constant / linear / cosine decay."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class Trainer:
    """Holds the policy, the optional online reference, the engine, the optimizer and the data."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        layout: dist.Layout,
        prompts: list[dict],
        ref_rows: list[dict],
        model_path: str,
    ):
        from dphrl.models import load_policy, load_tokenizer

        self.cfg, self.run_dir, self.layout = cfg, run_dir, layout
        self.algo, self.div = cfg.algo, cfg.divergence
        self.task = get_task(cfg.task.name)
        self.prompts, self.ref_rows = prompts, ref_rows
        self.tokenizer = load_tokenizer(model_path)
        torch.manual_seed(cfg.seed)
        self.policy = load_policy(model_path, cfg.model.dtype, layout.device)
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.policy = dist.shard(self.policy, layout)
        needs_online_ref = self.div.name == "reverse_kl" or self.div.name in POLICY_SAMPLE_TERMS
        self.ref_model = (
            load_policy(model_path, cfg.model.dtype, layout.device).eval()
            if needs_online_ref
            else None
        )
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False)
        self.divergence = (
            make_divergence(
                self.div.name,
                alpha=self.div.alpha,
                clamp_log_ratio=self.div.clamp_log_ratio,
                clamp_value=self.div.clamp_value,
            )
            if ref_rows
            else None
        )
        tr = cfg.trainer
        # fused: one kernel over all parameters (CPU and CUDA), a third of foreach's time here
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(),
            lr=tr.lr,
            betas=tuple(tr.adam_betas),
            weight_decay=tr.weight_decay,
            fused=layout.device.split(":")[0] in ("cpu", "cuda"),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(tr.warmup_steps, tr.schedule, tr.max_steps)
        )
        self.prompt_sampler = EpochSampler(len(prompts), cfg.seed)
        self.ref_sampler = EpochSampler(len(ref_rows), cfg.seed + 1) if ref_rows else None
        self.engine = engine_from_config(
            cfg.engine, cfg.model, model_path, device=layout.device, seed=cfg.seed
        )
        self.metrics = MetricsLogger(
            run_dir, tensorboard=tr.tensorboard, wandb=tr.wandb, enabled=layout.is_main
        )
        self.timer = Timer()
        self.step_num = 0
        self.eval_rows = self._eval_rows() if cfg.eval.every else []

    def _eval_rows(self) -> list[dict]:
        """Held-out prompts for `eval.every` (the task's eval split), checked before any rollout."""
        from dphrl.errors import ConfigError

        rows = self.task.load(self.cfg.task, "eval")[: self.cfg.eval.limit or 32]
        if not rows:
            raise ConfigError(
                "eval.every>0 needs held-out prompts: set task.eval_path (the embedded tasks have their own)"
            )
        return rows

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimizer step of the hybrid objective; returns this step's metrics."""
        self.timer.reset()
        rollouts = self.rollout()
        self.engine.sleep()  # gpu layouts with engine.sleep_mode: free the engine's memory to train
        with self.timer("train"):
            batch, advantages, old_logp, ref_model_logp = self.prepare(rollouts)
            ref_batch, ref_logp = self.ref_batch()
            stats = self.update(batch, advantages, old_logp, ref_model_logp, ref_batch, ref_logp)
        with self.timer("weight_sync"):
            self.engine.wake_up()
            self.sync_weights()
        self.step_num += 1
        return self.summarize(rollouts, batch, stats)

    def rollout(self) -> Rollouts:
        """This rank's share of a batch of prompts, G responses each, verified.

        DAPO's dynamic sampling drops groups whose rewards are all equal (zero advantage) and
        draws further prompts until the batch is full or `algo.max_refill_rounds` is spent.
        """
        a, rank, world = self.algo, self.layout.rank, self.layout.world_size
        want = a.prompts_per_step
        share = slice(
            rank * want // world, (rank + 1) * want // world
        )  # contiguous: seeds match 1 process
        prompt_ids: list[list[int]] = []
        groups: list[list[Scored]] = []
        for round_ in range(a.max_refill_rounds + 1 if a.dynamic_sampling else 1):
            rows = [self.prompts[i] for i in self.prompt_sampler.next_batch(want)][share]
            ids, kept = render_rows(self.tokenizer, rows, self.cfg.model.max_prompt_len, "train")
            seed = self.cfg.seed + 1_000_003 * (self.step_num + 1) + 100_019 * round_
            sampling = Sampling(
                a.temperature, a.top_p, self.cfg.model.max_new_tokens, seed
            ).shifted(share.start, a.group_size)
            with self.timer("rollout"):
                outputs = self.engine.generate(ids, a.group_size, sampling)
            with self.timer("verify"):
                scored = score_outputs(self.task, self.cfg.task, kept, outputs)
            for p, group in zip(ids, scored):
                rewards = torch.tensor([s.verdict.reward for s in group])
                if not a.dynamic_sampling or informative_groups(rewards, len(group)).item():
                    prompt_ids.append(p)
                    groups.append(group)
            if len(groups) >= share.stop - share.start:
                break
        groups = groups[: share.stop - share.start]
        flat_prompts = [p for p, g in zip(prompt_ids, groups) for _ in g]
        return Rollouts(flat_prompts, [s for g in groups for s in g], a.group_size)

    def prepare(
        self, r: Rollouts
    ) -> tuple[Packed | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pack the rollouts; advantages, old log-probs (trainer forward) and online-ref log-probs."""
        if not r.scored:
            return None, torch.zeros(0), torch.zeros(0), None
        batch = pack(
            r.prompt_ids, [s.completion.token_ids for s in r.scored], self.tokenizer.pad_token_id
        )
        if self.algo.overlong_filter:
            finished = torch.tensor([s.completion.finish_reason != "length" for s in r.scored])
            batch.response_mask = overlong_filter(
                batch.response_mask, finished, self.cfg.model.max_new_tokens
            )
        batch = batch.to(self.layout.device)
        advantages = group_advantages(r.rewards, r.group_size, norm_std=self.algo.norm_std).to(
            self.layout.device
        )
        with torch.no_grad():
            t = self.algo.temperature
            # One epoch over one minibatch: the loss's forward runs before any update, so its
            # detached log-probs are the old ones (ratio 1); a separate forward would repeat it.
            a = self.algo
            single_pass = a.ppo_epochs == 1 and (
                not a.minibatch_size or a.minibatch_size >= len(batch)
            )
            old_logp = None if single_pass else self.logprobs(self.policy, batch, t)
            ref_model_logp = (
                self.logprobs(self.ref_model, batch, t) if self.ref_model is not None else None
            )
        return batch, advantages, old_logp, ref_model_logp

    def ref_batch(self) -> tuple[Packed | None, torch.Tensor | None]:
        """This rank's share of `trainer.ref_batch_size` ref-store responses and their ref log-probs."""
        if self.ref_sampler is None:
            return None, None
        size, rank, world = (
            self.cfg.trainer.ref_batch_size,
            self.layout.rank,
            self.layout.world_size,
        )
        rows = [self.ref_rows[i] for i in self.ref_sampler.next_batch(size)][
            rank * size // world : (rank + 1) * size // world
        ]
        packed = pack(
            [r["prompt_ids"] for r in rows],
            [r["response_ids"] for r in rows],
            self.tokenizer.pad_token_id,
        )
        ref_logp = repad([r["ref_logprobs"] for r in rows], packed.response_mask)
        return packed.to(self.layout.device), ref_logp.to(self.layout.device)

    def update(
        self, batch, advantages, old_logp, ref_model_logp, ref_batch, ref_logp
    ) -> dict[str, float]:
        """`algo.ppo_epochs` passes over minibatches: PPO-clip + beta * divergence, AdamW each."""
        a = self.algo
        n = len(batch) if batch is not None else 0
        mb = a.minibatch_size or max(n, 1)
        n_mb = max(1, math.ceil(n / mb))
        totals: dict[str, float] = {}
        for _ in range(a.ppo_epochs):
            for k in range(n_mb):
                part = slice(k * mb, (k + 1) * mb)
                ref_part = _share(len(ref_batch), n_mb, k) if ref_batch is not None else None
                loss, stats = self.loss(
                    batch, advantages, old_logp, ref_model_logp, part, ref_batch, ref_logp, ref_part
                )
                self.optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                elif n:  # every advantage 0 and no divergence term: the gradient is exactly 0,
                    # found without a forward; AdamW still steps, as it would on that gradient
                    for param in self.policy.parameters():
                        param.grad = torch.zeros_like(param)
                else:  # no rollouts (all filtered) and no ref batch: nothing to step on
                    continue
                dist.average_gradients(self.policy, self.layout)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.policy.parameters(), self.cfg.trainer.grad_clip or float("inf")
                )
                stats["grad_norm"] = float(
                    grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                )
                self.optimizer.step()
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value / (a.ppo_epochs * n_mb)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return totals

    def loss(
        self, batch, advantages, old_logp, ref_model_logp, part, ref_batch, ref_logp, ref_part
    ):
        """The hybrid loss on one minibatch, scaled so that the rank-average of gradients equals
        the gradient of the global mean (the denominators count tokens or responses on all ranks)."""
        a, beta = self.algo, self.div.beta
        loss = torch.zeros((), device=self.layout.device)
        stats = {"pg_loss": 0.0, "clip_frac": 0.0, "div_loss": 0.0, "kl_ref": 0.0, "rkl_loss": 0.0}
        if batch is not None and len(batch.select(part)):
            mb = batch.select(part)
            mask = mb.response_mask
            old = None if old_logp is None else old_logp[part]
            logp = self._policy_logprobs(mb, advantages[part], old, ref_model_logp is None)
            pg_tok, clip_frac = ppo_clip_loss(
                logp,
                logp.detach() if old is None else old,
                advantages[part],
                mask,
                clip_low=a.clip_low,
                clip_high=a.clip_high,
            )
            denom = self._denominator(mask, a.loss_agg)
            pg = aggregate(pg_tok, mask, a.loss_agg, denom)
            loss = loss + pg
            stats["pg_loss"], stats["clip_frac"] = float(pg.detach()), float(clip_frac)
            if ref_model_logp is not None and beta > 0:
                est = (
                    REVERSE_KL_ESTIMATORS[self.div.estimator]
                    if self.div.name == "reverse_kl"
                    else POLICY_SAMPLE_TERMS[self.div.name]
                )
                rkl = aggregate(est(logp, ref_model_logp[part]), mask, a.loss_agg, denom)
                loss = loss + beta * rkl
                stats["rkl_loss"] = float(rkl.detach())
        if ref_batch is not None and beta > 0 and self.divergence is not None:
            rb = ref_batch.select(ref_part)
            mask = rb.response_mask
            logp = self.logprobs(self.policy, rb, 1.0, grad=True)
            denom = self._denominator(mask, "token-mean")
            div = aggregate(self.divergence(logp, ref_logp[ref_part]), mask, "token-mean", denom)
            loss = loss + beta * div
            with torch.no_grad():
                log_u = (logp - ref_logp[ref_part]) * mask
                kl = aggregate(
                    torch.expm1(log_u) - log_u, mask, "token-mean", denom
                )  # KL(pi_ref || pi_theta) estimate
            stats["div_loss"], stats["kl_ref"] = float(div.detach()), float(kl)
        return loss, stats

    def _policy_logprobs(
        self, mb: Packed, advantages: torch.Tensor, old: torch.Tensor | None, pg_only: bool
    ) -> torch.Tensor:
        """The policy's log-probs `# (n, T)` of a rollout minibatch, forwarded only where they
        can move the loss.

        A response whose advantage is exactly 0 (a group whose rewards are all equal: the
        usual case on hard or easy prompts) adds -min(rho 0, clip(rho) 0) = 0 to the PPO-clip
        loss and nothing to its gradient or clip fraction, whatever rho is. When that loss is
        all the rollouts carry (`pg_only`: no online reference term), such rows skip the
        forward; they hold their old log-probs (rho = 1), so the loss, its gradient and every
        statistic equal the full forward's, at the cost of the informative rows alone.
        """
        t = self.algo.temperature
        live = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(-1)  # (n,)
        if not pg_only or bool(live.all()):
            return self.logprobs(self.policy, mb, t, grad=True)
        base = torch.zeros_like(mb.response_mask) if old is None else old.detach().clone()
        if not bool(live.any()):
            if not (self.layout.fsdp and self.layout.world_size > 1):
                return base
            live = live.clone()
            live[0] = True  # FSDP2 ranks must all forward and backward (their collectives)
        rows = live.nonzero()[:, 0]
        computed = self.logprobs(self.policy, mb.select(rows), t, grad=True)  # (k, T)
        return base.index_put((rows,), computed)

    def _denominator(self, mask: torch.Tensor, mode: str) -> float:
        """Tokens (token-mean) or responses (seq-mean-*) over all ranks, divided by the world size."""
        local = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
        total = dist.all_reduce_sum([float(local)], self.layout.device)[0]
        return max(total, 1.0) / self.layout.world_size

    def logprobs(
        self, model, batch: Packed, temperature: float, grad: bool = False
    ) -> torch.Tensor:
        """Per-token log-probs `# (N, T)` of the response tokens: the one forward pass of training.

        Rollouts are scored at the sampling temperature (the PPO ratio compares the sampling
        distributions); ref-store responses at 1.0, as precompute-ref stored them.
        """
        with torch.set_grad_enabled(grad):
            logp, _ = batch_logprobs(
                model,
                batch,
                pack_tokens=self.cfg.model.pack_tokens,
                temperature=temperature,
                from_hidden=not self.layout.fsdp,
            )
        return logp

    def evaluate(self) -> dict[str, float]:
        """pass@k of the current policy on the held-out prompts (`eval.every`), via the engine.

        The unbiased estimator of `dphrl.passk.pass_at_k`, averaged over prompts; the full
        report (diversity, plots) is `dphrl eval-passk` on a saved model.
        """
        from dphrl.passk import pass_at_k
        from dphrl.rollout import sample_and_score

        ev = self.cfg.eval
        ids, kept = render_rows(
            self.tokenizer, self.eval_rows, self.cfg.model.max_prompt_len, "eval"
        )
        sampling = Sampling(
            ev.temperature, ev.top_p, self.cfg.model.max_new_tokens, self.cfg.seed + 7
        )
        scored = sample_and_score(self.engine, self.task, self.cfg.task, ids, kept, ev.n, sampling)
        correct = [sum(s.verdict.reward >= 1.0 for s in group) for group in scored]
        return {
            f"eval_pass@{k}": sum(pass_at_k(ev.n, c, k) for c in correct) / max(len(correct), 1)
            for k in ev.k
        }

    def sync_weights(self) -> None:
        """Push the updated weights to the rollout engine, one full tensor at a time."""
        self.engine.load_weights(dist.full_tensors(self.policy))

    def summarize(
        self, r: Rollouts, batch: Packed | None, stats: dict[str, float]
    ) -> dict[str, float]:
        rewards = r.rewards
        lengths = [len(s.completion.token_ids) for s in r.scored]
        logps = [lp for s in r.scored for lp in s.completion.logprobs]
        seconds = self.timer.totals()
        tokens = sum(lengths)
        out = {
            "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "pass_rate": float((rewards >= 1.0).float().mean()) if len(rewards) else 0.0,
            "groups": len(r.scored) // max(r.group_size, 1),
            "entropy": -sum(logps) / max(len(logps), 1),
            "response_len": tokens / max(len(lengths), 1),
            "verify_errors": sum(
                1 for s in r.scored if s.verdict.error in ("timeout", "exception")
            ),
            **stats,
            **{f"time_{k}": v for k, v in seconds.items()},
            "tokens_per_s": tokens / max(seconds.get("rollout", 0.0), 1e-9),
        }
        if self.layout.device.startswith("cuda"):
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


def _share(n: int, parts: int, k: int) -> slice:
    return slice(k * n // parts, (k + 1) * n // parts)


def training_data(
    cfg: Any, run_dir: Path, layout: dist.Layout, model_path: str
) -> tuple[list[dict], list[dict]]:
    """The RL prompts and the ref-store rows, running split / precompute-ref first when missing.

    Rank 0 runs the missing stages while the other ranks wait, so they are done once.
    """
    from dphrl.data import read_jsonl
    from dphrl.divergence import DIVERGENCES
    from dphrl.errors import ConfigError, DataError
    from dphrl.models import weights_hash
    from dphrl.reference import MANIFEST, load_ref_store

    if cfg.divergence.name not in DIVERGENCES or cfg.divergence.beta == 0:
        rows = get_task(cfg.task.name).load(cfg.task, "train")
        log.info(
            "divergence=%s: RL on all %d training prompts, no ref store",
            cfg.divergence.name,
            len(rows),
        )
        return rows, []
    split_dir, ref_dir = Path(cfg.split.out), Path(cfg.ref.out)
    if layout.is_main:
        if not (split_dir / "exp.jsonl").exists():
            print(f"train: no split in {split_dir}: running `dphrl split` first")
            from dphrl import split

            split.run(cfg, run_dir)
        if not (ref_dir / MANIFEST).exists():
            print(f"train: no ref store in {ref_dir}: running `dphrl precompute-ref` first")
            from dphrl import reference

            reference.run(cfg, run_dir)
    dist.barrier()
    prompts = read_jsonl(split_dir / "exp.jsonl")
    if not prompts:
        raise DataError(
            f"{split_dir / 'exp.jsonl'} is empty: the initial policy solves every prompt; nothing to explore"
        )
    ref_rows = load_ref_store(ref_dir, model_path, weights_hash(model_path))
    pef = len(read_jsonl(split_dir / "pef.jsonl"))
    if not ref_rows and pef == 0:
        print(
            f"train: D_pef is empty (no prompt solved in all {cfg.split.k} samples): the divergence term is off"
        )
    elif not ref_rows:
        raise ConfigError(
            f"divergence={cfg.divergence.name} needs ref-store responses, but {ref_dir} holds none "
            f"for {pef} D_pef prompts (ref.keep={cfg.ref.keep}); use ref.keep=all, more ref.samples_per_prompt, or divergence=none"
        )
    return prompts, ref_rows


def run(cfg: Any, run_dir: Path) -> Path:
    """Train; return the folder of the final HF model."""
    from dphrl.models import resolve_model_path

    layout = dist.resolve_layout(cfg.layout)
    dist.init(layout)
    run_dir = Path(cfg.trainer.run_dir) if cfg.trainer.run_dir else Path(run_dir)
    try:
        model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        prompts, ref_rows = training_data(cfg, run_dir, layout, model_path)
        trainer = Trainer(cfg, run_dir, layout, prompts, ref_rows, model_path)
        return fit(trainer)
    finally:
        dist.shutdown()


def fit(trainer: Trainer) -> Path:
    """Steps until `trainer.max_steps`, with checkpoints, exact resume and the final HF model."""
    from dphrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_hf_model
    from dphrl.metrics import reduce_metrics

    tr, run_dir = trainer.cfg.trainer, trainer.run_dir
    if tr.resume:
        found = latest_checkpoint(run_dir)
        if found is None:
            log.warning("trainer.resume=true but %s has no checkpoint: starting at step 0", run_dir)
        else:
            state = load_checkpoint(found, trainer.policy, trainer.optimizer, trainer.scheduler)
            trainer.step_num = state["step"]
            trainer.prompt_sampler.load_state_dict(state["prompt_sampler"])
            if trainer.ref_sampler is not None:
                trainer.ref_sampler.load_state_dict(state["ref_sampler"])
            trainer.sync_weights()
            trainer.metrics.truncate_after(trainer.step_num)
            print(f"train: resumed from {found} at step {trainer.step_num}")
    while trainer.step_num < tr.max_steps:
        metrics = reduce_metrics(trainer.step())
        if (
            trainer.cfg.eval.every
            and trainer.step_num % trainer.cfg.eval.every == 0
            and trainer.layout.is_main
        ):
            metrics.update(trainer.evaluate())
        trainer.metrics.log(trainer.step_num, metrics)
        last = trainer.step_num == tr.max_steps
        if (tr.save_every and trainer.step_num % tr.save_every == 0) or last:
            state = {
                "step": trainer.step_num,
                "prompt_sampler": trainer.prompt_sampler.state_dict(),
                "ref_sampler": trainer.ref_sampler.state_dict() if trainer.ref_sampler else None,
            }
            save_checkpoint(
                run_dir,
                trainer.step_num,
                trainer.policy,
                trainer.optimizer,
                trainer.scheduler,
                state,
                tr.keep,
            )
        if tr.stop_after_step is not None and trainer.step_num >= tr.stop_after_step:
            print(
                f"train: stopping after step {trainer.step_num} (trainer.stop_after_step, a test hook)"
            )
            return run_dir
    out = run_dir / "model"
    save_hf_model(trainer.policy, trainer.tokenizer, out)  # collective; rank 0 writes
    trainer.metrics.close()
    if trainer.layout.is_main:
        print(
            f"train: done. run folder {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}\n  model:   {out}"
        )
    return out
