"""Input files into a guest's ``/input`` before its program starts; ``/output`` files after.

The service writes and reads them from the host, through a descriptor on the directory in the
guest's own file system (``GuestProcess.open_dir``; the sandbox's root is read-only, so the
program cannot replace either directory). ``/input`` is root's: the program can read its
files but not change them. From ``/output`` only regular files are taken, opened without
following links, so a link the program leaves there cannot point the service at a host file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

from codemode.executor.guest.outcomes import ErrorType
from codemode.executor.run.outcome import FileInfo, LimitHit
from codemode.executor.sandbox import INPUT_DIR, OUTPUT_DIR, GuestProcess

#: Entries the program may leave in ``/output`` at most.
MAX_OUTPUT_FILES = 4096


class FilesUnsupported(Exception):
    """The guest has no file system of its own (a backend without a sandbox)."""


class InputFileError(Exception):
    """The client's file chunks do not match the files its start frame declared."""


def open_guest_dir(guest: GuestProcess, path: str) -> int:
    """A descriptor on ``path`` of the guest's file system; raises :class:`FilesUnsupported`."""
    fd = guest.open_dir(path)
    if fd is None:
        raise FilesUnsupported(
            f"this executor runs programs without a sandbox (isolation=process): no {path}"
        )
    return fd


async def write_inputs(
    guest: GuestProcess, files: tuple[FileInfo, ...], chunks: asyncio.Queue[tuple[str, bytes]]
) -> None:
    """Write ``files`` into the guest's ``/input`` as their chunks arrive, in order, read-only.

    The chunks were checked against the declared files as they came off the stream; a chunk
    of another file than the one expected still raises :class:`InputFileError`.
    """
    directory = open_guest_dir(guest, INPUT_DIR)
    try:
        for info in files:
            await _write_one(directory, info, chunks)
    finally:
        os.close(directory)


async def _write_one(
    directory: int, info: FileInfo, chunks: asyncio.Queue[tuple[str, bytes]]
) -> None:
    # In a session, a file of the same name from an earlier execution is replaced. Only the
    # service writes /input, so whatever has this name is a file it wrote itself.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(info.name, dir_fd=directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(info.name, flags, 0o600, dir_fd=directory)
    try:
        written = 0
        while written < info.size:
            name, data = await chunks.get()
            if name != info.name or written + len(data) > info.size:
                raise InputFileError(f"unexpected bytes for input file {info.name!r}")
            while data:  # tmpfs: memory, no blocking worth a thread
                done = os.write(fd, data)
                data = data[done:]
                written += done
        os.fchmod(fd, 0o444)
    finally:
        os.close(fd)


def read_outputs(guest: GuestProcess, limit: int) -> list[tuple[str, bytes]]:
    """The regular files the program left in the guest's ``/output``, sorted by name.

    Links, directories and other kinds are left out. Raises :class:`LimitHit`
    (``OutputFilesLimit``) when they add up to more than ``limit`` bytes.
    """
    directory = open_guest_dir(guest, OUTPUT_DIR)
    try:
        return _read_dir(directory, limit)
    finally:
        os.close(directory)


def _read_dir(directory: int, limit: int) -> list[tuple[str, bytes]]:
    names = os.listdir(directory)
    if len(names) > MAX_OUTPUT_FILES:
        raise LimitHit(
            ErrorType.OUTPUT_FILES_LIMIT,
            f"the program left {len(names)} entries in /output; the limit is {MAX_OUTPUT_FILES}",
        )
    found: list[tuple[str, bytes]] = []
    total = 0
    for name in sorted(names):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=directory)
        except OSError:
            continue  # a link (ELOOP), or gone
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            if total + info.st_size > limit:
                raise LimitHit(
                    ErrorType.OUTPUT_FILES_LIMIT,
                    f"the program left more than {limit} bytes of files in /output",
                )
            data = _read_all(fd, limit - total)
        finally:
            os.close(fd)
        total += len(data)
        found.append((name, data))
    return found


def _read_all(fd: int, at_most: int) -> bytes:
    chunks = []
    left = at_most + 1
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    data = b"".join(chunks)
    if len(data) > at_most:  # grew while being read
        raise LimitHit(ErrorType.OUTPUT_FILES_LIMIT, "a file in /output grew past the limit")
    return data
