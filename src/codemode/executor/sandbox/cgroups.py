"""Per-execution cgroups for the memory and pids limits, on cgroup v1 or v2.

The service creates one group per backend under its own cgroup (``codemode-<pid>-<token>``) and
one child per execution. Each controller is taken from wherever this host offers it: a v1
hierarchy mounted for that controller, or the v2 (unified) hierarchy when the controller is
enabled for the service's cgroup's children. A host offering neither degrades to rlimits, and
:func:`discover` says why.

A guest is put into its execution's group before bubblewrap starts (the launcher writes its own
pid to ``cgroup.procs``), so everything it forks is accounted there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path

CONTROLLERS = ("memory", "pids")
_PREFIX = "codemode-"
#: Group names of this process's backends that are still in use: the stale sweep of a
#: second backend in the same process (tests, an embedding application) leaves them alone.
_LIVE_NAMES: set[str] = set()
_CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Emptied per-execution groups a backend keeps for reuse; more are removed.
MAX_FREE_GROUPS = 64


@dataclass(frozen=True, slots=True)
class ControllerSite:
    """Where one controller's per-backend groups are created."""

    controller: str
    version: int  # 1 or 2
    parent: Path  # the service's own cgroup directory in that hierarchy


@dataclass(slots=True)
class CgroupSupport:
    """What :func:`discover` found: usable controllers and why others are not."""

    sites: dict[str, ControllerSite] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def has(self, controller: str) -> bool:
        return controller in self.sites


def _own_cgroups() -> tuple[dict[str, str], str | None]:
    """(v1 controller -> path, v2 path) of this process, from /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2: str | None = None
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return v1, v2
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        if names == "":
            v2 = path
            continue
        for name in names.split(","):
            v1[name] = path
    return v1, v2


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, options) of cgroup file systems."""
    out: list[tuple[str, str, str]] = []
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
            out.append((fields[1], fields[2], fields[3]))
    return out


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def discover() -> CgroupSupport:
    """Find, for each controller, a hierarchy where this process may create child groups."""
    support = CgroupSupport()
    own_v1, own_v2 = _own_cgroups()
    mounts = _mounts()
    v2_mount = next((Path(m) for m, fs, _ in mounts if fs == "cgroup2"), None)
    for controller in CONTROLLERS:
        site: ControllerSite | None = None
        for mount_point, fs, options in mounts:
            if fs != "cgroup" or controller not in options.split(","):
                continue
            rel = own_v1.get(controller)
            if rel is None:
                continue
            parent = Path(mount_point) / rel.lstrip("/")
            if _writable_dir(parent):
                site = ControllerSite(controller, 1, parent)
            else:
                support.problems.append(
                    f"{controller}: cgroup v1 group {parent} is not writable by this process"
                )
            break
        if site is None and v2_mount is not None and own_v2 is not None:
            parent = v2_mount / own_v2.lstrip("/")
            try:
                available = (parent / "cgroup.controllers").read_text().split()
                enabled = (parent / "cgroup.subtree_control").read_text().split()
            except OSError:
                available, enabled = [], []
            if controller not in available:
                support.problems.append(
                    f"{controller}: not offered by cgroup v2 at {parent} (cgroup.controllers)"
                )
            elif controller not in enabled and not _enable_v2(parent, controller):
                support.problems.append(
                    f"{controller}: cgroup v2 controller not delegated to {parent}; run the "
                    "service in a cgroup with it in cgroup.subtree_control (systemd: "
                    "Delegate=yes, and the service in a leaf group)"
                )
            elif _writable_dir(parent):
                site = ControllerSite(controller, 2, parent)
            else:
                support.problems.append(f"{controller}: {parent} is not writable")
        if site is not None:
            support.sites[controller] = site
        elif not any(p.startswith(f"{controller}:") for p in support.problems):
            support.problems.append(f"{controller}: no cgroup hierarchy offers this controller")
    return support


def _enable_v2(parent: Path, controller: str) -> bool:
    try:
        (parent / "cgroup.subtree_control").write_text(f"+{controller}")
    except OSError:
        return False
    return True


def _read_keyed(path: Path) -> dict[str, int]:
    """Parse ``key value`` lines (memory.oom_control, memory.events, pids.events)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value.strip())
    return out


def _read_small(path: str) -> str | None:
    """A small cgroup file's text (one read, no pathlib: these are read per execution)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode()
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_counter(where: tuple[str, str] | None) -> int:
    """A counter: the value of line ``key`` of a keyed file, or a file's one number."""
    if where is None:
        return 0
    path, key = where
    text = _read_small(path)
    if not text:
        return 0
    if not key:
        try:
            return int(text.strip())
        except ValueError:
            return 0
    prefix = key + " "
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return int(line[len(prefix) :].strip())
            except ValueError:
                return 0
    return 0


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
    except OSError:
        return False
    return True


def _procs(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _rmdir_tree(group: Path) -> bool:
    """Remove ``group`` and its (empty) children, deepest first."""
    if not group.exists():
        return True
    for child in sorted((p for p in group.iterdir() if p.is_dir()), reverse=True):
        _rmdir_tree(child)
    try:
        group.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def sweep_stale(support: CgroupSupport) -> int:
    """Remove groups left by earlier service processes that are gone. Returns how many."""
    removed = 0
    for site in support.sites.values():
        try:
            entries = list(site.parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.name.startswith(_PREFIX) or not entry.is_dir():
                continue
            try:
                owner = int(entry.name[len(_PREFIX) :].split("-", 1)[0])
            except ValueError:
                continue
            if owner != os.getpid() and Path(f"/proc/{owner}").exists():
                continue
            if entry.name in _LIVE_NAMES:
                continue  # another backend of this process, in use
            for child in list(entry.iterdir()) if entry.exists() else []:
                if child.is_dir():
                    for pid in _procs(child):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)
            if _rmdir_tree(entry):
                removed += 1
    return removed


class BackendCgroups:
    """This backend's groups (one per controller) and the per-execution children in them."""

    def __init__(self, support: CgroupSupport) -> None:
        self.support = support
        self._name = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        _LIVE_NAMES.add(self._name)
        self._roots: dict[str, Path] = {}
        self._seq = 0
        #: Emptied groups kept for the next executions (see :meth:`acquire`).
        self._free: list[ExecutionCgroup] = []

    def create(self) -> None:
        for controller, site in self.support.sites.items():
            root = site.parent / self._name
            root.mkdir(exist_ok=True)
            if site.version == 2:
                # Children of this group need the controller too.
                _write(root / "cgroup.subtree_control", f"+{controller}")
            elif controller == "memory":
                _write(root / "memory.use_hierarchy", "1")
            self._roots[controller] = root

    @property
    def name(self) -> str:
        """This backend's group name, the same under every controller."""
        return self._name

    @property
    def controllers(self) -> list[str]:
        return sorted(self._roots)

    def new_execution(self, memory_bytes: int, max_processes: int) -> ExecutionCgroup:
        self._seq += 1
        name = f"x{self._seq}"
        groups: dict[str, tuple[Path, int]] = {}
        try:
            for controller, root in self._roots.items():
                version = self.support.sites[controller].version
                path = root / name
                path.mkdir()
                groups[controller] = (path, version)
                if controller == "memory" and memory_bytes > 0:
                    if version == 1:
                        (path / "memory.limit_in_bytes").write_text(str(memory_bytes))
                        # No swap either (the file exists only with swap accounting).
                        _write(path / "memory.memsw.limit_in_bytes", str(memory_bytes))
                    else:
                        (path / "memory.max").write_text(str(memory_bytes))
                        _write(path / "memory.swap.max", "0")
                if controller == "pids" and max_processes > 0:
                    (path / "pids.max").write_text(str(max_processes))
        except OSError:
            ExecutionCgroup(groups).remove_now()
            raise
        return ExecutionCgroup(groups)

    def acquire(self, memory_bytes: int, max_processes: int) -> ExecutionCgroup:
        """A group for one execution: an emptied one from earlier executions, else a new one.

        Reusing a group spares a mkdir, the limit writes and an rmdir per execution (the
        limits are the backend's, the same for every guest). Its event counters are cumulative,
        so :meth:`release` records them and :meth:`ExecutionCgroup.exceeded` compares with that.
        """
        try:
            return self._free.pop()
        except IndexError:
            return self.new_execution(memory_bytes, max_processes)

    def has_free(self) -> bool:
        """Whether :meth:`acquire` would reuse a group (and do no file-system work)."""
        return bool(self._free)

    def release(self, group: ExecutionCgroup) -> bool:
        """Give back an execution's group once no process is left in it; False while some are.

        Returns True when the group was taken back (or removed). Kept groups are empty: a
        process can only enter one by a write to its ``cgroup.procs`` from outside the sandbox.
        """
        empty = group.is_empty()
        if empty is None:  # gone from under us: not reusable
            group.remove_now()
            return True
        if not empty:
            group.kill_all()
            return False
        if len(self._free) >= MAX_FREE_GROUPS:
            return group.remove_now()
        group.rebase()
        self._free.append(group)
        return True

    def remove(self) -> bool:
        """Kill what is left in this backend's groups and remove them; False if some remain."""
        self._free.clear()
        for controller, root in list(self._roots.items()):
            for child in list(root.iterdir()) if root.exists() else []:
                if child.is_dir():
                    ExecutionCgroup({"_": (child, 1)}).kill_all()
            if _rmdir_tree(root):
                del self._roots[controller]
        if not self._roots:
            _LIVE_NAMES.discard(self._name)
        return not self._roots


class ExecutionCgroup:
    """One execution's groups: join files for the launcher, outcome flags, kill, cleanup."""

    def __init__(self, groups: dict[str, tuple[Path, int]]) -> None:
        self._groups = groups
        #: (memory, pids) limit events counted before the current execution (see ``rebase``).
        self._baseline = (0, 0)
        #: The counters as last read by :meth:`exceeded`.
        self._seen: tuple[int, int] | None = None
        # Where the counters are: (file, key or "" for a plain number), as strings (read often).
        self._memory_counter: tuple[str, str] | None = None
        memory = groups.get("memory")
        if memory is not None:
            path, version = memory
            if version == 2:
                self._memory_counter = (str(path / "memory.events"), "oom_kill")
            elif _read_keyed(path / "memory.oom_control").get("oom_kill") is not None:
                self._memory_counter = (str(path / "memory.oom_control"), "oom_kill")
            else:
                self._memory_counter = (str(path / "memory.failcnt"), "")
        pids = groups.get("pids")
        self._pids_counter = (str(pids[0] / "pids.events"), "max") if pids is not None else None
        self._procs_files = [str(path / "cgroup.procs") for path, _ in groups.values()]

    @property
    def procs_files(self) -> list[str]:
        return list(self._procs_files)

    def open_procs(self) -> list[int]:
        """The ``cgroup.procs`` files, opened for writing; the caller closes them.

        A process given these joins the groups by writing ``0`` to each: the kernel checks the
        credentials of whoever opened the file (root here), not the writer's.
        """
        fds: list[int] = []
        try:
            for procs in self._procs_files:
                fds.append(os.open(procs, os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _counters(self) -> tuple[int, int]:
        return _read_counter(self._memory_counter), _read_counter(self._pids_counter)

    def exceeded(self) -> tuple[bool, bool]:
        """(memory, pids): whether the current execution hit each limit."""
        memory, pids = self._seen = self._counters()
        return memory > self._baseline[0], pids > self._baseline[1]

    def rebase(self) -> None:
        """Count from now on: the next execution in this group starts with no limit hit.

        Called once the group is empty; the counters then cannot have moved since
        :meth:`exceeded` read them after the guest's end, so that reading is reused.
        """
        self._baseline = self._seen if self._seen is not None else self._counters()
        self._seen = None

    def is_empty(self) -> bool | None:
        """No process in any of the groups; None when one cannot be read (removed)."""
        empty = True
        for procs in self._procs_files:
            text = _read_small(procs)
            if text is None:
                return None
            empty = empty and not text.strip()
        return empty

    def memory_exceeded(self) -> bool:
        entry = self._groups.get("memory")
        if entry is None:
            return False
        path, version = entry
        if version == 2:
            return _read_keyed(path / "memory.events").get("oom_kill", 0) > 0
        oom = _read_keyed(path / "memory.oom_control")
        if "oom_kill" in oom:
            return oom["oom_kill"] > 0
        return _read_int(path / "memory.failcnt") > 0

    def pids_exceeded(self) -> bool:
        entry = self._groups.get("pids")
        if entry is None:
            return False
        return _read_keyed(entry[0] / "pids.events").get("max", 0) > 0

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for path, _ in self._groups.values():
            seen.update(_procs(path))
        return sorted(seen)

    def kill_all(self) -> None:
        """SIGKILL every process in the groups (cgroup.kill on v2), until none is left."""
        for path, version in self._groups.values():
            if version == 2 and _write(path / "cgroup.kill", "1"):
                continue
            for _ in range(50):
                pids = _procs(path)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)

    def remove_now(self) -> bool:
        ok = True
        for path, _ in self._groups.values():
            ok = _rmdir_tree(path) and ok
        return ok

    def try_remove(self) -> bool:
        """Kill what is left and remove the groups; False while a process is still in one."""
        if self.pids():
            self.kill_all()
            return False
        return self.remove_now()
