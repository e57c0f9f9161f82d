"""The `algo` section: the common PPO keys flat, each variant's own keys in a group of its own.

A group holds the keys only one choice reads (`algo.clip_cov.*` only `algo.loss=clip_cov`),
declared, checked and composed as `engine.vllm` / `engine.hf` are: a dataclass field with a
default factory, its bounds next to each key, its rules in its own `check`. The keys every
variant reads (group size, sampling, clip range, epochs, aggregation, the loss and advantage
choices) stay flat.

`RENAMED_KEYS` maps the flat keys of before (`algo.clip_cov_ratio`) to their place in a group
(`algo.clip_cov.ratio`): `dphrl.config` refuses an old key wherever a user writes it, naming
the new one, and a checkpoint's recorded settings are read through the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dphrl.config_fields import bounded, choices
from dphrl.errors import ConfigError

# Closed sets. The registries keyed by these names (`dphrl.rl.aggregation.AGGREGATIONS`,
# `dphrl.rl.policy_loss.POLICY_LOSSES`, ...) import torch, which validation must not; tests
# check that each registry and its set agree.
AlgoName = choices("AlgoName", ("grpo", "dapo", "dapo_ds", "gspo", "dr_grpo"))
PolicyLossName = choices(
    "PolicyLossName", ("ppo_clip", "gspo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "cispo")
)
AdvantageName = choices("AdvantageName", ("grpo", "passk", "maxrl"))
RolloutCorrection = choices("RolloutCorrection", ("none", "tis", "mis_token", "mis_seq"))
LossAgg = choices(
    "LossAgg",
    ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
)

POLICY_LOSS_NAMES = tuple(PolicyLossName)
ADVANTAGE_NAMES = tuple(AdvantageName)
ROLLOUT_CORRECTION_NAMES = tuple(RolloutCorrection)


@dataclass
class ClipCovConfig:
    """`algo.loss=clip_cov` (arXiv 2505.22617): the share of tokens whose gradient is cut, and
    the Cov band [low, high] they are drawn from."""

    ratio: float = bounded(2e-4, ge=0.0, le=1.0)
    low: float = 1.0
    high: float = 5.0

    @staticmethod
    def check(c: ClipCovConfig) -> None:
        if c.low > c.high:
            raise ConfigError(
                f"algo.clip_cov.low={c.low} > algo.clip_cov.high={c.high}: the Cov band is empty"
            )


@dataclass
class KlCovConfig:
    """`algo.loss=kl_cov`: the share of tokens penalised and the weight of |logp - old logp|."""

    ratio: float = bounded(2e-3, ge=0.0, le=1.0)
    coef: float = bounded(1.0, ge=0.0)


@dataclass
class DppoConfig:
    """`algo.loss=dppo_tv` / `dppo_kl`: the divergence thresholds for A <= 0 / A > 0 (None: the
    paper's, 0.2 for TV, 0.05 for KL) and the cap C of the importance weight min(rho, C)."""

    delta_low: float | None = bounded(None, gt=0.0)
    delta_high: float | None = bounded(None, gt=0.0)
    ratio_cap: float = bounded(20.0, gt=0.0)


@dataclass
class CispoConfig:
    """`algo.loss=cispo`: the importance weight is clipped to [1 - low, 1 + high]."""

    low: float = bounded(1.0, ge=0.0, le=1.0)
    high: float = bounded(5.0, ge=0.0)


@dataclass
class EntropyConfig:
    """Adaptive entropy regularisation (dphrl.rl.entropy): - coef * entropy of the rollouts'
    token distributions joins the loss; after each step coef moves by `coef_step` towards
    keeping the entropy at `target` (up when below it, down when above), within
    [0, `coef_max`]. `target` null (default) is off."""

    target: float | None = bounded(None, gt=0.0)
    coef_init: float = bounded(0.0, ge=0.0)
    coef_step: float = bounded(0.005, ge=0.0)
    coef_max: float = bounded(0.05, ge=0.0)

    @staticmethod
    def check(e: EntropyConfig) -> None:
        if e.coef_init > e.coef_max:
            raise ConfigError(
                f"algo.entropy.coef_init={e.coef_init} > algo.entropy.coef_max={e.coef_max}: "
                "the coefficient starts outside its range"
            )


@dataclass
class RolloutCorrectionConfig:
    """Engine vs trainer log-prob mismatch (dphrl.rl.mismatch.ROLLOUT_CORRECTIONS): `name`
    picks the correction, as `divergence.name` and `engine.name` pick theirs, and its bounds
    sit beside it."""

    name: RolloutCorrection = RolloutCorrection.none
    low: float = bounded(0.5, ge=0.0)  # mis_*: lowest ratio kept
    high: float = 2.0  # tis: the cap C; mis_*: highest ratio kept

    @staticmethod
    def check(r: RolloutCorrectionConfig) -> None:
        if r.high <= max(r.low, 0.0):
            raise ConfigError(
                f"algo.rollout_correction.high={r.high} must be > "
                f"algo.rollout_correction.low={r.low} and > 0"
            )


@dataclass
class OverlongConfig:
    """DAPO's two ways with responses cut at model.max_new_tokens: `filter` drops them from the
    loss; the soft penalty costs the last `buffer` tokens before the limit up to `penalty`
    reward, linearly (dphrl.rl.filters.soft_overlong_penalty); buffer 0 = off."""

    filter: bool = False
    buffer: int = bounded(0, ge=0)
    penalty: float = bounded(1.0, ge=0.0)

    @staticmethod
    def check(o: OverlongConfig) -> None:
        if o.buffer and o.filter:
            raise ConfigError(
                f"algo.overlong.buffer={o.buffer} with algo.overlong.filter=true: the filter "
                "drops the responses the penalty is for; choose one"
            )


@dataclass
class AlgoConfig:
    """The RL part on D_exp: GRPO group advantages with PPO-clip, or its variants."""

    name: AlgoName = AlgoName.grpo
    group_size: int = bounded(8, ge=2)
    prompts_per_step: int = bounded(4, ge=1)
    temperature: float = bounded(1.0, gt=0.0)
    top_p: float = bounded(1.0, ge=0.0, le=1.0)
    norm_std: bool = True
    clip_low: float = bounded(0.2, ge=0.0, le=1.0)
    clip_high: float = bounded(0.2, ge=0.0)
    ppo_epochs: int = bounded(1, ge=1)
    # Rollouts per Adam update, counted over all ranks (each rank takes its 1/world share), so
    # a step makes ceil(rollouts / minibatch_size) updates on 1 GPU and on 8; 0 = one update.
    minibatch_size: int = bounded(0, ge=0)
    loss_agg: LossAgg = LossAgg["token-mean"]  # seq-mean-token-sum-norm: Dr. GRPO's
    # loss=ppo_clip: dual-clip's c (A < 0 losses capped at -c A) and the |log ratio| clamp
    # before exp; None is off. The official code uses 3 and 20 (on in the paper presets).
    dual_clip: float | None = bounded(None, gt=1.0)
    clamp_log_ratio: float | None = bounded(None, gt=0.0)
    # DAPO's dynamic sampling: all-equal groups dropped and refilled, for at most this many
    # rounds. Flat, not a group: `algo.dynamic_sampling=true` is the switch as users type it.
    dynamic_sampling: bool = False
    max_refill_rounds: int = bounded(4, ge=0)
    # The policy loss and the advantage (dphrl.rl.policy_loss.POLICY_LOSSES / ADVANTAGES).
    loss: PolicyLossName = PolicyLossName.ppo_clip
    advantage: AdvantageName = AdvantageName.grpo
    passk_k: int = 4  # advantage=passk: the k of pass@k, in [1, group_size]
    # The keys one variant reads, a group each.
    clip_cov: ClipCovConfig = field(default_factory=ClipCovConfig)
    kl_cov: KlCovConfig = field(default_factory=KlCovConfig)
    dppo: DppoConfig = field(default_factory=DppoConfig)
    cispo: CispoConfig = field(default_factory=CispoConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)

    @staticmethod
    def check(a: AlgoConfig) -> None:
        if a.advantage == "passk" and not 1 <= a.passk_k <= a.group_size:
            raise ConfigError(
                f"algo.passk_k={a.passk_k} is out of range: it must be in "
                f"[1, algo.group_size={a.group_size}]"
            )


# The flat keys of before -> their key in a group.
RENAMED_KEYS = {
    "algo.clip_cov_ratio": "algo.clip_cov.ratio",
    "algo.clip_cov_low": "algo.clip_cov.low",
    "algo.clip_cov_high": "algo.clip_cov.high",
    "algo.kl_cov_ratio": "algo.kl_cov.ratio",
    "algo.kl_cov_coef": "algo.kl_cov.coef",
    "algo.dppo_delta_low": "algo.dppo.delta_low",
    "algo.dppo_delta_high": "algo.dppo.delta_high",
    "algo.dppo_ratio_cap": "algo.dppo.ratio_cap",
    "algo.cispo_low": "algo.cispo.low",
    "algo.cispo_high": "algo.cispo.high",
    "algo.entropy_target": "algo.entropy.target",
    "algo.entropy_coef_init": "algo.entropy.coef_init",
    "algo.entropy_coef_step": "algo.entropy.coef_step",
    "algo.entropy_coef_max": "algo.entropy.coef_max",
    "algo.rollout_correction": "algo.rollout_correction.name",
    "algo.rollout_correction_low": "algo.rollout_correction.low",
    "algo.rollout_correction_high": "algo.rollout_correction.high",
    "algo.overlong_filter": "algo.overlong.filter",
    "algo.overlong_buffer": "algo.overlong.buffer",
    "algo.overlong_penalty": "algo.overlong.penalty",
}


def renamed(key: str) -> ConfigError:
    """The error for an old key: what it is called now."""
    return ConfigError(f"{key} was renamed: use {RENAMED_KEYS[key]}")
