"""ClientConfig and ExecutorConfig: precedence, validation messages, limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from codemode import Codemode
from codemode.config import ClientConfig, ConfigError, ExecutorConfig, LimitsConfig


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_client_defaults() -> None:
    """With nothing set, the client targets http://localhost:8001 with documented defaults."""
    config = ClientConfig()
    assert config.executor_url == "http://localhost:8001"
    assert config.executor_api_key is None
    assert config.timeout == 30.0
    assert config.max_retries == 3


def test_client_env_is_read_and_explicit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """CODEMODE_* variables fill fields; an explicit argument beats the variable."""
    monkeypatch.setenv("CODEMODE_EXECUTOR_URL", "http://env-host:9000")
    monkeypatch.setenv("CODEMODE_EXECUTOR_API_KEY", "env-key")
    monkeypatch.setenv("CODEMODE_TIMEOUT", "12.5")
    config = ClientConfig(executor_url="http://arg-host:9001")
    assert config.executor_url == "http://arg-host:9001"
    assert config.api_key_value() == "env-key"
    assert config.timeout == 12.5


def test_client_yaml_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """from_yaml reads the file's fields; an environment variable beats the file."""
    path = write(
        tmp_path / "codemode.yaml",
        "executor_url: http://file-host:7000\nexecutor_api_key: file-key\ntimeout: 5\n",
    )
    config = ClientConfig.from_yaml(path)
    assert (config.executor_url, config.api_key_value(), config.timeout) == (
        "http://file-host:7000",
        "file-key",
        5.0,
    )
    monkeypatch.setenv("CODEMODE_TIMEOUT", "9")
    assert ClientConfig.from_yaml(path).timeout == 9.0
    assert Codemode.from_config(path).config.executor_url == "http://file-host:7000"


def test_client_key_is_not_shown() -> None:
    """The API key never appears in the config's repr."""
    config = ClientConfig(executor_api_key="s3cret-value")
    assert "s3cret-value" not in repr(config)
    assert config.api_key_value() == "s3cret-value"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"executor_url": "ftp://x:1"}, "executor_url 'ftp://x:1' must start with one of"),
        ({"timeout": 0}, "timeout: Input should be greater than 0"),
        ({"max_retries": 99}, "max_retries: Input should be less than or equal to 20"),
        ({"executor_urll": "http://x:1"}, "executor_urll: Extra inputs are not permitted"),
    ],
    ids=["scheme", "timeout", "retries", "unknown-field"],
)
def test_client_validation_names_the_setting(values: dict[str, object], message: str) -> None:
    """An invalid value raises ConfigError naming the field and what is wrong."""
    with pytest.raises(ConfigError) as info:
        ClientConfig.load(**values)
    assert str(info.value).startswith("invalid Codemode configuration: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config file"),
        ("a: [unclosed", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping of settings, not list"),
        ("timeout: -1\n", "timeout: Input should be greater than 0"),
        ("no_such_setting: 1\n", "no_such_setting: Extra inputs are not permitted"),
    ],
    ids=["missing", "not-yaml", "not-mapping", "invalid-value", "unknown-key"],
)
def test_client_yaml_errors(tmp_path: Path, content: str | None, message: str) -> None:
    """A missing, malformed or invalid YAML file raises ConfigError saying what is wrong."""
    path = tmp_path / "codemode.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=None) as info:
        ClientConfig.from_yaml(path)
    assert message in str(info.value)


def test_executor_refuses_without_a_key() -> None:
    """ExecutorConfig without api_key raises ConfigError naming CODEMODE_API_KEY and the opt-out."""
    with pytest.raises(ConfigError) as info:
        ExecutorConfig.load()
    assert "CODEMODE_API_KEY" in str(info.value)
    assert "--insecure-no-auth" in str(info.value)


def test_executor_insecure_no_auth_allows_no_key() -> None:
    """insecure_no_auth=True is the explicit opt-out from a key."""
    config = ExecutorConfig.load(insecure_no_auth=True)
    assert config.api_key is None


def test_executor_rejects_a_short_key() -> None:
    """A key shorter than 8 characters is refused."""
    with pytest.raises(ConfigError, match="at least 8 characters"):
        ExecutorConfig.load(api_key="short")


def test_executor_tls_needs_cert_and_key(tmp_path: Path) -> None:
    """A TLS certificate without its key (or the reverse) is refused."""
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file must be given together"):
        ExecutorConfig.load(api_key="long-enough-key", tls_cert_file=tmp_path / "cert.pem")


def test_executor_metrics_are_off_by_default_and_bind_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No metrics port unless one is set (CODEMODE_METRICS_PORT works); the host is loopback."""
    config = ExecutorConfig.load(insecure_no_auth=True)
    assert (config.metrics_port, config.metrics_host) == (None, "127.0.0.1")
    monkeypatch.setenv("CODEMODE_METRICS_PORT", "9464")
    monkeypatch.setenv("CODEMODE_METRICS_HOST", "10.0.0.7")
    config = ExecutorConfig.load(insecure_no_auth=True)
    assert (config.metrics_port, config.metrics_host) == (9464, "10.0.0.7")
    assert ExecutorConfig.load(insecure_no_auth=True, metrics_port=0).metrics_port == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metrics_port": 65536}, "metrics_port: Input should be less than or equal to 65535"),
        ({"metrics_port": -1}, "metrics_port: Input should be greater than or equal to 0"),
        ({"metrics_port": "http"}, "metrics_port: Input should be a valid integer"),
        ({"metrics_port": 8001}, "metrics_port 8001 is the service's port; pick another"),
        ({"metrics_host": ""}, "metrics_host: String should have at least 1 character"),
    ],
    ids=["too-high", "negative", "not-a-number", "the-service-port", "empty-host"],
)
def test_executor_metrics_settings_are_checked(values: dict[str, object], message: str) -> None:
    """A bad metrics port or host raises ConfigError naming the setting and what is wrong."""
    with pytest.raises(ConfigError) as info:
        ExecutorConfig.load(insecure_no_auth=True, **values)
    assert message in str(info.value)


def test_executor_precedence_explicit_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ExecutorConfig prefers an explicit value to the environment, and that to the file."""
    path = write(
        tmp_path / "executor.yaml",
        "api_key: file-key-123\nport: 7001\nmax_queued_executions: 0\nqueue_timeout: 3\n",
    )
    monkeypatch.setenv("CODEMODE_PORT", "7002")
    monkeypatch.setenv("CODEMODE_QUEUE_TIMEOUT", "4")
    monkeypatch.setenv("CODEMODE_LIMITS__MEMORY_BYTES", str(64 << 20))
    config = ExecutorConfig.load(path, queue_timeout=5, host=None)
    assert config.api_key is not None
    assert config.api_key.get_secret_value() == "file-key-123"
    assert config.max_queued_executions == 0  # file
    assert config.port == 7002  # env over file
    assert config.queue_timeout == 5  # explicit over env; None values are skipped
    assert config.host == "127.0.0.1"
    assert config.limits.memory_bytes == 64 << 20  # nested env


def test_limits_lowered_only_lowers() -> None:
    """lowered() takes each positive requested value that is lower, and ignores the rest."""
    limits = LimitsConfig()
    lowered = limits.lowered(
        {
            "cpu_seconds": 2.5,
            "memory_bytes": limits.memory_bytes * 4,
            "max_output_bytes": 4096,
            "max_processes": 0,
        }
    )
    assert lowered.cpu_seconds == 2.5
    assert lowered.memory_bytes == limits.memory_bytes
    assert lowered.max_output_bytes == 4096
    assert isinstance(lowered.max_output_bytes, int)
    assert lowered.max_processes == limits.max_processes
    assert limits.cpu_seconds == LimitsConfig().cpu_seconds  # the original is unchanged


def test_limits_lowered_with_nothing_lower_is_the_same_object() -> None:
    """Requesting no lower value returns the limits unchanged."""
    limits = LimitsConfig()
    assert limits.lowered({}) is limits
    assert limits.lowered({"cpu_seconds": 10_000.0, "memory_bytes": -5}) is limits
