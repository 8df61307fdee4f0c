"""ClientConfig and ExecutorConfig: precedence, validation messages, limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from codemode import Codemode
from codemode.config import ClientConfig, ConfigError, ExecutorConfig, LimitsConfig
from codemode.config.executor import ApiKeyConfig, hash_api_key


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


# ------------------------------------------------------------------------------------------
# api_keys: tenants with hashed keys

KEY_A = "alpha-key-0123456789abcdef"
KEY_B = "beta-key-0123456789abcdef"


def test_api_keys_take_a_hash_alone_or_with_limits(tmp_path: Path) -> None:
    """An entry is the hash alone or a mapping with limits; api_key adds tenant 'default'."""
    path = write(
        tmp_path / "executor.yaml",
        f"api_key: {KEY_A}-default\n"
        "api_keys:\n"
        f"  alpha: {hash_api_key(KEY_A)}\n"
        "  beta:\n"
        f"    key_hash: {hash_api_key(KEY_B).upper().replace('SHA256:', 'sha256:')}\n"
        "    max_concurrent_executions: 2\n"
        "    max_executions_per_minute: 30\n"
        "    max_execution_timeout: 5\n"
        "    max_sessions: 0\n"
        "    limits: {memory_bytes: 67108864, cpu_seconds: 2}\n",
    )
    config = ExecutorConfig.load(path)
    keys = config.tenant_keys()
    assert sorted(keys) == ["alpha", "beta", "default"]
    assert keys["alpha"] == ApiKeyConfig(key_hash=hash_api_key(KEY_A))
    assert keys["default"].key_hash == hash_api_key(f"{KEY_A}-default")
    beta = keys["beta"]
    assert beta.key_hash == hash_api_key(KEY_B)  # upper-case hex is taken, stored lower
    assert (beta.max_concurrent_executions, beta.max_executions_per_minute) == (2, 30)
    assert (beta.max_execution_timeout, beta.max_sessions) == (5.0, 0)
    assert beta.limits == {"memory_bytes": 64 << 20, "cpu_seconds": 2.0}


def test_hash_api_key_is_sha256_hex() -> None:
    """hash_api_key gives 'sha256:' and the key's SHA-256 in 64 lower-case hex digits."""
    digest = hash_api_key("abc")
    assert digest == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_api_keys_alone_need_no_api_key() -> None:
    """api_keys without api_key is a configuration with authentication, no 'default' tenant."""
    config = ExecutorConfig.load(api_keys={"alpha": hash_api_key(KEY_A)})
    assert config.api_key is None
    assert list(config.tenant_keys()) == ["alpha"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"a": KEY_A}, "key_hash must be 'sha256:' and 64 hex digits"),
        ({"a": "sha256:" + "ab" * 31}, "key_hash must be 'sha256:' and 64 hex digits"),
        ({"a": "md5:" + "ab" * 32}, "key_hash must be 'sha256:' and 64 hex digits"),
        ({"a": "sha256:" + "zz" * 32}, "key_hash must be 'sha256:' and 64 hex digits"),
        ({"a": {"limits": {}}}, "api_keys.a.key_hash: Field required"),
        ({"a b": hash_api_key(KEY_A)}, "key id 'a b' must be 1-63 letters"),
        ({"-a": hash_api_key(KEY_A)}, "key id '-a' must be 1-63 letters"),
        ({"a" * 64: hash_api_key(KEY_A)}, "must be 1-63 letters"),
        (
            {"a": {"key_hash": hash_api_key(KEY_A), "limits": {"memory": 1}}},
            "'memory' is not a limit (cpu_seconds, memory_bytes",
        ),
        (
            {"a": {"key_hash": hash_api_key(KEY_A), "limits": {"memory_bytes": 1024}}},
            "memory_bytes: Input should be greater than or equal to 33554432",
        ),
        (
            {"a": {"key_hash": hash_api_key(KEY_A), "limits": {"max_file_bytes": 0}}},
            "limit max_file_bytes must be positive",
        ),
        (
            {"a": {"key_hash": hash_api_key(KEY_A), "max_concurrent_executions": 0}},
            "api_keys.a.max_concurrent_executions: Input should be greater than or equal to 1",
        ),
        (
            {"a": {"key_hash": hash_api_key(KEY_A), "max_executions_per_minute": -1}},
            "api_keys.a.max_executions_per_minute: Input should be greater than or equal to 1",
        ),
        (
            {"a": {"key_hash": hash_api_key(KEY_A), "max_execution_timeout": 0}},
            "api_keys.a.max_execution_timeout: Input should be greater than 0",
        ),
        (
            {"a": {"key_hash": hash_api_key(KEY_A), "rate": 5}},
            "api_keys.a.rate: Extra inputs are not permitted",
        ),
        (
            {"a": hash_api_key(KEY_A), "b": hash_api_key(KEY_A)},
            "api_keys 'a' and 'b' have the same key",
        ),
    ],
    ids=[
        "the-key-itself",
        "short-digest",
        "other-algorithm",
        "not-hex",
        "no-hash",
        "id-with-space",
        "id-leading-dash",
        "id-too-long",
        "unknown-limit",
        "limit-below-its-minimum",
        "limit-zero",
        "concurrency-zero",
        "rate-negative",
        "timeout-zero",
        "unknown-setting",
        "one-key-two-ids",
    ],
)
def test_bad_api_keys_are_refused_naming_the_entry(entry: dict[str, object], message: str) -> None:
    """A bad hash, id, limit or setting in api_keys raises ConfigError saying which and why."""
    with pytest.raises(ConfigError) as info:
        ExecutorConfig.load(api_keys=entry)
    assert message in str(info.value)


def test_a_key_id_given_twice_in_the_file_is_refused(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys; the config file refuses them, naming the line."""
    path = write(
        tmp_path / "executor.yaml",
        "api_keys:\n"
        f"  alpha: {hash_api_key(KEY_A)}\n"
        f"  beta: {hash_api_key(KEY_B)}\n"
        f"  alpha: {hash_api_key(KEY_B + 'x')}\n",
    )
    with pytest.raises(ConfigError) as info:
        ExecutorConfig.load(path)
    assert "duplicate key 'alpha'" in str(info.value)
    assert "line 4" in str(info.value)


def test_api_key_and_api_keys_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both may be given (api_key is tenant 'default'), but not with an api_keys 'default'
    entry, nor with api_key's own key under another id."""
    monkeypatch.setenv("CODEMODE_API_KEY", KEY_A)
    both = ExecutorConfig.load(api_keys={"beta": hash_api_key(KEY_B)})
    assert sorted(both.tenant_keys()) == ["beta", "default"]
    with pytest.raises(ConfigError, match="api_keys names 'default', the tenant of api_key"):
        ExecutorConfig.load(api_keys={"default": hash_api_key(KEY_B)})
    with pytest.raises(ConfigError, match="api_keys 'alpha' and 'default' have the same key"):
        ExecutorConfig.load(api_keys={"alpha": hash_api_key(KEY_A)})


def test_api_keys_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """CODEMODE_API_KEYS holds the same mapping as JSON."""
    monkeypatch.setenv(
        "CODEMODE_API_KEYS",
        f'{{"alpha": "{hash_api_key(KEY_A)}", "beta": {{"key_hash": "{hash_api_key(KEY_B)}", '
        '"max_concurrent_executions": 3}}',
    )
    keys = ExecutorConfig.load().tenant_keys()
    assert keys["alpha"].key_hash == hash_api_key(KEY_A)
    assert keys["beta"].max_concurrent_executions == 3
