"""Choosing the isolation backend ``codemode serve`` runs executions in."""

from __future__ import annotations

import logging

from codemode.config import ExecutorConfig
from codemode.executor.sandbox.environment import GuestContents
from codemode.executor.sandbox.interface import SandboxBackend
from codemode.executor.sandbox.process import ProcessBackend

logger = logging.getLogger("codemode.executor")

PROCESS_WARNING = (
    "isolation=process: programs run as plain child processes of the executor, with NO "
    "sandbox (they can read files, use the network and see other processes). Use it only "
    "for trusted code or development; run `codemode doctor` to see what bwrap isolation needs."
)


class IsolationUnavailable(RuntimeError):
    """The host cannot enforce the isolation asked for; the message lists what is missing."""


def make_backend(config: ExecutorConfig) -> SandboxBackend:
    """The backend for ``config.isolation``; raises :class:`IsolationUnavailable`.

    ``auto`` (the fork server), ``forkserver`` and ``bwrap`` (a one-shot sandbox per execution)
    all require the kernel sandbox and refuse to fall back silently. Both sandbox backends rest
    on the same host properties (root, bwrap, seccomp, namespaces), which ``check_host`` probes.
    """
    contents = GuestContents(
        sandbox_venv=str(config.sandbox_venv) if config.sandbox_venv is not None else None,
        preload=config.preload_modules,
        preload_warmup=config.preload_warmup,
        sandbox_env=config.sandbox_env,
    )
    if config.isolation == "process":
        logger.warning(PROCESS_WARNING)
        return ProcessBackend(**contents)
    try:
        from codemode.executor.sandbox.bwrap import BwrapBackend
        from codemode.executor.sandbox.hostcheck import check_host
    except ImportError as exc:  # pragma: no cover - both ship with the package
        raise IsolationUnavailable(f"the bwrap backend cannot be loaded: {exc}") from None
    missing = [c for c in check_host() if c.required and not c.ok]
    if missing:
        lines = "\n".join(f"  - {c.name}: {c.detail} (fix: {c.fix})" for c in missing)
        raise IsolationUnavailable(
            "this host cannot enforce the sandbox:\n"
            + lines
            + "\nfix the above, or pass --isolation=process to run WITHOUT isolation"
        )
    if config.isolation == "bwrap":
        return BwrapBackend(limits=config.limits, **contents)
    from codemode.executor.sandbox.forkserver import ForkServerBackend

    return ForkServerBackend(limits=config.limits, **contents)
