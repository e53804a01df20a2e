"""Whole-file writes that readers and concurrent writers can never catch half-done.

Every process of a multi-process run writes some of the same files (the run's config, the exit record), so
each write goes to its own temporary file beside the target and is then renamed over it: a reader sees the
old file or the new one, and two writers never share (and so never truncate or move away) a temporary file.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (rename of a unique temporary file in the same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL on a name no other writer uses; mode 0o666 so the umask decides, as for an ordinary write
    # (mkstemp's 0o600 would make an exported dataset unreadable to the rest of a class).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
