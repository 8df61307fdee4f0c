"""The executor service's settings (``codemode serve``)."""

from __future__ import annotations

import hashlib
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

__all__ = ["DEFAULT_TENANT", "ApiKeyConfig", "ExecutorConfig", "LimitsConfig", "hash_api_key"]

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Key ids become log fields and metric labels: short, printable, no spaces or quotes.
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")

#: The tenant of the single ``api_key`` setting (and of every call without authentication).
DEFAULT_TENANT = "default"


def hash_api_key(key: str) -> str:
    """The ``sha256:<hex>`` form of ``key`` that ``api_keys`` holds (``codemode hash-key``).

    A fast hash is enough because keys are random tokens, not passwords: nothing is gained by
    a slow one (bcrypt, argon2), which would cost every request its work factor.
    """
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


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


class ApiKeyConfig(BaseModel):
    """One tenant's key, stored hashed, and what its requests may use.

    Each limit lowers the service's own for this key's requests; unset, the service's applies.
    A YAML entry may be just the hash (``alice: sha256:…``) when the key has no limits.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_hash: str = Field(description="sha256:<64 hex digits> of the key (codemode hash-key).")
    max_concurrent_executions: int | None = Field(
        default=None, ge=1, description="Executions of this key running or queued at once."
    )
    max_executions_per_minute: int | None = Field(
        default=None, ge=1, description="Executions this key may start in any 60 s."
    )
    max_execution_timeout: float | None = Field(default=None, gt=0)
    max_sessions: int | None = Field(
        default=None, ge=0, description="Sessions of this key open at once (0: none)."
    )
    limits: dict[str, float] = Field(
        default_factory=dict, description="Any LimitsConfig fields, each lowering the service's."
    )

    @model_validator(mode="before")
    @classmethod
    def _hash_only(cls, value: Any) -> Any:
        return {"key_hash": value} if isinstance(value, str) else value

    @field_validator("key_hash")
    @classmethod
    def _check_hash(cls, value: str) -> str:
        value = value.strip().lower()
        if not _KEY_HASH.match(value):
            raise ValueError(
                "key_hash must be 'sha256:' and 64 hex digits: the hash of the key, never the "
                "key itself (make one with `codemode hash-key`)"
            )
        return value

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, value: dict[str, float]) -> dict[str, float]:
        for name, number in value.items():
            if name not in LimitsConfig.model_fields:
                raise ValueError(
                    f"{name!r} is not a limit ({', '.join(LimitsConfig.model_fields)})"
                )
            if not number > 0:
                raise ValueError(f"limit {name} must be positive")
        try:
            LimitsConfig.model_validate(value)
        except ValidationError as exc:
            raise ValueError(
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            ) from None
        return value


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
    api_keys: dict[str, ApiKeyConfig] = Field(
        default_factory=dict,
        description="Tenants: key id -> its hashed key and limits. Re-read on SIGHUP; "
        "api_key, if also given, is the tenant 'default'.",
    )
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
    preload_warmup: str | None = Field(
        default=None,
        description="Python the fork server's zygote runs once after the preloads, before it "
        "forks guests, so that the first use of those modules (pandas' first DataFrame …) is "
        "paid once, not in every program; each guest runs it again while it waits in the pool, "
        "so that the copy-on-write copies it makes are off the request's path. Operator code: "
        "it runs in the sandbox, as the preloads do.",
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

    @field_validator("api_keys")
    @classmethod
    def _check_key_ids(cls, value: dict[str, ApiKeyConfig]) -> dict[str, ApiKeyConfig]:
        for key_id in value:
            if not _KEY_ID.match(key_id):
                raise ValueError(
                    f"key id {key_id!r} must be 1-63 letters, digits, '_', '.' or '-', "
                    "starting with a letter or digit"
                )
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.api_key is None and not self.api_keys and not self.insecure_no_auth:
            raise ValueError(
                "no API key: set CODEMODE_API_KEY (or api_key or api_keys in the config file), "
                "or pass --insecure-no-auth to serve without authentication"
            )
        if self.api_key is not None and len(self.api_key.get_secret_value()) < 8:
            raise ValueError("api_key must be at least 8 characters")
        if self.api_key is not None and DEFAULT_TENANT in self.api_keys:
            raise ValueError(
                f"api_keys names {DEFAULT_TENANT!r}, the tenant of api_key: drop api_key "
                f"(CODEMODE_API_KEY) or rename that entry"
            )
        owners: dict[str, str] = {}
        for key_id, key in self.tenant_keys().items():
            if key.key_hash in owners:
                raise ValueError(
                    f"api_keys {owners[key.key_hash]!r} and {key_id!r} have the same key; "
                    "give each tenant its own"
                )
            owners[key.key_hash] = key_id
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

    def tenant_keys(self) -> dict[str, ApiKeyConfig]:
        """Every accepted key by tenant id: ``api_keys``, and ``api_key`` as ``default``."""
        keys = dict(self.api_keys)
        if self.api_key is not None:
            keys[DEFAULT_TENANT] = ApiKeyConfig(
                key_hash=hash_api_key(self.api_key.get_secret_value())
            )
        return keys

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
