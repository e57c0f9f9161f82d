"""The `dphrl` command: a thin Typer app whose four work subcommands are Hydra apps.

Typer only picks the subcommand; every argument after it goes untouched to a `@hydra.main`
function, so overrides, `--multirun`, `--cfg job`, `--help` and Hydra's run folders all work.
The command's own logic is imported only after the config has composed and validated, so
help and config errors answer without importing torch. `report`, which reads the folders the
others wrote and composes no config, is a plain Typer command (`dphrl.commands.report`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # package data: ships in the wheel

# subcommand -> (Hydra config name, "module:function" that runs it)
COMMANDS = {
    "split": ("split", "dphrl.commands.split:run"),
    "precompute-ref": ("precompute_ref", "dphrl.commands.precompute_ref:run"),
    "train": ("train", "dphrl.commands.train:run"),
    "eval-passk": ("eval_passk", "dphrl.commands.eval_passk:run"),
}
REPORT = "dphrl.commands.report:run"  # a plain Typer command: no config to compose

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DPH-RL: RL from verifiable rewards that keeps pass@k. "
    "Each command takes Hydra overrides, e.g. `dphrl train divergence=js task=bird`.",
)
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _job(command: str):
    """Build the Hydra task function of one command."""
    from omegaconf import DictConfig

    def job(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from dphrl.config import typed as typed_config
        from dphrl.errors import DphrlError

        try:
            typed = typed_config(cfg)  # auto precisions settled, validated
            from dphrl.logs import route

            route(typed.verbose)
            from dphrl.dist import ranks_from_submitit
            from dphrl.memory.plan import plan_before_launch

            ranks_from_submitit()  # hydra/launcher=slurm: each task is a rank, as under torchrun
            # before any model loads: a run that cannot fit the card stops here, naming the knob
            plan_before_launch(command, typed, dry_run=typed.dry_run)
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            if typed.dry_run:
                _dry_run(command, typed, run_dir)
                return
            module, func = COMMANDS[command][1].split(":")
            getattr(importlib.import_module(module), func)(typed, run_dir)
        except (DphrlError, OSError) as err:
            # An OSError no writer named (a full disk, a read-only folder) still ends here,
            # with its path, not as a traceback.
            _fail(command, err)

    return job


def _fail(command: str, err: Exception) -> None:
    """A user's error: its message on stderr, no traceback, exit status 2."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]dphrl {command}: error:[/] {err}", highlight=False)
    sys.exit(2)


def _dry_run(command: str, cfg, run_dir: Path) -> None:
    """`dry_run=true`: prove the config, the model and the data resolve; write nothing more.
    (The memory plan, which the dry run also prints and checks, ran before this.)

    Useful before launching a sweep: each job of a `--multirun` gets its folder and its
    composed `.hydra/config.yaml`, and a bad path fails here rather than after a rollout.
    """
    from dphrl.embedded import resolve_model_path
    from dphrl.tasks import get_task

    rows = get_task(cfg.task.name).load(cfg.task, "train")
    model = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    print(
        f"dphrl {command} (dry run): task {cfg.task.name}: {len(rows)} prompts; model {model}; run folder {run_dir}"
    )


def run_command(command: str, args: list[str]) -> None:
    """Run one subcommand as a Hydra app with `args` as its command line."""
    import hydra

    from dphrl.config import check_overrides, register
    from dphrl.errors import ConfigError

    try:
        check_overrides(args)
    except ConfigError as err:
        _fail(command, err)
    register()
    config_name = COMMANDS[command][0]
    if {"--cfg", "-c"} & set(args) and "--resolve" not in args:
        # print values, not interpolations: the paper presets pick theirs per method
        args = [*args, "--resolve"]
    sys.argv = [f"dphrl {command}", *args, *torchrun_overrides(args, os.environ)]
    main_fn = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(
        _job(command)
    )
    main_fn()


def torchrun_overrides(args: list[str], env: Mapping[str, str]) -> list[str]:
    """What every rank of a torchrun adds to its Hydra overrides: one run folder for all ranks
    (each would otherwise take its own `${now}`, seconds apart) unless `hydra.run.dir` is
    given, and for ranks above 0 a log file of their own in it (Hydra truncates the one it
    opens). Nothing outside torchrun or in a --multirun."""
    if int(env.get("WORLD_SIZE", "1")) < 2 or {"--multirun", "-m"} & set(args):
        return []
    added = []
    if not any(a.startswith("hydra.run.dir=") for a in args):
        launch = env.get("TORCHELASTIC_RUN_ID", "none")
        if launch == "none":  # a plain torchrun: its agent is every rank's parent
            launch = f"{env.get('MASTER_PORT', '')}-{os.getppid()}"
        added.append(f"hydra.run.dir=outputs/${{now:%Y-%m-%d}}/torchrun-{launch}")
    rank = env.get("RANK", "0")
    if rank != "0":
        log = f"${{hydra.runtime.output_dir}}/${{hydra.job.name}}_rank{rank}.log"
        added.append(f"hydra.job_logging.handlers.file.filename={log}")
    return added


def _add(name: str, summary: str) -> None:
    def command(ctx: typer.Context) -> None:
        run_command(name, list(ctx.args))

    command.__doc__ = summary
    app.command(name, context_settings=_PASS_THROUGH, add_help_option=False, help=summary)(command)


_add("split", "Split prompts into D_pef / D_exp by k samples of the policy.")
_add("precompute-ref", "Store D_pef responses and their reference log-probs.")
_add("train", "Hybrid RL: PPO-clip on D_exp + beta * f-divergence on D_pef.")
_add("eval-passk", "Unbiased pass@k (and diversity) of models on datasets.")


@app.command("report")
def report(
    folders: Annotated[
        list[Path], typer.Argument(help="run folders, or folders holding runs (a --multirun sweep)")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="where report.md/.csv/.png go; default: the one folder given, else .",
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help="a metrics.jsonl key to show (repeat); default: reward_mean and the eval_* ones",
        ),
    ] = None,
) -> None:
    """One table (markdown + csv) and one figure over runs: overrides, final and best metrics, pass@k."""
    from dphrl.errors import DphrlError

    module, func = REPORT.split(":")
    try:
        getattr(importlib.import_module(module), func)(folders, out, metric)
    except (DphrlError, OSError) as err:
        _fail("report", err)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
