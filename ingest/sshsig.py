"""OpenSSH signatures (SSHSIG, OpenSSH's PROTOCOL.sshsig) made with an Ed25519 key file, so that whoever holds
the public key checks them with OpenSSH alone:

    ssh-keygen -Y verify -f allowed_signers -I <identity> -n <namespace> -s FILE.sig < FILE

Only unencrypted keys: the tool signs unattended (cron, CI), where a passphrase would have to sit in the
environment beside the key file and guard nothing more than the file's permissions do. `ssh-keygen -t ed25519
-N '' -f KEY` makes a key; `ssh-keygen -p -N '' -f KEY` removes a passphrase. The key is a secret: no message,
repr or log line holds any of it (errors are our own words, raised `from None`).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ingest.errors import ConfigError

MAGIC = b"SSHSIG"
BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"
KEY_TYPE = b"ssh-ed25519"
HASHES = {b"sha256", b"sha512"}  # what PROTOCOL.sshsig allows; we sign with sha512, as ssh-keygen does


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key loaded from an OpenSSH key file, with the file's comment."""

    private: Ed25519PrivateKey = field(repr=False)
    comment: str


def load_signing_key(path: str | Path) -> SigningKey:
    """The unencrypted OpenSSH Ed25519 private key in `path`; ConfigError (one line, naming the file) otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"signing key {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    try:
        private = serialization.load_ssh_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying the key is encrypted
        raise ConfigError(
            f"signing key {path}: it is passphrase-protected, and the tool signs only with an unencrypted key "
            "(remove the passphrase with ssh-keygen -p -N '' -f KEY, or make a dedicated key)"
        ) from None
    except ValueError:
        raise ConfigError(
            f"signing key {path}: not an OpenSSH private key (make one with ssh-keygen -t ed25519 -N '' -f KEY)"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        kind = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        raise ConfigError(
            f"signing key {path}: a key of type {kind.split()[0].decode()}, not ssh-ed25519 "
            "(make one with ssh-keygen -t ed25519 -N '' -f KEY)"
        )
    return SigningKey(private, _comment(data))


def sign(key: SigningKey, data: bytes, namespace: str) -> str:
    """The armoured SSHSIG signature of `data` in `namespace`, as `ssh-keygen -Y sign` writes it."""
    signature = key.private.sign(_signed_data(namespace.encode(), b"sha512", data))
    blob = (
        MAGIC
        + struct.pack(">I", 1)  # the format's version
        + _string(_public_blob(key))
        + _string(namespace.encode())
        + _string(b"")  # reserved
        + _string(b"sha512")
        + _string(_string(KEY_TYPE) + _string(signature))
    )
    text = base64.b64encode(blob).decode()
    return "\n".join([BEGIN, *(text[i : i + 70] for i in range(0, len(text), 70)), END]) + "\n"


def public_key_line(key: SigningKey) -> str:
    """`ssh-ed25519 AAAA... comment`: put an identity before it to make an allowed_signers line."""
    return f"{KEY_TYPE.decode()} {base64.b64encode(_public_blob(key)).decode()} {key.comment}".rstrip()


def verify(signature: str, data: bytes, namespace: str, public_key_line: str) -> bool:
    """Whether `signature` (armoured) is the key's signature of `data` in `namespace`, as `ssh-keygen -Y verify`
    decides. `public_key_line` is `public_key_line()`'s form, or an allowed_signers line; ConfigError if it
    holds no ssh-ed25519 key."""
    trusted = _trusted_blob(public_key_line)
    try:
        lines = signature.strip().splitlines()
        if lines[0].strip() != BEGIN or lines[-1].strip() != END:
            return False
        blob = _Reader(base64.b64decode("".join(line.strip() for line in lines[1:-1]), validate=True))
        if blob.take(len(MAGIC)) != MAGIC or blob.uint32() != 1:
            return False
        public, signed_namespace, _reserved, hash_algorithm, wrapped = (blob.string() for _ in range(5))
        inner = _Reader(wrapped)
        if (
            public != trusted
            or signed_namespace != namespace.encode()
            or hash_algorithm not in HASHES
            or inner.string() != KEY_TYPE
        ):
            return False
        raw = _Reader(public)
        raw.string()  # the key type, checked by the comparison with `trusted`
        Ed25519PublicKey.from_public_bytes(raw.string()).verify(
            inner.string(), _signed_data(signed_namespace, hash_algorithm, data)
        )
        return True
    except (ValueError, IndexError, InvalidSignature):  # unparsable armour or blob, or a wrong signature
        return False


def _signed_data(namespace: bytes, hash_algorithm: bytes, data: bytes) -> bytes:
    """What the Ed25519 signature covers (PROTOCOL.sshsig): the reserved field is always empty here."""
    digest = hashlib.new(hash_algorithm.decode(), data).digest()
    return MAGIC + _string(namespace) + _string(b"") + _string(hash_algorithm) + _string(digest)


def _public_blob(key: SigningKey) -> bytes:
    raw = key.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _string(KEY_TYPE) + _string(raw)


def _trusted_blob(line: str) -> bytes:
    fields = line.split()
    try:
        blob = base64.b64decode(fields[fields.index(KEY_TYPE.decode()) + 1], validate=True)
        key = _Reader(blob)
        if key.string() != KEY_TYPE or len(key.string()) != 32:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError("the public key to verify with is not an ssh-ed25519 key line") from None
    return blob


def _comment(data: bytes) -> str:
    """The key file's comment, which cryptography drops (PROTOCOL.key: the last field of the private section,
    plain text in an unencrypted file; the caller has loaded the file, so its layout is known good)."""
    lines = data.strip().splitlines()
    body = _Reader(base64.b64decode(b"".join(lines[1:-1])))
    body.take(len(b"openssh-key-v1\0"))
    for _ in range(3):  # cipher, KDF and KDF options: "none", "none", ""
        body.string()
    body.uint32()  # the number of keys: one
    body.string()  # its public blob
    private = _Reader(body.string())
    private.take(8)  # two check integers
    for _ in range(3):  # key type, public key, private key
        private.string()
    return private.string().decode(errors="replace")


def _string(value: bytes) -> bytes:
    """The SSH wire form of a string: its length (uint32, big-endian), then its bytes."""
    return struct.pack(">I", len(value)) + value


class _Reader:
    """Reads SSH wire fields from a buffer; ValueError when it runs short."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self) -> bytes:
        return self.take(self.uint32())
