"""One writer per output folder: an exclusive lock file naming its holder.

Two commands writing one folder at once interleave their chunks (every sample twice, a
histogram with impossible buckets). Each command holds `<folder>/.dphrl.lock` while it writes:
the file names the holder (pid, host, command), and the lock itself is a `flock` on it, which
the kernel drops when the holder dies, so a lock left by a killed process is stale by
construction and the next run takes it over. A second writer stops at once, naming the holder,
or, where it only needs what the holder is making (train's split and ref store, which two jobs
of a sweep may both find missing), waits for it (`wait=True`) and then finds it made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from dphrl.data import output_error
from dphrl.errors import DphrlError, FolderLocked

log = logging.getLogger(__name__)
LOCK = ".dphrl.lock"


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode(errors="replace")
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(raw)
    return {}


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, *, wait: bool = False) -> Iterator[Path]:
    """Hold the folder's lock for the block; raise `FolderLocked` naming a live holder, or
    with `wait`, log who holds it and block until it is released."""
    folder = Path(folder)
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:  # a read-only or full file system: stop before any work
        raise output_error(path, err) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _holder(fd)
            held = (
                f"{h.get('command', 'dphrl')}, pid {h.get('pid', '?')} on host "
                f"{h.get('host', '?')}, since {h.get('since', '?')}"
            )
            if not wait:
                raise FolderLocked(
                    f"{folder} is being written by another run ({held}); "
                    "wait for it to finish, or use another output folder"
                ) from None
            log.info("%s is being written by another run (%s): waiting for it", folder, held)
            fcntl.flock(fd, fcntl.LOCK_EX)
        gone = _holder(fd)
        if gone:  # released only by the kernel: its holder died without unlocking
            log.warning(
                "%s: taking over the lock of %s (pid %s on host %s), which ended without releasing it",
                folder,
                gone.get("command"),
                gone.get("pid"),
                gone.get("host"),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the file stays (unlinking it races with a waiting opener)
    finally:
        os.close(fd)  # releases the flock


def live_holder(folder: str | os.PathLike) -> dict | None:
    """Who is writing `folder` now (pid, host, command), or None: no lock file, or no live
    holder (a finished run truncated it; a killed one's the kernel released). Reading takes
    and drops a shared lock, which an exclusive holder refuses; it never blocks."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd) or {"command": "dphrl"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def ranks_lock(folder: str | os.PathLike, command: str, *, wait: bool = False) -> Iterator[None]:
    """`folder_lock` held by rank 0 for all ranks of a torchrun (every rank samples, rank 0
    writes); a refusal on rank 0 is raised on every rank, so none waits for the others in a
    collective that will not come. One process: `folder_lock` itself."""
    from dphrl import dist

    if dist.world_size() == 1:
        with folder_lock(folder, command, wait=wait):
            yield
        return
    held = folder_lock(folder, command, wait=wait) if dist.is_main() else contextlib.nullcontext()
    refusal = None
    try:
        held.__enter__()
    except DphrlError as err:
        refusal = str(err)
    refusal = dist.broadcast_object(refusal)
    if refusal is not None:
        raise FolderLocked(refusal)
    try:
        yield
    finally:
        held.__exit__(None, None, None)
