"""Where the small reproduction's arms gained and lost: two-digit sums with and without a carry.

Reads `OUT/eval/samples.jsonl` and `OUT/sets/{heldout,pef}.jsonl` of a finished
`scripts/reproduce_small.sh` run and prints, per set, kind of sum and arm, pass@1 over the
sampled answers (not the greedy one) and how often the answer is the true sum + 10: the
"spurious carry", a tens digit one too high. docs/results/table64/RESULTS.md reads this
table; it is a script so that anyone can recompute it from a run folder.

    .venv/bin/python scripts/carry_analysis.py runs/reproduce_small
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from reproduce_report import arm_of  # scripts/ is on sys.path when run as a script

from dphrl.data import read_jsonl

SUM = re.compile(r"What is (\d+) \+ (\d+)\?")


def sums(path: Path) -> dict[int, tuple[int, bool]]:
    """{row id: (a + b, whether the units carry)} for the rows that are bare sums `a + b`."""
    found = {}
    for row in read_jsonl(path):
        prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        m = SUM.search(prompt)
        if m:
            a, b = int(m[1]), int(m[2])
            found[row["id"]] = (a + b, a % 10 + b % 10 >= 10)
    return found


def main(out: Path) -> None:
    sets = {name: sums(out / "sets" / f"{name}.jsonl") for name in ("heldout", "pef")}
    # (set, kind, arm) -> [answers, correct, answer == truth + 10]
    counts: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in read_jsonl(out / "eval" / "samples.jsonl"):
        name = next((n for n in sets if f"/{n}.jsonl" in s["dataset"]), None)
        if s["greedy"] or name is None or s["id"] not in sets[name]:
            continue
        total, carry = sets[name][s["id"]]
        cell = counts[(name, "carry" if carry else "no carry", arm_of(s["model"], out)[0])]
        cell[0] += 1
        cell[1] += bool(s["correct"])
        cell[2] += s["answer"] == str(total + 10)
    print("| set | sums | arm | answers | pass@1 | answer = sum + 10 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, kind, arm), (n, right, plus10) in sorted(counts.items()):
        print(f"| {name} | {kind} | {arm} | {n} | {100 * right / n:.0f} | {100 * plus10 / n:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
