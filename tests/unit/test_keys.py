"""CURVE key files: written in ZeroMQ's certificate format, read back from text or files, and the
folder signature that tells the server its authorised clients changed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq.auth

from stoker.client.protocol.keys import folder_signature, generate, load_key_pair, load_public_key, public_keys_in
from stoker.server.tools.cli import main


def test_keys_generate_writes_zmq_certificates(tmp_path: Path, capsys) -> None:
    assert main(["keys", "generate", str(tmp_path / "keys"), "--name", "trainer"]) == 0
    public_path, secret_path = tmp_path / "keys" / "trainer.key", tmp_path / "keys" / "trainer.key_secret"
    public, secret = zmq.auth.load_certificate(str(secret_path))
    assert zmq.auth.load_certificate(str(public_path)) == (public, None)
    assert len(public) == len(secret) == 40
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600, "the secret is the owner's alone"
    assert str(public_path) in capsys.readouterr().out
    assert main(["keys", "generate", str(tmp_path / "keys"), "--name", "trainer"]) == 1, "never replaced by accident"
    assert zmq.auth.load_certificate(str(secret_path)) == (public, secret)
    assert main(["keys", "generate", str(tmp_path / "keys"), "--name", "trainer", "--force"]) == 0
    assert zmq.auth.load_certificate(str(secret_path))[0] != public


def test_public_keys_from_text_or_files_and_clear_errors(tmp_path: Path) -> None:
    public_path, secret_path = generate(tmp_path, "server")
    public, secret = load_key_pair(secret_path)
    assert load_public_key(public.decode()) == load_public_key(public_path) == load_public_key(secret_path) == public
    with pytest.raises(ValueError, match="public certificate"):
        load_key_pair(public_path)
    with pytest.raises(ValueError, match="cannot read"):
        load_key_pair(tmp_path / "missing.key_secret")
    with pytest.raises(ValueError, match="Z85"):
        load_public_key("x" * 39 + "~")
    (tmp_path / "junk.key").write_text("not a certificate\n")
    with pytest.raises(ValueError):
        load_public_key(tmp_path / "junk.key")


def test_the_folder_signature_follows_added_removed_and_swapped_keys(tmp_path: Path) -> None:
    folder = tmp_path / "authorized"
    folder.mkdir()
    before = folder_signature(folder)
    first, _ = generate(tmp_path / "a", "a")
    (folder / "a.key").write_bytes(first.read_bytes())
    added = folder_signature(folder)
    assert added != before and len(public_keys_in(folder)) == 1
    (folder / "junk.key").write_text("half written")
    assert len(public_keys_in(folder)) == 1, "a file that is no certificate authorises nobody"
    # Kubernetes updates a mounted Secret by pointing a symlink at a new folder.
    second, _ = generate(tmp_path / "b", "b")
    data = tmp_path / "data-1"
    data.mkdir()
    (data / "b.key").write_bytes(second.read_bytes())
    (folder / "b.key").symlink_to(data / "b.key")
    assert folder_signature(folder) != added and len(public_keys_in(folder)) == 2
    (folder / "a.key").unlink()
    assert public_keys_in(folder) == {load_public_key(second)}
