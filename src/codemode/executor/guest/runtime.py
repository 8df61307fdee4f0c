"""The guest runtime: the small program that runs inside the sandbox around the user's code.

It speaks to the service over one inherited stream socket (the *channel*, see
:mod:`.protocol`), never through stdout: stdout and stderr are plain pipes that the service
reads and streams, so nothing printed can forge a frame. A one-shot sandbox runs it through
``python -I -S -B GUEST_DIR`` (``__main__``); the fork server's zygote imports it once and calls
:func:`serve_one` in each child. Its names are for the service; the program sees only
``tools``, ``context``, ``config`` and sets ``result``.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import errno
import linecache
import os
import resource
import socket
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

from .outcomes import ErrorType
from .protocol import (
    FRAME_HEADER,
    OUTPUT_DIR,
    Channel,
    ProtocolError,
    encode_frame,
    parse_header,
)
from .tools import JSON_ENCODER, Relay, Steps, ToolError, Tools

#: Filename under which the user's code is compiled; tracebacks keep only these frames.
USER_FILENAME = "<codemode>"
#: A deep traceback keeps this many outermost and innermost frames.
TRACEBACK_HEAD, TRACEBACK_TAIL = 10, 20
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect
#: This package's folder: frames of its files are the runtime's, not the user's.
_GUEST_DIR = os.path.dirname(os.path.abspath(__file__))

#: The signal module's C half: setting a handler through ``signal.signal`` converts to and
#: from enums in Python, which the first time in a guest copies pages shared with the zygote.
C_SIGNAL: Any = __import__("_signal")

# Limits the guest applies to itself before the user's code runs (name -> rlimit). The
# address-space cap is ``address_space_bytes`` when the start frame has it (a generous
# backstop where a memory cgroup counts real use), else ``memory_bytes``.
_RLIMITS = {
    "cpu_seconds": resource.RLIMIT_CPU,
    "address_space_bytes": resource.RLIMIT_AS,
    "max_processes": resource.RLIMIT_NPROC,
    "max_file_bytes": resource.RLIMIT_FSIZE,
    "max_open_files": resource.RLIMIT_NOFILE,
}
#: site-packages directories put on ``sys.path`` at start (the sandbox venv's).
SITE_DIRS: list[str] = []
#: How many installed names a "no module named" error lists before "and N more".
_LISTED_PACKAGES = 15


def _freeze(value: Any) -> Any:
    """A read-only view of decoded JSON: mappings become proxies, lists become tuples."""
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Running the program


def apply_limits(limits: Mapping[str, Any]) -> None:
    """Lower this process's rlimits (soft and hard) before untrusted code runs."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for key, which in _RLIMITS.items():
        value = int(limits.get(key) or 0)
        if which == resource.RLIMIT_AS and "address_space_bytes" not in limits:
            value = int(limits.get("memory_bytes") or 0)
        if value <= 0:
            continue
        soft, hard = value, value
        if which == resource.RLIMIT_CPU:
            hard = value + 1  # SIGXCPU first, SIGKILL a second later
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))
    # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the process.
    C_SIGNAL.signal(C_SIGNAL.SIGXFSZ, C_SIGNAL.SIG_IGN)


def _bounded_frames(tb: types.TracebackType | None) -> tuple[list[tuple[Any, int]], int]:
    """The traceback's (frame, line) pairs, keeping the first and last few of a deep one.

    A runaway recursion leaves up to a million frames: formatting all of them would cost the
    program its CPU limit and the model a wall of identical lines.
    """
    pairs = [(t.tb_frame, t.tb_lineno) for t in _walk_tb(tb)]
    if len(pairs) <= TRACEBACK_HEAD + TRACEBACK_TAIL:
        return pairs, 0
    return pairs[:TRACEBACK_HEAD] + pairs[-TRACEBACK_TAIL:], len(
        pairs
    ) - TRACEBACK_HEAD - TRACEBACK_TAIL


def _walk_tb(tb: types.TracebackType | None) -> Iterator[types.TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def user_traceback(exc: BaseException) -> str:
    """Format ``exc`` keeping only frames of the user's code (and what they called)."""
    pairs, cut = _bounded_frames(exc.__traceback__)
    frames = traceback.StackSummary.extract(iter(pairs), lookup_lines=True)
    first_user = next((i for i, f in enumerate(frames) if f.filename == USER_FILENAME), None)
    # The runtime's own frames (tool forwarders, the relay) are not the user's business.
    kept = (
        [f for f in frames[first_user:] if os.path.dirname(f.filename) != _GUEST_DIR]
        if first_user is not None
        else []
    )
    lines = ["Traceback (most recent call last):\n"] if kept else []
    formatted = traceback.format_list(kept)
    if cut:
        at = max(0, min(len(formatted), TRACEBACK_HEAD - (first_user or 0)))
        formatted.insert(at, f"  [... {cut} frames omitted ...]\n")
    lines += formatted
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def limit_error_type(exc: BaseException) -> str | None:
    """The limit an uncaught exception reports, judged by its type and errno, or None.

    In the sandbox a refused fork surfaces as ``BlockingIOError`` (EAGAIN) and a refused thread
    as the ``RuntimeError`` that ``threading`` raises from ``Thread.start``; a refused mapping
    as ``OSError`` ENOMEM.
    """
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return ErrorType.MEMORY_LIMIT
    if isinstance(exc, BlockingIOError) and exc.errno == errno.EAGAIN:
        return ErrorType.PROCESS_LIMIT
    if type(exc) is RuntimeError and exc.__traceback__ is not None:
        last = list(_walk_tb(exc.__traceback__))[-1].tb_frame.f_code
        if last.co_name == "start" and last.co_filename.endswith("threading.py"):
            return ErrorType.PROCESS_LIMIT
    return None


def installed_packages(site_dirs: list[str] | None = None) -> list[str]:
    """The distributions in the sandbox venv's site-packages, by name (from their dist-info)."""
    names: set[str] = set()
    for site in SITE_DIRS if site_dirs is None else site_dirs:
        with contextlib.suppress(OSError):
            for entry in os.listdir(site):
                if entry.endswith(".dist-info"):
                    names.add(entry[: -len(".dist-info")].split("-")[0].replace("_", "-"))
    return sorted(names, key=str.lower)


def _explain_missing_module(exc: ModuleNotFoundError) -> None:
    """Say in ``exc``'s message that the sandbox lacks the module, and what it has instead."""
    top = (exc.name or "").partition(".")[0]
    if not top or top in sys.modules:
        return  # a submodule of an installed package: its own message says enough
    installed = installed_packages()
    if not installed:
        offer = "only the standard library"
    else:
        shown = ", ".join(installed[:_LISTED_PACKAGES])
        more = len(installed) - _LISTED_PACKAGES
        offer = f"the standard library and: {shown}" + (f" and {more} more" if more > 0 else "")
    exc.msg = f"{exc.msg}: '{top}' is not installed in the sandbox, which has {offer}"


def _error_frame(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ModuleNotFoundError):
        with contextlib.suppress(Exception):
            _explain_missing_module(exc)
    error_type = (
        ErrorType.TOOL_ERROR if type(exc) is ToolError else type(exc).__name__
    )  # a subclass (ToolBudgetExceeded) keeps its own name
    error_type = limit_error_type(exc) or error_type
    return {
        "t": "done",
        "ok": False,
        "type": error_type,
        "message": str(exc) if not isinstance(exc, SyntaxError) else exc.msg,
        "traceback": user_traceback(exc),
        "line": getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None,
    }


def run_program(
    code: str,
    namespace: dict[str, Any],
    *,
    on_compiled: Callable[[], None] | None = None,
) -> Any:
    """Compile and run ``code`` in ``namespace``, awaiting it when it uses top-level ``await``."""
    linecache.cache[USER_FILENAME] = (len(code), None, code.splitlines(True), USER_FILENAME)
    compiled = compile(code, USER_FILENAME, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if on_compiled is not None:
        on_compiled()
    if compiled.co_flags & _CO_COROUTINE:
        # The program awaits at top level: only then is asyncio imported.
        import asyncio

        coro = eval(compiled, namespace)  # noqa: S307 - a coroutine of the program, not an expression
        return asyncio.run(coro)
    exec(compiled, namespace)  # noqa: S102 - running the program is this module's purpose
    return None


def _encode_result(namespace: Mapping[str, Any], max_bytes: int) -> tuple[dict[str, Any], bytes]:
    if "result" not in namespace:
        return {"t": "done", "ok": True}, b""
    value = namespace["result"]
    try:
        payload = JSON_ENCODER.encode(value).encode()
    except (TypeError, ValueError) as exc:
        return {
            "t": "done",
            "ok": False,
            "type": ErrorType.RESULT_NOT_SERIALIZABLE,
            "message": f"result must be JSON-serialisable, got {type(value).__name__}: {exc}",
            "traceback": "",
        }, b""
    if max_bytes and len(payload) > max_bytes:
        return {
            "t": "done",
            "ok": False,
            "type": ErrorType.RESULT_TOO_LARGE,
            "message": f"result is {len(payload)} bytes encoded; the limit is {max_bytes}",
            "traceback": "",
        }, b""
    return {"t": "done", "ok": True}, payload


def _left_files() -> bool:
    """Whether the program left anything in ``/output`` (where there is one)."""
    try:
        return bool(os.listdir(OUTPUT_DIR))
    except OSError:
        return False


def _namespace(header: Mapping[str, Any], relay: Relay) -> dict[str, Any]:
    """The program's globals: ``tools``, ``context`` and ``config`` of its start frame."""
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    _enter(namespace, header, relay)
    return namespace


def _enter(namespace: dict[str, Any], header: Mapping[str, Any], relay: Relay) -> None:
    """Give the program its start frame's ``tools``, ``context`` and ``config``.

    In a session the namespace is the previous execution's, variables and imports kept; its
    ``result`` goes, so that an unset one is not reported again.
    """
    relay.tool_names = frozenset(header.get("tools") or ())
    namespace.pop("result", None)
    namespace["tools"] = Tools(relay)
    namespace["codemode"] = Steps(relay)
    namespace["context"] = _freeze(header.get("context") or {})
    namespace["config"] = _freeze(header.get("config") or {})


def _run(code: str, namespace: dict[str, Any], max_result: int) -> tuple[dict[str, Any], bytes]:
    """Run the program; the done frame (header, payload) that reports its outcome."""
    try:
        run_program(code, namespace)
    except SystemExit as exc:
        # sys.exit() ends the program normally; a non-zero code is an error.
        if exc.code not in (None, 0):
            return _error_frame(exc), b""
        return _encode_result(namespace, max_result)
    except BaseException as exc:
        return _error_frame(exc), b""
    return _encode_result(namespace, max_result)


#: The start frame :func:`warm_up` parses: like the ones that follow.
_WARM_UP_HEADER = {"t": "start", "tools": ["t"], "config": {"k": 1}, "context": {"k": [1]}}


def warm_up() -> None:
    """Take a request's first-run costs before the guest reports ready.

    A guest is forked from the fork server's zygote: the first run of each code path writes
    to pages shared copy-on-write with the zygote (reference counts, caches, the allocator's
    arenas). This parses a start frame, builds a program's namespace and encodes a result,
    as a request does, while the guest waits in the pool, so the request does not pay those
    faults. It stops short of compiling and running a dummy program, which costs more CPU
    than it saves. Nothing of it stays: the namespace is thrown away.
    """
    frame = encode_frame(_WARM_UP_HEADER, b"result = 1")
    head_len, _ = FRAME_HEADER.unpack_from(frame)
    header = parse_header(frame[FRAME_HEADER.size : FRAME_HEADER.size + head_len])
    namespace = _namespace(header, Relay(None, frozenset()))  # type: ignore[arg-type]
    namespace["result"] = {"n": 1, "s": "x"}
    encode_frame(*_encode_result(namespace, 0))


def prime(rounds: int = 64) -> None:
    """Run a request's pure-Python path in the zygote until CPython has specialised it.

    CPython 3.11 quickens a function after a few calls and then specialises its instructions,
    writing to the code object each time until it settles. In a forked guest every such write
    copies a page it shares with the zygote; made here first, they are made once, for all
    guests. Only fixed dummy requests run here; the program cache entry they leave is
    removed.
    """
    for _ in range(rounds):
        warm_up()
        dummy = _namespace(_WARM_UP_HEADER, Relay(None, frozenset()))  # type: ignore[arg-type]
        encode_frame(*_run("result = sum(range(10))", dummy, 0))
    linecache.cache.pop(USER_FILENAME, None)


def serve_one(channel_fd: int, prefix: bytes = b"") -> int:
    """Run one execution on ``channel_fd``: read the start frame, run, report, return.

    A start frame with ``"session": true`` asks for more: after its outcome the guest waits
    for the next start frame and runs it in the same namespace, until the service ends it.
    The limits are those of the first frame, for the whole session (rlimits only go down).
    ``prefix``: the first bytes of the channel, when the caller has already read them.
    """
    # The start frame carries the code; its size is bounded by the service before sending.
    channel = Channel(channel_fd, max_payload=64 << 20, prefix=prefix)
    header, payload = channel.recv()
    if header["t"] != "start":
        raise ProtocolError("first frame must be start")
    limits: dict[str, Any] = header.get("limits") or {}
    max_result = int(limits.get("max_result_bytes") or 0)
    channel.max_payload = max_result or (64 << 20)
    relay = Relay(channel, frozenset())
    namespace = _namespace(header, relay)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    apply_limits(limits)
    while True:
        done = _run(payload.decode("utf-8"), namespace, max_result)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        if _left_files():
            done[0]["files"] = True  # the service then collects them
        channel.send(*done)
        if not header.get("session"):
            channel.wait_closed()
            return 0
        header, payload = relay.next_frame()
        if header["t"] != "start":
            raise ProtocolError(f"expected a start frame, got {header['t']!r}")
        _enter(namespace, header, relay)


def receive_fds(control_fd: int) -> int:
    """Wait on ``control_fd`` for (channel, stdout, stderr) from the service; return the channel.

    A pre-started guest gets its descriptors this way (one ``SCM_RIGHTS`` message); stdout and
    stderr become fds 1 and 2. It first says it is ready (one byte): its sandbox is then
    complete, which the service waits for before it hands the guest a request.
    """
    with socket.socket(fileno=control_fd) as control:
        control.sendall(b"R")
        _, fds, _, _ = socket.recv_fds(control, 16, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise EOFError("the service sent no descriptors")
    channel, out, err = fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    return channel


def add_site_dirs(dirs: list[str]) -> None:
    """Put the sandbox venv's site-packages on ``sys.path``, after the standard library.

    Its ``.pth`` files are not run: only what the directory itself holds is importable.
    """
    for site in dirs:
        if site not in sys.path:
            sys.path.append(site)
            SITE_DIRS.append(site)


def preload(modules: list[str]) -> None:
    """Import ``modules`` now, ahead of the programs that will use them."""
    import importlib

    for name in modules:
        importlib.import_module(name)


def make_home(path: str) -> None:
    """Create this execution's home directory (the target of ``$HOME``), as its own uid."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


def parse_args(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``[--path DIR]... [--preload MOD,...] [--home DIR] [--check] REST``: (options, REST)."""
    options: dict[str, list[str]] = {"path": [], "preload": [], "home": [], "check": []}
    rest = list(argv)
    while rest and rest[0].removeprefix("--") in options:
        name = rest.pop(0).removeprefix("--")
        if name == "check":
            options["check"].append("1")
            continue
        value = rest.pop(0)
        options[name] += [v for v in value.split(",") if v] if name == "preload" else [value]
    return options, rest


def main(argv: list[str]) -> NoReturn:
    """Entry point as a script: ``guest [OPTIONS] CHANNEL_FD`` or ``... --fds-from CONTROL_FD``.

    Options (:func:`parse_args`): the venv's site-packages, modules to import before the
    program comes (a pooled guest does it while it waits), the home to create. ``--check``
    stops after the imports: exit 0, or the import's traceback on stderr and exit 1.
    """
    options, rest = parse_args(argv[1:])
    add_site_dirs(options["path"])
    if options["check"]:
        try:
            preload(options["preload"])
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    try:
        if options["home"]:
            make_home(options["home"][0])
        preload(options["preload"])
        serve_one(receive_fds(int(rest[1])) if rest[0] == "--fds-from" else int(rest[0]))
    except (EOFError, ProtocolError, OSError, ImportError):
        os._exit(70)
    # Skip interpreter teardown: threads may still wait on the channel, and the service
    # kills the process tree when the outcome has arrived anyway.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
