"""One bake per output: a lock file beside --out, held for the whole bake.

    .OUT.lock        {"pid": 1234, "host": "runner-7", "started": "2026-12-01T10:30:00Z"}

The lock covers everything a bake keeps beside OUT: OUT.work/ (checkpoints), .OUT.partial-*
(the output being built) and .OUT.old-* (an earlier output while it is being replaced). It is an
advisory `fcntl.flock` on that file: the kernel drops it when its process ends, however it ends,
so a lock left by a killed bake can't block anyone; its file then still names the dead process,
and the next bake takes it over with a notice. The file is removed when the bake ends.

flock works between processes of one machine, and on NFS between machines where the server
supports locks (Linux NFSv4 does).

Holding the lock, a bake knows no live bake uses OUT's hidden siblings, so `lock_output` cleans
them: stale .OUT.partial-* folders are deleted, and an .OUT.old-* left by a bake killed while
replacing OUT is put back (if OUT is missing) or deleted (if the new output made it to OUT).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputLockedError, WriteError, describe
from .output import read_record


def lock_path(out: Path) -> Path:
    """.OUT.lock beside OUT (`out` absolute, as `output.check_output` returns it)."""
    return out.parent / f".{out.name}.lock"


class OutputLock:
    """The lock on one output, held from `acquire` until `release` (or the end of the process)."""

    def __init__(self, path: Path, fd: int, took_over: dict | None):
        self.path, self._fd = path, fd
        self.took_over = took_over  # what the lock file said when its holder was already gone, else None

    @classmethod
    def acquire(cls, out: Path) -> OutputLock:
        """Take the lock on `out`, or raise OutputLockedError naming the process that holds it."""
        path = lock_path(out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(f"can't create {path.parent} for --out {out} ({describe(err)}).") from None
        for _ in range(100):  # retried only when the file we locked was removed/replaced meanwhile
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise WriteError(f"can't create the lock file {path} ({describe(err)}).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read(fd)
                # The holder writes its record just after it takes the lock: a loser that comes in
                # between reads an empty file, so it waits a moment for the name before it says "another process".
                deadline = time.monotonic() + 1.0
                while not holder and time.monotonic() < deadline:
                    time.sleep(0.01)
                    holder = _read(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise OutputLockedError(f"--out {out} is being baked by {_who(holder)} (lock {path}); wait "
                                            "for it to finish, or choose another --out.") from None
                raise WriteError(f"can't lock {path} ({describe(err)}).") from None
            # A holder that was releasing may have unlinked the file between our open and our flock:
            # then we hold a lock on a file nobody else will see. Only the file at `path` counts.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read(fd)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_me()) + "\n").encode("utf-8"), 0)
            except OSError as err:
                os.close(fd)
                raise WriteError(f"can't write the lock file {path} ({describe(err)}).") from None
            return cls(path, fd, previous or None)
        raise OutputLockedError(f"--out {out}: the lock {path} keeps changing hands; try again.")

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: see `acquire`)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def lock_output(out: Path, note: Callable[[str], None] = lambda message: None) -> Iterator[OutputLock]:
    """Hold the lock on `out` for the block; take over a dead holder's lock and clean what it left.

    note: called with one line for each thing done that the user should hear of (a lock taken over,
    an output put back, stale folders removed). Raises OutputLockedError when a live bake holds it.
    """
    lock = OutputLock.acquire(out)
    try:
        if lock.took_over:
            note(f"took over the lock {lock.path} from {_who(lock.took_over)}, which is no longer running.")
        for line in recover(out):
            note(line)
        yield lock
    finally:
        lock.release()


def recover(out: Path) -> list[str]:
    """Clean what bakes killed on `out` left beside it; return one line per thing done. Hold the lock first.

    .OUT.partial-*: an output never finished: deleted. .OUT.old-*: an earlier output renamed aside by
    `output.publish`: put back when OUT is missing (the kill came between its two renames), deleted
    when OUT is a finished output (the new one made it), else left where it is and named.
    """
    done = []
    partials = _siblings(out, "partial")
    for folder in partials:
        shutil.rmtree(folder, ignore_errors=True)
    if partials:
        done.append(f"removed {len(partials)} unfinished output folder{'s' * (len(partials) > 1)} left beside "
                    f"{out} by a bake that was stopped ({', '.join(p.name for p in partials)}).")
    for old in _siblings(out, "old"):
        if not os.path.lexists(out):
            try:
                os.replace(old, out)
                done.append(f"put the earlier output back at {out} from {old.name}, where a bake that was stopped "
                            "while replacing it had moved it.")
                continue
            except OSError as err:
                done.append(f"the earlier output of {out} is in {old} (a bake was stopped while replacing it) and "
                            f"can't be moved back ({describe(err)}); move it back yourself.")
                continue
        if read_record(out) is not None:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}, the earlier output a finished bake had replaced with {out}.")
        else:
            done.append(f"left {old} alone: it holds an earlier output of {out}, which is not a finished bake now.")
    return done


# The hidden siblings `output.make_staging` and `output.publish` create: .OUT.partial-XXXXXXXX
# (mkdtemp's 8 characters) and .OUT.old-PID-XXXXXXXX. Matched exactly, so that another output
# whose name happens to start with OUT's never loses its folders.
_SUFFIX = {"partial": r"partial-[a-z0-9_]{8}", "old": r"old-\d+-[0-9a-f]{8}"}


def _siblings(out: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{_SUFFIX[kind]}")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return sorted(out.parent / n for n in names if pattern.fullmatch(n) and (out.parent / n).is_dir()
                  and not (out.parent / n).is_symlink())


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _read(fd: int) -> dict:
    """The lock file's record; {} when empty or unreadable (a holder killed while writing it)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _who(holder: dict) -> str:
    if not holder:
        return "another process"
    host = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"process {holder.get('pid', '?')}{host}{since}"
