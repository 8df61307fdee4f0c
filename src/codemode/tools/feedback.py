"""An execution's outcome as text for the model: what it needs to continue, nothing more.

Success gives the result and the program's output; failure gives the error type, message and
the traceback of the model's own lines (the executor already strips runtime frames). stdout
and stderr are cut to a size, keeping the head and the tail, with a marker saying how much was
cut. Nothing else from the result (correlation id, timings) is shown.
"""

from __future__ import annotations

from codemode.core.results import ExecutionResult

__all__ = ["DEFAULT_MAX_OUTPUT_CHARS", "format_result", "truncate"]

#: Characters of stdout, and separately of stderr, kept for the model by default.
DEFAULT_MAX_OUTPUT_CHARS = 4000


def truncate(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, head and tail kept, with a marker of the cut."""
    if limit <= 0 or len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut ...]\n{text[len(text) - tail :]}"


def format_result(
    result: ExecutionResult, *, max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
) -> str:
    """The text a model sees after its program ran (see the module docstring)."""
    lines: list[str] = []
    if result.paused is not None:
        call = result.paused.call
        lines.append(
            f"paused: {call.describe()} needs the application's approval. The program stopped "
            "there; the application will run it again once the call is decided. Do not retry "
            "it yourself."
        )
    elif result.success:
        lines.append(f"result: {result.result if result.result is not None else 'None (not set)'}")
    else:
        lines.append(f"error: {result.error_type or 'Error'}: {result.error or ''}".rstrip())
        if result.traceback:
            lines.append(result.traceback.rstrip("\n"))
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if text:
            lines.append(f"{name}:\n{truncate(text.rstrip(chr(10)), max_output_chars)}")
    if result.output_truncated:
        lines.append("[output stopped at the executor's output limit; later output was dropped]")
    return "\n".join(lines)
