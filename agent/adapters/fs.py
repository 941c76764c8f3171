"""The file system, as the agent writes it: atomic writes, private directories, locks.

Shared by the executor (stack files), the state store, the daemon and ``render``. Nothing here
follows a symlink it did not expect: state directories and lock files are checked and opened
with ``O_NOFOLLOW``, so a directory prepared by another user cannot turn a lock into a
truncation of some other file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from agent.core.errors import AgentError


class LockHeld(AgentError):
    """Another process holds the lock."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class UnsafePath(AgentError):
    """A path the agent would write to is a symlink, not ours, or open to others."""


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write-then-rename in the same directory, fsynced: a reader sees old or new, never half.
    The temporary name is unique per call, so concurrent writers never share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed; refuse one that is a symlink, owned by another user,
    or writable by group or others (another user could plant links in it)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path}: not a directory (a symlink?); the agent keeps its state in a real directory")
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{path}: owned by uid {st.st_uid}, not by the agent (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise UnsafePath(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 700 it")
    return path


#: Machine-wide pass locks (root's agents); others use a per-uid dir under the temp dir.
SYSTEM_LOCK_DIR = Path("/run/lock/llm-agent")
LOCK_DIR_ENV = "AGENT_LOCK_DIR"


def machine_lock_dir(environ: dict[str, str] | None = None) -> Path:
    """The directory of locks shared by every agent on this machine, whatever its state dir:
    ``$AGENT_LOCK_DIR``, else ``/run/lock/llm-agent`` for root, else ``<tmp>/llm-agent-<uid>``.
    Always a private directory (``private_dir``): a planted one is refused, not used."""
    env = os.environ if environ is None else environ
    if env.get(LOCK_DIR_ENV):
        return private_dir(Path(env[LOCK_DIR_ENV]))
    if os.geteuid() == 0 and SYSTEM_LOCK_DIR.parent.is_dir():
        with contextlib.suppress(OSError, UnsafePath):
            return private_dir(SYSTEM_LOCK_DIR)
    return private_dir(Path(tempfile.gettempdir()) / f"llm-agent-{os.geteuid()}")


@contextlib.contextmanager
def locked(path: Path, what: str, *, wait: bool = False, write_pid: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel if the process dies).
    Without ``wait``, a held lock raises ``LockHeld`` naming ``what`` and the holder's pid."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path}: lock file is a symlink; refusing to follow it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise UnsafePath(f"{path}: lock file is not a regular file owned by the agent")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise LockHeld(f"{what} (pid {holder}; lock {path})", holder) from None
        if write_pid:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
