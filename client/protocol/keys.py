"""CURVE keys in ZeroMQ's certificate format: what a server and its clients authenticate each other
and encrypt the data plane with.

``stoker keys generate DIR`` writes ``DIR/NAME.key`` (the public certificate: give it to the other
side) and ``DIR/NAME.key_secret`` (the secret one: keep it, mode 0600), as
``zmq.auth.create_certificates`` does. A server is configured with its secret certificate and a
folder of its clients' public certificates; a client with the server's public key (its Z85 text or
its public certificate file) and its own secret certificate.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq.auth
from zmq.utils import z85

__all__ = ["KeyPair", "generate", "load_key_pair", "load_public_key", "public_keys_in", "folder_signature"]

KeyPair = tuple[bytes, bytes]
"""``(public, secret)``, each 40 bytes of Z85 text."""

_Z85_KEY_LENGTH = 40


def generate(folder: str | Path, name: str = "stoker", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair as ``folder/name.key`` and ``folder/name.key_secret``; return both paths.

    The secret file is made readable by its owner only. Existing keys are kept unless ``overwrite``:
    regenerating a key by accident locks every peer that trusted the old one out.
    """
    folder = Path(folder)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(path) for path in (public, secret) if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"keys already exist: {', '.join(existing)} (pass --force to replace them)")
    folder.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        written_public, written_secret = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old_umask)
    Path(written_secret).chmod(0o600)
    Path(written_public).chmod(0o644)
    return Path(written_public), Path(written_secret)


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except OSError as exc:
        raise ValueError(f"cannot read the key file {str(path)!r}: {exc.strerror or exc}") from None
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{str(path)!r} is not a ZeroMQ certificate: {exc}") from None
    if public is None or len(public) != _Z85_KEY_LENGTH:
        raise ValueError(f"{str(path)!r} holds no CURVE public key")
    return public, secret


def load_key_pair(path: str | Path) -> KeyPair:
    """``(public, secret)`` from a secret certificate file (``NAME.key_secret``)."""
    public, secret = _read_certificate(Path(path))
    if secret is None:
        raise ValueError(f"{str(path)!r} is a public certificate; pass the secret one (NAME.key_secret)")
    return public, secret


def load_public_key(value: str | Path) -> bytes:
    """A public key from its Z85 text (40 characters) or from a certificate file (public or secret)."""
    text = str(value).strip()
    if len(text) == _Z85_KEY_LENGTH and not Path(text).exists():
        try:
            if len(z85.decode(text.encode("ascii"))) == 32:
                return text.encode("ascii")
        except (ValueError, KeyError, UnicodeEncodeError):  # z85 raises KeyError on a foreign character
            pass
        raise ValueError("the key is neither 40 characters of Z85 text nor the path of a certificate file")
    return _read_certificate(Path(text))[0]


def public_keys_in(folder: str | Path) -> set[bytes]:
    """The public keys of every certificate (``*.key``) in ``folder``; unreadable files are skipped."""
    keys: set[bytes] = set()
    for path in sorted(Path(folder).glob("*.key")):
        try:
            keys.add(_read_certificate(path)[0])
        except ValueError:
            continue  # a half-written or foreign file: it authorises nobody
    return keys


def folder_signature(folder: str | Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a key file is added, removed or replaced (also through the symlink swap
    Kubernetes uses to update a mounted Secret): names, sizes and modification times."""
    entries = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return ()
    for name in names:
        try:
            status = os.stat(os.path.join(folder, name))  # follows symlinks
        except OSError:
            continue
        entries.append((name, status.st_size, status.st_mtime_ns))
    return tuple(entries)
