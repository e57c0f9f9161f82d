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
baselines (`none`, `reverse_kl`) train on every prompt, as in the paper. The run around the
steps (resume, checkpoints, evals, the final model) is `dphrl.training.runloop.fit`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dphrl import dist, seeds
from dphrl.config import DphrlConfig
from dphrl.engine import Sampling, engine_from_config
from dphrl.metrics import MetricsLogger, Timer, accumulate, step_metrics
from dphrl.precision import resolve_dtype
from dphrl.rl.advantages import make_advantage
from dphrl.rl.aggregation import agg_count
from dphrl.rl.batching import Packed, pack_topk, pack_with, share
from dphrl.rl.divergence import TOPK_DIVERGENCES, make_divergence, policy_sample_term
from dphrl.rl.entropy import adaptive_entropy_coef
from dphrl.rl.filters import informative_groups, overlong_filter, soft_overlong_penalty
from dphrl.rl.hybrid import LOSS_STATS, StepBatch, hybrid_loss
from dphrl.rl.logprobs import autocast, batch_logprobs, live_rows_logprobs
from dphrl.rl.mismatch import make_correction
from dphrl.rl.policy_loss import ZERO_ADVANTAGE_INERT, policy_loss_for
from dphrl.rollout import Rollouts, Scored, render_rows, score_outputs
from dphrl.tasks import get_task
from dphrl.training import minibatches, weight_sync
from dphrl.training.checkpoint import data_settings, run_settings, save_hf_model
from dphrl.training.heldout import heldout_rows, heldout_sums, pef_rows
from dphrl.training.lora import add_adapters, save_adapter
from dphrl.training.optim import clipped_step, make_optimizer, zero_gradients
from dphrl.training.sampler import EpochSampler

log = logging.getLogger(__name__)

# Loss statistics taken over the whole minibatch's denominators: micro-batches' values add up.
# The others (clip and mismatch fractions, ratios) are averaged by each micro-batch's tokens.
ADDITIVE_STATS = frozenset({"pg_loss", "div_loss", "kl_ref", "rkl_loss"})


class Trainer:
    """Holds the policy, the optional online reference, the engine, the optimizer and the data."""

    def __init__(
        self,
        cfg: DphrlConfig,
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
        # float32 master weights and AdamW state whatever model.dtype (the compute dtype) is
        self.compute_dtype = cfg.model.compute_dtype
        self.policy = load_policy(model_path, "float32", layout.device)
        self.peft = None  # with model.lora.r > 0: the PeftModel over self.policy (training.lora)
        if cfg.model.lora.r:  # unsharded: the config refuses LoRA with FSDP
            self.peft = add_adapters(self.policy, cfg.model.lora)
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            if self.peft is not None:
                self.policy.enable_input_require_grads()  # frozen embeddings: checkpoints need it
        self.policy = dist.shard(self.policy, layout, self.compute_dtype)
        # reverse_kl's estimator, or js_full's policy half: on the rollouts, vs an online reference
        self.policy_term = policy_sample_term(self.div.name, self.div.estimator)
        a = self.algo
        self.advantage_fn = make_advantage(a.advantage, norm_std=a.norm_std, k=a.passk_k)
        # Clip-Cov's random token picks: reseeded each step (`step`), so a resumed run draws the same
        self.cov_generator = torch.Generator()
        self.policy_loss = policy_loss_for(a, self.cov_generator)  # clip range and options bound
        self.correction = make_correction(  # engine vs trainer log-probs (rl.mismatch)
            a.rollout_correction.name, a.rollout_correction.low, a.rollout_correction.high
        )
        self.ref_model = None  # under LoRA the reference is the policy with adapters disabled
        if self.policy_term is not None and self.peft is None:
            ref_model = load_policy(model_path, "float32", layout.device).eval()
            ref_model.requires_grad_(False)
            self.ref_model = dist.shard(ref_model, layout, self.compute_dtype)  # as the policy
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
        self.topk = self.div.name in TOPK_DIVERGENCES  # the rehearsal reads the stored top-k
        self.entropy_coef = a.entropy.coef_init  # algo.entropy.target: follows it step by step
        tr = cfg.trainer
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(trainable, tr, layout.device)
        self.prompt_sampler = EpochSampler(len(prompts), cfg.seed)
        self.ref_sampler = (
            EpochSampler(len(ref_rows), seeds.ref_sampler(cfg.seed)) if ref_rows else None
        )
        self.engine = engine_from_config(
            cfg.engine, cfg.model, model_path, device=layout.device, seed=cfg.seed
        )
        self.metrics = MetricsLogger(
            run_dir, tensorboard=tr.tensorboard, wandb=tr.wandb, enabled=layout.is_main
        )
        self.timer = Timer(cuda_sync=layout.device.startswith("cuda"))
        self.max_len = cfg.model.max_new_tokens
        self.step_num = 0
        # what defines the run, recorded in each checkpoint: a resume with other values fails
        self.settings = {**run_settings(cfg), **data_settings(prompts, ref_rows)}
        ev = cfg.eval
        # eval.every's sets, by metric prefix: the held-out prompts, and D_pef with pef_limit
        self.eval_sets = {"eval": heldout_rows(self.task, cfg.task, ev.limit)} if ev.every else {}
        if ev.every and ev.pef_limit:
            self.eval_sets["eval_pef"] = pef_rows(cfg.split.out, ev.pef_limit)
        if layout.is_main:
            log.info("train: %s", self.plan_line())

    def plan_line(self) -> str:
        """What a step is: rollouts over the ranks, Adam updates, micro-batches, numerics."""
        a, tr = self.algo, self.cfg.trainer
        rollouts = a.prompts_per_step * a.group_size
        per_epoch = math.ceil(rollouts / a.minibatch_size) if a.minibatch_size else 1
        micro = f"{tr.micro_batch_tokens} tokens" if tr.micro_batch_tokens else "whole minibatches"
        return (
            f"{rollouts} rollouts a step over {self.layout.world_size} rank(s), "
            f"{a.ppo_epochs * per_epoch} Adam update(s) a step (algo.minibatch_size="
            f"{a.minibatch_size or 'all'}, ppo_epochs={a.ppo_epochs}); micro-batches of {micro}; "
            f"float32 weights, compute in {self.compute_dtype or 'float32'}"
        )

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimizer step of the hybrid objective; returns this step's metrics."""
        self.timer.reset()
        rollouts = self.rollout()  # G responses per D_exp prompt, with their rewards
        self.cov_generator.manual_seed(seeds.clip_cov(self.cfg.seed, self.step_num))
        peaks = {"mem_peak_rollout_gib": dist.peak_memory_gib(self.layout.device)}
        self.engine.sleep()  # engine.sleep_mode on GPUs: weights and KV cache freed to train
        with self.timer("train"):
            advantages = self.advantages(rollouts)
            batch = self.batch(rollouts, advantages)
            stats = self.update(batch)  # per minibatch: micro-batches' backwards, then AdamW
        peaks["mem_peak_train_gib"] = dist.peak_memory_gib(self.layout.device)
        with self.timer("weight_sync"):
            self.push_weights()  # weights woken, streamed in, then the KV cache
        peaks["mem_peak_weight_sync_gib"] = dist.peak_memory_gib(self.layout.device)
        if self.algo.entropy.target is not None:  # ranks agree: the update reads the global mean
            stats["entropy_coef"] = self.entropy_coef
            self.entropy_coef = adaptive_entropy_coef(
                self.entropy_coef,
                dist.all_reduce_sum(
                    [stats.get("policy_entropy", self.algo.entropy.target)], self.layout.device
                )[0]
                / self.layout.world_size,
                target=self.algo.entropy.target,
                step=self.algo.entropy.coef_step,
                max_coef=self.algo.entropy.coef_max,
            )
        self.step_num += 1
        stats.update({k: v for k, v in peaks.items() if v is not None})  # on CUDA
        return self.summarize(rollouts, stats)

    def rollout(self) -> Rollouts:
        """This rank's share of a batch of prompts, G responses each, verified.

        DAPO's dynamic sampling drops groups whose rewards are all equal (zero advantage) and
        draws further prompts until the batch is full or `algo.max_refill_rounds` is spent.
        Under torchrun the ranks decide together: a refill round runs while any rank is short,
        so every prompt sampler advances alike, and each rank keeps as many groups as the
        rank with fewest, so every rank runs the same minibatches (FSDP's collectives match).
        """
        a, want = self.algo, self.algo.prompts_per_step
        mine = share(want, self.layout.world_size, self.layout.rank)  # seeds match 1 process
        need = mine.stop - mine.start
        prompt_ids: list[list[int]] = []
        groups: list[list[Scored]] = []
        for round_ in range(a.max_refill_rounds + 1 if a.dynamic_sampling else 1):
            rows = [self.prompts[i] for i in self.prompt_sampler.next_batch(want)][mine]
            ids, kept = render_rows(self.tokenizer, rows, self.cfg.model.max_prompt_len, "train")
            seed = seeds.rollout(self.cfg.seed, self.step_num, round_)
            sampling = Sampling(
                a.temperature, a.top_p, self.cfg.model.max_new_tokens, seed
            ).shifted(mine.start, a.group_size)
            with self.timer("rollout"):
                outputs = self.engine.generate(ids, a.group_size, sampling)
            with self.timer("verify"):
                scored = score_outputs(self.task, self.cfg.task, kept, outputs)
            for p, group in zip(ids, scored):
                rewards = torch.tensor([s.verdict.reward for s in group])
                if not a.dynamic_sampling or informative_groups(rewards, len(group)).item():
                    prompt_ids.append(p)
                    groups.append(group)
            short = max(need - len(groups), 0)
            if not a.dynamic_sampling or dist.all_reduce_sum([short], self.layout.device)[0] == 0:
                break
        keep = min(len(groups), need)
        if a.dynamic_sampling:
            keep = -int(dist.all_reduce_max([-keep], self.layout.device)[0])
        groups, prompt_ids = groups[:keep], prompt_ids[:keep]
        flat_prompts = [p for p, g in zip(prompt_ids, groups) for _ in g]
        return Rollouts(flat_prompts, [s for g in groups for s in g], a.group_size)

    def advantages(self, r: Rollouts) -> torch.Tensor:
        """Group advantages `# (B*G,)` of the rollouts' rewards (`algo.advantage`: GRPO, pass@k)."""
        if not r.scored:
            return torch.zeros(0)
        rewards, a = r.rewards, self.algo
        if a.overlong.buffer:  # DAPO's soft overlong penalty
            lengths = torch.tensor([len(s.completion.token_ids) for s in r.scored])
            max_len = self.cfg.model.max_new_tokens
            rewards = rewards + soft_overlong_penalty(
                lengths, max_len, min(a.overlong.buffer, max_len), a.overlong.penalty
            )
        return self.advantage_fn(rewards, r.group_size)

    def batch(self, r: Rollouts, advantages: torch.Tensor) -> StepBatch:
        """Pack the rollouts with the engine's log-probs of their tokens and their online
        reference's log-probs (a trainer forward), and draw this rank's share of the ref store.
        pi_old's log-probs come in `update`, which knows the minibatches (`old_logprobs`)."""
        store, store_ref_logp, *topk = self.ref_batch()
        topk = dict(zip(("store_topk_ids", "store_topk_ref_logp"), topk))
        if not r.scored:
            return StepBatch(None, advantages, store=store, store_ref_logp=store_ref_logp, **topk)
        rollouts, engine_logp = pack_with(
            r.prompt_ids,
            [s.completion.token_ids for s in r.scored],
            [s.completion.logprobs for s in r.scored],
            self.tokenizer.pad_token_id,
        )
        if self.algo.overlong.filter:
            finished = torch.tensor([s.completion.finish_reason != "length" for s in r.scored])
            rollouts.response_mask = overlong_filter(
                rollouts.response_mask, finished, self.cfg.model.max_new_tokens
            )
        rollouts = rollouts.to(self.layout.device)
        t = self.algo.temperature
        with torch.no_grad():
            online = None if self.policy_term is None else self.reference_logprobs(rollouts, t)
        return StepBatch(
            rollouts,
            advantages.to(self.layout.device),
            None,  # old_logp: `update`
            online,
            store,
            store_ref_logp,
            engine_logp.to(self.layout.device),
            **topk,
        )

    def ref_batch(self) -> tuple:
        """This rank's share of `trainer.ref_batch_size` ref-store responses and their ref
        log-probs; for a top-k divergence also the stored top-k ids and log-probs."""
        if self.ref_sampler is None:
            return None, None
        size = self.cfg.trainer.ref_batch_size
        rows = [self.ref_rows[i] for i in self.ref_sampler.next_batch(size)]
        rows = rows[share(size, self.layout.world_size, self.layout.rank)]
        packed, ref_logp = pack_with(
            [r["prompt_ids"] for r in rows],
            [r["response_ids"] for r in rows],
            [r["ref_logprobs"] for r in rows],
            self.tokenizer.pad_token_id,
        )
        dev = self.layout.device
        if not self.topk:
            return packed.to(dev), ref_logp.to(dev)
        top_ids, top_logp = pack_topk(rows, packed.response_mask)  # (M, S, K) each
        return packed.to(dev), ref_logp.to(dev), top_ids.to(dev), top_logp.to(dev)

    def updates_per_epoch(self, rollouts: int) -> int:
        """Adam updates per pass over the step's rollouts (`minibatches.updates_per_epoch`)."""
        a = self.algo
        return minibatches.updates_per_epoch(
            rollouts, a.minibatch_size, a.group_size, self.layout.device
        )

    def update(self, batch: StepBatch) -> dict[str, float]:
        """`algo.ppo_epochs` passes over the step's minibatches; each is forwarded and
        backpropagated in micro-batches (`trainer.micro_batch_tokens`), then AdamW steps once.
        Every rank takes its rows of each global minibatch (`minibatches.minibatch_rows`)."""
        a, n = self.algo, len(batch)
        n_mb = self.updates_per_epoch(n)
        rows = minibatches.minibatch_rows(batch, n_mb, a.group_size, self.layout.device)
        batch = replace(batch, old_logp=self.old_logprobs(batch, n_mb, rows[0][0]))
        totals: dict[str, float] = {}
        updates = 0
        for epoch in range(a.ppo_epochs):
            for k in range(n_mb):
                mb = batch.minibatch(*rows[k])
                if epoch == 0 and k == 0 and a.ppo_epochs == 1:
                    mb = replace(mb, old_logp=None)  # before any update: its own (old_logprobs)
                self.optimizer.zero_grad(set_to_none=True)
                stats, has_grad = self.backward(mb)
                if not has_grad:
                    if not n:  # no rollouts (all filtered) and no ref batch: nothing to step on
                        continue
                    zero_gradients(self.policy)
                stats["grad_norm"] = clipped_step(  # rank-averaged, clipped; AdamW steps
                    self.policy, self.optimizer, self.cfg.trainer.grad_clip, self.layout
                )
                accumulate(totals, stats, a.ppo_epochs * n_mb)
                updates += 1
        totals["lr"] = self.scheduler.get_last_lr()[0]
        totals["adam_updates"] = updates
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held while sampling
        return totals

    @torch.no_grad()
    def old_logprobs(self, batch: StepBatch, n_mb: int, first: torch.Tensor) -> torch.Tensor | None:
        """pi_old's log-probs `# (N, T)` of the rollouts, forwarded before the step's first
        update, for the rows whose loss forward comes after one (`first`: this rank's rows of
        the first minibatch).

        The first minibatch is forwarded before any update, so its loss forward's own detached
        log-probs are its old ones (ratio 1: `update` hands it `old_logp=None`); a separate
        forward of its rows would only repeat that one. With one epoch, only the later
        minibatches' rows are forwarded here, and none with one minibatch (None). With several
        epochs every row is forwarded: each minibatch comes back after updates. The first
        minibatch's rows hold 0, never read. Under FSDP a rank holding none of the rows
        forwarded still forwards one (`live_rows_logprobs`), so the collectives match.
        """
        a, rollouts = self.algo, batch.rollouts

        def forward(rows: Packed) -> torch.Tensor:
            return self.logprobs_in_parts(self.policy, rows, a.temperature)

        if rollouts is None or (a.ppo_epochs == 1 and n_mb == 1):
            return None
        if a.ppo_epochs > 1:
            return forward(rollouts)
        later = torch.ones(len(rollouts), dtype=torch.bool, device=batch.advantages.device)
        later[first] = False
        return live_rows_logprobs(
            forward, rollouts, later, None, dist.forward_on_every_rank(self.layout)
        )

    def backward(self, mb: StepBatch) -> tuple[dict[str, float], bool]:
        """The hybrid loss's gradient on one minibatch, accumulated over its micro-batches:
        first the rollouts', then the ref-store rows'. Each micro-batch's loss divides by the
        whole minibatch's count on all ranks, so the gradients add up to the minibatch's.
        Returns the loss statistics and whether any micro-batch's loss had a gradient."""
        a, beta = self.algo, self.div.beta
        use_store = mb.store is not None and beta > 0 and self.divergence is not None
        rollout_mask = None if mb.rollouts is None else mb.rollouts.response_mask
        counts = [
            0.0 if rollout_mask is None else agg_count(rollout_mask, a.loss_agg, self.max_len),
            agg_count(mb.store.response_mask, "token-mean", 0) if use_store else 0.0,
        ]
        total = dist.all_reduce_sum(counts, self.layout.device)
        denom, store_denom = (max(c, 1.0) / self.layout.world_size for c in total)
        parts: list[tuple[StepBatch, float]] = []
        if mb.rollouts is not None:
            rows = self.micro_slices(mb.rollouts)
            parts += [(mb.minibatch(r, None), w) for r, w in rows]
        if use_store:
            rows = self.micro_slices(mb.store)
            no_rollouts = replace(mb, rollouts=None, advantages=mb.advantages[:0])
            parts += [(no_rollouts.minibatch(slice(0, 0), r), w) for r, w in rows]
        merged: dict[str, float] = {}
        stepped = False
        for part, weight in parts:
            loss, stats = self.loss(part, denom, store_denom)
            if loss.requires_grad:
                (loss * (weight > 0)).backward()  # weight 0: a stand-in forward (FSDP)
                stepped = True
            for key, value in stats.items():
                share_ = 1.0 if key in ADDITIVE_STATS else weight
                merged[key] = merged.get(key, 0.0) + share_ * value * (weight > 0)
        return {**dict.fromkeys(LOSS_STATS, 0.0), **merged}, stepped

    def micro_slices(self, rows: Packed) -> list[tuple[slice, float]]:
        """`rows`' micro-batches of `trainer.micro_batch_tokens` (`minibatches.micro_batches`)."""
        return minibatches.micro_batches(rows, self.cfg.trainer.micro_batch_tokens, self.layout)

    def loss(
        self, mb: StepBatch, denom: float, store_denom: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy's forwards on one micro-batch, then `hybrid_loss` over the minibatch's
        denominators (tokens or responses on all ranks, over the world size), so that the
        rank-average of the accumulated gradients equals the gradient of the global mean."""
        a, beta = self.algo, self.div.beta
        logp = store_logp = store_topk_logp = entropy = None
        if mb.rollouts is not None and len(mb.rollouts) and a.entropy.target is not None:
            logp, entropy = self.forward(
                self.policy, mb.rollouts, a.temperature, grad=True, with_entropy=True
            )  # every row: the entropy bonus acts on zero-advantage rows too
        elif mb.rollouts is not None and len(mb.rollouts):
            logp = self._policy_logprobs(mb)
        if mb.store is not None and len(mb.store) and beta > 0 and self.divergence is not None:
            store_logp, _ = self.forward(
                self.policy, mb.store, 1.0, grad=True, extra_ids=mb.store_topk_ids
            )  # (M, S), or (M, S, 1 + K) with the stored top-k tokens after the sampled one
            if mb.store_topk_ids is not None:
                store_logp, store_topk_logp = store_logp[..., 0], store_logp[..., 1:]
        return hybrid_loss(
            mb, logp, store_logp, beta=beta, policy_loss=self.policy_loss,
            divergence=self.divergence, policy_term=self.policy_term, correction=self.correction,
            loss_agg=a.loss_agg, denom=denom, store_denom=store_denom,
            store_topk_logp=store_topk_logp, entropy=entropy, entropy_coef=self.entropy_coef,
        )  # fmt: skip

    def _policy_logprobs(self, mb: StepBatch) -> torch.Tensor:
        """The policy's log-probs `# (n, T)` of a rollout minibatch, forwarded only where they
        can move the loss: zero-advantage rows skip the forward (`live_rows_logprobs`) when
        PPO-clip is all the rollouts carry (no online reference term; a loss in
        `ZERO_ADVANTAGE_INERT`, not Clip-Cov / KL-Cov, whose covariance is centred over every
        token)."""
        adv = mb.advantages
        live = adv != 0 if adv.dim() == 1 else (adv != 0).any(-1)  # (n,)
        if mb.online_ref_logp is not None or self.algo.loss not in ZERO_ADVANTAGE_INERT:
            live = torch.ones_like(live)
        return live_rows_logprobs(
            lambda b: self.logprobs(self.policy, b, self.algo.temperature, grad=True),
            mb.rollouts,
            live,
            mb.old_logp,
            dist.forward_on_every_rank(self.layout),
        )

    def logprobs(
        self, model, batch: Packed, temperature: float, grad: bool = False
    ) -> torch.Tensor:
        """Per-token log-probs `# (N, T)` of the response tokens: the one forward pass of training.

        Rollouts are scored at the sampling temperature (the PPO ratio compares the sampling
        distributions); ref-store responses at 1.0, as precompute-ref stored them.

        With `model.autocast` the decoder body's matmuls (and their backward) run in that dtype
        over the weights in model.dtype, as mixed-precision training does: on a CPU with bf16
        matmuls or a GPU the step is faster, while AdamW still updates float32 weights (a step
        of 2e-5 on a weight near 1 is below bfloat16's spacing there, 2^-7, and would round
        away), and the lm_head and log-softmax stay in model.dtype
        (`dphrl.rl.logprobs._scaled_logits`). precompute-ref makes the ref store's log-probs under
        the same autocast, so log r is 0 at step 0 again.
        """
        return self.forward(model, batch, temperature, grad)[0]

    def forward(
        self, model, batch: Packed, temperature: float, grad: bool = False, **options
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logprobs` with `batch_logprobs`' options (`with_entropy`, `extra_ids`): the
        log-probs and the per-token entropy (None unless asked). FSDP layouts compute in
        model.dtype through their MixedPrecisionPolicy (`dist.shard`), others under autocast."""
        dtype = None if self.layout.fsdp else self.compute_dtype
        with torch.set_grad_enabled(grad), autocast(self.layout.device, dtype):
            return batch_logprobs(
                model,
                batch,
                pack_tokens=self.cfg.model.pack_tokens,
                temperature=temperature,
                **options,
            )

    def logprobs_in_parts(self, model, batch: Packed, temperature: float) -> torch.Tensor:
        """`logprobs` without grad `# (N, T)`, forwarded in micro-batches (`micro_slices`)."""
        parts = self.micro_slices(batch)
        outs = [(s, self.logprobs(model, batch.select(s), temperature)) for s, _ in parts]
        return torch.cat([logp for (_, weight), (_, logp) in zip(parts, outs) if weight > 0])

    def evaluate(self) -> dict[str, float]:
        """pass@k of the current policy on the held-out prompts (`eval.every`), and on D_pef
        with `eval.pef_limit` (`eval_pef_*`): every rank evaluates its share with its own engine
        (no rank idles in a collective meanwhile), and the sums over ranks make the means."""
        m, layout = self.cfg.model, self.layout
        means = {}
        for name, rows in self.eval_sets.items():
            sums = heldout_sums(
                self.engine, self.task, self.cfg.task, self.tokenizer, rows, self.cfg.eval,
                m.max_prompt_len, m.max_new_tokens, seeds.heldout(self.cfg.seed),
                part=(layout.rank, layout.world_size), name=name,
            )  # fmt: skip
            keys = sorted(sums)
            total = dict(zip(keys, dist.all_reduce_sum([sums[k] for k in keys], layout.device)))
            prompts = max(total.pop("prompts"), 1.0)
            means.update({key: value / prompts for key, value in total.items()})
        return means

    def save_model(self, out: Path) -> dict[str, Path]:
        """The final HF model in `out` (collective); under LoRA the adapter folder first
        (`run_dir/adapter`), then the adapters merged into the weights for the HF model.
        Returns the folders written, by name."""
        folders = {}
        if self.peft is not None:
            folders["adapter"] = self.run_dir / "adapter"
            if self.layout.is_main:
                save_adapter(self.peft, self.tokenizer, folders["adapter"], self.cfg.model.path)
            self.policy = self.peft.merge_and_unload()  # training is over: merge in place
        return {"model": save_hf_model(self.policy, self.tokenizer, out), **folders}

    # ---- the state a checkpoint holds (`dphrl.training.checkpoint.save_state`) -------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint of this step needs: the live weights, AdamW and schedule
        (the checkpoint gathers their full states, from every rank under FSDP) and, as JSON,
        the step, both data positions, the entropy coefficient and the run's settings."""
        return {
            "model": self.policy,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "step": self.step_num,
            "prompt_sampler": self.prompt_sampler.state_dict(),
            "ref_sampler": self.ref_sampler.state_dict() if self.ref_sampler else None,
            "entropy_coef": self.entropy_coef,
            "settings": self.settings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (`checkpoint.load_state` has restored the
        weights, AdamW and the schedule in place): the step, the data positions and the entropy
        coefficient; then the engine gets the resumed weights, to sample as the run did."""
        self.step_num = state["step"]
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        if self.ref_sampler is not None:
            self.ref_sampler.load_state_dict(state["ref_sampler"])
        self.entropy_coef = state["entropy_coef"]
        self.push_weights()

    def reference_logprobs(self, rollouts: Packed, temperature: float) -> torch.Tensor:
        """The online reference's log-probs of the rollouts: the initial model's copy, or under
        LoRA the policy itself with its adapters disabled."""
        if self.peft is None:
            return self.logprobs_in_parts(self.ref_model, rollouts, temperature)
        with self.peft.disable_adapter():
            return self.logprobs_in_parts(self.policy, rollouts, temperature)

    def push_weights(self) -> None:
        """The updated weights into the rollout engine (`dphrl.training.weight_sync.push`): one
        full tensor at a time, in the engine's dtype (under LoRA each adapted weight merged)."""
        engine_dtype = resolve_dtype(
            self.cfg.engine.dtype, self.layout.device, self.cfg.model.dtype
        )
        weight_sync.push(
            self.policy, self.engine, self.layout.device, lora=self.peft is not None,
            dtype=engine_dtype,
        )  # fmt: skip

    def summarize(self, r: Rollouts, stats: dict[str, float]) -> dict[str, float]:
        """The step's metrics: rollouts (rewards, lengths, entropy), loss statistics, times."""
        return step_metrics(r.scored, r.group_size, stats, self.timer.totals(), self.layout.device)
