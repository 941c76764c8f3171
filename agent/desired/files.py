"""The one way desired-state files are read: inside their root, bounded, strictly UTF-8.

A desired-state tree comes from whoever can push to the repository, so a file in it may be
a symbolic link to ``/etc/shadow``, a FIFO that blocks a reader forever, a gigabyte, or not
text at all. ``read_text`` refuses each with a located ``DesiredStateError`` and never shows
what a refused file contains. Links that stay inside the root are followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from agent.core.errors import DesiredStateError
from agent.core.yamlsrc import MAX_BYTES


def inside(root: Path, path: Path) -> bool:
    """True if ``path``, every link followed, is ``root`` or below it (both must exist)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def exists(root: Path, rel: str) -> bool:
    """True if ``root/rel`` names something (a dangling link counts: reading it says why)."""
    return os.path.lexists(root / rel)


def read_text(root: Path, rel: str, shown: str) -> str:
    """The text of ``root/rel``; ``shown`` is how errors name the file (``hosts/a.yaml``)."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise DesiredStateError.single(shown, None, "path must stay inside the desired-state tree")
    path = root.joinpath(*parts)
    if not os.path.lexists(path):
        raise DesiredStateError.single(shown, None, "file not found")
    if not inside(root, path):
        # Say nothing of where it leads: the target's name or text may be private.
        raise DesiredStateError.single(shown, None, "is a link that leads outside the desired-state tree (refused)")
    data = _read_bytes(Path(os.path.realpath(path)), shown)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DesiredStateError.single(shown, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def _read_bytes(path: Path, shown: str) -> bytes:
    """Open without following a final link and without blocking (a FIFO), refuse anything
    but a regular file, and read at most ``MAX_BYTES`` (plus one, to tell it is more)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DesiredStateError.single(shown, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DesiredStateError.single(shown, None, "not a regular file (refused)")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise DesiredStateError.single(shown, None, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise DesiredStateError.single(shown, None, f"larger than the {MAX_BYTES >> 20} MiB limit for a file")
    return b"".join(chunks)
