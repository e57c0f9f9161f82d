"""The small reproduction's table: RESULTS.md, results.json and two plots from one $OUT folder.

Reads what `scripts/reproduce_small.sh` left in OUT: `eval/passk.json` (every model on every
set), `arms/<arm>/seed<s>/metrics.jsonl` (the training curves, with `eval_*` every
`eval.every` steps) and `split/split_stats.json`. Writes, atomically:

- `results.json`: per arm and set, greedy and pass@k over seeds (mean, std, the values);
- `RESULTS.md`: the paper's table shape (rows = arms; per set Greedy / pass@8 / pass@16 as
  mean ± std over seeds) and the training settings; the reading of the result is written by a
  person into the committed RESULTS.md, not generated;
- `passk_curves.png`: pass@k vs k, one panel per set, one line per arm (mean over seeds);
- `passk_over_steps.png`: the forgetting curves: held-out and D_pef greedy, pass@1 and the
  largest pass@k during training (`eval.every`, D_pef with `eval.pef_limit`), a row of panels
  per set and a line per arm (step 0 is the base model's eval-passk, the last step the final
  model's where training skipped it), and the rehearsal's forgetting for the arms with a ref
  store: the share of ref responses whose log-prob fell more than 1 nat below the initial
  policy's (`ref_forgot_frac`, every step).

`--export DIR` copies the raw record (eval-passk's samples gzipped, the training metrics, the
split's stats) into DIR; run on DIR, this script recomputes every figure from those samples.

    .venv/bin/python scripts/reproduce_report.py runs/reproduce_small --arms "grpo dph_js" --seeds "0 1"

Reading a run's metrics.jsonl and passk.json, a result's cells and writing a figure are
`dphrl.report`'s (what `dphrl report` uses); this script adds the reproduction's own shape:
arms x seeds from its folder layout, the three sets, and means over seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections import defaultdict
from pathlib import Path

from dphrl.data import write_json, write_text
from dphrl.report import passk_cells, read_metrics, read_passk, save_figure

SETS = ("held-out", "D_pef", "OOD")
# the sets training evaluates (eval.every; D_pef with eval.pef_limit), by metric prefix
CURVE_SETS = {"held-out": "eval_", "D_pef": "eval_pef_"}
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


SAMPLES_GZ = "samples.jsonl.gz"  # a committed table's raw eval: every sample with its verdict


@functools.cache
def eval_results(out: Path) -> list[dict]:
    """eval-passk's results (passk.json's) in `out/eval`; where only the compressed samples
    were kept (a table committed under docs/results/), recomputed from them with eval-passk's
    own summary: every figure of the table comes from the samples and their verdicts."""
    folder = out / "eval"
    if (folder / "passk.json").is_file() or not (folder / SAMPLES_GZ).is_file():
        return read_passk(folder)
    import gzip

    from dphrl.commands.eval_passk import summarize

    with gzip.open(folder / SAMPLES_GZ, "rt") as f:
        samples = [json.loads(line) for line in f]
    settings = json.loads((folder / "passk_settings.json").read_text())
    ids: dict = defaultdict(dict)  # (model, dataset) -> prompt ids, in order, as a set
    for row in samples:
        ids[row["model"], row["dataset"]][row["id"]] = None
    datasets = [
        {"model": m, "dataset": d, "ids": list(pids), "dropped": 0} for (m, d), pids in ids.items()
    ]
    return summarize(samples, datasets, settings["k"], settings["greedy"])


def set_order(out: Path) -> list[str]:
    """eval-passk's dataset labels in eval.datasets' order: held-out, D_pef, OOD
    (reproduce_small.sh's SETS), so `SETS` names them."""
    return list(dict.fromkeys(r["dataset"] for r in eval_results(out)))


def collect(out: Path) -> dict:
    """results[arm][set] = {"greedy": [per seed], "pass@k": {k: [per seed]}}."""
    results = eval_results(out)
    set_of = dict(zip(set_order(out), SETS, strict=False))
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


def arm_color(arms: list[str], arm: str) -> str:
    """One colour an arm in every panel, by its place in `arms`: a panel only some arms have a
    line in (the forgetting one) would otherwise give them the first arms' colours."""
    return f"C{arms.index(arm) % 10}"


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
                    color=arm_color(arms, arm),
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
    eval-passk evaluates the final model on the same prompts and n anyway) gets its last point
    from `eval/passk.json`, the figures of its final model on the same sets (`final_points`)."""
    final = final_points(out)
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


def final_points(out: Path) -> dict:
    """{(arm, seed): {"eval_greedy": ..., "eval_pass@k": ..., "eval_pef_greedy": ...}}:
    eval-passk's figures of each trained arm's final model on the sets training evaluates
    (`CURVE_SETS`), named as training logs them."""
    prefix = dict(zip(set_order(out), CURVE_SETS.values(), strict=False))
    final: dict = defaultdict(dict)
    for r in eval_results(out):
        arm, seed = arm_of(r["model"], out)
        if arm != "base" and r["dataset"] in prefix:
            final[(arm, seed)].update(
                {f"{prefix[r['dataset']]}{name}": v for name, v in passk_cells(r).items()}
            )
    return final


def with_base(curves: dict, table: dict) -> dict:
    """Each arm's curves start at step 0 from the base model's figures on the same set
    (eval-passk on the same prompts and n; its own samples)."""
    start = {}
    for s, prefix in CURVE_SETS.items():
        base = table["base"][s]
        start.update(
            {f"{prefix}pass@{k}": statistics.fmean(v) for k, v in base["pass@k"].items() if v}
        )
        if base["greedy"]:
            start[f"{prefix}greedy"] = statistics.fmean(base["greedy"])
    return {
        arm: {
            key: ([(0, start[key])] if key in start else []) + points for key, points in c.items()
        }
        for arm, c in curves.items()
    }


def plot_over_steps(curves: dict, arms: list[str], path: Path) -> None:
    """During training, one row of panels per set training evaluated (`CURVE_SETS`: held-out,
    D_pef), one panel per figure (greedy, pass@1, the largest pass@k), one line per arm; and a
    panel of the rehearsal's forgetting (`FORGETTING`) when some arm logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for c in curves.values() for k in c}
    rows = [(s, p) for s, p in CURVE_SETS.items() if any(k.startswith(f"{p}pass@") for k in keys)]
    ks = sorted({int(k.split("@")[1]) for k in keys if k.startswith("eval_pass@")})
    figures = ["greedy", *(f"pass@{k}" for k in dict.fromkeys([1, ks[-1]] if ks else []))]
    extra = FORGETTING in keys
    ncols = len(figures) + extra
    fig, axes = plt.subplots(
        max(len(rows), 1), ncols, figsize=(4.5 * ncols, 3.6 * max(len(rows), 1)), squeeze=False
    )
    panels = [(axes[i][j], f"{p}{f}", f"{s} {f}") for i, (s, p) in enumerate(rows)
              for j, f in enumerate(figures)]  # fmt: skip
    if extra:
        panels.append((axes[0][-1], FORGETTING, "ref responses > 1 nat below start, seed mean"))
        for row in axes[1:]:
            row[-1].axis("off")
    for ax, key, title in panels:
        for arm in arms:
            points = curves.get(arm, {}).get(key, [])
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    marker="o",
                    label=LABELS.get(arm, arm),
                    color=arm_color(arms, arm),
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)  # a panel every arm has a line in
    fig.tight_layout()
    save_figure(fig, path)


def sweep(out: Path) -> None:
    """The sweeps' tables -> `OUT/sweep.md` and `sweep.json`: per run of `OUT/sweep/`
    (`grpo_<steps>x<prompts>_lr<lr>`: GRPO; `js_x<m>`: DPH-JS at m x its default beta) the
    held-out and D_pef figures of each eval.every point (D_pef: `eval.pef_limit`), and its
    minutes (what the budget rule weighs)."""
    rows = {}
    for run in sorted((out / "sweep").glob("*/metrics.jsonl")):
        metrics = read_metrics(run.parent)
        rows[run.parent.name] = {
            "held-out": [r for r in metrics if "eval_greedy" in r],
            "minutes": sum(v for r in metrics for k, v in r.items() if k.startswith("time_")) / 60,
        }
    lines = [
        "| run | minutes | step | held-out greedy | held-out pass@1 | held-out pass@16 "
        "| D_pef greedy | D_pef pass@1 | D_pef pass@16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for name, run in rows.items():
        for p in run["held-out"] or [{"step": "-"}]:
            cells = [p.get(f"{prefix}{f}") for prefix in CURVE_SETS.values()
                     for f in ("greedy", "pass@1", "pass@16")]  # fmt: skip
            lines.append(
                f"| {name} | {run['minutes']:.1f} | {p['step']} | "
                + " | ".join(pct(c) for c in cells)
                + " |"
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
    parser.add_argument(
        "--export",
        type=Path,
        help="also copy the table's raw record (compressed eval samples, training metrics, "
        "split stats, the report) into this folder, from which this script recomputes the table",
    )
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
    plot_over_steps(curves, arms, out / "passk_over_steps.png")  # base: no curve, a colour
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
    if args.export:
        export(out, args.export)


# What a committed table keeps of OUT: small files, and eval-passk's samples compressed
RECORD = (
    "eval/passk_settings.json",
    "split/split_stats.json",
    "arms/*/seed*/metrics.jsonl",
    "sweep/*/metrics.jsonl",
    "sweep.json",
    "sweep.md",
    "results.json",
    "RESULTS.md",
    "passk_curves.png",
    "passk_over_steps.png",
)


def export(out: Path, dest: Path) -> None:
    """Copy the table's raw record into `dest` (OUT's layout, no models): every file of
    `RECORD` and `eval/samples.jsonl` gzipped, so that `reproduce_report.py dest --arms ...
    --seeds ...` recomputes every figure from the samples' verdicts (`eval_results`)."""
    import gzip
    import shutil

    for pattern in RECORD:
        for src in sorted(out.glob(pattern)):
            target = dest / src.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    samples = out / "eval" / "samples.jsonl"
    tmp = dest / "eval" / (SAMPLES_GZ + ".tmp")
    with samples.open("rb") as f, gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as g:
        shutil.copyfileobj(f, g)
    tmp.replace(dest / "eval" / SAMPLES_GZ)
    print(f"reproduce_report: the raw record is in {dest}")


if __name__ == "__main__":
    main()
