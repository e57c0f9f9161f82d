"""How one GRPO step's cost grows with the work: dphrl vs TRL's GRPOTrainer over a grid.

The step is `benchmarks/trl_step.py`'s, with its settings and its two workers (same weights,
prompts, sampler settings, reward, loss, optimizer; see its docstring), measured at each point
of two axes: the group size G at a fixed max response length, and the max response length at
a fixed G. At each point the two sides run one after the other, each in a fresh process (so
its peak RSS, the kernel's VmHWM, is its own), the order alternating from point to point;
medians over the timed steps. Per point: step time, seconds per generated token (samplers
differ, so lengths differ at random), peak RSS, and dphrl / TRL for each.

Arith answers end at EOS after a few dozen tokens, so past that the length axis raises the
cap, not the typical length: it measures what a few long samples cost each side (TRL's
`generate` decodes every row until the longest ends; dphrl's decode loop drops finished rows).

Writes BENCHMARKS.md's section, benchmarks/cost_curves.png (two columns, vs G and vs length;
step time above, peak RSS below) and `cost_curves_*` keys in results.json.

Usage: python benchmarks/cost_curves.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.trl_step import SIDES, _subprocess  # noqa: E402

FULL = {
    "groups": (4, 8, 16, 32),
    "fixed_len": 64,  # trl_step's length: its point is (8, 64)
    "lengths": (32, 128, 512),
    "fixed_group": 8,
    "prompts": 1,
    "warmup": 1,
    "steps": 2,
}
QUICK = {
    "groups": (4, 8),
    "fixed_len": 32,
    "lengths": (32, 128),
    "fixed_group": 4,
    "prompts": 1,
    "warmup": 1,
    "steps": 1,
}
TARGET_G16, TARGET_ANY = 0.35, 0.5  # issue 16: dphrl / TRL step time


def points(grid: dict) -> list[tuple[int, int]]:
    """The grid's distinct (G, max response length) points: the G axis, then the length axis."""
    pts = [(g, grid["fixed_len"]) for g in grid["groups"]]
    pts += [(grid["fixed_group"], n) for n in grid["lengths"]]
    return list(dict.fromkeys(pts))


def summarize(run: dict) -> dict[str, float]:
    """One side's worker output at one point: medians over its timed steps, and its peak RSS."""
    steps = run["steps"]
    tokens = sum(s["tokens"] for s in steps)
    return {
        "step_s": statistics.median(s["step_s"] for s in steps),
        "train_s": statistics.median(s["train_s"] + s["sync_s"] for s in steps),
        "tokens": statistics.median(s["tokens"] for s in steps),
        "s_per_token": sum(s["step_s"] for s in steps) / max(tokens, 1),
        "peak_rss_mib": run["peak_rss_mib"],
    }


def measure(grid: dict, folder: str) -> dict[tuple[int, int], dict[str, dict]]:
    """Both sides at every point, interleaved: point by point, the order alternating."""
    out: dict[tuple[int, int], dict[str, dict]] = {}
    for k, (group, length) in enumerate(points(grid)):
        sizes = {
            "prompts": grid["prompts"],
            "group": group,
            "max_new": length,
            "warmup": grid["warmup"],
            "steps": grid["steps"],
            "repeats": 1,
        }
        out[(group, length)] = {}
        for side in SIDES if k % 2 == 0 else SIDES[::-1]:
            out[(group, length)][side] = summarize(_subprocess(side, sizes, f"{folder}/{k}"))
        print(f"cost_curves: G={group} len={length}: {out[(group, length)]}", flush=True)
    return out


def ratios(measured: dict[tuple[int, int], dict[str, dict]]) -> dict[str, float]:
    """results.json keys: dphrl / TRL step time, time per token and peak RSS at each point."""
    out = {}
    for (group, length), m in measured.items():
        ours, trl = m["dphrl"], m["trl"]
        at = f"g{group}_len{length}"
        out[f"cost_curves_step_time_ours_over_trl_{at}"] = ours["step_s"] / trl["step_s"]
        out[f"cost_curves_time_per_token_ours_over_trl_{at}"] = (
            ours["s_per_token"] / trl["s_per_token"]
        )
        out[f"cost_curves_peak_rss_ours_over_trl_{at}"] = ours["peak_rss_mib"] / trl["peak_rss_mib"]
    return out


def plot(measured: dict, grid: dict, path: Path) -> None:
    """Step time (top) and peak RSS (bottom) of both sides vs G (left) and vs length (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dphrl.data import atomic_path

    axes_spec = [
        ("group size G", grid["groups"], lambda x: (x, grid["fixed_len"])),
        ("max response length", grid["lengths"], lambda x: (grid["fixed_group"], x)),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for col, (label, xs, point) in enumerate(axes_spec):
        for row, (key, ylabel) in enumerate(
            [("step_s", "step time (s)"), ("peak_rss_mib", "peak RSS (MiB)")]
        ):
            ax = axes[row][col]
            for side in SIDES:
                ax.plot(xs, [measured[point(x)][side][key] for x in xs], marker="o", label=side)
            for x in xs:
                m = measured[point(x)]
                ratio = m["dphrl"][key] / m["trl"][key]
                ax.annotate(
                    f"{ratio:.2f}x",
                    (x, m["dphrl"][key]),
                    textcoords="offset points",
                    xytext=(0, -12),
                    ha="center",
                    fontsize=8,
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(xs), [str(x) for x in xs])
            ax.set_ylim(bottom=0)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        fixed = f"length {grid['fixed_len']}" if col == 0 else f"G {grid['fixed_group']}"
        axes[0][col].set_title(f"vs {label} ({fixed})")
        axes[1][col].set_xlabel(label)
    axes[0][0].legend()
    fig.suptitle("One GRPO step, dphrl vs TRL GRPOTrainer (labels: dphrl / TRL)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table(measured: dict) -> str:
    rows = []
    for (group, length), m in measured.items():
        ours, trl = m["dphrl"], m["trl"]
        rows.append(
            f"| {group} | {length} | {ours['step_s']:.1f} | {trl['step_s']:.1f} "
            f"| **{ours['step_s'] / trl['step_s']:.2f}x** | {ours['s_per_token'] / trl['s_per_token']:.2f}x "
            f"| {ours['train_s']:.1f} | {trl['train_s']:.1f} | {ours['tokens']:.0f} | {trl['tokens']:.0f} "
            f"| {ours['peak_rss_mib']:.0f} | {trl['peak_rss_mib']:.0f} "
            f"| {ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x |"
        )
    head = (
        "| G | max length | dphrl step s | TRL step s | step time | per token | dphrl train s "
        "| TRL train s | dphrl tokens | TRL tokens | dphrl peak RSS | TRL peak RSS | peak RSS |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    return head + "\n" + "\n".join(rows)


def main(quick: bool = False) -> dict[str, float]:
    """Measure the grid, write the plot, BENCHMARKS.md's section and results.json."""
    from benchmarks.report import publish
    from benchmarks.trl_step import LR, MODEL, THREADS

    grid = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        measured = measure(grid, folder)
    png = ROOT / "benchmarks" / f"cost_curves{'_quick' if quick else ''}.png"
    plot(measured, grid, png)
    results = ratios(measured)
    worst = max(m["dphrl"]["step_s"] / m["trl"]["step_s"] for m in measured.values())
    g16 = measured.get((16, grid["fixed_len"]))
    at16 = g16["dphrl"]["step_s"] / g16["trl"]["step_s"] if g16 else None
    verdict = (
        f"at G = 16 {at16:.2f}x (target <= {TARGET_G16}x: {'meets' if at16 <= TARGET_G16 else 'misses'} it); "
        if at16 is not None
        else ""
    )
    verdict += f"worst point {worst:.2f}x (target <= {TARGET_ANY}x: {'meets' if worst <= TARGET_ANY else 'misses'} it)"
    body = f"""
One GRPO step as in `benchmarks/trl_step.py` (model `{MODEL}`, float32, CPU, {THREADS} torch
thread(s) each, {grid["prompts"]} arith prompt(s) x G rollouts, temperature 1.0, PPO-clip 0.2,
token-mean loss, one AdamW step at lr {LR}, no reference model), at every point of two axes: G in
{list(grid["groups"])} at max length {grid["fixed_len"]}, and max length in {list(grid["lengths"])} at G =
{grid["fixed_group"]}. At each point dphrl and TRL each ran in a fresh process, one after the
other (order alternating by point), {grid["warmup"]} warm-up + {grid["steps"]} timed step(s);
medians, seconds. "per token" is all timed steps' seconds over their generated tokens (the two
samplers draw different lengths). Train = the step minus generation and reward (dphrl: its
train + weight sync). Peak RSS is the whole process's (VmHWM, default malloc): dphrl holds a
second copy of the weights in its engine.{" Quick sizes." if quick else ""}

![dphrl vs TRL cost curves](benchmarks/{png.name})

{table(measured)}

dphrl / TRL step time: {verdict}.
"""
    return publish(
        "cost_curves",
        "Cost curves: one GRPO step, dphrl vs TRL, over G and length",
        body,
        results,
        quick,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two points per axis (minutes)")
    args = parser.parse_args()
    print(json.dumps(main(quick=args.quick), indent=2))
