"""Driver for the torchrun test: `dphrl train` with the toy `coin` task registered."""

import sys

import toytask

from dphrl.cli import run_command

toytask.register()
run_command("train", sys.argv[1:])
