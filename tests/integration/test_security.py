"""The data plane with CURVE and the control plane behind a token, against real servers and sockets:
who gets in, who is refused (fast, typed), what crosses the wire, and what a server refuses to start."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import zmq.auth

from stoker.client import AuthenticationError
from stoker.client.protocol.keys import generate
from tests.helpers import fetch_epoch, http_json, metrics, run_cli, wait_until
from tests.relay import DelayRelay

pytestmark = pytest.mark.slow

FAST_S = 10.0  # "within seconds": well under the client's 60 s timeout


class Keys:
    """A server key pair, an authorised client, a stranger, and the folder the server trusts."""

    def __init__(self, root: Path) -> None:
        self.server_public, self.server_secret = generate(root / "server", "server")
        self.client_public, self.client_secret = generate(root / "client", "client")
        self.stranger_public, self.stranger_secret = generate(root / "stranger", "stranger")
        self.authorized = root / "authorized"
        self.authorized.mkdir()
        shutil.copy(self.client_public, self.authorized / "client.key")

    @property
    def serve_args(self) -> tuple[str, ...]:
        return ("--curve-secret-key", str(self.server_secret), "--authorized-clients", str(self.authorized))

    def client(self, secret: Path | None = None) -> dict[str, str]:
        return {"server_key": str(self.server_public), "client_key": str(secret or self.client_secret)}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def indices_of(batches) -> list[int]:
    return [int(i) for _, _, idx in batches for i in idx]


def refused_within_seconds(endpoint: str, **options) -> AuthenticationError:
    started = time.monotonic()
    with pytest.raises(AuthenticationError) as info:
        fetch_epoch(endpoint, **options)
    assert time.monotonic() - started < FAST_S, "refused by a timeout, not by the handshake"
    return info.value


def test_an_authorised_client_streams_an_exactly_once_epoch(cluster, keys: Keys, monkeypatch) -> None:
    server = cluster.start(*keys.serve_args)
    got = fetch_epoch(server.data, **keys.client())
    assert Counter(indices_of(got)) == Counter(range(48))
    # The same keys from the environment; the server's key as its Z85 text this time.
    server_public = zmq.auth.load_certificate(str(keys.server_public))[0].decode()
    monkeypatch.setenv("STOKER_SERVER_KEY", server_public)
    monkeypatch.setenv("STOKER_CLIENT_KEY_FILE", str(keys.client_secret))
    again = fetch_epoch(server.data)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, again, strict=True))
    assert http_json(server.http + "/status")[1]["security"] == {
        "curve": True,
        "authorized_clients": 1,
        "refused": {"unknown_key": 0, "handshake": 0},
    }


def test_unauthorised_clients_fail_fast_and_the_server_keeps_serving_others(cluster, keys: Keys) -> None:
    server = cluster.start(*keys.serve_args)
    no_keys = refused_within_seconds(server.data)
    assert "requires CURVE keys" in str(no_keys)
    wrong_server = refused_within_seconds(
        server.data, server_key=str(keys.stranger_public), client_key=str(keys.client_secret)
    )
    assert "server_key" in str(wrong_server)
    stranger = refused_within_seconds(server.data, **keys.client(keys.stranger_secret))
    assert "not among the server's authorised clients" in str(stranger)

    # The server carries on for those who belong, and says what it refused without naming keys.
    assert Counter(indices_of(fetch_epoch(server.data, **keys.client()))) == Counter(range(48))
    assert http_json(server.http + "/healthz")[0] == 200
    refused = http_json(server.http + "/status")[1]["security"]["refused"]
    assert refused["unknown_key"] >= 1 and refused["handshake"] >= 2
    wait_until(
        lambda: metrics(server.http).get("stoker_refused_connections|reason=unknown_key", 0) >= 1,
        what="the refusal in /metrics (gauges refresh twice a second)",
    )
    logs = cluster.logs()
    assert "refused" in logs
    for path in (keys.client_public, keys.stranger_public, keys.server_public):
        assert zmq.auth.load_certificate(str(path))[0].decode() not in logs


def test_keys_added_and_revoked_take_effect_without_a_restart(cluster, keys: Keys) -> None:
    server = cluster.start(*keys.serve_args)
    newcomer = keys.client(keys.stranger_secret)
    refused_within_seconds(server.data, **newcomer)
    shutil.copy(keys.stranger_public, keys.authorized / "stranger.key")
    assert len(fetch_epoch(server.data, **newcomer)) == 12
    (keys.authorized / "stranger.key").unlink()
    refused_within_seconds(server.data, **newcomer)
    assert len(fetch_epoch(server.data, **keys.client())) == 12, "the others are untouched"
    assert http_json(server.http + "/status")[1]["security"]["authorized_clients"] == 1


def first_sample_bytes(batches) -> list[bytes]:
    """Slices of the first few samples' pixels exactly as the wire carries them: the layout the client
    asked for (a contiguous NCHW tensor here), uint8."""
    wire = batches[0][0].contiguous().numpy()
    return [wire[i].tobytes()[4096 : 4096 + 64] for i in range(3)]


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_with_curve_the_wire_carries_no_pixel_bytes(cluster, keys: Keys, curve: bool) -> None:
    server = cluster.start(*(keys.serve_args if curve else ()))
    options = keys.client() if curve else {}
    with DelayRelay.to(server.data, capture=True) as relay:
        batches = fetch_epoch(relay.tcp_endpoint, **options)
        assert Counter(indices_of(batches)) == Counter(range(48))
        found = [relay.contains(piece) for piece in first_sample_bytes(batches)]
    # Without CURVE an eavesdropper reads the pixels (which shows the check can see them at all).
    assert found == ([False] * 3 if curve else [True] * 3)


def test_a_non_loopback_bind_without_keys_is_refused(cluster, keys: Keys) -> None:
    result = run_cli(
        "serve", "--dataset", "demo=server/demo-data", "--bind", "tcp://0.0.0.0:0", "--http", "127.0.0.1:0",
        timeout_s=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "without CURVE keys" in result.stderr and "--allow-unauthenticated" in result.stderr
    # With keys it serves; the operator may also opt out, loudly.
    secured = cluster.start(*keys.serve_args, bind="tcp://0.0.0.0:0")
    loopback = secured.data.replace("0.0.0.0", "127.0.0.1")
    assert len(fetch_epoch(loopback, **keys.client())) == 12
    cluster.start("--allow-unauthenticated", bind="tcp://0.0.0.0:0")
    assert "without authentication or encryption" in cluster.logs()


def test_http_reads_need_the_token_off_loopback(cluster, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-for-tests\n")
    server = cluster.start("--http-token-file", str(token_file), env_http="0.0.0.0:0")
    base = server.http.replace("0.0.0.0", "127.0.0.1")
    for path in ("/healthz", "/readyz"):
        assert http_json(base + path)[0] == 200, path
    for path in ("/status", "/metrics", "/config", "/", "/openapi.json", "/docs"):
        assert http_json(base + path)[0] in (401, 404), path
        assert http_json(base + path, token="wrong")[0] in (401, 404), path
    for path in ("/status", "/metrics", "/config", "/"):
        assert http_json(base + path, token="t0ken-for-tests")[0] == 200, path
    assert run_cli("status", base, timeout_s=60).returncode == 1
    listed = run_cli("status", base, "--token-file", str(token_file), timeout_s=60)
    assert listed.returncode == 0, listed.stderr
    shown = [http_json(base + path, token="t0ken-for-tests")[1] for path in ("/status", "/config")]
    assert "t0ken-for-tests" not in repr(shown) + cluster.logs()

    public = cluster.start("--http-token-file", str(token_file), "--http-public-reads", env_http="0.0.0.0:0")
    base = public.http.replace("0.0.0.0", "127.0.0.1")
    assert http_json(base + "/status")[0] == 200
    assert http_json(base + "/config", "PATCH", {"max_prefetch": 3})[0] == 401, "changes always need the token"


def test_https_when_given_a_certificate(cluster, tmp_path: Path) -> None:
    import ssl
    import urllib.request

    cert, key = self_signed(tmp_path)
    server = cluster.start("--http-tls-cert", str(cert), "--http-tls-key", str(key))
    assert server.http.startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(server.http + "/healthz", context=context, timeout=10) as response:
        assert response.status == 200


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
