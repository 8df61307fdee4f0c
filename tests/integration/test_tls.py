"""TLS and mutual TLS are configuration: certificates in the config files, https:// in the URL."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from codemode import Codemode
from codemode.config import ClientConfig
from codemode.core.errors import ExecutorConnectionError
from tests.helpers import ServerProcess
from tests.integration.conftest import Servers

KEY = "tls-test-key-0123456789"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, and a client certificate."""
    base = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("codemode test CA", ca_key, None)
    ca_crt, _ = _write(base / "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_crt, server_key_path = _write(
        base / "server",
        _issue("localhost", server_key, ("codemode test CA", ca_key), server=True),
        server_key,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_crt, client_key_path = _write(
        base / "client", _issue("app", client_key, ("codemode test CA", ca_key)), client_key
    )
    return {
        "ca": ca_crt,
        "server_crt": server_crt,
        "server_key": server_key_path,
        "client_crt": client_crt,
        "client_key": client_key_path,
    }


def _start(servers: Servers, tmp_path: Path, pki: dict[str, Path], mtls: bool) -> ServerProcess:
    config = tmp_path / "executor.yaml"
    lines = [f"tls_cert_file: {pki['server_crt']}", f"tls_key_file: {pki['server_key']}"]
    if mtls:
        lines.append(f"tls_client_ca_file: {pki['ca']}")
    config.write_text("\n".join(lines) + "\n")
    return servers.start(api_key=KEY, extra_args=["--config", str(config)])


@pytest.fixture
def tls_server(servers: Servers, tmp_path: Path, pki: dict[str, Path]) -> Iterator[ServerProcess]:
    """An executor serving TLS only."""
    server = _start(servers, tmp_path, pki, mtls=False)
    yield server
    servers.stop(server)


@pytest.fixture
def mtls_server(servers: Servers, tmp_path: Path, pki: dict[str, Path]) -> Iterator[ServerProcess]:
    """An executor that also requires a client certificate signed by the test CA."""
    server = _start(servers, tmp_path, pki, mtls=True)
    yield server
    servers.stop(server)


def _port(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def test_https_url_runs_over_tls(tls_server: ServerProcess, pki: dict[str, Path]) -> None:
    """An https:// executor_url with the CA file runs a program over TLS."""
    config = ClientConfig(
        executor_url=f"https://localhost:{_port(tls_server)}",
        executor_api_key=KEY,
        tls_ca_file=pki["ca"],
    )
    async with Codemode.from_client_config(config) as codemode:
        assert await codemode.execute_async("result = 2 + 2") == "4"


async def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server: ServerProcess) -> None:
    """An http:// client against a TLS-only executor fails to connect, and nothing runs."""
    config = ClientConfig(
        executor_url=f"http://localhost:{_port(tls_server)}",
        executor_api_key=KEY,
        connect_timeout=1,
        max_retries=0,
    )
    async with Codemode.from_client_config(config) as codemode:
        with pytest.raises(ExecutorConnectionError) as caught:
            await codemode.execute_async("result = 1")
    assert caught.value.may_have_run is False


async def test_mutual_tls_needs_a_client_certificate(
    mtls_server: ServerProcess, pki: dict[str, Path]
) -> None:
    """With tls_client_ca_file set, a client with a certificate runs and one without cannot."""
    url = f"https://localhost:{_port(mtls_server)}"
    good = ClientConfig(
        executor_url=url,
        executor_api_key=KEY,
        tls_ca_file=pki["ca"],
        tls_cert_file=pki["client_crt"],
        tls_key_file=pki["client_key"],
    )
    async with Codemode.from_client_config(good) as codemode:
        assert await codemode.execute_async("result = 'mtls'") == '"mtls"'
    anonymous = ClientConfig(
        executor_url=url,
        executor_api_key=KEY,
        tls_ca_file=pki["ca"],
        connect_timeout=1,
        max_retries=0,
    )
    async with Codemode.from_client_config(anonymous) as codemode:
        with pytest.raises(ExecutorConnectionError):
            await codemode.execute_async("result = 1")
