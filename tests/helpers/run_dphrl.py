"""Driver for the torchrun tests of the sampling commands: `dphrl <command> <overrides>` with
the toy `coin` task registered."""

import sys

import toytask

from dphrl.cli import run_command

toytask.register()
run_command(sys.argv[1], sys.argv[2:])
