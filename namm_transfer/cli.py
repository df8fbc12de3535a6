"""What every program of the suite shares: one-line errors for bad input, and quiet third-party logs.

A user who passes a wrong path, a broken weights file or an unknown task gets one line on stderr naming the
problem and exit status 2, never a traceback. Input errors are ValueError (every config and loader of the
suite raises a subclass naming the problem) and missing files; anything else still raises. Set
``NAMM_TRANSFER_DEBUG=1`` to see the traceback of an input error too.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

# Input problems the programs report in one line: every loader and config in the suite raises a
# ValueError subclass (or a missing-file error) whose message names the problem.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the suite's error style: ``error: <one line>`` and exit status 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_program(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` offline and turn input errors into one line on stderr and exit status 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return main(argv)
    except INPUT_ERRORS as error:
        if os.environ.get("NAMM_TRANSFER_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished items are saved; rerun the same command to resume", file=sys.stderr)
        return 130
