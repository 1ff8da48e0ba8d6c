"""`file`: JSON lines appended to `path`, flushed to disk per batch; past `max_bytes` the file is rotated
(`path.1` the newest of `backups` kept). A line is never split across two files, and the torn last line of
a writer killed mid-write is cut off before the next write (its batch is sent again)."""

from __future__ import annotations

import os
from pathlib import Path

from ingest.errors import SinkError
from ingest.sinks.base import Sink


class FileSink(Sink):
    def send(self, events: list[dict], lines: list[bytes]) -> None:
        path = Path(str(self.config.path))
        data = b"".join(line + b"\n" for line in lines)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size and path.stat().st_size + len(data) > self.config.max_bytes:
                self._rotate(path)
            with path.open("ab") as out:
                _cut_torn_line(out)
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise SinkError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _rotate(self, path: Path) -> None:
        keep = self.config.backups
        if keep == 0:
            path.unlink()
            return
        path.with_name(f"{path.name}.{keep}").unlink(missing_ok=True)
        for i in range(keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.rename(path.with_name(f"{path.name}.{i + 1}"))
        path.rename(path.with_name(f"{path.name}.1"))


def _cut_torn_line(out) -> None:
    """Truncates the file after its last line end."""
    end = out.seek(0, os.SEEK_END)
    with open(out.name, "rb") as reader:
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            reader.seek(start)
            block = reader.read(pos - start)
            if pos == end and block.endswith(b"\n"):
                return
            newline = block.rfind(b"\n")
            if newline >= 0:
                out.truncate(start + newline + 1)
                return
            pos = start
    out.truncate(0)
