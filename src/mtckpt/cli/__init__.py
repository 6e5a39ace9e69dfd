"""The ``mtckpt`` command line (also ``python -m mtckpt``), one module per command group,
thin over the library.

Exit codes: 0 success; 1 the operation failed, or ``verify`` found a damaged copy (one
line on stderr says why); 2 bad usage (which flag, and what was expected).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import MtckptError
from . import _copy, _daemon, _plan, _steps
from ._common import UsageError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mtckpt", description="multi-tier checkpointing")
    top.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = top.add_subparsers(dest="command", required=True)
    _daemon.add_parsers(commands)
    _steps.add_parsers(commands)
    _copy.add_parsers(commands)
    _plan.add_parsers(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.handler(args)
    except UsageError as exc:
        message = str(exc)
        prefix = f"mtckpt {args.command}: "
        print(message if message.startswith(prefix) else prefix + message, file=sys.stderr)
        return 2
    except (ValueError, OSError, MtckptError) as exc:  # a one-line reason, not a traceback
        print(f"mtckpt {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
