"""TLS, mutual TLS and bearer tokens on a real server process, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from ops_harness import ServerProcess
from server_harness import run_cli

from nextchar.client.client import NextCharClient
from nextchar.client.credentials import Credentials
from nextchar.client.errors import Unauthenticated, Unavailable
from nextchar.v1 import admin_pb2
from nextchar.v1 import inference_pb2 as pb

x509 = pytest.importorskip("cryptography.x509", reason="cryptography makes the test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # signed by a CA the server does not trust
    other_client_key: Path


def _issue(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "other_ca", "srv", "cli", "oth")}
    ca = _issue("nextchar test CA", keys["ca"], None, None, ca=True)
    other_ca = _issue("another CA", keys["other_ca"], None, None, ca=True)
    srv = _issue("localhost", keys["srv"], ca.subject, keys["ca"], server=True)
    cli = _issue("client", keys["cli"], ca.subject, keys["ca"])
    oth = _issue("stranger", keys["oth"], other_ca.subject, keys["other_ca"])
    return Pki(_write(d / "ca.pem", ca), _write(d / "server.pem", srv),
               _write(d / "server.key", key=keys["srv"]), _write(d / "client.pem", cli),
               _write(d / "client.key", key=keys["cli"]),
               _write(d / "other.pem", oth), _write(d / "other.key", key=keys["oth"]))


def _tls_channel(pki: Pki, cert: Path | None = None, key: Path | None = None):
    creds = Credentials(tls_ca=pki.ca, tls_cert=cert, tls_key=key)
    return lambda address: grpc.secure_channel(address, creds.channel_credentials())


def test_tls_and_tokens(model_repo: Path, pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = ServerProcess(model_repo, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                           "--auth-token-file", str(token_file), log_path=tmp_path / "server.log",
                           channel=_tls_channel(pki))  # health answers without a token: readiness works
    try:
        with NextCharClient(server.address, credentials=Credentials(token=TOKEN, tls_ca=pki.ca)) as c:
            assert c.generate("lstm", "O say", 10).summary.generated_chars == 10
            assert c.health() == "SERVING"
        for token in (None, "wrong-token"):
            with NextCharClient(server.address, credentials=Credentials(token=token, tls_ca=pki.ca)) as c:
                assert c.health() == "SERVING"  # health is open
                with pytest.raises(Unauthenticated):
                    c.generate("lstm", "O say", 10)
                with pytest.raises(Unauthenticated):
                    list(c.generate_stream("lstm", "O say", 10))
        with pytest.raises(grpc.RpcError) as admin:  # Admin needs the token, from loopback too
            server.admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=10)
        assert admin.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reply = server.admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=10,
                                              metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert list(reply.changes) == []
        plain = NextCharClient(server.address, credentials=Credentials(token=TOKEN), timeout=5)
        with plain, pytest.raises(Unavailable):  # plaintext to a TLS port does not connect
            plain.list_models()
        result = run_cli("generate", "--server", server.address, "--tls-ca", str(pki.ca), "--model", "lstm",
                         "--prompt", "O say", "--max-chars", "12", "--temperature", "0", "--quiet",
                         env={"NEXTCHAR_TOKEN": TOKEN})
        assert result.returncode == 0 and len(result.stdout.rstrip("\n")) == 12, result.stderr
        result = run_cli("models", "--server", server.address, "--tls-ca", str(pki.ca), "--token", "nope")
        assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr
        assert TOKEN not in server.log()
    finally:
        assert server.terminate() == 0


def test_mutual_tls(model_repo: Path, pki: Pki, tmp_path: Path) -> None:
    server = ServerProcess(model_repo, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                           "--tls-client-ca", str(pki.ca), log_path=tmp_path / "server.log",
                           channel=_tls_channel(pki, pki.client_cert, pki.client_key))
    try:
        ok = Credentials(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        with NextCharClient(server.address, credentials=ok) as c:
            assert c.predict_next("lstm", "O say", 1)[0].char
        stranger = Credentials(tls_ca=pki.ca, tls_cert=pki.other_client_cert, tls_key=pki.other_client_key)
        for creds in (Credentials(tls_ca=pki.ca), stranger):  # no client certificate; an untrusted one
            client = NextCharClient(server.address, credentials=creds, timeout=5)
            with client, pytest.raises(Unavailable):
                client.list_models()
    finally:
        assert server.terminate() == 0


def test_generate_request_without_token_is_refused_by_stub_too(model_repo: Path, tmp_path: Path) -> None:
    """Plaintext server with a token from the environment: raw stubs see UNAUTHENTICATED with a reason."""
    server = ServerProcess(model_repo, log_path=tmp_path / "server.log", env={"NEXTCHAR_AUTH_TOKEN": TOKEN})
    try:
        with pytest.raises(grpc.RpcError) as refused:
            request = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O", max_new_chars=2)
            server.stub.Generate(request, timeout=10, metadata=(("authorization", "Basic abc"),))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in refused.value.details()
    finally:
        assert server.terminate() == 0
