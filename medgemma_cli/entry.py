"""The `medgemma` executable: model commands run in a supervised child (see `containment`), the rest here.

Kept to the standard library so that the supervising parent costs a few milliseconds, not an import of
typer, numpy or llama.cpp."""

from __future__ import annotations

import sys


def main() -> None:
    from medgemma_cli import containment, offline

    argv = sys.argv[1:]
    if containment.supervised_command(argv):
        sys.exit(containment.run_supervised(argv))
    is_offline, command = offline.is_offline(argv)
    if is_offline:
        offline.forbid_sockets(command)
    containment.init_child()
    from medgemma_cli.cli import main as cli_main

    cli_main()
