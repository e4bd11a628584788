"""The object-store module against a real S3-compatible server (moto, a subprocess on loopback), a
delaying relay in front of it, and scripted HTTP servers for failures and credential endpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import pickle
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stoker.server.data.locators import ObjectMissing, StoreUnavailable
from stoker.server.data.stores import (
    ObjectInfo,
    StoreConfig,
    clear_stores,
    parse_s3_url,
    read_object,
    store_for,
)
from tests.helpers import DEFAULTS
from tests.s3 import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    DelayRelay,
    MotoServer,
    Reply,
    ScriptedServer,
    Seen,
    make_bucket,
    put_objects,
)

pytestmark = pytest.mark.slow  # starts the moto server (once per session)

FUTURE_TIMEOUT_S = 30.0
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
FOUND = Reply(200, {"ETag": '"e7a"', "Last-Modified": LAST_MODIFIED, "Content-Length": "5"})
ROLE_CREDENTIALS = {
    "AccessKeyId": "ASIAROLEKEYSTOKER001",
    "SecretAccessKey": "role-secret-stoker",
    "Token": "role-session-token",
    "Expiration": "2099-01-01T00:00:00Z",
    "Code": "Success",
}


def signer(seen: Seen) -> str:
    """The access key id that signed a request (SigV4's ``Credential=KEY/date/region/...``)."""
    return seen.headers["authorization"].split("Credential=", 1)[1].split("/", 1)[0]


def config(**changes: float) -> StoreConfig:
    """The settings' store config with ``changes``."""
    return dataclasses.replace(DEFAULTS.store_config, **changes)


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket/a/b c+%.jpg") == ("bucket", "a/b c+%.jpg")
    assert parse_s3_url("s3://my.bucket-1/") == ("my.bucket-1", "")
    assert parse_s3_url("s3://my_bucket") == ("my_bucket", "")
    assert parse_s3_url("s3://b12/key?with#chars") == ("b12", "key?with#chars")  # S3 keys may hold them
    for bad in ("", "bucket/key", "s3:/bucket/key", "S3://bucket/key", "gs://bucket/key", "s3://", "s3:///key",
                "s3://ab/key", "s3://-bucket/key", "s3://user@bucket/key", "s3:// bucket/key"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_store_config_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="tries=0"):
        config(tries=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        config(request_timeout_s=0)


def test_store_for_is_one_store_per_bucket_and_config(s3_env: dict[str, str]) -> None:
    assert store_for("bucket-a") is store_for("bucket-a")
    assert store_for("bucket-a") is not store_for("bucket-b")
    assert store_for("bucket-a", config(tries=1)) is not store_for("bucket-a")
    first = store_for("bucket-a")
    clear_stores()
    assert store_for("bucket-a") is not first


def test_list_filters_by_prefix_in_key_order(s3_env: dict[str, str], s3_server: MotoServer, s3_bucket: str) -> None:
    keys = [f"set/{i % 7}/{i:04d}.jpg" for i in range(200)] + ["set/7.jpg", "settle/x", "other/y", "set2/z"]
    put_objects(s3_server.endpoint, s3_bucket, ((key, key.encode()) for key in keys))
    store = store_for(s3_bucket)

    listed = list(store.list("set/"))
    assert [info.key for info in listed] == sorted(k for k in keys if k.startswith("set/"))
    sample = listed[0]
    assert sample.size == len(sample.key) and sample.etag == hashlib.md5(sample.key.encode()).hexdigest()
    # S3's string prefixes, not only folders
    assert [i.key for i in store.list("set")] == sorted(k for k in keys if k.startswith("set"))
    assert [i.key for i in store.list("set/3/00")] == sorted(k for k in keys if k.startswith("set/3/00"))
    assert len(list(store.list())) == len(keys)
    assert list(store.list("nothing/")) == []


def _list_page(keys: list[str], token: str | None) -> bytes:
    contents = "".join(
        f"<Contents><Key>{key}</Key><LastModified>2015-10-21T07:28:00.000Z</LastModified>"
        f'<ETag>"{key[-1]}"</ETag><Size>{len(key)}</Size><StorageClass>STANDARD</StorageClass></Contents>'
        for key in keys
    )
    more = (
        f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"
        if token
        else "<IsTruncated>false</IsTruncated>"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>bkt</Name><KeyCount>{len(keys)}</KeyCount><MaxKeys>1000</MaxKeys>{more}"
        f"{contents}</ListBucketResult>"
    ).encode()


def test_list_follows_every_page(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # moto pages at 1000 keys and obstore asks for no smaller pages: a scripted store pages at 2
    def reply(seen: Seen) -> Reply:
        if "continuation-token=page-3" in seen.path:
            return Reply(200, {}, _list_page(["p/e"], None))
        if "continuation-token=page-2" in seen.path:
            return Reply(200, {}, _list_page(["p/c", "p/d"], "page-3"))
        return Reply(200, {}, _list_page(["p/a", "p/b"], "page-2"))

    with ScriptedServer(reply) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        listed = list(store_for("bkt").list("p/"))
    assert listed == [ObjectInfo(f"p/{c}", 3, c) for c in "abcde"]
    assert len(server.requests) == 3


def test_head_and_get(s3_env: dict[str, str], s3_server: MotoServer, s3_bucket: str) -> None:
    data = bytes(range(256)) * 200
    make_bucket(s3_server.endpoint, s3_bucket, {"obj.bin": data, "empty": b"", "odd//key.jpg": b"x"})
    store = store_for(s3_bucket)

    assert store.head("obj.bin") == ObjectInfo("obj.bin", len(data), hashlib.md5(data).hexdigest())
    assert store.get("obj.bin") == data
    assert store.get("obj.bin", 1000, 5000) == data[1000:6000]
    assert store.get("obj.bin", 50000) == data[50000:]
    assert store.get("obj.bin", 7, 0) == b""
    assert store.get("empty") == b""
    assert read_object(f"s3://{s3_bucket}/obj.bin", 3, 4) == data[3:7]
    with pytest.raises(ObjectMissing, match="ends after"):
        store.get("obj.bin", len(data) - 10, 20)  # a tar member past the end: the shard changed
    with pytest.raises(ObjectMissing, match="past the end"):
        store.get("obj.bin", len(data) + 10, 20)
    with pytest.raises(ValueError):
        store.get("obj.bin", -1, 4)
    # S3 allows keys with empty segments; obstore cannot address them, nor list around them
    with pytest.raises(ObjectMissing, match="key not supported"):
        store.get("odd//key.jpg")
    with pytest.raises(ValueError, match="empty path segment"):
        list(store.list("odd/"))
    copy = pickle.loads(pickle.dumps(store))  # rebuilt from its bucket and config, never shared
    assert copy is not store and copy.get("obj.bin", 0, 3) == data[:3]


def test_open_stream_reads_tar_shards_and_lines(s3_env: dict[str, str], s3_server: MotoServer, s3_bucket: str) -> None:
    members = {f"{i:05d}.jpg": bytes([i]) * (1000 + 977 * i) for i in range(40)}
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    manifest = "".join(f"{name}\t{i}\n" for i, name in enumerate(members)).encode()
    make_bucket(s3_server.endpoint, s3_bucket, {"shard-0.tar": shard.getvalue(), "manifest.tsv": manifest})
    store = store_for(s3_bucket)

    read: dict[str, bytes] = {}
    with store.open_stream("shard-0.tar", chunk_bytes=4096) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            handle = tar.extractfile(member)
            assert handle is not None
            read[member.name] = handle.read()
    assert read == members

    with store.open_stream("manifest.tsv") as stream:
        lines = list(io.TextIOWrapper(stream, encoding="utf-8"))
    assert lines == manifest.decode().splitlines(keepends=True)

    with store.open_stream("shard-0.tar") as stream:  # left early: closing drops the download
        assert stream.read(10) == shard.getvalue()[:10]
    assert stream.closed


def test_missing_object_and_missing_bucket(s3_env: dict[str, str], s3_bucket: str) -> None:
    store = store_for(s3_bucket)
    for read in (lambda: store.get("nope.jpg"), lambda: store.get("nope.jpg", 10, 20), lambda: store.head("nope.jpg"),
                 lambda: store.open_stream("nope.jpg")):  # fmt: skip
        with pytest.raises(ObjectMissing, match=f"s3://{s3_bucket}/nope.jpg"):
            read()
    # A missing bucket is the store's fault, not the sample's: it must not mark a dataset bad.
    gone = store_for("no-such-bucket-here")
    for read in (lambda: gone.get("a.jpg"), lambda: gone.head("a.jpg"), lambda: list(gone.list("a/"))):
        with pytest.raises(StoreUnavailable, match="no-such-bucket-here"):
            read()


def test_unreachable_store_fails_after_bounded_retries(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A bound socket that never listens: every connection is refused, and no one else can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        store = store_for("bkt", config(tries=3, backoff_s=0.05, connect_timeout_s=1.0))
        for read in (lambda: store.get("k", 0, 10), lambda: store.head("k"), lambda: list(store.list("p/"))):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="s3://bkt/.*after 3 tries") as caught:
                read()
            assert time.monotonic() - started < 5.0
            assert "error sending request" in str(caught.value)


@pytest.mark.parametrize(("status", "tries", "expected"), [(503, 3, 3), (500, 2, 2), (429, 3, 3), (403, 3, 1)])
def test_server_errors_are_retried_a_bounded_number_of_times(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, status: int, tries: int, expected: int
) -> None:
    with ScriptedServer(lambda seen: Reply(status)) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        with pytest.raises(StoreUnavailable, match=f"get s3://bkt/k failed.*{status}"):
            store_for("bkt", config(tries=tries, backoff_s=0.01)).get("k", 0, 10)
    assert len(server.requests) == expected  # 403 is refused credentials: asking again will not help


def test_secrets_never_appear_in_messages_logs_or_reprs(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # What AWS answers a bad signature with: an XML body that echoes the access key id.
    echo = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SignatureDoesNotMatch</Code><Message>bad</Message>"
        f"<AWSAccessKeyId>{ACCESS_KEY_ID}</AWSAccessKeyId><StringToSign>{SECRET_ACCESS_KEY}</StringToSign></Error>"
    ).encode()
    texts: list[str] = []
    with ScriptedServer(lambda seen: Reply(403, {"Content-Type": "application/xml"}, echo)) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        store = store_for("bkt", config(tries=2, backoff_s=0.01))
        for read in (lambda: store.get("k"), lambda: store.head("k"), lambda: list(store.list("p/"))):
            with pytest.raises(StoreUnavailable) as caught:
                read()
            texts += [str(caught.value), "".join(traceback.format_exception(caught.value))]
        texts.append(repr(store))
    assert "SignatureDoesNotMatch" in texts[0]  # the useful part stays
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        clear_stores()
        with pytest.raises(StoreUnavailable) as caught:
            store_for("bkt", config(tries=1)).get("k")
        texts.append("".join(traceback.format_exception(caught.value)))
    texts += [caplog.text, *(record.getMessage() for record in caplog.records)]
    assert any(record.name == "stoker.server.data.stores" for record in caplog.records)
    for text in texts:
        assert ACCESS_KEY_ID not in text and SECRET_ACCESS_KEY not in text


def _write_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    config, credentials = tmp_path / "config", tmp_path / "credentials"
    config.write_text(f"[profile stoker-test]\nregion = eu-west-3\nendpoint_url = {endpoint}\n")
    credentials.write_text(
        "[stoker-test]\naws_access_key_id = AKIAPROFILEKEY000001\naws_secret_access_key = profile-secret\n"
        "aws_session_token = profile-session-token\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "stoker-test")


def test_profile_gives_credentials_region_and_endpoint(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with ScriptedServer(lambda seen: FOUND) as server:
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        ):
            monkeypatch.delenv(name)
        _write_profile(tmp_path, monkeypatch, server.endpoint)
        assert store_for("bkt").head("a.jpg") == ObjectInfo("a.jpg", 5, "e7a")
    (seen,) = server.requests
    assert signer(seen) == "AKIAPROFILEKEY000001"
    assert "/eu-west-3/s3/aws4_request" in seen.headers["authorization"]
    assert seen.headers["x-amz-security-token"] == "profile-session-token"


def test_environment_keys_win_over_a_profile(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with ScriptedServer(lambda seen: FOUND) as server:
        _write_profile(tmp_path, monkeypatch, "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        store_for("bkt").head("a.jpg")
    assert signer(server.requests[0]) == ACCESS_KEY_ID


def _role_reply(seen: Seen) -> Reply:
    """A credentials endpoint (EKS pod identity, EC2 instance metadata) and a store behind one port."""
    if seen.path == "/pod-credentials":
        return Reply(200, {"Content-Type": "application/json"}, json.dumps(ROLE_CREDENTIALS).encode())
    if seen.path == "/latest/api/token":
        return Reply(200, {}, b"imds-session")
    if seen.path == "/latest/meta-data/iam/security-credentials/":
        return Reply(200, {}, b"stoker-role")
    if seen.path == "/latest/meta-data/iam/security-credentials/stoker-role":
        return Reply(200, {}, json.dumps(ROLE_CREDENTIALS).encode())
    return FOUND


@pytest.mark.parametrize("role", ["pod-identity", "instance"])
def test_role_credentials(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, role: str) -> None:
    with ScriptedServer(_role_reply) as server:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        if role == "pod-identity":
            token = tmp_path / "token"
            token.write_text("pod-token")
            monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{server.endpoint}/pod-credentials")
            monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token))
        else:
            monkeypatch.setenv("AWS_METADATA_ENDPOINT", server.endpoint)
        assert store_for("bkt").head("a.jpg").size == 5
    signed = [seen for seen in server.requests if seen.path == "/bkt/a.jpg"]
    assert [signer(seen) for seen in signed] == [ROLE_CREDENTIALS["AccessKeyId"]]
    assert signed[0].headers["x-amz-security-token"] == ROLE_CREDENTIALS["Token"]


def test_a_process_forked_after_requests_is_refused_not_hung(s3_env: dict[str, str], s3_bucket: str) -> None:
    # obstore's runtime threads do not survive fork; a child must get an error, not hang.
    script = textwrap.dedent(f"""
        import os, sys
        from stoker.server.data.stores import configure_stores, store_for
        from stoker.server.settings import EngineSettings
        configure_stores(EngineSettings(workers=1).store_config)
        list(store_for({s3_bucket!r}).list(""))
        pid = os.fork()
        if pid == 0:
            try:
                store_for({s3_bucket!r}).head("x")
            except RuntimeError as exc:
                os._exit(7 if "forked after" in str(exc) else 1)
            os._exit(2)
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert result.returncode == 7, result.stderr


def test_relay_delays_each_request(s3_env: dict[str, str], s3_server: MotoServer, s3_bucket: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    make_bucket(s3_server.endpoint, s3_bucket, {"a.jpg": b"12345"})
    with DelayRelay.to(s3_server.endpoint, delay_s=0.05) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
        store = store_for(s3_bucket)
        for _ in range(3):
            started = time.monotonic()
            assert store.get("a.jpg") == b"12345"
            assert time.monotonic() - started >= 0.05
        assert relay.connections >= 1


def test_reads_in_flight_hide_the_relay_delay(s3_env: dict[str, str], s3_server: MotoServer, s3_bucket: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    shard = bytes(range(256)) * 4096  # 1 MiB
    make_bucket(s3_server.endpoint, s3_bucket, {"shard.tar": shard})
    delay_s, reads = 0.1, 24
    ranges = [(i * 40000, 30000) for i in range(reads)]
    with DelayRelay.to(s3_server.endpoint, delay_s=delay_s) as relay:
        monkeypatch.setenv("AWS_ENDPOINT_URL", relay.endpoint)
        store = store_for(s3_bucket)
        with ThreadPoolExecutor(reads) as pool:
            started = time.monotonic()
            futures = [pool.submit(store.get, "shard.tar", start, length) for start, length in ranges]
            results = [future.result(FUTURE_TIMEOUT_S) for future in futures]
            elapsed = time.monotonic() - started
    assert results == [shard[start : start + length] for start, length in ranges]
    # One at a time they would take reads x delay (2.4 s); overlapped, a few delays even on a loaded machine.
    assert delay_s <= elapsed < reads * delay_s * 0.75, f"{reads} reads took {elapsed:.2f} s"
