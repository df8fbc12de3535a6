"""Append-only JSON-lines files that survive a killed writer: predictions, evolution logs, reference caches.

One JSON object per line, each appended in one write, flushed and fsynced. A process killed mid-write can
leave a cut last line; reading ignores it and the next append removes it, each time with a warning naming the
file and line, so a rerun continues where the killed one stopped. A bad line followed by more data is not a
cut line but damage: :class:`JsonlError` names the file and the line.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping

from namm_transfer.atomic import atomic_write


class JsonlError(ValueError):
    """A JSON-lines file is damaged before its last line (the message names the file and the line)."""


class CutLineWarning(UserWarning):
    """A cut last line (an interrupted write) was ignored or removed."""


class JsonlFile:
    """One append-only JSON-lines file.

    Args:
        path: the file (it may not exist yet; its folder is created on the first append).
        key: a field every record must hold (e.g. ``"item_id"``), or None.
    """

    def __init__(self, path: str | Path, key: str | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self._repaired = False

    def _scan(self) -> tuple[list[dict], int, int | None]:
        """(valid records, byte offset where the next record must start, line number of a cut last line)."""
        if not self.path.exists():
            return [], 0, None
        data = self.path.read_bytes()
        records: list[dict] = []
        start = line_no = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline == -1 else newline + 1
            line_no += 1
            raw = data[start:end]
            if raw.strip():
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict) or (self.key is not None and self.key not in record):
                        raise ValueError(f"not a JSON object with {self.key!r}" if self.key else "not a JSON object")
                except ValueError as error:  # JSON and UTF-8 decoding errors are ValueErrors
                    if data[end:].strip():
                        reason = " ".join(str(error).split())
                        raise JsonlError(f"{self.path}:{line_no}: corrupt line ({reason}); repair or remove it") from None
                    return records, start, line_no
                records.append(record)
            start = end
        return records, len(data), None

    def check(self) -> None:
        """Raise JsonlError if the file is damaged before its last line; a cut last line passes silently (the
        reader that follows warns about it)."""
        self._scan()

    def records(self) -> list[dict]:
        """Every complete record in file order; a cut last line is ignored with a :class:`CutLineWarning`."""
        records, _, cut = self._scan()
        if cut is not None and not self._repaired:
            warnings.warn(f"{self.path}:{cut}: ignoring an incomplete last line (cut by an interrupted run)", CutLineWarning,
                          stacklevel=2)
        return records

    def repair(self) -> None:
        """Remove a cut last line (with a :class:`CutLineWarning`) and end the file with a newline."""
        if not self.path.exists():
            self._repaired = True
            return
        _, good_end, cut = self._scan()
        with self.path.open("r+b") as handle:
            if cut is not None:
                warnings.warn(f"{self.path}:{cut}: removed an incomplete last line (cut by an interrupted run)", CutLineWarning,
                              stacklevel=2)
                handle.truncate(good_end)
            if good_end:
                handle.seek(good_end - 1)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
        self._repaired = True

    def append(self, record: Mapping) -> None:
        """Append ``record`` as one line, flushed and fsynced (the first append repairs the file first)."""
        record = dict(record)
        if self.key is not None and self.key not in record:
            raise ValueError(f"a record of {self.path} needs {self.key!r}")
        line = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8") + b"\n"
        if not self._repaired:
            self.repair()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def rewrite(self, records: Iterable[Mapping]) -> None:
        """Replace the whole file with ``records`` atomically (a temporary file moved into place)."""
        atomic_write(self.path, "".join(json.dumps(dict(r), ensure_ascii=False, default=str) + "\n" for r in records))
        self._repaired = True
