"""One table and one figure over many runs: a `--multirun` sweep folder, or any run folders.

A run is a folder Hydra made for one job (`.hydra/overrides.yaml`: how it was started) or
that holds what a command wrote: `metrics.jsonl` (train: one object per step) and
`passk.json` (eval-passk: pass@k per model and eval set). Each run becomes a row (a row per
model, where its passk.json compares several):

- its overrides as columns (the markdown moves the ones every run shares above the table);
- per training metric, the final value and the best (the highest) with its step;
- per eval set of its passk.json, greedy accuracy and pass@k;
- its status: `running` (a live process holds the folder's lock, `dphrl.lock`), `done` (the
  final model or passk.json is there) or `stopped` (killed, failed, or not yet at its end).

`report.md` and `report.csv` carry the same rows; the csv has every k and the best values'
steps in columns of their own. `report.png` draws each run's reward and held-out pass@k over
steps, and pass@k against k per eval set.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dphrl.data import atomic_path, read_jsonl, write_text
from dphrl.errors import DataError
from dphrl.lock import live_holder

OVERRIDES = Path(".hydra") / "overrides.yaml"
CONFIG = Path(".hydra") / "config.yaml"
METRICS = "metrics.jsonl"
PASSK = "passk.json"
# the training metrics shown unless `metrics` names others: the rollouts' reward, and the
# held-out greedy accuracy and pass@1 / pass@(largest k) that `eval.every` logs
DEFAULT_METRICS = ("reward_mean", "eval_greedy", "eval_pass@1", "eval_pass@max")


@dataclass
class Run:
    """What one run folder holds, read once."""

    name: str  # the folder, relative to the folder the report was asked for
    folder: Path
    overrides: dict[str, str] = field(default_factory=dict)
    status: str = "stopped"
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl rows
    passk: list[dict] = field(default_factory=list)  # passk.json's results


def is_run(folder: Path) -> bool:
    return (folder / OVERRIDES).is_file() or any(
        (folder / name).is_file() for name in (METRICS, PASSK)
    )


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """`folder` if it is a run, else the runs below it (a sweep's jobs), in job order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give a run or a --multirun sweep folder")
    if is_run(folder):
        return [folder]
    found = []
    for sub in sorted(folder.iterdir(), key=_natural):
        if sub.is_dir() and not sub.name.startswith("."):
            found += find_runs(sub)
    return found


def _natural(path: Path) -> list:
    """Sort key putting job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_overrides(folder: Path) -> dict[str, str]:
    """`key=value` overrides the job was started with (Hydra's own `hydra.*` left out)."""
    path = folder / OVERRIDES
    if not path.is_file():
        return {}
    import yaml

    found = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        if not key.lstrip("+~").startswith("hydra."):
            found[key] = value
    return found


def output_folders(folder: Path) -> list[Path]:
    """Where a job wrote: its own folder, and `trainer.run_dir` / `eval.out` where it set them."""
    found = [folder]
    path = folder / CONFIG
    if path.is_file():
        import yaml

        cfg = yaml.safe_load(path.read_text()) or {}
        for section, key in (("trainer", "run_dir"), ("eval", "out")):
            value = (cfg.get(section) or {}).get(key)
            if value and Path(value) not in found:
                found.append(Path(value))
    return found


def read_metrics(folder: str | os.PathLike) -> list[dict]:
    """`folder/metrics.jsonl`'s rows (none if absent); a torn last line, a step being
    written by a live run, is dropped."""
    path = Path(folder) / METRICS
    return read_jsonl(path, tolerate_torn_tail=True) if path.is_file() else []


def read_passk(folder: str | os.PathLike) -> list[dict]:
    """`folder/passk.json`'s results (none if absent): one per model and eval set."""
    path = Path(folder) / PASSK
    return json.loads(path.read_text())["results"] if path.is_file() else []


def passk_cells(result: dict) -> dict[str, float | None]:
    """One passk.json result as `{"greedy": ..., "pass@1": ..., ...}`."""
    return {
        "greedy": result.get("greedy"),
        **{f"pass@{k}": v for k, v in (result.get("pass_at_k") or {}).items()},
    }


def before_after(results: list[dict], before: str, after: str, names: tuple[str, ...]) -> str:
    """What an eval of two models says in words, one clause per eval set (passk.json's
    `results`; the sets in order of appearance, named by `names`): pass@1 and greedy of model
    `before` -> model `after`. A set named `D_pef` (the prompts the initial policy solved in
    every sample) is called kept when pass@1 falls by at most 2 points and greedy not at all:
    `held-out (32 prompts) pass@1 0.56 -> 0.58, greedy 0.69 -> 0.69; D_pef (19 prompts)
    pass@1 0.96 -> 0.97, greedy 1.00 -> 1.00: kept`."""
    sets = list(dict.fromkeys(r["dataset"] for r in results))
    by = {(r["model"], r["dataset"]): r for r in results}
    clauses = []
    for name, dataset in zip(names, sets, strict=False):
        a, b = by.get((before, dataset)), by.get((after, dataset))
        if a is None or b is None:
            continue
        p1 = [(r.get("pass_at_k") or {}).get("1") for r in (a, b)]
        greedy = [r.get("greedy") for r in (a, b)]
        text = f"{name} ({a['prompts']} prompts)"
        if None not in p1:
            text += f" pass@1 {p1[0]:.2f} -> {p1[1]:.2f}"
        if None not in greedy:
            text += f", greedy {greedy[0]:.2f} -> {greedy[1]:.2f}"
        if name == "D_pef" and None not in p1 + greedy:
            kept = p1[1] >= p1[0] - 0.02 and greedy[1] >= greedy[0]
            text += ": kept" if kept else ": not kept"
        clauses.append(text)
    return "; ".join(clauses)


def run_name(folder: Path, root: Path) -> str:
    """The run's folder relative to `root`; a sweep job's `<num>_<overrides>` shortened to its
    number, since the overrides are columns of their own."""
    parts = list(folder.relative_to(root).parts) or [folder.name]
    job = re.match(r"(\d+)_", parts[-1])
    if job and (folder / OVERRIDES).is_file():
        parts[-1] = job[1]
    return "/".join(parts)


def load_run(folder: Path, root: Path) -> Run:
    """Read one run: overrides, metrics, pass@k results and its status."""
    run = Run(name=run_name(folder, root), folder=folder, overrides=read_overrides(folder))
    finished = False
    for out in output_folders(folder):
        run.metrics = run.metrics or read_metrics(out)
        run.passk = run.passk or read_passk(out)
        finished |= (out / "model").is_dir() or (out / PASSK).is_file()
        if live_holder(out) is not None:
            run.status = "running"
    if run.status != "running" and finished:
        run.status = "done"
    return run


def load_runs(folders: list[str | os.PathLike]) -> list[Run]:
    """Every run in `folders` (runs or sweep folders), each read once."""
    runs = []
    for root in map(Path, folders):
        for run in (load_run(f, root) for f in find_runs(root)):
            if len(folders) > 1:  # tell job 0 of one sweep from job 0 of another
                run.name = f"{root.name}/{run.name}" if run.folder != root else run.name
            runs.append(run)
    if not runs:
        raise DataError(
            f"no runs in {', '.join(map(str, folders))}: a run folder holds .hydra/overrides.yaml, "
            f"{METRICS} or {PASSK}"
        )
    return runs


def final_and_best(rows: list[dict], key: str) -> tuple[float | None, float | None, int | None]:
    """(the last logged value, the highest value, its step) of `key` over metrics rows."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not points:
        return None, None, None
    best_step, best = max(points, key=lambda p: p[1])
    return points[-1][1], best, best_step


def metric_keys(runs: list[Run], wanted: tuple[str, ...]) -> list[str]:
    """`wanted` (with `eval_pass@max` read as the largest logged k) as logged by some run."""
    logged = {k for run in runs for row in run.metrics for k in row if k != "step"}
    ks = [int(k.split("@")[1]) for k in logged if k.startswith("eval_pass@")]
    keys = [f"eval_pass@{max(ks)}" if k == "eval_pass@max" and ks else k for k in wanted]
    return [k for k in dict.fromkeys(keys) if k in logged]


def short_set(spec: str) -> str:
    """An eval set's label: `name=/long/path/heldout.jsonl` -> `name=heldout.jsonl`."""
    name, eq, source = spec.partition("=")
    if not eq or source.startswith("hf:"):
        return spec
    return f"{name}={Path(source).name}"


def table(runs: list[Run], metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[dict]:
    """The report's rows: one dict per run (per run and model), columns in order."""
    keys = metric_keys(runs, metrics)
    override_keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    results = [r for run in runs for r in run.passk]
    sets: dict[str, list[str]] = {}  # eval set -> its cells (greedy, pass@k for every k)
    for r in results:
        cells = sets.setdefault(short_set(r["dataset"]), [])
        cells += [c for c in passk_cells(r) if c not in cells]
    rows = []
    for run in runs:
        base: dict = {"run": run.name, "status": run.status}
        base |= {k: run.overrides.get(k) for k in override_keys}
        base["steps"] = run.metrics[-1]["step"] if run.metrics else None
        for key in keys:
            final, best, step = final_and_best(run.metrics, key)
            base |= {key: final, f"best {key}": best, f"best {key} step": step}
        models = list(dict.fromkeys(r["model"] for r in run.passk)) or [None]
        for model in models:
            row = dict(base)
            if len(models) > 1:
                row["run"] = f"{run.name} ({model_label(model)})"
            for s, names in sets.items():
                result = next(
                    (r for r in run.passk if r["model"] == model and short_set(r["dataset"]) == s),
                    {},
                )
                cells = passk_cells(result)
                row |= {f"{s} {name}": cells.get(name) for name in names}
            rows.append(row)
    return rows


def model_label(model: str | None) -> str:
    """A model path's last two parts (`seed0/model`), enough to tell a run's models apart."""
    return "/".join(Path(str(model)).parts[-2:])


def to_csv(rows: list[dict]) -> str:
    """Every column, numbers unrounded, empty where a run has no value."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    """The table to read: overrides every run shares go above it; best values carry their
    step (`0.750 @6`); per eval set greedy, pass@1 and pass@(largest k)."""
    columns = list(rows[0])
    overrides = columns[columns.index("status") + 1 : columns.index("steps")]
    shared = {c: rows[0][c] for c in overrides if len({row[c] for row in rows}) == 1}
    shown = [c for c in columns if c not in shared and not c.endswith(" step")]
    shown = [c for c in shown if not _hidden_k(c, columns)]
    lines = []
    if shared:
        lines += ["Every run: " + " ".join(f"`{k}={v}`" for k, v in shared.items()), ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    for row in rows:
        cells = []
        for c in shown:
            cell = _fmt(row[c])
            if c.startswith("best ") and row.get(f"{c} step") is not None:
                cell += f" @{row[f'{c} step']}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _hidden_k(column: str, columns: list[str]) -> bool:
    """A `<set> pass@k` column other than k = 1 and the set's largest k (the csv has them)."""
    match = re.fullmatch(r"(.*) pass@(\d+)", column)
    if not match:
        return False
    ks = [
        int(m[1]) for c in columns if (m := re.fullmatch(re.escape(match[1]) + r" pass@(\d+)", c))
    ]
    return int(match[2]) not in (1, max(ks))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def label(run: Run, runs: list[Run]) -> str:
    """A run's legend entry: the overrides that tell it from the others, else its folder."""
    varying = [k for k in run.overrides if len({r.overrides.get(k) for r in runs}) > 1]
    return " ".join(f"{k}={run.overrides[k]}" for k in varying) or run.name


def figure(runs: list[Run], metrics: tuple[str, ...] = DEFAULT_METRICS):
    """Training metrics over steps (one panel per metric shown in the table), then pass@k
    against k (log2 axis) per eval set; one colour per run throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = metric_keys(runs, metrics)
    sets = list(dict.fromkeys(short_set(r["dataset"]) for run in runs for r in run.passk))
    panels = len(keys) + len(sets)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.5 * max(panels, 1), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        for i, run in enumerate(runs):
            points = [(r["step"], r[key]) for r in run.metrics if r.get(key) is not None]
            if points:
                ax.plot(
                    *zip(*points, strict=True), marker=".", color=f"C{i}", label=label(run, runs)
                )
        ax.set(title=key, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax, s in zip(axes[0][len(keys) :], sets, strict=False):
        for i, run in enumerate(runs):
            for r in (r for r in run.passk if short_set(r["dataset"]) == s):
                ks = sorted(int(k) for k in r["pass_at_k"])
                name = label(run, runs) + (
                    f" ({model_label(r['model'])})"
                    if len({x["model"] for x in run.passk}) > 1
                    else ""
                )
                ax.plot(
                    ks, [r["pass_at_k"][str(k)] for k in ks], marker="o", color=f"C{i}", label=name
                )
                ax.set_xscale("log", base=2)
                ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=s, xlabel="k", ylabel="pass@k", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    if panels:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a figure as a png atomically (`data.atomic_path`) and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(
    folders: list[str | os.PathLike],
    out: str | os.PathLike,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> tuple[list[dict], str]:
    """Read the runs in `folders`; write `report.md`, `report.csv` and `report.png` into `out`;
    return the rows and the markdown."""
    runs = load_runs(folders)
    rows = table(runs, metrics)
    md = to_markdown(rows)
    out = Path(out)
    write_text(out / "report.md", md)
    write_text(out / "report.csv", to_csv(rows))
    save_figure(figure(runs, metrics), out / "report.png")
    return rows, md
