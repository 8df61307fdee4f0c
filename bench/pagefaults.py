"""Page faults per execution, by process and by memory area: where a sandbox's CPU goes.

    .venv/bin/python bench/pagefaults.py [--n 500] [--smoke] [--isolation X]

Starts a ``codemode serve`` (``run.py``'s ``Executor``), runs ``result = 2 + 2`` N times in
sequence while ``perf record -a -e exceptions:page_fault_user`` records every user-space page
fault on the machine, then counts those of the sandbox: the fork server's zygote and its guests
(every process with the zygote's name, apart from the service and this one). Each fault is
put in the zygote's memory area it hit (a guest is a fork of the zygote, so its areas are the
zygote's) and in its kind, from the fault's error code: a write to a page already mapped (a
copy-on-write copy, in a guest or in the zygote after a fork), a write to an unmapped page, a
read or an instruction fetch. Needs root, x86-64 (the tracepoint is x86's) and ``perf``
(Debian: ``apt-get install linux-perf``); run it on an otherwise quiet machine, since the
recording is system-wide.

Prints a table and writes ``bench/results/pagefaults.json`` (``pagefaults.smoke.json`` with
``--smoke``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import errno
import os
import platform
import re
import secrets
import select
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
from run import Executor

from codemode import ClientConfig, Codemode
from codemode.executor.sandbox.forkserver import ZYGOTE_MOUNT

#: One line of ``perf script -F comm,pid,trace`` for this tracepoint.
_LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+address=(0x[0-9a-f]+) ip=\S+ error_code=(0x[0-9a-f]+)")
#: x86 page-fault error code bits (arch/x86/include/asm/trap_pf.h).
_PRESENT, _WRITE, _FETCH = 0x1, 0x2, 0x10


def _kind(error_code: int) -> str:
    if error_code & _WRITE:
        return "write, copy on write" if error_code & _PRESENT else "write, new page"
    return "instruction fetch" if error_code & _FETCH else "read"


class MemoryMap:
    """A process's areas from ``/proc/PID/maps``, to name the area an address falls in."""

    def __init__(self, text: str) -> None:
        areas = []
        for line in text.splitlines():
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = Path(fields[5]).name if len(fields) > 5 else "anonymous"
            areas.append((start, end, f"{name} ({fields[1]})"))
        areas.sort()
        self._areas = areas
        self._starts = [a[0] for a in areas]

    def area(self, address: int) -> str:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._areas[i][1]:
            return self._areas[i][2]
        return "mapped after the zygote's start"


def find_zygote(executor_pid: int) -> int | None:
    """The fork server's zygote in the executor's process tree (None with other isolation)."""
    stats = benchlib.proc_stats()
    pythons = []
    for pid in benchlib.tree_pids(executor_pid, stats):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # bwrap's own command line names the zygote too; the zygote and its guests are Pythons.
        if Path(argv[0].decode()).name.startswith("python") and ZYGOTE_MOUNT.encode() in argv:
            pythons.append(pid)
    # Its pre-forked guests share its command line; the zygote is the one whose parent is not.
    return next((pid for pid in pythons if int(stats[pid][1]) not in pythons), None)


def count(
    script: str, zygote: int, comm: str, exclude: set[int], memory: MemoryMap
) -> dict[str, Any]:
    """Tally ``perf script`` output: faults of the zygote and of the other ``comm`` processes."""
    per_process: Counter[str] = Counter()
    per_area: Counter[tuple[str, str]] = Counter()
    guests: set[int] = set()
    for line in script.splitlines():
        match = _LINE.match(line)
        if match is None or match.group(1) != comm:
            continue
        pid = int(match.group(2))
        if pid in exclude:
            continue
        who = "zygote" if pid == zygote else "guests"
        if pid != zygote:
            guests.add(pid)
        per_process[who] += 1
        kind = _kind(int(match.group(4), 16))
        per_area[(kind, memory.area(int(match.group(3), 16)))] += 1
    return {"per_process": per_process, "per_area": per_area, "guests": len(guests)}


def _perf() -> str:
    perf = shutil.which("perf")
    if perf is None or os.geteuid() != 0:
        raise SystemExit("needs root and perf (Debian: apt-get install linux-perf)")
    if platform.machine() != "x86_64":
        raise SystemExit("needs x86-64: the exceptions:page_fault_user tracepoint is x86's")
    return perf


class Recording:
    """``perf record`` of every user-space page fault on the machine, from start() to stop().

    perf starts with its events disabled and enables them on a command through its control
    FIFO, acknowledging it: recording begins before start() returns, not some time after.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "perf.data")
        self.ctl = os.path.join(directory, "ctl")
        self.ack = os.path.join(directory, "ack")
        self.perf = _perf()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        os.mkfifo(self.ctl)
        os.mkfifo(self.ack)
        self.proc = await asyncio.create_subprocess_exec(
            *(self.perf, "record", "-q", "-a", "-e", "exceptions:page_fault_user"),
            *("-D", "-1", "--control", f"fifo:{self.ctl},{self.ack}", "-o", self.path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.to_thread(self._enable, time.monotonic() + 30)
        except OSError as exc:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            _, stderr = await self.proc.communicate()
            raise RuntimeError(f"perf record did not start ({exc}):\n{stderr.decode()}") from None

    def _enable(self, deadline: float) -> None:
        assert self.proc is not None
        while True:  # ENXIO until perf has opened its end of the FIFO
            try:
                ctl = os.open(self.ctl, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                if self.proc.returncode is not None:
                    raise OSError(errno.ECHILD, "perf exited") from None
                time.sleep(0.02)
        ack = os.open(self.ack, os.O_RDONLY | os.O_NONBLOCK)
        try:
            os.write(ctl, b"enable\n")
            reply = b""
            while not reply.startswith(b"ack"):
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, "perf did not acknowledge 'enable'")
                select.select([ack], [], [], 0.1)
                with contextlib.suppress(BlockingIOError):
                    reply += os.read(ack, 16)  # b"" while perf has not opened its end yet
                if not reply:
                    time.sleep(0.01)
        finally:
            os.close(ctl)
            os.close(ack)

    async def stop(self) -> str:
        """Stop recording; the recorded faults as ``perf script`` lines."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(self.proc.wait(), 60)
        script = await asyncio.create_subprocess_exec(
            *(self.perf, "script", "-i", self.path, "-F", "comm,pid,trace"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await script.communicate()
        if script.returncode != 0:
            raise RuntimeError(f"perf script exited with {script.returncode}")
        return out.decode(errors="replace")


def inspect_zygote(executor_pid: int) -> tuple[int, str, MemoryMap]:
    """The zygote's pid, process name and memory map; exits if the executor has no zygote."""
    zygote = find_zygote(executor_pid)
    if zygote is None:
        raise SystemExit("no fork-server zygote found: run with the forkserver isolation")
    memory = MemoryMap(Path(f"/proc/{zygote}/maps").read_text())
    return zygote, Path(f"/proc/{zygote}/comm").read_text().strip(), memory


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    extra = [f"--isolation={args.isolation}"] if args.isolation else []
    executor = Executor(secrets.token_hex(16), [*extra, "--log-level=WARNING"])
    await executor.start()
    try:
        codemode = Codemode.from_client_config(
            ClientConfig(executor_url=executor.url, executor_api_key=executor.api_key)
        )
        try:
            execute = codemode.execute_async
            await benchlib.sequential(execute, benchlib.CODE_TRIVIAL, 4, args.warmup)
            zygote, comm, memory = inspect_zygote(executor.pid)
            with tempfile.TemporaryDirectory(prefix="codemode-pagefaults-") as tmp:
                recording = Recording(tmp)
                await recording.start()
                try:
                    await benchlib.sequential(execute, benchlib.CODE_TRIVIAL, 4, args.n)
                finally:
                    script = await recording.stop()
        finally:
            await codemode.close_async()
        tally = count(script, zygote, comm, {os.getpid(), executor.pid}, memory)
    finally:
        await executor.stop()
    n = args.n
    per_process = {k: round(v / n, 1) for k, v in sorted(tally["per_process"].items())}
    per_process["total"] = round(sum(tally["per_process"].values()) / n, 1)
    by_kind: Counter[str] = Counter()
    for (kind, _), value in tally["per_area"].items():
        by_kind[kind] += value
    return {
        "executions": n,
        "guests_seen": tally["guests"],
        "per_execution": per_process,
        "per_execution_by_kind": {k: round(v / n, 1) for k, v in by_kind.most_common()},
        "per_execution_by_area": [
            {"kind": kind, "area": area, "faults": round(v / n, 1)}
            for (kind, area), v in tally["per_area"].most_common(args.top)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="executions recorded (default 500)")
    parser.add_argument("--smoke", action="store_true", help="20 executions; checks it works")
    parser.add_argument("--isolation", choices=["auto", "forkserver"], default=None)
    parser.add_argument("--top", type=int, default=15, help="areas listed (default 15)")
    args = parser.parse_args()
    args.warmup = 5 if args.smoke else 100
    if args.smoke:
        args.n = 20
    _perf()
    result = asyncio.run(measure(args))
    print(f"page faults per execution, {args.n} sequential `{benchlib.CODE_TRIVIAL}`:")
    for who, value in result["per_execution"].items():
        print(f"  {who:<40} {value:>8}")
    print("by kind:")
    for kind, value in result["per_execution_by_kind"].items():
        print(f"  {kind:<40} {value:>8}")
    print("by kind and area:")
    for row in result["per_execution_by_area"]:
        print(f"  {row['kind']:<22} {row['area']:<45} {row['faults']:>8}")
    path = benchlib.write_results("pagefaults", "codemode page faults", result, args.smoke)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
