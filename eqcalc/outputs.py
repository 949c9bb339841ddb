"""Output files and folders that a kill, a full disk or a second process cannot corrupt.

* :func:`writable_dir` / :func:`writable_file`: checked *before* long work (a relaxation,
  training, MD), so a finished computation is never thrown away because its output could not be
  written at the end.
* :class:`FolderLock`: one run per output folder. An ``fcntl`` lock on ``.eqcalc.lock`` is held
  while a run writes there; the kernel drops it when the process ends, however it ends, so the
  folder of a killed run is taken over at once and a live run's folder is refused.
* :class:`RecordFile`: append-only files (trajectories, logs) written one whole record (a frame,
  a log record) at a time; a failed write (disk full) cuts the file back to its last complete
  record before the typed error is raised.
* :func:`replace_atomically`: whole files (checkpoints) written to a temporary name, synced and
  renamed over the old one: a reader sees the old file or the new one.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from eqcalc.errors import OutputError, RunFolderBusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no folder locks, a warning instead
    fcntl = None

log = logging.getLogger("eqcalc")

LOCK = ".eqcalc.lock"


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def writable_dir(path) -> Path:
    """Create folder ``path`` if needed and prove it writable with a probe file; otherwise an
    :class:`~eqcalc.errors.OutputError` naming it and the fix."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".eqcalc-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"output folder {str(path)!r} cannot be written ({_reason(e)}); choose a "
                          "folder you can write to (--output-dir), or fix its permissions or free "
                          "disk space") from e
    return path


def writable_file(path) -> Path:
    """Check that file ``path`` can be written later: its folder is writable (created if
    needed) and an existing ``path`` is a writable file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {str(path)!r} is a folder; give a file name, e.g. {str(path / 'model.eqm')!r}")
    writable_dir(path.parent if str(path.parent) else Path("."))
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"output file {str(path)!r} exists and is read-only; choose another name "
                          "or make it writable")
    return path


class FolderLock:
    """Exclusive lock of run folder ``folder`` while a run writes there (module docstring).

    >>> with FolderLock(out_dir):
    ...     run()
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._file = None

    def acquire(self) -> "FolderLock":
        if fcntl is None:  # pragma: no cover
            log.warning("no file locks on this platform: make sure no other run writes into %s", self.folder)
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise OutputError(f"cannot create the lock file {str(self.path)!r} ({_reason(e)}); choose a "
                              "writable --output-dir") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunFolderBusyError(
                f"output folder {str(self.folder)!r} is in use by a run that is still going ({holder}); "
                "wait for it to finish, or write into another folder (--output-dir)") from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.info("taking over %s from a run that ended (%s)", self.folder, previous)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)[:200]}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        # The file stays: unlinking it would let a third process lock a new file while a second
        # still holds the old one.
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _write_some(fd: int, data: memoryview) -> int:
    """One ``write`` system call (a seam for tests that simulate a full disk)."""
    return os.write(fd, data)


@contextlib.contextmanager
def simulated_full_disk(after_calls: int):
    """For fault tests: within the block, write system calls of :class:`RecordFile` after the
    first ``after_calls`` write half their bytes once, then fail with ``ENOSPC``."""
    count = [0]
    real = _write_some

    def write(fd: int, data: memoryview) -> int:
        count[0] += 1
        if count[0] <= after_calls:
            return real(fd, data)
        if count[0] == after_calls + 1 and len(data) > 1:
            return real(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    globals()["_write_some"] = write
    try:
        yield
    finally:
        globals()["_write_some"] = real


class RecordFile:
    """Append-only text file written in whole records (module docstring). ``append=False``
    starts it empty."""

    def __init__(self, path, append: bool = True):
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise OutputError(f"cannot open {str(self.path)!r} for writing ({_reason(e)}); choose a "
                              "writable --output-dir") from e

    def write(self, text: str) -> None:
        """Append ``text`` entirely, or raise :class:`OutputError` with the file as it was."""
        data = memoryview(text.encode())
        start = os.fstat(self.fd).st_size
        try:
            while len(data):
                data = data[_write_some(self.fd, data):]
        except OSError as e:
            try:
                os.ftruncate(self.fd, start)
            except OSError:  # pragma: no cover - nothing more can be done
                pass
            raise OutputError(
                f"writing {str(self.path)!r} failed ({_reason(e)}); the file was cut back to its last "
                "complete record. Free disk space, then restart from the last checkpoint (--restart)") from e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def replace_atomically(path, write: Callable[[object], None]) -> None:
    """Write file ``path`` through ``write(binary_file)`` to a temporary name in the same folder,
    sync it and rename it over ``path``; on failure ``path`` is untouched and the temporary gone."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"writing {str(path)!r} failed ({_reason(e)}); the previous version is intact. "
                          "Free disk space or choose a writable folder") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cut_tail(path, keep_upto: Optional[int]) -> None:
    """Cut ``path`` to ``keep_upto`` bytes when that is shorter than the file."""
    if keep_upto is not None and os.path.getsize(path) > keep_upto:
        log.info("cut %s back to %d bytes (records after the checkpoint, or a half-written one)", path, keep_upto)
        os.truncate(path, keep_upto)


def write_atoms(path, atoms, format: str = "extxyz") -> None:
    """Write one ASE ``Atoms`` or a list of them to ``path`` atomically (:func:`replace_atomically`)."""
    import io

    import ase.io

    text = io.StringIO()
    ase.io.write(text, atoms, format=format)
    replace_atomically(path, lambda f: f.write(text.getvalue().encode()))
