"""CURVE key files, in ZeroMQ's certificate format (``zmq.auth``, the format of czmq's ``zcert``).

A key pair is two text files: ``NAME.key`` holds the public key, ``NAME.key_secret`` the public and
the secret key, each as 40 characters of Z85 (ZeroMQ's base-85 encoding of the 32-byte key)::

    curve
        public-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
        secret-key = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"

The server is configured with its secret certificate and a folder of its clients' public
certificates (the allow-list); a client with its own secret certificate and the server's public
one. Both sides use this module; nothing here touches a socket except :meth:`ClientKeys.apply`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85


class CertificateError(ValueError):
    """A certificate file is missing, unreadable or not a certificate; the message names the file."""


def generate(folder: str | os.PathLike[str], name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``folder/NAME.key`` and ``folder/NAME.key_secret`` (mode 0600); returns both paths."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise CertificateError(f"key name {name!r}: use letters, digits, '-' or '_' (it names the files)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists() and not force:
            raise CertificateError(f"{p} exists; pass --force to replace it")
    old = os.umask(0o077)                      # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load(path: str | os.PathLike[str], secret: bool = False) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a certificate file; ``secret=True`` requires the secret key."""
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"{path}: no such certificate file")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CertificateError(f"{path}: not a ZeroMQ certificate ({e})") from None
    if public is None or len(public) != 40 or (secret_key is not None and len(secret_key) != 40):
        raise CertificateError(f"{path}: not a ZeroMQ certificate (expected 40-character Z85 keys)")
    if secret and secret_key is None:
        raise CertificateError(f"{path}: holds no secret key (give the NAME.key_secret file, not NAME.key)")
    return public, secret_key


def load_allowlist(folder: str | os.PathLike[str]) -> dict[bytes, str]:
    """The authorised clients: their public key (32 raw bytes) -> name (the file's name without
    ``.key``), from every ``*.key`` file in ``folder``. Raises CertificateError for a bad file or folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CertificateError(f"{folder}: no such folder of client certificates")
    keys: dict[bytes, str] = {}
    for path in sorted(folder.glob("*.key")):
        public, _ = load(path)
        keys.setdefault(z85.decode(public), path.stem)
    return keys


def secret_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Secret certificates lying in a folder meant for public ones (an operator's mistake)."""
    return sorted(Path(folder).glob("*.key_secret"))


@dataclass(frozen=True)
class ClientKeys:
    """What a client sets on its socket before ``connect``: the server's public key, its own key pair."""
    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_cert: str | os.PathLike[str], client_cert: str | os.PathLike[str]) -> ClientKeys:
        """``server_cert``: the server's ``.key`` (or ``.key_secret``); ``client_cert``: this client's ``.key_secret``."""
        server_public, _ = load(server_cert)
        public, secret = load(client_cert, secret=True)
        return cls(server_public, public, secret)          # type: ignore[arg-type]

    @classmethod
    def ephemeral(cls, server_public: bytes) -> ClientKeys:
        """A fresh key pair no server knows (tests; a server that authorises any key)."""
        public, secret = zmq.curve_keypair()
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
