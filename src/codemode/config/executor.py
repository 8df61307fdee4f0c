"""The executor service's settings (``codemode serve``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode, SettingsConfigDict

from codemode.config import _defaults as d
from codemode.config._yaml import ConfigError, YamlSettings, with_yaml_file
from codemode.config.client import _describe

__all__ = ["ExecutorConfig", "LimitsConfig"]

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LimitsConfig(BaseModel):
    """Per-execution limits. A request may lower each of them, never raise one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_seconds: float = Field(default=d.CPU_SECONDS, gt=0)
    memory_bytes: int = Field(default=d.MEMORY_BYTES, ge=32 * 1024 * 1024)
    max_processes: int = Field(default=d.MAX_PROCESSES, ge=1)
    max_file_bytes: int = Field(default=d.MAX_FILE_BYTES, ge=0)
    max_open_files: int = Field(default=d.MAX_OPEN_FILES, ge=16)
    max_output_bytes: int = Field(default=d.MAX_OUTPUT_BYTES, ge=1024)
    max_result_bytes: int = Field(default=d.MAX_RESULT_BYTES, ge=1024)
    tmpfs_bytes: int = Field(default=d.TMPFS_BYTES, ge=1024 * 1024)
    max_input_bytes: int = Field(default=d.MAX_INPUT_BYTES, ge=0)
    max_output_files_bytes: int = Field(default=d.MAX_OUTPUT_FILES_BYTES, ge=0)

    def lowered(self, requested: dict[str, float]) -> LimitsConfig:
        """These limits, with each positive requested value taken where it is lower."""
        changes: dict[str, Any] = {}
        for name, value in requested.items():
            current = getattr(self, name)
            if value and 0 < value < current:
                changes[name] = type(current)(value)
        return self.model_copy(update=changes) if changes else self


class ExecutorConfig(YamlSettings):
    """How ``codemode serve`` listens, authenticates, admits and isolates.

    Environment: ``CODEMODE_API_KEY``, ``CODEMODE_PORT``, ``CODEMODE_LIMITS__MEMORY_BYTES`` …
    """

    model_config = SettingsConfigDict(
        env_prefix="CODEMODE_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    host: str = d.DEFAULT_HOST
    port: int = Field(default=d.DEFAULT_PORT, ge=0, le=65535)
    api_key: SecretStr | None = None
    insecure_no_auth: bool = False
    isolation: Literal["auto", "forkserver", "bwrap", "process"] = Field(
        default="auto",
        description="auto: forkserver, refusing to start if the host cannot enforce it; "
        "forkserver: guests forked ahead from one sandboxed zygote, each in fresh namespaces; "
        "bwrap: a one-shot bubblewrap sandbox per execution; "
        "process: plain child processes, no isolation (warns).",
    )
    max_concurrent_executions: int = Field(default=d.MAX_CONCURRENT_EXECUTIONS, ge=1)
    max_queued_executions: int = Field(default=d.MAX_QUEUED_EXECUTIONS, ge=0)
    queue_timeout: float = Field(default=d.QUEUE_TIMEOUT_S, ge=0)
    shutdown_grace: float = Field(default=d.SHUTDOWN_GRACE_S, ge=0)
    default_execution_timeout: float = Field(default=d.EXECUTION_TIMEOUT_S, gt=0)
    max_execution_timeout: float = Field(default=d.MAX_EXECUTION_TIMEOUT_S, gt=0)
    max_code_bytes: int = Field(default=4 * d.MAX_CODE_LENGTH, gt=0)
    max_sessions: int = Field(
        default=d.MAX_SESSIONS,
        ge=0,
        description="Sessions open at once (each holds a sandbox); more are refused.",
    )
    default_session_ttl: float = Field(default=d.SESSION_TTL_S, gt=0)
    max_session_ttl: float = Field(default=d.MAX_SESSION_TTL_S, gt=0)
    session_idle_timeout: float = Field(
        default=d.SESSION_IDLE_TIMEOUT_S,
        gt=0,
        description="A session with no execution for this long ends, seconds.",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    sandbox_venv: Path | None = Field(
        default=None,
        description="A virtualenv made with the sandbox's Python whose site-packages every "
        "sandbox may import (bound read-only; nothing else of it is visible).",
    )
    preload_modules: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Modules the sandbox imports once, before it forks guests "
        "(environment: a comma-separated list).",
    )
    sandbox_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables every guest gets, over the defaults (HOME, USER, "
        "LOGNAME, and OPENBLAS_NUM_THREADS, OMP_NUM_THREADS … set to 1).",
    )
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(
        default=None, description="Require client certs (mTLS)."
    )
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics at http://metrics_host:metrics_port/metrics "
        "(0 picks a free port); None, the default, serves none.",
    )
    metrics_host: str = Field(
        default=d.DEFAULT_METRICS_HOST,
        min_length=1,
        description="Address the metrics endpoint binds. It has no authentication, so it is "
        "loopback unless set (0.0.0.0 for a Prometheus outside the host or container).",
    )

    @field_validator("preload_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            value = tuple(str(v).strip() for v in value if str(v).strip())
            for name in value:
                if not _MODULE.match(name):
                    raise ValueError(f"{name!r} is not a module name")
        return value

    @field_validator("sandbox_env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.match(name) or "\0" in text:
                raise ValueError(f"{name!r} cannot be set in the sandbox's environment")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.api_key is None and not self.insecure_no_auth:
            raise ValueError(
                "no API key: set CODEMODE_API_KEY (or api_key in the config file), "
                "or pass --insecure-no-auth to serve without authentication"
            )
        if self.api_key is not None and len(self.api_key.get_secret_value()) < 8:
            raise ValueError("api_key must be at least 8 characters")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if (
            self.metrics_port
            and self.metrics_port == self.port
            and not self.host.startswith("unix:")
        ):
            raise ValueError(
                f"metrics_port {self.metrics_port} is the service's port; pick another"
            )
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ExecutorConfig:
        """Settings from ``overrides`` (``None`` values skipped), the environment, then ``path``.

        Raises :class:`ConfigError` naming every invalid setting.
        """
        explicit = {k: v for k, v in overrides.items() if v is not None}
        target = cls if path is None else with_yaml_file(cls, path)
        try:
            return target(**explicit)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
