"""The ``inspectd`` command: the daemon's commands (``daemon.cli``) plus the offline tools.

The tools (``eval``, ``synth``, ``bench``, ``demo``, ``train``) register their subcommands on
the daemon's parser here, so imports flow tools → daemon / workers / sensors and the daemon
never imports a tool; ``python -m daemon.cli`` runs the daemon's commands alone.
"""

from __future__ import annotations

import argparse
import sys

from daemon import cli as daemon_cli


def build_parser() -> argparse.ArgumentParser:
    """The full ``inspectd`` parser: the daemon's commands, then each tool's."""
    from tools import demo, train
    from tools.bench import run as bench
    from tools.evaluation import cli as eval_cli

    return daemon_cli.build_parser(demo.add_commands, eval_cli.add_commands, train.add_commands, bench.add_commands)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``inspectd`` console script."""
    return daemon_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
