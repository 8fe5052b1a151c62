"""Output files of the commands that write them (``plan -o``, ``convert -o``, ``diagram -o``): all or nothing,
never over an input; devices, FIFOs and this process's own descriptors written in place.

Stage: CLI. Imports the stdlib and :mod:`flowdsl.cli_common`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from flowdsl.cli_common import _fail


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def write_outputs(outputs: list[tuple[str, Path, bytes]], inputs: list[Path]) -> None:
    """Write output files all or nothing: a usage error (exit 2) — before any is written — when one would
    overwrite an input file, two name the same file, or one cannot be written (its directory is missing, it
    is a directory, a socket or a block device, permissions). ``outputs``: (option, path, bytes); ``inputs``: the
    spec, then the files it uses.

    A regular file (or a new one) is first written to a temporary file beside it, then all are renamed into place
    (through a symlink, to the file it points to), so that a failing command leaves every target as it was. A
    target that is not a regular file is written in place, never renamed over: a character device (``/dev/null``,
    a terminal) or a FIFO is opened for writing (a FIFO waits for its reader, as a shell's ``>`` does), and one of
    this process's own descriptors (``/dev/stdout``, ``/dev/fd/N``, a ``>(…)`` of the shell) is written to as it
    stands — a pipe, a terminal or the file it was opened on, at its offset. Those are written after every
    temporary file, before the renames.
    """
    import stat
    import tempfile

    ways: list[tuple[str, Any]] = []  # per output: ("rename", its real path) | ("open", path) | ("fd", number)
    for i, (option, path, _) in enumerate(outputs):
        for n, source in enumerate(inputs):
            if _same_file(path, source):
                what = f"the input file {source}" if n == 0 else \
                    f"{source}, which the spec uses (a sub-flow or a worker module)"
                raise _fail(f"{option} {path}: that is {what}; refusing to write over it (choose another output "
                            "file)")
        for other, earlier, _ in outputs[:i]:
            if _same_file(path, earlier):
                raise _fail(f"{option} {path} and {other} {earlier} name the same file; give each its own")
        if path.is_dir():
            raise _fail(f"cannot write {path}: it is a directory ({option} takes a file name)")
        descriptor = _own_descriptor(path)
        try:
            mode = os.stat(path).st_mode if descriptor is None else 0
        except OSError:  # none there yet (or none reachable: said when it is written)
            mode = stat.S_IFREG
        if descriptor is not None:
            ways.append(("fd", descriptor))
        elif stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            ways.append(("open", path))
        elif stat.S_ISSOCK(mode):
            raise _fail(f"cannot write {path}: it is a socket, not a file ({option} takes a file name)")
        elif stat.S_ISBLK(mode):
            raise _fail(f"cannot write {path}: it is a block device (a disk or a partition); flowdsl writes no output "
                        f"over one ({option} takes a file name: write a file, and copy it there if that is meant)")
        else:
            ways.append(("rename", os.path.realpath(path)))
    staged: list[tuple[Path, str, str]] = []
    try:
        for (_, path, data), (way, where) in zip(outputs, ways, strict=True):
            if way != "rename":
                continue
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(where)}.", dir=os.path.dirname(where))
            except OSError as exc:
                raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None
            staged.append((path, tmp, where))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.chmod(tmp, _new_file_mode(where))
            except OSError as exc:  # (a full disk: the error names no file, the temporary one at most)
                raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None
        for (_, path, data), (way, where) in zip(outputs, ways, strict=True):
            if way != "rename":
                _write_in_place(path, data, where if way == "fd" else None)
        for path, tmp, where in staged:
            try:
                os.replace(tmp, where)
            except OSError as exc:
                raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None
        staged.clear()
    finally:
        for _, tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _own_descriptor(path: Path) -> int | None:
    """The number of this process's file descriptor that ``path`` names — ``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``, through any symbolic links — or None. (Resolved as a path, such a name is the file or pipe
    behind the descriptor, which must be written through it, never renamed over.)"""
    own = f"/proc/{os.getpid()}/fd"
    here = os.path.abspath(path)
    for _ in range(40):  # (as the kernel follows links: at most 40)
        parent, name = os.path.split(here)
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.path.realpath(parent) == own:
                    return int(name)
        try:
            link = os.readlink(here)
        except OSError:  # not a link (or nothing there)
            return None
        here = os.path.normpath(os.path.join(parent, link))
    return None


def _write_in_place(path: Path, data: bytes, descriptor: int | None) -> None:
    """Write ``data`` into ``path``, a character device or a FIFO (opened for writing, never created or renamed
    over), or through ``descriptor``, one of this process's own, as it stands (left open)."""
    import stat

    try:
        if descriptor is None:
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)  # (a FIFO: waits for a reader)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):  # replaced by a file since it was looked at
                    raise _fail(f"cannot write {path}: it became a regular file while flowdsl wrote its outputs; "
                                "run the command again")
                _write_all(fd, data)
            finally:
                os.close(fd)
        else:
            if descriptor == 1 and sys.stdout is not None:  # (None: started with stdout closed)
                with contextlib.suppress(OSError, ValueError):
                    sys.stdout.flush()
            _write_all(descriptor, data)
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _new_file_mode(target: str) -> int:
    """The mode a file written to ``target`` gets: the existing file's, else 0o666 less the umask."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask
