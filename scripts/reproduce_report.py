"""The small reproduction's table: RESULTS.md, results.json and two plots from one $OUT folder.

Reads what `scripts/reproduce_small.sh` left in OUT: `eval/passk.json` (every model on every
set), `arms/<arm>/seed<s>/metrics.jsonl` (the training curves, with `eval_*` every
`eval.every` steps) and `split/split_stats.json`. Writes, atomically:

- `results.json`: per arm and set, greedy and pass@k over seeds (mean, std, the values);
- `RESULTS.md`: the paper's table shape (rows = arms; per set Greedy / pass@8 / pass@16 as
  mean ± std over seeds) and the training settings; the reading of the result is written by a
  person into the committed RESULTS.md, not generated;
- `passk_curves.png`: pass@k vs k, one panel per set, one line per arm (mean over seeds);
- `passk_over_steps.png`: held-out pass@k and greedy during training, one line per arm (step 0
  is the base model's eval-passk, the last step the final model's where training skipped it),
  and the rehearsal's forgetting for the arms with a ref store: the share of ref responses whose
  log-prob fell more than 1 nat below the initial policy's (`ref_forgot_frac`, every step).

    .venv/bin/python scripts/reproduce_report.py runs/reproduce_small --arms "grpo dph_js" --seeds "0 1"

Reading a run's metrics.jsonl and passk.json, a result's cells and writing a figure are
`dphrl.report`'s (what `dphrl report` uses); this script adds the reproduction's own shape:
arms x seeds from its folder layout, the three sets, and means over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from dphrl.data import write_json, write_text
from dphrl.report import passk_cells, read_metrics, read_passk, save_figure

SETS = ("held-out", "D_pef", "OOD")
LABELS = {
    "base": "base (no training)",
    "grpo": "GRPO",
    "dapo": "DAPO",
    "grpo_rkl": "GRPO + reverse KL",
    "dph_f": "DPH-F (forward KL)",
    "dph_js": "DPH-JS",
    "dph_alpha": "DPH-alpha",
    # the EXTRA_ARMS names RESULTS.md uses for the objectives that followed DPH-RL
    "passk": "pass@k training",
    "klcov": "KL-Cov",
    "dph_f_default": "DPH-F, default beta",
    "dph_js_default": "DPH-JS, default beta",
}


def arm_of(model: str, out: Path) -> tuple[str, str]:
    """(arm, seed) of a model path `OUT/arms/<arm>/seed<s>/model`; the base model otherwise."""
    parts = Path(model).parts
    if "arms" in parts:
        i = parts.index("arms")
        return parts[i + 1], parts[i + 2].removeprefix("seed")
    return "base", "-"


def collect(out: Path) -> dict:
    """results[arm][set] = {"greedy": [per seed], "pass@k": {k: [per seed]}}."""
    results = read_passk(out / "eval")
    # eval.datasets lists held-out, D_pef, OOD in that order (reproduce_small.sh's SETS)
    order = list(dict.fromkeys(r["dataset"] for r in results))
    set_of = dict(zip(order, SETS, strict=False))
    table: dict = defaultdict(
        lambda: defaultdict(lambda: {"greedy": [], "pass@k": defaultdict(list)})
    )
    for r in results:
        arm, _ = arm_of(r["model"], out)
        cell = table[arm][set_of[r["dataset"]]]
        cell["greedy"].append(r["greedy"])
        for k, v in r["pass_at_k"].items():
            cell["pass@k"][int(k)].append(v)
    return table


def spread(values: list[float]) -> dict:
    """Mean and sample std (0 for one value) of a list of per-seed figures."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def table_md(table: dict, arms: list[str], ks: list[int]) -> str:
    """The paper's table shape in markdown."""
    shown = [k for k in (8, 16) if k in ks] or ks[-2:]
    head = "| arm | " + " | ".join(
        f"{s} {c}" for s in SETS for c in ["Greedy", *(f"pass@{k}" for k in shown)]
    )
    lines = [head + " |", "|" + " --- |" * (1 + len(SETS) * (1 + len(shown)))]
    for arm in arms:
        cells = []
        for s in SETS:
            cell = table[arm][s]
            for values in [cell["greedy"], *(cell["pass@k"][k] for k in shown)]:
                if not values:
                    cells.append("-")
                    continue
                st = spread(values)
                cells.append(
                    f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f}"
                    if len(values) > 1
                    else f"{100 * st['mean']:.1f}"
                )
        lines.append(f"| {LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(table: dict, arms: list[str], ks: list[int], path: Path) -> None:
    """pass@k vs k, one panel per set, one line per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(5 * len(SETS), 4), sharey=True)
    for ax, s in zip(axes, SETS, strict=True):
        for arm in arms:
            pk = table[arm][s]["pass@k"]
            if pk:
                ax.plot(
                    ks,
                    [statistics.fmean(pk[k]) for k in ks],
                    marker="o",
                    label=LABELS.get(arm, arm),
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(s)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pass@k")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# The forgetting signal every step of a ref-store arm logs (dphrl.rl.hybrid.FORGETTING_STATS).
FORGETTING = "ref_forgot_frac"


def training_curves(out: Path, arms: list[str], seeds: list[str]) -> dict:
    """curves[arm][metric] = [(step, mean over seeds)] for the `eval_*` metrics of training,
    and `FORGETTING` where the arm logs it (every step).

    A seed evaluated during training (`eval.every`) but not at its last step (`eval.at_end=false`:
    eval-passk evaluates the final model on the same held-out prompts and n anyway) gets its
    last point from `eval/passk.json`, the held-out set's figures of its final model."""
    final = final_heldout(out)
    curves: dict = {}
    for arm in arms:
        per_step: dict = defaultdict(lambda: defaultdict(list))
        for seed in seeds:
            rows = read_metrics(out / "arms" / arm / f"seed{seed}")
            for row in rows:
                if row.get(FORGETTING) is not None:
                    per_step[FORGETTING][row["step"]].append(row[FORGETTING])
            evaluated = [r for r in rows if any(k.startswith("eval_") for k in r)]
            if not rows or not evaluated:
                continue
            last = rows[-1]["step"]
            if evaluated[-1]["step"] != last and (arm, seed) in final:
                keys = [k for k in evaluated[-1] if k.startswith("eval_")]
                end = final[(arm, seed)]
                evaluated.append(
                    {"step": last, **{k: end[k] for k in keys if end.get(k) is not None}}
                )
            for row in evaluated:
                for key, value in row.items():
                    if key.startswith("eval_"):
                        per_step[key][row["step"]].append(value)
        curves[arm] = {
            key: [(step, statistics.fmean(v)) for step, v in sorted(steps.items())]
            for key, steps in per_step.items()
        }
    return curves


def final_heldout(out: Path) -> dict:
    """{(arm, seed): {"eval_greedy": ..., "eval_pass@k": ...}}: eval-passk's held-out figures
    (the first of eval.datasets) of each trained arm's final model, named as training logs them."""
    results = read_passk(out / "eval")
    heldout = results[0]["dataset"] if results else None
    final = {}
    for r in results:
        arm, seed = arm_of(r["model"], out)
        if arm != "base" and r["dataset"] == heldout:
            final[(arm, seed)] = {f"eval_{name}": v for name, v in passk_cells(r).items()}
    return final


def with_base(curves: dict, table: dict) -> dict:
    """Each arm's curve starts at step 0 from the base model's held-out figures (eval-passk on
    the same prompts and n; its own samples)."""
    base = table["base"]["held-out"]
    start = {f"eval_pass@{k}": statistics.fmean(v) for k, v in base["pass@k"].items()}
    if base["greedy"]:
        start["eval_greedy"] = statistics.fmean(base["greedy"])
    return {
        arm: {
            key: ([(0, start[key])] if key in start else []) + points for key, points in c.items()
        }
        for arm, c in curves.items()
    }


def plot_over_steps(curves: dict, arms: list[str], path: Path) -> None:
    """Held-out pass@k (largest k) and greedy during training, one line per arm, and a panel of
    the rehearsal's forgetting (`FORGETTING`) when some arm logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for c in curves.values() for k in c})
    passk = [k for k in keys if k.startswith("eval_pass@")]
    shown = [
        k
        for k in [
            max(passk, key=lambda k: int(k.split("@")[1]), default=None),
            "eval_greedy",
            FORGETTING,
        ]
        if k in keys
    ]
    fig, axes = plt.subplots(
        1, max(len(shown), 1), figsize=(5 * max(len(shown), 1), 4), squeeze=False
    )
    for ax, key in zip(axes[0], shown, strict=False):
        for arm in arms:
            points = curves.get(arm, {}).get(key, [])
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=LABELS.get(arm, arm))
        ax.set_title(
            "ref responses > 1 nat below the initial policy"
            if key == FORGETTING
            else f"held-out {key.removeprefix('eval_')} during training"
        )
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def sweep(out: Path) -> None:
    """The sweeps' tables -> `OUT/sweep.md` and `sweep.json`: per run of `OUT/sweep/`
    (`grpo_<steps>x<prompts>_lr<lr>`: GRPO; `js_x<m>`: DPH-JS at m x its default beta) the
    held-out figures of eval.every, and the D_pef figures of `OUT/sweep/eval` (eval-passk of
    the last step) where it exists."""
    rows = {}
    for run in sorted((out / "sweep").glob("*/metrics.jsonl")):
        points = [r for r in read_metrics(run.parent) if "eval_greedy" in r]
        rows[run.parent.name] = {"held-out": points}
    for r in read_passk(out / "sweep" / "eval"):
        name = Path(r["model"]).parent.name
        rows.setdefault(name, {"held-out": []})["D_pef"] = passk_cells(r)
    lines = [
        "| run | step | held-out greedy | held-out pass@1 | held-out pass@16 "
        "| D_pef greedy | D_pef pass@1 | D_pef pass@16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for name, run in rows.items():
        points = run["held-out"] or [{"step": "-"}]
        for i, p in enumerate(points):
            pef = run.get("D_pef", {}) if i == len(points) - 1 else {}
            lines.append(
                f"| {name} | {p['step']} | {pct(p.get('eval_greedy'))} "
                f"| {pct(p.get('eval_pass@1'))} | {pct(p.get('eval_pass@16'))} "
                f"| {pct(pef.get('greedy'))} | {pct(pef.get('pass@1'))} | {pct(pef.get('pass@16'))} |"
            )
    write_json(out / "sweep.json", rows)
    write_text(out / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def split_md(stats: dict) -> str:
    """The shared split in one line: how many prompts the initial policy solved in every sample."""
    if not stats:
        return ""
    return (
        f"\nSplit (shared by every arm): {stats['prompts']} prompts, {stats['pef']} in D_pef "
        f"({100 * stats['pef'] / stats['prompts']:.0f}%), {stats['exp']} in D_exp, mean pass "
        f"rate {stats['mean_pass_rate']:.2f}; histogram {stats['pass_rate_histogram']}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arms", help="space-separated arm names, as trained")
    parser.add_argument("--seeds", help="space-separated seeds, as trained")
    parser.add_argument("--seconds", type=int, default=None, help="wall time of the whole run")
    parser.add_argument("--sweep", action="store_true", help="only the sweeps' table")
    args = parser.parse_args()
    out: Path = args.out
    if args.sweep:
        sweep(out)
        return
    if not args.arms or not args.seeds:
        parser.error("--arms and --seeds are needed for the table")
    arms, seeds = ["base", *args.arms.split()], args.seeds.split()

    table = collect(out)
    ks = sorted({k for a in table.values() for c in a.values() for k in c["pass@k"]})
    results = {
        arm: {
            s: {
                "greedy": spread(table[arm][s]["greedy"]) if table[arm][s]["greedy"] else None,
                **{f"pass@{k}": spread(v) for k, v in sorted(table[arm][s]["pass@k"].items())},
            }
            for s in SETS
        }
        for arm in arms
    }
    curves = with_base(training_curves(out, args.arms.split(), seeds), table)
    stats_path = out / "split" / "split_stats.json"
    split_stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    write_json(
        out / "results.json",
        {
            "arms": arms,
            "seeds": seeds,
            "sets": list(SETS),
            "results": results,
            "training_curves": curves,
            "split": split_stats,
            "seconds": args.seconds,
        },
    )
    plot_curves(table, arms, ks, out / "passk_curves.png")
    plot_over_steps(curves, args.arms.split(), out / "passk_over_steps.png")
    minutes = f"{args.seconds / 60:.0f} min" if args.seconds else "not measured"
    write_text(
        out / "RESULTS.md",
        "# Small reproduction: results\n\n"
        f"Sets: held-out (in-domain, other seed), D_pef (the prompts the initial policy solved in "
        f"every sample), OOD (bare differences and products, never trained on). Seeds: "
        f"{', '.join(seeds)}; figures in %, mean ± std over seeds. Wall time: {minutes}.\n\n"
        + table_md(table, arms, ks)
        + "\n\n![pass@k vs k](passk_curves.png)\n\n![during training](passk_over_steps.png)\n"
        + split_md(split_stats)
        + (
            f"\n## The sweeps\n\n{(out / 'sweep.md').read_text()}"
            if (out / "sweep.md").exists()
            else ""
        ),
    )
    print(f"reproduce_report: wrote {out}/RESULTS.md, results.json and the two plots")


if __name__ == "__main__":
    main()
