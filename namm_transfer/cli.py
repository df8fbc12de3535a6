"""What every program of the suite shares: checks of arguments, paths and devices before any work, one place
that turns every expected failure into one line, and a truthful interrupt message.

The promise to a user: a wrong command is answered with one line on stderr (``error: ...``) naming the thing
and what to do, exit status 2, before any model is loaded or any file is written; nothing half-done is left
behind. Programs therefore

1. parse with :class:`ArgumentParser` and the bounded types :class:`IntRange`, :class:`FloatRange` and
   :func:`float_list` (their bounds are printed in ``--help``);
2. check devices (:func:`check_device`), inputs (:func:`check_readable_file`, :func:`check_readable_dir`) and
   outputs (:func:`check_output_dir`: writable, free space) and every cross-argument rule;
3. only then load models and write files, inside :func:`run_program`, which maps the failures that can still
   happen (a full disk, a cut weights file, a model folder transformers refuses) with :func:`describe_error`.

``NAMM_TRANSFER_DEBUG=1`` shows the traceback of a mapped failure too. Failures that are not expected (bugs)
keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

DEVICE_TYPES = ("cpu", "cuda", "mps")


class InputError(ValueError, argparse.ArgumentTypeError):
    """A bad argument, path or device. As an argparse ``type`` its message is shown as is; in a program it
    becomes the one error line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the suite's error style: ``error: <one line>`` and exit status 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


class IntRange:
    """An argparse ``type``: an integer in ``[low, high]``; ``str()`` gives the range for ``--help``."""

    def __init__(self, low: int, high: int) -> None:
        if low > high:
            raise ValueError(f"IntRange: low {low} > high {high}")
        self.low, self.high = low, high

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise InputError(f"{text!r} is not an integer (expected {self})") from None
        if not self.low <= value <= self.high:
            raise InputError(f"{value} is out of range (expected {self})")
        return value

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


class FloatRange:
    """An argparse ``type``: a finite float in ``[low, high]`` (``(low, high]`` when ``open_low``)."""

    def __init__(self, low: float, high: float, open_low: bool = False) -> None:
        if low > high:
            raise ValueError(f"FloatRange: low {low} > high {high}")
        self.low, self.high, self.open_low = low, high, open_low

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{text!r} is not a number (expected {self})") from None
        above_low = value > self.low if self.open_low else value >= self.low
        if not (above_low and value <= self.high):  # also refuses nan
            raise InputError(f"{text} is out of range (expected {self})")
        return value

    def __str__(self) -> str:
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


def float_list(item: FloatRange, allow_empty: bool = False) -> Callable[[str], tuple[float, ...]]:
    """An argparse ``type``: comma-separated numbers, each checked by ``item``."""

    def parse(text: str) -> tuple[float, ...]:
        values = tuple(item(part.strip()) for part in text.split(",") if part.strip())
        if not values and not allow_empty:
            raise InputError(f"expected at least one number in {item}, got {text!r}")
        return values

    parse.__name__ = "number list"
    return parse


def name_list(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated names (blank entries dropped)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def check_choices(values: Sequence[str], known: Sequence[str], what: str) -> None:
    """Refuse an empty list or any name not in ``known``."""
    if not values:
        raise InputError(f"{what}: no names given; choose from {', '.join(known)}")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise InputError(f"{what}: unknown {', '.join(unknown)}; known: {', '.join(known)}")


def check_device(text: str):
    """The ``torch.device`` named by ``text`` if this machine has it; InputError otherwise.

    Accepts ``cpu``, ``cuda``, ``cuda:N`` and ``mps``. Refuses malformed names, a CUDA device on a torch built
    without CUDA or a machine without a GPU, and an index past the GPUs present.
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {text!r} is not a device name (use cpu, cuda, cuda:N or mps)") from None
    if device.type not in DEVICE_TYPES:
        raise InputError(f"device {text!r}: device type {device.type!r} is not supported (use cpu, cuda or mps)")
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise InputError(f"device {text!r}: this torch is built without CUDA; use --device cpu")
        if not torch.cuda.is_available():
            raise InputError(f"device {text!r}: no CUDA GPU is visible on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"device {text!r}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {text!r}: MPS is not available on this machine; use --device cpu")
    return device


def _unreadable(path: Path, what: str, error: OSError) -> InputError:
    return InputError(f"{what} {path}: {_os_problem(error)}")


def check_readable_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a file this process can read (one byte is read); InputError otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} {path}: no such file")
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder, expected a file")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise _unreadable(path, what, error) from None
    return path


def check_readable_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a folder this process can list; InputError otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what} {path}: no such folder")
    if not path.is_dir():
        raise InputError(f"{what} {path}: is a file, expected a folder")
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as error:
        raise _unreadable(path, what, error) from None
    return path


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def check_output_dir(path: str | Path, what: str, need_bytes: int = 0) -> Path:
    """``path`` as a Path if it is, or can be created as, a folder this process can write with ``need_bytes``
    free; InputError otherwise. Nothing is created: writability is probed with an unnamed temporary file in the
    nearest existing folder (``O_TMPFILE``), so no file appears or remains.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: is a file, expected a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InputError(f"{what} {path}: {base} is a file, so the folder cannot be created there")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
        stats = os.statvfs(base)
    except OSError as error:
        raise InputError(f"{what} {path}: cannot write in {base}: {_os_problem(error)}") from None
    free = stats.f_bavail * stats.f_frsize
    if free < need_bytes:
        raise InputError(
            f"{what} {path}: {free / 2**20:.0f} MiB free on its file system, about {need_bytes / 2**20:.0f} MiB "
            "needed; free some space or choose another folder"
        )
    return path


_OS_PROBLEMS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied; choose a path you may use",
    errno.EPERM: "operation not permitted; choose a path you may use",
    errno.EROFS: "read-only file system; choose a writable folder",
    errno.ENOSPC: "no space left on device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EEXIST: "already exists",
    errno.EIO: "input/output error on the device",
}


def _os_problem(error: OSError) -> str:
    return _OS_PROBLEMS.get(error.errno) or _first_line(error.strerror or error) or type(error).__name__


def _first_line(error: object) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split()) if text else ""


def describe_error(error: BaseException) -> str | None:
    """One line for an expected failure, or None for anything else (a bug keeps its traceback).

    Expected: ValueError and its kin (every config, loader and check of the suite raises one naming the
    problem; JSON and UTF-8 decoding errors are among them), the OSError family (named by the file and the
    errno: missing, permission, read-only, no space, a folder where a file should be ...), safetensors
    errors, device errors torch raises for a missing CUDA build or GPU, and running out of memory.
    """
    from safetensors import SafetensorError

    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return f"out of memory ({_first_line(error) or 'host'}); lower the sizes (--length, batch) or use another device"
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({_first_line(error)})"
    if isinstance(error, ValueError):
        return _first_line(error) or type(error).__name__
    if isinstance(error, OSError):
        names = [str(n) for n in (error.filename, error.filename2) if n is not None]
        if error.errno is None:
            return _first_line(error) or type(error).__name__
        return f"{' -> '.join(names) + ': ' if names else ''}{_os_problem(error)}"
    if isinstance(error, SafetensorError):
        return f"not a readable safetensors file ({_first_line(error)})"
    text = _first_line(error)
    if isinstance(error, (AssertionError, RuntimeError)) and ("CUDA" in text or "device" in text.lower()):
        return f"device error: {text}; check --device"
    return None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_program(
    main: Callable[[Sequence[str] | None], int],
    argv: Sequence[str] | None = None,
    *,
    interrupted: str = "interrupted",
) -> int:
    """Run ``main(argv)`` offline; an expected failure becomes ``error: <one line>`` on stderr and exit status 2.

    Args:
        main: the program; returns its exit status.
        argv: its arguments (None: ``sys.argv[1:]``).
        interrupted: the line printed on Ctrl-C (exit status 130); say truthfully what was saved.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line per warning; restored when the block ends
        try:
            return main(argv)
        except KeyboardInterrupt:
            print(interrupted, file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - sorted by describe_error; bugs are re-raised
            message = describe_error(error)
            if message is None or os.environ.get("NAMM_TRANSFER_DEBUG"):
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2
