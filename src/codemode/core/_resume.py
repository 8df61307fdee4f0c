"""Pausing and resuming an execution for an approval: what is kept, and the request rebuilt.

A pause keeps, beside the execution's journal, what running it again needs (its code, declared
tools, config, context, timeout, limits, input files and the decisions so far) in the journal
store, so that a resume works in another process after a restart with the SQLite store.
"""

from __future__ import annotations

import base64
import json
import logging
import time

from codemode.core._exchange import Prepared
from codemode.core._request import Request
from codemode.core.approvals import (
    PAUSED,
    ExecutionNotPausedError,
    PausedExecution,
    PendingCall,
)
from codemode.core.budget import Redaction
from codemode.core.context import RuntimeContext
from codemode.core.journal import JournalStore, PausedRecord
from codemode.core.results import ExecutionResult

__all__ = ["paused_result", "resumed_request"]

logger = logging.getLogger("codemode.client")


def paused_result(
    journals: JournalStore, request: Request, prepared: Prepared, call: PendingCall
) -> ExecutionResult:
    """Keep what resuming ``prepared`` needs; the result that says it paused at ``call``."""
    cid = prepared.correlation_id
    decisions = {str(k): v for k, v in (request.decisions or {}).items()}
    stored = {
        "code": prepared.start.code,
        "available_tools": (
            None if request.available_tools is None else list(request.available_tools)
        ),
        "config": json.loads(prepared.start.config_json or b"{}"),
        "timeout": prepared.start.timeout_seconds,
        "context": dict(prepared.context.variables),
        "limits": dict(request.limits or {}),
        "files": {name: base64.b64encode(data).decode() for name, data in prepared.files},
        "decisions": decisions,
    }
    pending = {"seq": call.seq, "tool": call.tool, "args": call.args, "kwargs": call.kwargs}
    journals.pause(PausedRecord(cid, prepared.binding, stored, pending))
    journal = tuple(journals.open(cid, prepared.binding))
    logger.info("execution paused: %s awaits approval", call.tool, extra={"correlation_id": cid})
    return ExecutionResult(
        success=False,
        error_type=PAUSED,
        error=f"{call.describe()} awaits the application's approval; resume with "
        f"codemode.resume({cid!r}, approve=True|False)",
        correlation_id=cid,
        paused=PausedExecution(cid, call, journal),
    )


def resumed_request(
    journals: JournalStore,
    paused_ttl: float,
    execution_id: str,
    *,
    approve: bool,
    redact: Redaction | None = None,
) -> Request:
    """The request that runs a paused execution again with ``approve`` for its pending call.

    Claims the pause (of two concurrent claims one wins); raises
    :class:`~codemode.core.approvals.ExecutionNotPausedError` for an unknown, expired or
    already resumed id.
    """
    if not isinstance(approve, bool):
        raise TypeError("approve must be True or False")
    record = journals.claim(execution_id)
    if record is None:
        raise ExecutionNotPausedError(
            f"no paused execution {execution_id!r}: unknown, already resumed, or expired",
            correlation_id=execution_id,
        )
    if time.time() - record.paused_at > paused_ttl:
        journals.discard(execution_id)
        raise ExecutionNotPausedError(
            f"paused execution {execution_id!r} expired (paused_ttl "
            f"{paused_ttl:g}s); run the program again",
            correlation_id=execution_id,
        )
    stored = record.request
    decisions = {int(k): bool(v) for k, v in stored.get("decisions", {}).items()}
    decisions[int(record.pending["seq"])] = approve
    request = Request(
        stored["code"],
        stored["available_tools"],
        stored["config"],
        stored["timeout"],
        RuntimeContext(variables=stored["context"]),
        correlation_id=execution_id,
        limits=stored["limits"] or None,
        files={n: base64.b64decode(d) for n, d in stored["files"].items()} or None,
        redact=redact,
        decisions=decisions,
    )
    return request
