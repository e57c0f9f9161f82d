"""The memory plan of a command: per-rank lines, the check against the card, the launch hook.

`build_plan` reads the config and the model's shape into lines (`dphrl.memory.formulas` does
the arithmetic); `plan_before_launch` runs at the start of every command and of `dry_run=true`:
it finds the card's memory (`layout.gpu_memory_gib`, else CUDA's), logs the table on rank 0,
and raises `PlanExceedsMemory` naming the phase, the largest items, their knobs and, where
one helps, the value of `trainer.micro_batch_tokens` or `engine.vllm.gpu_memory_utilization`
that fits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from dphrl.engine import resolve_engine_name
from dphrl.errors import ConfigError
from dphrl.memory.formulas import (
    DTYPE_BYTES,
    GIB,
    LOGPROB_CHUNK,
    activation_bytes,
    forward_tokens,
    gathered_bytes,
    head_bytes,
    kv_bytes_per_token,
    mask_bytes,
    vllm_overhead_bytes,
)
from dphrl.memory.shape import ModelShape, find_shape
from dphrl.precision import resolve_dtype

if TYPE_CHECKING:
    from dphrl.config import DphrlConfig

log = logging.getLogger(__name__)
RUNTIME_BYTES = GIB  # CUDA context, cuBLAS / NCCL workspaces: outside torch's allocator
HEADROOM = 0.9  # a suggested setting fits this share of the card (fragmentation, caching)


@dataclass(frozen=True)
class Line:
    """One item of the plan: its bytes in each phase (None: not there) and the knob that
    shrinks it."""

    item: str
    sampling: int | None
    training: int | None
    how: str
    knob: str = ""


@dataclass
class Plan:
    """Per-rank lines, the card's capacity (None: unknown) and where it came from."""

    title: str
    lines: list[Line]
    capacity: int | None = None
    capacity_from: str = ""
    notes: list[str] = field(default_factory=list)
    kv_short: str | None = None  # why vLLM would not start in its share, if it would not

    def total(self, phase: str) -> int:
        return sum(getattr(line, phase) or 0 for line in self.lines)

    def table(self) -> str:
        """The plan as a small fixed-width table, GiB per rank and phase."""

        def gib(v: int | None) -> str:
            return "-" if v is None else f"{v / GIB:.2f}"

        rows = [(ln.item, gib(ln.sampling), gib(ln.training), ln.how) for ln in self.lines]
        rows.append(("total", gib(self.total("sampling")), gib(self.total("training")), ""))
        if self.capacity is not None:
            cap = gib(self.capacity)
            rows.append(("device", cap, cap, self.capacity_from))
        head = ("per rank, GiB", "sampling", "training", "how")
        w = [max(len(r[k]) for r in [head, *rows]) for k in range(3)]
        fmt = f"{{:<{w[0]}}}  {{:>{w[1]}}}  {{:>{w[2]}}}  {{}}"
        out = [self.title, fmt.format(*head).rstrip()]
        out += [fmt.format(*r).rstrip() for r in rows]
        return "\n".join([*out, *self.notes])

    def over(self) -> str | None:
        """The first phase whose total is over the capacity (None: both fit, or no card)."""
        if self.capacity is None:
            return None
        return next((p for p in PHASES if self.total(p) > self.capacity), None)

    def refusal(self, fits: str = "") -> str:
        """Why the plan does not fit: vLLM's KV cache, or the phase over the card, its largest
        items with their knobs, and `fits`, a setting that would."""
        if self.kv_short:
            return f"memory plan: {self.kv_short}"
        phase = self.over()
        total = self.total(phase)
        big = sorted(
            (ln for ln in self.lines if getattr(ln, phase) and ln.knob),
            key=lambda ln: -getattr(ln, phase),
        )[:3]
        turn = "; ".join(f"{ln.item} {getattr(ln, phase) / GIB:.1f} GiB: {ln.knob}" for ln in big)
        return (
            f"memory plan: the {phase} phase needs {total / GIB:.1f} GiB per rank, "
            f"more than the {self.capacity / GIB:.1f} GiB of the device ({self.capacity_from}). "
            f"Largest: {turn}." + (f" {fits}" if fits else "")
        )


PHASES = ("sampling", "training")


class PlanExceedsMemory(ConfigError):
    """The memory plan of a command is over the device's memory in one phase."""


def _ref_store(cfg: DphrlConfig) -> bool:
    """Whether train rehearses ref-store rows (`dphrl.presample.inputs.training_data`)."""
    return (
        cfg.divergence.name in ("forward_kl", "js", "js_full", "alpha") and cfg.divergence.beta > 0
    )


def _online_reference(cfg: DphrlConfig) -> bool:
    """Whether train holds a second model: reverse_kl's estimator or js_full's policy half on
    the rollouts (`dphrl.rl.divergence.policy_sample_term`), unless LoRA disables adapters."""
    return cfg.divergence.name in ("reverse_kl", "js_full") and not cfg.model.lora.r


def engine_lines(cfg: DphrlConfig, shape: ModelShape, capacity: int | None, training: bool):
    """The rollout engine's line, and vLLM's KV budget in tokens (None: not vLLM or no card).

    vLLM takes `gpu_memory_utilization` of the card for its weights, activations and KV
    cache, and keeps it while training unless `engine.sleep_mode`; the hf engine holds its
    weights and, while decoding, `engine.hf.batch_size` sequences of KV cache and logits."""
    e, m = cfg.engine, cfg.model
    b = DTYPE_BYTES[resolve_dtype(e.dtype, "cuda", m.dtype)]  # the plan is for GPUs
    seq = m.max_prompt_len + m.max_new_tokens
    asleep = "asleep while training (engine.sleep_mode)"
    if resolve_engine_name(e.name) == "vllm":
        v = e.vllm
        if capacity is None:
            return Line(
                "vLLM engine", None, None, "gpu_memory_utilization of an unknown card"
            ), None
        share = int(v.gpu_memory_utilization * capacity)
        weights = shape.params * b // v.tensor_parallel_size
        kv = share - weights - vllm_overhead_bytes(shape, b, v.enforce_eager)
        kv_tokens = max(kv, 0) // kv_bytes_per_token(shape, b, v.tensor_parallel_size)
        kept = None if not training else (0 if e.sleep_mode else share)
        how = (
            f"{v.gpu_memory_utilization} x card: weights {weights / GIB:.2f}, KV cache "
            f"{max(kv, 0) / GIB:.2f} GiB = {kv_tokens:,} tokens"
            + (f"; {asleep}" if training and e.sleep_mode else "")
        )
        knob = "engine.vllm.gpu_memory_utilization" + (
            "" if e.sleep_mode else ", engine.sleep_mode=true"
        )
        return Line("vLLM engine (weights + KV)", share, kept, how, knob), kv_tokens
    weights = shape.params * b
    decode = e.hf.batch_size * (seq * kv_bytes_per_token(shape, b) + shape.vocab * 4)
    kept = None if not training else (0 if e.sleep_mode else weights)
    how = f"weights {weights / GIB:.2f} + {e.hf.batch_size} sequences of KV and logits"
    return Line("hf engine", weights + decode, kept, how, "engine.hf.batch_size"), None


def state_lines(cfg: DphrlConfig, shape: ModelShape, world: int) -> list[Line]:
    """What the trainer keeps in both phases: float32 masters, gradients and AdamW moments
    (of the adapters alone under LoRA, over a float32 frozen base), sharded over W ranks by
    FSDP2, and the online reference, float32 like the policy (sharded the same way)."""
    m = cfg.model
    w = world if cfg.layout.fsdp else 1
    shard = f" / {w}" if w > 1 else ""
    more = "more GPUs (layout=gpu8, multinode)" if cfg.layout.fsdp else "layout.fsdp=true"
    P = shape.params
    trained = shape.lora_params(m.lora.r, list(m.lora.target_modules)) if m.lora.r else P
    what = f"{trained / 1e6:.1f} M adapter params" if m.lora.r else f"{P / 1e9:.2f} B params"
    weights = 4 * (P + trained if m.lora.r else P) // w

    def both(item: str, size: int, how: str, knob: str) -> Line:
        return Line(item, size, size, how, knob)

    lines = [
        both("weights, fp32 master", weights, f"4 B x {P / 1e9:.2f} B params"
             + (" + adapters" if m.lora.r else "") + shard, more),
        Line("gradients, fp32", 0, 4 * trained // w,
             f"4 B x {what}{shard}; freed after each step", more),
        both("AdamW moments, fp32", 8 * trained // w, f"8 B x {what}{shard}", more),
    ]  # fmt: skip
    if _online_reference(cfg):
        knob = "model.lora.r (the policy without its adapters is the reference)"
        lines.append(both("online reference, float32", 4 * P // w, f"4 B x {P / 1e9:.2f} B params{shard}", knob))  # fmt: skip
    return lines


def forward_lines(cfg: DphrlConfig, shape: ModelShape, world: int) -> list[Line]:
    """What one training forward and backward add: FSDP2's gathered layers (or autocast's
    compute copy), the activations, the log-prob head and the attention mask."""
    m, a = cfg.model, cfg.algo
    b = DTYPE_BYTES[m.compute_dtype or "float32"]
    t = forward_tokens(
        prompts_per_step=a.prompts_per_step,
        group_size=a.group_size,
        minibatch_size=a.minibatch_size,
        ref_batch_size=cfg.trainer.ref_batch_size if _ref_store(cfg) else 0,
        world=world,
        prompt_len=m.max_prompt_len,
        response_len=m.max_new_tokens,
        pack_tokens=m.pack_tokens,
        micro_batch_tokens=cfg.trainer.micro_batch_tokens,
    )
    lines = []
    if cfg.layout.fsdp:
        how = "float32 root + 2 layers, lm_head and layer gradients"
        lines.append(Line("gathered layers (FSDP2)", None, gathered_bytes(shape, b), how))
    elif b < 4:
        size = b * shape.layers * shape.layer_params
        lines.append(Line(f"{m.compute_dtype} layer copies", None, size, "autocast's casts"))
    ckpt = m.gradient_checkpointing
    knob = "trainer.micro_batch_tokens" + ("" if ckpt else ", model.gradient_checkpointing=true")
    how = ("checkpointed; " if ckpt else "") + t.how
    act = activation_bytes(shape, t.forward, b, ckpt)
    lines.append(Line(f"activations, {t.forward:,} tokens", None, act, how, knob))
    # every layout makes its log-probs chunk by chunk from the hidden states (the lm_head
    # included under FSDP2: dphrl.rl.logprobs.decoder_hidden), so full logits never exist
    full = False
    how = f"logits of {t.response:,} tokens" if full else f"{LOGPROB_CHUNK}-token float32 chunks"
    # the head runs in its weight's dtype: FSDP2's gathered compute copy, else the fp32 master
    head = head_bytes(shape, t.response, b if full else 4, full)
    lines.append(
        Line("log-prob head", None, head, how, "trainer.micro_batch_tokens" if full else "")
    )
    packed = m.pack_tokens > 0
    mask = mask_bytes(t.forward, t.width, b if packed else 1)
    how = f"rows of {t.width:,} tokens"
    lines.append(Line("attention mask", None, mask, how, "model.pack_tokens" if packed else ""))
    return lines


def build_plan(
    cfg: DphrlConfig,
    command: str,
    shape: ModelShape,
    world: int,
    capacity: int | None,
    capacity_from: str = "",
) -> Plan:
    """The per-rank plan of `command` (train: sampling and training phases; split,
    precompute-ref, eval-passk: sampling, the last two with the scoring or evaluated model)."""
    m = cfg.model
    training = command == "train"
    engine, kv_tokens = engine_lines(cfg, shape, capacity, training)
    kept: list[Line] = []
    forward: list[Line] = []
    if training:
        kept, forward = state_lines(cfg, shape, world), forward_lines(cfg, shape, world)
    elif command == "precompute-ref":
        b = 4  # float32 weights, as the trainer's (model.dtype is the compute dtype)
        kept = [Line("scoring model, float32", shape.params * b, None, "loaded next to the engine")]
    lines = [*kept, engine, *forward]
    lines.append(
        Line(
            "CUDA context, workspaces",
            RUNTIME_BYTES,
            RUNTIME_BYTES if training else None,
            "fixed estimate",
        )
    )
    ranks = f"{world} rank{'s' if world > 1 else ''}" + (", FSDP2" if cfg.layout.fsdp else "")
    title = (
        f"memory plan, dphrl {command}: {m.path} ({shape.params / 1e9:.2f} B params), "
        f"{ranks}, compute {m.compute_dtype or 'float32'}"
    )
    plan = Plan(title, lines, capacity, capacity_from)
    seq = m.max_prompt_len + m.max_new_tokens
    if capacity is not None and kv_tokens is not None and kv_tokens < seq:
        plan.kv_short = (
            f"vLLM's share (engine.vllm.gpu_memory_utilization={cfg.engine.vllm.gpu_memory_utilization}) "
            f"leaves KV cache for {kv_tokens:,} tokens after its weights, and one sequence of "
            f"model.max_prompt_len + model.max_new_tokens is {seq:,}: vLLM would refuse to start; "
            "raise engine.vllm.gpu_memory_utilization or shorten those"
        )
    return plan


def planned_world(layout_name: str) -> tuple[int, str]:
    """Ranks to plan for: torchrun's WORLD_SIZE, else 8 for gpu8 / multinode (one node's,
    for a dry run away from the cluster), else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), "WORLD_SIZE"
    if layout_name in ("gpu8", "multinode"):
        return 8, f"layout={layout_name} without torchrun: 8 assumed"
    return 1, "one process"


def device_capacity(cfg: DphrlConfig) -> tuple[int | None, str]:
    """The card's memory: `layout.gpu_memory_gib`, else what CUDA reports for this rank's
    device; None on a CPU layout or where no GPU is seen."""
    if cfg.layout.gpu_memory_gib is not None:
        return int(cfg.layout.gpu_memory_gib * GIB), "layout.gpu_memory_gib"
    if cfg.layout.device == "cpu" or cfg.layout.name == "cpu":
        return None, ""

    import torch

    if not torch.cuda.is_available():
        return None, ""
    index = int(os.environ.get("LOCAL_RANK", "0"))
    props = torch.cuda.get_device_properties(index)
    return props.total_memory, f"{props.name}, as CUDA reports"


def fitting_budget(cfg: DphrlConfig, shape: ModelShape, world: int, capacity: int) -> int | None:
    """The largest `trainer.micro_batch_tokens`, a multiple of 1024, whose training phase
    fits `capacity` (the plan grows with it); None when not even one row's forward does."""

    def fits(budget: int) -> bool:
        trial = replace(cfg, trainer=replace(cfg.trainer, micro_batch_tokens=budget))
        return build_plan(trial, "train", shape, world, capacity).total("training") <= capacity

    if not fits(1024):
        return None
    lo, hi = 1, 1
    while fits(hi * 2 * 1024) and hi < 2**20:
        hi *= 2
    lo, hi = hi, hi * 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * 1024) else (lo, mid)
    return lo * 1024


def what_fits(plan: Plan, cfg: DphrlConfig, shape: ModelShape, world: int) -> str:
    """A setting that makes the overflowing phase fit, when one knob does it."""
    phase, cap = plan.over(), plan.capacity
    if phase == "training":  # within 90 % of the card: room for the allocator's caching
        budget = fitting_budget(cfg, shape, world, int(HEADROOM * cap))
        if budget is not None and budget != cfg.trainer.micro_batch_tokens:
            return f"trainer.micro_batch_tokens={budget} fits (in {HEADROOM:.0%} of the card)."
    if phase == "sampling" and resolve_engine_name(cfg.engine.name) == "vllm":
        util = cfg.engine.vllm.gpu_memory_utilization
        rest = plan.total("sampling") - int(util * cap)
        room = int((cap - rest) / cap * 20) / 20  # down to a multiple of 0.05
        trial = replace(
            cfg,
            engine=replace(cfg.engine, vllm=replace(cfg.engine.vllm, gpu_memory_utilization=room)),
        )
        if room >= 0.05 and build_plan(trial, "train", shape, world, cap).kv_short is None:
            return f"engine.vllm.gpu_memory_utilization={room} fits."
    return ""


def plan_before_launch(command: str, cfg: DphrlConfig, dry_run: bool) -> Plan | None:
    """The plan of `command` for `cfg`, logged (rank 0) and checked: `PlanExceedsMemory` when
    a phase does not fit the card. Skipped on CPU layouts unless a dry run asks or
    `layout.gpu_memory_gib` sets a card; unavailable (said, not guessed) when the model's
    config.json is not on this machine."""
    capacity, source = device_capacity(cfg)
    if capacity is None and not dry_run:
        return None
    shape = find_shape(cfg.model.path)
    if shape is None:
        log.info(
            "memory plan: unavailable, %s is not a local folder and its config.json is not in "
            "the hub cache (nothing is downloaded to plan)",
            cfg.model.path,
        )
        return None
    world, world_from = planned_world(str(cfg.layout.name))
    plan = build_plan(cfg, command, shape, world, capacity, source)
    plan.notes.append(f"ranks: {world_from}")
    if capacity is None:
        plan.notes.append(
            "no device to check against: set layout.gpu_memory_gib to plan for a card"
        )
    if os.environ.get("RANK", "0") == "0":
        log.info("%s", plan.table())
    if plan.kv_short or plan.over():
        raise PlanExceedsMemory(plan.refusal(what_fits(plan, cfg, shape, world)))
    return plan
