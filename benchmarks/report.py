"""Shared by every benchmark: write its figures into BENCHMARKS.md and benchmarks/results.json.

Each benchmark owns one section of BENCHMARKS.md, delimited by HTML comments, so benchmarks
can be rerun one at a time without clobbering each other. Figures are ratios measured side by
side in one run; the section records the command and the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

from dphrl.data import write_text

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "benchmarks" / "results.json"
HEADER = "# Benchmarks\n\nFigures are ratios measured side by side in one run. Rerun with `python benchmarks/run.py` (or one file).\n"


def machine() -> str:
    """One line naming the machine the figures came from, its CPU's bf16 units included: the
    sessions' CPUs differ (AMX, AVX512-BF16, neither), and with them every bfloat16 figure."""
    try:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except ImportError:
        dev, tv = "no torch", "-"
    return (
        f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, {dev}, "
        f"Python {platform.python_version()}, torch {tv}"
    )


def cpu_name() -> str:
    """The CPU's model name and its bfloat16 flags, e.g. `AMD EPYC (bf16 units: avx512_bf16)`."""
    from dphrl.precision import BF16_FLAGS, cpu_flags, cpu_info

    name = (cpu_info() or {}).get("model name") or platform.processor() or platform.machine()
    units = sorted(BF16_FLAGS & cpu_flags())
    return f"{name} (bf16 units: {', '.join(units) or 'none'})"


def update_section(name: str, title: str, body: str, measured_on: str | None = None) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md with `body`.

    `measured_on` names the machine when the figures came from another one (a GPU machine).
    """
    text = MARKDOWN.read_text() if MARKDOWN.exists() else HEADER
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {measured_on or machine()}\n\n{body.strip()}\n<!-- /bench:{name} -->\n"
    )
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S
    )
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + section
    )
    write_text(MARKDOWN, text)


def record(results: dict[str, float]) -> None:
    """Merge {name: ratio} into benchmarks/results.json."""
    current = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    current.update(results)
    write_text(RESULTS, json.dumps(current, indent=2, sort_keys=True) + "\n")


def publish(name: str, title: str, body: str, results: dict[str, float], quick: bool) -> dict:
    """Write a section and its figures; a quick run's go to `<name>_quick` (section and keys),
    so they never replace the full ones. Returns the figures as recorded."""
    suffix = "_quick" if quick else ""
    results = {k + suffix: v for k, v in results.items()}
    update_section(name + suffix, title + (" (quick)" if quick else ""), body)
    record(results)
    return results
