"""The SDK's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from codemode.config import _defaults as d
from codemode.config._yaml import ConfigError, YamlSettings, with_yaml_file

__all__ = ["ClientConfig", "ConfigError"]

_SCHEMES = ("http", "https", "unix", "dns", "ipv4", "ipv6")


class ClientConfig(YamlSettings):
    """How the SDK reaches an executor and how patient it is.

    Every field can come from the environment as ``CODEMODE_<FIELD>`` (for example
    ``CODEMODE_EXECUTOR_URL``, ``CODEMODE_EXECUTOR_API_KEY``); explicit arguments win.
    Times are in seconds.
    """

    model_config = SettingsConfigDict(
        env_prefix="CODEMODE_", extra="forbid", frozen=True, validate_default=True
    )

    executor_url: str = Field(
        default=d.DEFAULT_EXECUTOR_URL,
        description="http://host:port, https://host:port, unix:///path, dns:///name:port, "
        "or several comma-separated http(s) addresses balanced round robin.",
    )
    executor_api_key: SecretStr | None = Field(
        default=None, description="Bearer key of the executor; None for an executor without auth."
    )
    timeout: float = Field(
        default=d.EXECUTION_TIMEOUT_S, gt=0, description="Default execution timeout, seconds."
    )
    connect_timeout: float = Field(default=d.CONNECT_TIMEOUT_S, gt=0)
    tool_timeout: float = Field(
        default=d.TOOL_TIMEOUT_S, gt=0, description="Per tool call, seconds."
    )
    max_retries: int = Field(default=d.MAX_RETRIES, ge=0, le=20)
    retry_backoff_base: float = Field(default=d.RETRY_BACKOFF_BASE_S, ge=0)
    retry_backoff_max: float = Field(default=d.RETRY_BACKOFF_MAX_S, ge=0)
    max_code_length: int = Field(default=d.MAX_CODE_LENGTH, gt=0, description="Characters.")
    failover: Literal["replay", "never"] = Field(
        default="replay",
        description="With several executors: re-run an execution whose executor died on "
        "another one, its tool calls answered from the journal (none runs twice); 'never' "
        "raises ExecutorConnectionError(may_have_run=True) instead.",
    )
    max_pauses: int = Field(
        default=20,
        ge=0,
        description="Approvals one execution may wait for; past them a call needing one is "
        "refused (PermissionError in the program).",
    )
    paused_ttl: float = Field(
        default=86400.0,
        gt=0,
        description="Seconds a paused execution can be resumed; later resume() refuses it.",
    )
    journal_path: Path | None = Field(
        default=None,
        description="SQLite file of tool-call journals and paused executions, kept across "
        "restarts; None keeps them in memory.",
    )
    tls_ca_file: Path | None = Field(default=None, description="PEM roots for https:// URLs.")
    tls_cert_file: Path | None = Field(default=None, description="Client certificate (mTLS).")
    tls_key_file: Path | None = Field(default=None, description="Client key (mTLS).")

    @field_validator("executor_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        for part in value.split(","):
            scheme = urlsplit(part.strip()).scheme
            if scheme not in _SCHEMES:
                raise ValueError(
                    f"executor_url {part.strip()!r} must start with one of "
                    + ", ".join(f"{s}://" for s in _SCHEMES)
                )
        return value

    @classmethod
    def load(cls, **values: Any) -> Self:
        """Build a config, turning validation errors into one :class:`ConfigError`."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Read settings from a YAML file whose keys are this class's fields.

        Environment variables win over the file, as explicit arguments win over both.
        """
        target = with_yaml_file(cls, path)
        try:
            return target()
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def api_key_value(self) -> str | None:
        """The key in clear, for the one place that sends it."""
        return None if self.executor_api_key is None else self.executor_api_key.get_secret_value()


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "invalid Codemode configuration: " + "; ".join(parts)
