"""What a guest sees of an ordinary machine: its environment, a home, a user name, time zones.

Every sandbox starts from an empty environment; :func:`guest_env` is what it gets instead: a
``HOME``, ``USER`` and ``LOGNAME``, and the thread counts of the numeric libraries (OpenBLAS,
OpenMP, MKL, numexpr …) set to 1, since each of their threads counts against the process limit
and a guest has one CPU's worth of fair share anyway; the operator's ``sandbox_env`` overrides
any of it. ``HOME`` is ``/home/codemode``, a symlink to :data:`HOME_TARGET` on the execution's own
private, size-bounded ``/tmp``, which the guest creates before the program runs (so a home is
as fresh as the rest of the execution). :func:`passwd_text` and :func:`group_text` give every
sandbox uid that name, in files bound read-only at ``/etc/passwd`` and ``/etc/group``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import TypedDict

#: The user every guest is, whatever its uid.
GUEST_USER = "codemode"
#: The guest's home, as programs see it: a symlink into its private /tmp.
GUEST_HOME = f"/home/{GUEST_USER}"
#: The directory the home symlink points to, created by each guest as its own uid.
HOME_TARGET = "/tmp/.home"  # noqa: S108 - the guest's private tmpfs, not the host's /tmp
#: The host's time-zone database, bound read-only where it exists.
ZONEINFO = "/usr/share/zoneinfo"

#: Threads a numeric library starts unless told otherwise: one per CPU, each one a process of
#: the execution's limit (and idle stacks of reserved memory).
THREAD_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class GuestContents(TypedDict, total=False):
    """What every backend gives its guests besides the runtime (``ExecutorConfig``'s fields)."""

    sandbox_venv: str | None
    preload: Sequence[str]
    #: Run once by the fork server's zygote after the preloads; other backends ignore it.
    preload_warmup: str | None
    sandbox_env: Mapping[str, str] | None


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` as a plain dict, or ``ValueError`` naming a variable that cannot be set."""
    out: dict[str, str] = {}
    for name, value in env.items():
        if not _NAME.match(name):
            raise ValueError(f"sandbox_env: {name!r} is not a valid environment variable name")
        if "\0" in str(value):
            raise ValueError(f"sandbox_env: the value of {name} contains a NUL byte")
        out[name] = str(value)
    return out


def guest_env(
    overrides: Mapping[str, str] | None = None, *, home: str = GUEST_HOME
) -> dict[str, str]:
    """The environment of every guest (besides ``LANG``), with the operator's ``overrides``."""
    env = {"HOME": home, "USER": GUEST_USER, "LOGNAME": GUEST_USER}
    env.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    env.update(check_env(overrides or {}))
    return env


def passwd_text(uid_base: int, uid_count: int) -> str:
    """An ``/etc/passwd`` naming every sandbox uid :data:`GUEST_USER`, home :data:`GUEST_HOME`."""
    lines = ["root:x:0:0:root:/root:/usr/sbin/nologin"]
    lines += [
        f"{GUEST_USER}:x:{uid}:{uid}:Codemode sandbox:{GUEST_HOME}:/usr/sbin/nologin"
        for uid in range(uid_base, uid_base + uid_count)
    ]
    lines.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
    return "\n".join(lines) + "\n"


def group_text(uid_base: int, uid_count: int) -> str:
    """An ``/etc/group`` with a group :data:`GUEST_USER` for every sandbox gid."""
    lines = ["root:x:0:"]
    lines += [f"{GUEST_USER}:x:{gid}:" for gid in range(uid_base, uid_base + uid_count)]
    lines.append("nogroup:x:65534:")
    return "\n".join(lines) + "\n"


class IdentityFiles:
    """``passwd`` and ``group`` for a uid range, written to a root-owned host directory.

    The directory (0755, files 0644, under ``TMPDIR``) lives as long as the backend;
    :meth:`remove` deletes it. Raises ``OSError`` when it cannot be written.
    """

    def __init__(self, uid_base: int, uid_count: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="codemode-etc-")
        self.passwd = os.path.join(self.dir, "passwd")
        self.group = os.path.join(self.dir, "group")
        try:
            os.chmod(self.dir, 0o755)  # noqa: S103 - the sandbox uids read it, read-only
            for path, text in (
                (self.passwd, passwd_text(uid_base, uid_count)),
                (self.group, group_text(uid_base, uid_count)),
            ):
                with open(path, "w", encoding="ascii") as handle:
                    handle.write(text)
                os.chmod(path, 0o644)
        except BaseException:
            self.remove()  # a full disk leaves no half-written directory behind
            raise

    def binds(self) -> list[tuple[str, str]]:
        """(host file, path in sandbox) pairs for the layout."""
        return [(self.passwd, "/etc/passwd"), (self.group, "/etc/group")]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def zoneinfo_binds() -> list[str]:
    """The host's time-zone database, when it has one (else the venv's ``tzdata`` serves)."""
    return [ZONEINFO] if os.path.isfile(os.path.join(ZONEINFO, "UTC")) else []
