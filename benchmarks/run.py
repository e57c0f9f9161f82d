"""Run every benchmark, each in its own process; `--quick` runs the reduced versions.

Each benchmark writes its own section of BENCHMARKS.md and merges its {name: ratio} figures
into benchmarks/results.json (both through benchmarks/report.py); this driver runs them one
after another (never two at once: they time and measure memory on the same cores), prints
what each recorded, and keeps the header of BENCHMARKS.md saying how to rerun. Quick figures
never replace full ones: they go to `<name>_quick` sections and keys.

Usage: python benchmarks/run.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import HEADER, MARKDOWN, RESULTS, record  # noqa: E402

# name -> (arguments of a full run, arguments of a quick run), in the order they run.
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "logprobs": ([], ["--quick"]),
    "verify": (["--rounds", "5"], ["--rounds", "2", "--limit", "2"]),
    "rollout": (
        ["--prompts", "8", "--n", "4", "--max-new-tokens", "64", "--repeats", "2"],
        ["--prompts", "2", "--n", "2", "--max-new-tokens", "16"],
    ),
    "roofline": ([], ["--quick"]),
    "split_ranks": ([], ["--limit", "64"]),
    "pipeline": ([], ["--quick"]),
    "train_step": ([], ["--quick"]),
    "trl_step": ([], ["--quick"]),
    "cost_curves": ([], ["--quick"]),
    "mfu": ([], ["--quick"]),
    "autocast_step": ([], ["--quick"]),
    "topk_rehearsal": ([], ["--quick"]),
}

RERUN = """
Every figure below is a ratio of two variants measured side by side in one run (same
machine, same process settings, interleaved where timed), so it is comparable across
machines only as a ratio. Rerun all with `python benchmarks/run.py` (full sizes; about half an
hour on an idle 2-core CPU: on 2026-11-30 pipeline took 8 min, cost curves 9, train_step,
trl_step and mfu 2-3 each; logprobs, verify and rollout were not timed then) or `python benchmarks/run.py --quick`
(reduced sizes, about fifteen minutes;
quick figures go to their own `*_quick` sections and keys and never replace full ones),
one benchmark with `python benchmarks/<name>.py [--quick]`, or a subset with
`python benchmarks/run.py --only train_step trl_step`. Each section names the command and
the machine it came from; `benchmarks/results.json` holds the latest ratio under each name.
"""


def write_header() -> None:
    """Put the rerun instructions at the top of BENCHMARKS.md, keeping every section."""
    text = MARKDOWN.read_text() if MARKDOWN.exists() else HEADER
    start = text.find("<!-- bench:")
    sections = text[start:] if start >= 0 else ""
    head = HEADER.split("\n\n")[0] + "\n" + RERUN
    tmp = MARKDOWN.with_name(f".{MARKDOWN.name}.tmp")
    tmp.write_text(head + ("\n" + sections if sections else ""))
    os.replace(tmp, MARKDOWN)


def _section(text: str, name: str) -> re.Match | None:
    return re.search(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", text, re.S
    )


def keep_full(name: str, text_before: str, before: dict[str, float]) -> dict[str, float]:
    """After a quick run of a benchmark that does not separate its quick figures itself, move
    them to `<name>_quick` (section and keys) and put back the full ones it replaced."""
    after = json.loads(RESULTS.read_text())
    changed = {k: v for k, v in after.items() if before.get(k) != v and k.startswith(name + "_")}
    if all(k.endswith("_quick") for k in changed):
        return changed
    quick = {k if k.endswith("_quick") else k + "_quick": v for k, v in changed.items()}
    restored = {k: v for k, v in after.items() if k not in changed}
    restored.update({k: before[k] for k in changed if k in before})
    tmp = RESULTS.with_name(f".{RESULTS.name}.tmp")
    tmp.write_text(json.dumps({**restored, **quick}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)
    text = MARKDOWN.read_text()
    new = _section(text, name)
    if new is not None:
        old = _section(text_before, name)
        body = new.group(0).replace(f"bench:{name} -->", f"bench:{name}_quick -->", 2)
        body = re.sub(r"^## (.*)$", r"## \1 (quick)", body, count=1, flags=re.M)
        text = text.replace(new.group(0), old.group(0) if old else "")
        stale = _section(text, f"{name}_quick")
        text = text.replace(stale.group(0), body) if stale else text.rstrip("\n") + "\n\n" + body
        tmp = MARKDOWN.with_name(f".{MARKDOWN.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, MARKDOWN)
    return quick


def run(name: str, args: list[str], quick: bool) -> tuple[float, dict[str, float]]:
    """One benchmark in a fresh process; its wall time and the figures it recorded."""
    before = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    text_before = MARKDOWN.read_text() if MARKDOWN.exists() else ""
    started = time.perf_counter()
    cmd = [sys.executable, f"benchmarks/{name}.py", *args]
    print(f"== {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.setdefault("DPHRL_CACHE", str(ROOT / ".cache"))
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    seconds = time.perf_counter() - started
    after = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    if quick and proc.returncode == 0 and changed:
        changed = keep_full(name, text_before, before)
    if proc.returncode != 0:
        print(f"== {name} failed (exit {proc.returncode}) after {seconds:.0f} s", flush=True)
    else:
        print(f"== {name}: {seconds:.0f} s, {json.dumps(changed)}", flush=True)
    return seconds, changed if proc.returncode == 0 else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, a few minutes")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run just these")
    args = parser.parse_args()
    names = [n for n in BENCHMARKS if (ROOT / "benchmarks" / f"{n}.py").exists()]
    names = [n for n in names if not args.only or n in args.only]
    total, failed, figures = time.perf_counter(), [], {}
    for name in names:
        _, changed = run(name, BENCHMARKS[name][1 if args.quick else 0], args.quick)
        if not changed:
            failed.append(name)
        figures.update(changed)
    record(figures)  # each benchmark recorded its own; this keeps the driver's view in one place
    write_header()
    print(json.dumps(figures, indent=2, sort_keys=True))
    print(f"== all: {time.perf_counter() - total:.0f} s; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
