"""Per-step metrics: one rich console line, `metrics.jsonl`, tensorboard, and wandb when asked.

The trainer computes a flat dict of floats each step under the names below (`reward_mean`,
`pg_loss`, `time_rollout`, ...), averages it across ranks with `reduce_metrics`, and hands it
to `MetricsLogger.log` on every rank; only rank 0's logger (`enabled=True`) writes. The jsonl
file is the record other tools read (one object per step, `{"step": 3, "reward_mean": ...}`);
a resumed run first calls `truncate_after(step)` so steps redone after the checkpoint appear
once, in the jsonl and in tensorboard alike.

torch, tensorboard and wandb are imported only when used, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from dphrl.data import atomic_path, write_json
from dphrl.errors import DphrlError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# What the console line shows, in order, when the step logged it: (key, label, format).
# The full set goes to the jsonl file, tensorboard and wandb.
CONSOLE_FIELDS = (
    ("reward_mean", "reward", "{:.3f}"),
    ("pass_rate", "pass", "{:.2f}"),
    ("pg_loss", "pg", "{:+.4f}"),
    ("clip_frac", "clip", "{:.3f}"),
    ("div_loss", "div", "{:.3g}"),  # small but non-zero early in a run: keep the digits
    ("kl_ref", "kl", "{:.3g}"),
    ("ref_forgot_frac", "forgot", "{:.2f}"),  # ref responses > 1 nat below the initial policy
    ("entropy", "ent", "{:.3f}"),
    ("response_len", "len", "{:.1f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("lr", "lr", "{:.2e}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
)
TIME_PREFIX = "time_"


def format_line(step: int, metrics: Mapping[str, float]) -> str:
    """The compact console line: key metrics, then the time split (`time_*` keys) in seconds."""
    parts = [f"[bold]step {step}[/bold]"]
    for key, label, fmt in CONSOLE_FIELDS:
        if key in metrics:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    times = [
        f"{key.removeprefix(TIME_PREFIX)} {value:.2f}s"
        for key, value in metrics.items()
        if key.startswith(TIME_PREFIX)
    ]
    if times:
        parts.append("[dim]" + " ".join(times) + "[/dim]")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each step's metrics to the console, `metrics.jsonl`, tensorboard and wandb.

    Construct it on every rank, with `enabled` true on rank 0 only: a missing wandb then fails
    on all ranks alike, before any work, instead of leaving the others waiting in a collective.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        wandb: bool = False,
        enabled: bool = True,
        config: Mapping[str, Any] | None = None,
        console: Console | None = None,
    ) -> None:
        if wandb:
            _require_wandb()
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.console = console or Console(highlight=False)
        self._want_tensorboard = tensorboard
        self._want_wandb = wandb
        self._config = dict(config or {})
        self._file = None
        self._tb: Any = None
        self._wandb: Any = None
        self._purge_step: int | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one step everywhere; call it once per step, after `reduce_metrics`."""
        if not self.enabled:
            return
        values = {key: float(value) for key, value in metrics.items()}
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # kept open across steps
        row = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.console.print(format_line(step, values), soft_wrap=True)  # a log keeps it one line
        writer = self._tensorboard()
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        run = self._wandb_run()
        if run is not None:
            run.log(values, step=step)

    def truncate_after(self, step: int) -> None:
        """Forget steps after `step` (a resumed run redoes them), in the jsonl and tensorboard.

        A torn last line (a write cut by a kill) is dropped too.
        """
        if not self.enabled:
            return
        self._close_files()
        self._purge_step = step + 1
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")

    def close(self) -> None:
        """Flush and close every sink; the logger can log again afterwards (it reopens)."""
        self._close_files()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _tensorboard(self) -> Any:
        """The SummaryWriter, opened on first use so a resume's purge step is known by then."""
        if not self._want_tensorboard or self._tb is not None:
            return self._tb
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._want_tensorboard = False
            self.console.print(
                "[yellow]tensorboard is not installed; skipping it (pip install tensorboard)"
            )
            return None
        log_dir = str(self.run_dir / TENSORBOARD_DIR)
        self._tb = SummaryWriter(log_dir=log_dir, purge_step=self._purge_step)
        self._purge_step = None
        return self._tb

    def _wandb_run(self) -> Any:
        """The wandb run, resumed under the id kept in the run folder, so one run is one chart."""
        if not self._want_wandb or self._wandb is not None:
            return self._wandb
        import wandb

        id_file = self.run_dir / "wandb.json"
        run_id = (
            json.loads(id_file.read_text())["id"] if id_file.exists() else wandb.util.generate_id()
        )
        write_json(id_file, {"id": run_id})
        self._wandb = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dphrl"),
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=self._config,
        )
        return self._wandb


def _require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise DphrlError(
            "trainer.wandb=true needs the wandb package: run `pip install wandb` (and `wandb login`), "
            "or set trainer.wandb=false"
        ) from None


class Timer:
    """Accumulates wall time per phase: `with timer("rollout"): ...`, then `timer.totals()`.

    With `cuda_sync`, CUDA work is waited for at each edge, so a phase is charged for the
    kernels it launched rather than the next phase that happens to wait for them.
    """

    def __init__(self, cuda_sync: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.cuda_sync = cuda_sync
        self.on_phase: Callable[[str], None] | None = None  # told each phase as it starts

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_phase is not None:
            self.on_phase(name)
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def totals(self) -> dict[str, float]:
        """Seconds per phase since the last `reset`."""
        return dict(self.seconds)

    def reset(self) -> None:
        """Start a new step's split."""
        self.seconds = {}

    def pop(self) -> dict[str, float]:
        """This step's split as `time_<phase>` metrics; the timer starts over."""
        split = {TIME_PREFIX + name: value for name, value in self.seconds.items()}
        self.reset()
        return split

    def _sync(self) -> None:
        if self.cuda_sync:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()


def accumulate(totals: dict[str, float], stats: Mapping[str, float], n: int) -> None:
    """Add one of `n` minibatches' `stats` into `totals`, which end as their mean; a maximum
    (`*_max`) stays the maximum over minibatches."""
    for key, value in stats.items():
        if key.endswith("_max"):
            totals[key] = max(totals.get(key, value), value)
        else:
            totals[key] = totals.get(key, 0.0) + value / n


def reduce_metrics(metrics: Mapping[str, float], sum_keys: Iterable[str] = ()) -> dict[str, float]:
    """Average each metric across ranks (sum those in `sum_keys`, e.g. token counts; take the
    maximum of those named `*_max`, e.g. `mismatch_abs_max`).

    Identity outside torch.distributed. Collective inside it: every rank must call it with the
    same keys, or the ranks disagree on what the numbers mean.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {key: float(value) for key, value in metrics.items()}
    keys = sorted(metrics)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    world, summed = dist.get_world_size(), set(sum_keys)
    out = {k: v if k in summed else v / world for k, v in zip(keys, values.tolist(), strict=True)}
    maxed = [k for k in keys if k.endswith("_max")]
    if maxed:
        peaks = torch.tensor([float(metrics[k]) for k in maxed], dtype=torch.float64, device=device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        out.update(zip(maxed, peaks.tolist(), strict=True))
    return out


def step_metrics(
    scored: list[Any],
    group_size: int,
    stats: Mapping[str, float],
    seconds: Mapping[str, float],
    device: str,
) -> dict[str, float]:
    """One train step's metrics from its verified rollouts (`dphrl.rollout.Scored`), the loss
    statistics and the phase times: reward, pass rate, groups, entropy of the sampled tokens,
    response length, verifier errors, throughput (and peak GPU memory on CUDA)."""
    import torch

    rewards = torch.tensor([s.verdict.reward for s in scored], dtype=torch.float32)
    lengths = [len(s.completion.token_ids) for s in scored]
    logps = [lp for s in scored for lp in s.completion.logprobs]
    tokens = sum(lengths)
    out = {
        "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "pass_rate": float((rewards >= 1.0).float().mean()) if len(rewards) else 0.0,
        "groups": len(scored) // max(group_size, 1),
        "entropy": -sum(logps) / max(len(logps), 1),
        "response_len": tokens / max(len(lengths), 1),
        "verify_errors": sum(1 for s in scored if s.verdict.error in ("timeout", "exception")),
        **stats,
        **{f"time_{k}": v for k, v in seconds.items()},
        "tokens_per_s": tokens / max(seconds.get("rollout", 0.0), 1e-9),
    }
    if device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
