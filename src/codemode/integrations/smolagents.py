"""smolagents adapter: a ``CodeAgent``'s code runs in a Codemode session, its tools in the app.

:class:`CodemodeExecutor` is a smolagents ``PythonExecutor``: pass it as
``CodeAgent(tools=..., model=..., executor=CodemodeExecutor(codemode))``, or build both with
:func:`codemode_agent`. The agent's steps run one after another in one session, so a variable
set in one step is there in the next. Each smolagents ``Tool`` is registered as a Codemode
tool that calls it in this process; inside the sandbox a thin forwarder of the tool's own name
(``get_weather(city="Paris")``, as the model writes it) calls ``tools.get_weather``, so no tool
source ever enters the sandbox. ``final_answer(x)`` hands ``x`` to the agent's final-answer
tool here, then ends the step by raising ``FinalAnswerException`` in the sandbox.

A step's ``output`` is, as in smolagents' remote executors, the value of its last statement when
that is an expression (else None); the executor assigns it to ``_``, as the Python REPL does.
A value that is not JSON-serialisable comes back as its ``repr``. Codemode clears ``result``
before each execution; a program's own ``result`` is kept for the next step all the same.
A failed program raises :class:`CodeStepError`, whose text (the output, the error, the
traceback) the agent records as the step's error for the model. Needs
``pip install 'codemode[smolagents]'``.

One module past the usual size: a third of it is the helpers' source, which it sends into
the sandbox as text.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from codemode.config import ClientConfig
from codemode.core.context import RuntimeContext
from codemode.core.errors import ExecutionError, SessionClosedError, SessionLostError
from codemode.core.executor_client import ExecutorClient, _worker_loop
from codemode.core.registry import ComponentRegistry
from codemode.core.results import ExecutionResult
from codemode.tools.docstrings import Docstring
from codemode.tools.feedback import DEFAULT_MAX_OUTPUT_CHARS, truncate
from codemode.tools.function import FunctionTool
from codemode.tools.spec import spec_from_callable

if TYPE_CHECKING:
    # Typing only: the facade may import this module, not the other way round.
    from codemode.core.codemode import Codemode
    from codemode.core.session import Session

try:
    from smolagents import CodeAgent  # type: ignore[import-untyped]
    from smolagents.local_python_executor import (  # type: ignore[import-untyped]
        CodeOutput,
        PythonExecutor,
    )
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "codemode.integrations.smolagents needs smolagents: pip install 'codemode[smolagents]'"
    ) from exc

__all__ = ["CodeStepError", "CodemodeExecutor", "codemode_agent"]

T = TypeVar("T")

#: The error type a step ends with when the program called ``final_answer``.
FINAL_ANSWER_EXCEPTION = "FinalAnswerException"
#: Names the sandbox gives every program; a variable may not replace them.
_RESERVED = frozenset({"tools", "context", "config", "result"})
#: smolagents input types as Python annotations (for validation and the stubs).
_TYPES: dict[str, Any] = {
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": float,
    "array": list[Any],
    "object": dict[str, Any],
    "null": type(None),
    "any": Any,
    "image": Any,
    "audio": Any,
}
_SETUP_KEY = "smolagents"
_HELPERS_FILENAME = "<smolagents>"
#: Run once per sandbox (and after each ``send_tools`` / ``send_variables``): defines the
#: helpers below, whose values all come from the execution's ``config``, never from the text.
_SETUP_PROGRAM = (
    f"exec(compile(config[{_SETUP_KEY!r}]['source'], {_HELPERS_FILENAME!r}, 'exec'), globals())\n"
    f"_codemode_install(config[{_SETUP_KEY!r}])\n"
)
#: Defined in the session: fixed source, compiled under its own file name so that tracebacks
#: through a forwarder show its line rather than a line of the model's program.
_HELPERS = '''\
import builtins as _cm_builtins
import json as _cm_json
import linecache as _cm_linecache
import types as _cm_types


class FinalAnswerException(BaseException):
    """Ends the step: final_answer() has handed the answer to the application."""


def _codemode_tool(name):
    def call(*args, **kwargs):
        return tools[name](*args, **kwargs)

    call.__code__ = call.__code__.replace(co_name=name, co_qualname=name)  # for tracebacks
    call.__name__ = call.__qualname__ = name
    return call


def _codemode_final_answer(*args, **kwargs):
    tools["final_answer"](*args, **kwargs)
    raise FinalAnswerException("final_answer() ends the step")


def _codemode_thaw(value):
    if isinstance(value, _cm_types.MappingProxyType):
        return {key: _codemode_thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_codemode_thaw(item) for item in value]
    return value


def _codemode_install(setup):
    source = setup["source"]
    lines = source.splitlines(True)
    _cm_linecache.cache["<smolagents>"] = (len(source), None, lines, "<smolagents>")
    namespace = globals()
    for name in setup["tools"]:
        namespace[name] = _codemode_final_answer if name == "final_answer" else _codemode_tool(name)
    namespace.update(_codemode_thaw(setup["variables"]))


def _codemode_end_step(namespace, value, max_chars=50_000):
    if "result" in namespace:
        # Codemode clears `result` before each execution; a name missing from the globals is
        # looked up in builtins, so the program's own `result` is still there next step.
        _cm_builtins.result = namespace["result"]
    try:
        encoded = _cm_json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        value = encoded = repr(value)
    if len(encoded) > max_chars:
        text = value if isinstance(value, str) else encoded
        value = text[:max_chars] + f"... [{len(text) - max_chars} characters cut]"
    return value
'''
#: The last expression's value goes to ``_``, as in the Python REPL (the model sees the
#: assignment in a traceback through that line: a name it knows reads better there).
_VALUE_NAME = "_"


class CodeStepError(ExecutionError):
    """A step's program failed. ``str()`` is the text the model reads: what the program printed,
    then the traceback of its own lines; ``result`` is the full :class:`ExecutionResult`."""

    def __init__(self, result: ExecutionResult) -> None:
        super().__init__(result)
        self.text = _failure_text(result)

    def __str__(self) -> str:
        return self.text


class CodemodeExecutor(PythonExecutor):  # type: ignore[misc]  # smolagents ships no types
    """Runs a ``CodeAgent``'s steps in one Codemode session; see the module docstring.

    ``codemode``: where to run (its config; its registered tools are callable too, as
    ``tools.name``). ``execution_timeout``: seconds per step (default the config's).
    ``context``: a fixed context for the programs and context-aware tools (default the
    caller's, as ``Codemode.with_context`` sets it). ``ttl`` and ``limits``: for the session,
    as ``Codemode.session``. The session opens at the first step and ends with
    :meth:`cleanup` (``agent.cleanup()``, or leaving ``with agent:``). When a step ends the
    sandbox (a time or memory limit, the session expiring) the step fails saying so, and the
    next step starts in a fresh sandbox, with the tools and variables sent again.

    smolagents calls it from sync code; each call blocks until its step is done, on a loop of
    Codemode's own, so it also works from a thread with a running event loop.
    """

    def __init__(
        self,
        codemode: Codemode,
        *,
        execution_timeout: float | None = None,
        context: RuntimeContext | Mapping[str, Any] | None = None,
        ttl: float | None = None,
        limits: Mapping[str, float] | None = None,
    ) -> None:
        # Checked by what it carries: importing the facade here would close an import cycle
        # once the facade offers this adapter.
        if not isinstance(getattr(codemode, "config", None), ClientConfig) or not isinstance(
            getattr(codemode, "registry", None), ComponentRegistry
        ):
            raise TypeError(f"codemode must be a Codemode, not {type(codemode).__name__}")
        if execution_timeout is not None and not execution_timeout > 0:
            raise ValueError("execution_timeout must be a positive number of seconds")
        if ttl is not None and not ttl > 0:
            raise ValueError("ttl must be a positive number of seconds")
        if context is not None and not isinstance(context, RuntimeContext):
            if not isinstance(context, Mapping):
                raise TypeError(
                    f"context must be a RuntimeContext or a mapping, not {type(context).__name__}"
                )
            context = RuntimeContext(variables=context)
        self.codemode = codemode
        self.execution_timeout = execution_timeout
        self.context = context
        self._creation_context = codemode.registry.get_context()
        self._ttl, self._limits = ttl, dict(limits or {})
        # The agent's tools live in a registry of this executor: two agents on one Codemode
        # never see each other's tools (or final answers), and the application's registry
        # keeps only what the application put there.
        self.registry = ComponentRegistry()
        self._client = ExecutorClient(config=codemode.config, registry=self.registry)
        self._session: Session | None = None
        self._tool_names: list[str] = []
        self._variables: dict[str, Any] = {}
        self._setup_pending = True
        self._answers: list[Any] = []
        self._answers_lock = threading.Lock()
        self._closed = False

    @property
    def session(self) -> Session | None:
        """The session the steps run in, once the first step has opened it."""
        return self._session

    # smolagents' PythonExecutor interface ---------------------------------------------------

    def send_tools(self, tools: Mapping[str, Any]) -> None:
        """Make the agent's tools callable in the sandbox under their names, run here.

        Each tool needs ``name``, ``inputs`` (smolagents' ``{name: {"type", "description",
        "nullable"}}``) and ``output_type``, and is called as ``tool(**arguments)``; the
        arguments are checked against ``inputs`` before it runs. Raises ``TypeError`` for an
        object that is not such a tool, ``ValueError`` for a name that is not an identifier.
        """
        self._check_open()
        if not isinstance(tools, Mapping):
            raise TypeError(f"tools must be a mapping of name to tool, not {type(tools).__name__}")
        wrapped = {name: self._wrap(name, tool) for name, tool in tools.items()}
        registry = ComponentRegistry()
        # The application's Codemode tools first: an agent tool of the same name replaces one.
        for name, app_tool in self.codemode.registry.tools().items():
            registry.register_tool(name, app_tool)
        for name, tool in wrapped.items():
            registry.register_tool(name, tool, overwrite=True)
        # Swapped whole: a step starting meanwhile sees the old set or the new one.
        self.registry = self._client.registry = registry
        self._tool_names = list(wrapped)
        self._setup_pending = True

    def send_variables(self, variables: Mapping[str, Any]) -> None:
        """Define ``variables`` in the sandbox before the next step (JSON-serialisable values).

        Raises ``TypeError`` naming a variable whose value cannot be sent, ``ValueError`` for
        a name that is not an identifier or is one the sandbox reserves (``tools``,
        ``context``, ``config``, ``result``).
        """
        self._check_open()
        if not isinstance(variables, Mapping):
            raise TypeError(f"variables must be a mapping, not {type(variables).__name__}")
        for name, value in variables.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"variable name {name!r} must be a Python identifier")
            if name in _RESERVED:
                raise ValueError(f"variable name {name!r} is reserved in the Codemode sandbox")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"variable {name!r} cannot be sent to the sandbox: it must be "
                    f"JSON-serialisable, got {type(value).__name__} ({exc})"
                ) from None
        self._variables.update(variables)
        self._setup_pending = True

    def __call__(self, code_action: str) -> Any:
        """Run one step's code; its output, printed logs and whether it gave the final answer.

        Raises :class:`CodeStepError` when the program fails, :class:`SessionLostError` when
        the sandbox was lost under it, and the connection errors of
        :mod:`codemode.core.errors`; smolagents records each as the step's error.
        """
        self._check_open()
        if not isinstance(code_action, str):
            raise TypeError(f"code must be a str, not {type(code_action).__name__}")
        context = self._current_context()
        with self._answers_lock:
            self._answers.clear()
        result = self._block(self._run_step(_with_output(code_action), context))
        with self._answers_lock:
            answers = list(self._answers)
        logs = _logs(result)
        if not result.success and result.error_type == FINAL_ANSWER_EXCEPTION and answers:
            return CodeOutput(output=answers[-1], logs=logs, is_final_answer=True)
        if not result.success:
            raise CodeStepError(result)
        return CodeOutput(output=result.value, logs=logs, is_final_answer=False)

    def cleanup(self) -> None:
        """End the session (its sandbox is killed) and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        try:
            if session is not None:
                self._block(session.close_async())
        finally:
            self._client.close()

    close = cleanup

    # Internals ---------------------------------------------------------------------------

    def _wrap(self, name: Any, tool: Any) -> FunctionTool[..., Any]:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"tool name {name!r} must be a Python identifier")
        inputs = getattr(tool, "inputs", None)
        if not callable(tool) or not isinstance(inputs, Mapping):
            raise TypeError(
                f"tool {name!r} ({type(tool).__name__}) is not a smolagents Tool: it needs "
                "`inputs` and to be callable"
            )
        if name == "final_answer":

            def call(**arguments: Any) -> Any:
                answer = tool(**arguments)
                with self._answers_lock:
                    self._answers.append(answer)
                return None  # the answer stays in the application; nothing to send back

        else:

            def call(**arguments: Any) -> Any:
                return tool(**arguments)

        signature = _signature(name, inputs, getattr(tool, "output_type", "any"))
        call.__name__ = call.__qualname__ = name
        call.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect
        call.__annotations__ = {
            **{p.name: p.annotation for p in signature.parameters.values()},
            "return": signature.return_annotation,
        }
        description = str(getattr(tool, "description", "") or "")
        summary, _, rest = description.strip().partition("\n")
        doc = Docstring(
            summary=summary.strip(),
            description=rest.strip(),
            params={
                key: str(spec.get("description", "")) if isinstance(spec, Mapping) else ""
                for key, spec in inputs.items()
            },
        )
        return FunctionTool(call, spec_from_callable(call, name=name, doc=doc), name, None)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this CodemodeExecutor was cleaned up; make a new one")

    def _current_context(self) -> RuntimeContext | None:
        if self.context is not None:
            return self.context
        return self.codemode.registry.get_context() or self._creation_context

    def _block(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on Codemode's worker loop, where the session lives, and wait for it.

        ``run_sync`` would use a fresh loop per call from plain sync code, and a session
        belongs to the loop it was opened on.
        """
        loop = _worker_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError(
                "CodemodeExecutor blocks until its step is done: it cannot be called from "
                "the loop its session runs on (from inside a Codemode tool, call it in a thread)"
            )
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def _run_step(self, code: str, context: RuntimeContext | None) -> ExecutionResult:
        session = await self._ready(context)
        try:
            return await session.run_async(
                code, execution_timeout=self.execution_timeout, context=context
            )
        except SessionLostError as exc:
            self._setup_pending = True
            raise SessionLostError(
                f"{exc}. The next step starts in a fresh sandbox: variables, imports and files "
                "of earlier steps are gone.",
                cause=exc,
                correlation_id=exc.correlation_id,
                status=exc.status,
            ) from exc

    async def _ready(self, context: RuntimeContext | None) -> Session:
        """The open session, with the helpers, tools and variables defined in it."""
        session = self._session
        if session is None:
            session = self._client.session(ttl=self._ttl, limits=self._limits)
            await session.open_async()
            self._session = session
            self._setup_pending = True
        elif not session.alive:
            await session.reset()
            self._setup_pending = True
        if self._setup_pending:
            setup = {
                "source": _HELPERS,
                "tools": self._tool_names,
                "variables": self._variables,
            }
            result = await session.run_async(
                _SETUP_PROGRAM,
                config={_SETUP_KEY: setup},
                execution_timeout=self.execution_timeout,
                context=context,
            )
            if not result.success:
                raise ExecutionError(result)
            self._setup_pending = False
        return session


def codemode_agent(
    codemode: Codemode,
    *,
    tools: Iterable[Any],
    model: Any,
    execution_timeout: float | None = None,
    context: RuntimeContext | Mapping[str, Any] | None = None,
    ttl: float | None = None,
    limits: Mapping[str, float] | None = None,
    **agent_options: Any,
) -> Any:
    """A smolagents ``CodeAgent`` whose code runs in a Codemode session (a
    :class:`CodemodeExecutor`); its tools run in this process.

    ``agent_options`` go to ``CodeAgent`` (``max_steps``, ``instructions``,
    ``additional_authorized_imports`` to tell the model what the sandbox can import, …).
    End the session with ``agent.cleanup()`` or ``with codemode_agent(...) as agent:``.
    """
    executor = CodemodeExecutor(
        codemode, execution_timeout=execution_timeout, context=context, ttl=ttl, limits=limits
    )
    return CodeAgent(tools=list(tools), model=model, executor=executor, **agent_options)


# Helpers ----------------------------------------------------------------------------------


def _annotation(kind: Any) -> Any:
    if isinstance(kind, list | tuple):
        choices = [_annotation(k) for k in kind]
        if Any in choices:
            return Any
        union = choices[0]
        for choice in choices[1:]:
            union = union | choice
        return union
    if kind not in _TYPES:
        raise TypeError(f"unknown smolagents type {kind!r}; known: {', '.join(_TYPES)}")
    return _TYPES[kind]


def _signature(name: str, inputs: Mapping[str, Any], output_type: Any) -> inspect.Signature:
    """A signature for ``inputs``: nullable ones default to None, and those after the first
    nullable one are keyword-only (a required one may follow it)."""
    params: list[inspect.Parameter] = []
    kind: inspect._ParameterKind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for key, spec in inputs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"tool {name!r}: input name {key!r} must be a Python identifier")
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise TypeError(f"tool {name!r}: input {key!r} needs a 'type'")
        try:
            annotation = _annotation(spec["type"])
        except TypeError as exc:
            raise TypeError(f"tool {name!r}: input {key!r}: {exc}") from None
        default: Any = inspect.Parameter.empty
        if spec.get("nullable"):
            annotation = annotation if annotation is Any else annotation | None
            default, kind = None, inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(key, kind, default=default, annotation=annotation))
    try:
        returns = _annotation(output_type)
    except TypeError:
        returns = Any
    return inspect.Signature(params, return_annotation=returns)


def _with_output(code: str) -> str:
    """``code`` with its last expression's value kept for the step's output.

    The source is edited in place (the expression gets an assignment in front), so line
    numbers in tracebacks stay the model's. Code that does not parse is sent as it is: the
    sandbox reports the syntax error.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    value = "None"
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        lines = code.split("\n")
        line = lines[last.lineno - 1].encode()
        lines[last.lineno - 1] = (
            line[: last.col_offset] + f"{_VALUE_NAME} = ".encode() + line[last.col_offset :]
        ).decode()
        code, value = "\n".join(lines), _VALUE_NAME
    return f"{code}\nresult = _codemode_end_step(globals(), {value})\n"


def _logs(result: ExecutionResult) -> str:
    logs = result.stdout
    if result.stderr:
        logs += ("" if not logs or logs.endswith("\n") else "\n") + result.stderr
    if result.output_truncated:
        logs += "\n[output stopped at the executor's output limit; later output was dropped]\n"
    return logs


def _failure_text(result: ExecutionResult) -> str:
    parts: list[str] = []
    logs = _logs(result)
    if logs:
        parts.append("Execution logs:\n" + truncate(logs.rstrip("\n"), DEFAULT_MAX_OUTPUT_CHARS))
    detail = result.traceback or f"{result.error_type}: {result.error}"
    parts.append("Code execution failed:\n" + detail.rstrip("\n"))
    if result.traceback and result.error_type and result.error_type not in result.traceback:
        parts.append(f"({result.error_type}: {result.error})")
    if not result.session_alive:
        parts.append(
            "The sandbox ended with this error: the next step starts in a fresh one, without "
            "the variables, imports and files of earlier steps."
        )
    return "\n".join(parts)
