"""Ed25519 keys, and signing and checking envelopes (SPEC 7): the one home of crypto.

`cryptography` does the cryptography; nothing here is home-made but the canonical
encoding: the envelope's JSON with every field but `sig`, keys sorted, no spaces,
so a signature covers `kind`, `id`, `sender`, `sent_at`, `expires_at`, `to` and the
body exactly as the receiver decodes them. The coordinator and each agent sign every
envelope they publish (`Signer`); the receiver calls `check` with the public key it
trusts for the sender, which raises `Refused` (`unsigned` or `bad_signature`).

Key files: a private key is PKCS#8 PEM written 0600 (refused if others may read it),
a public key is one line, the raw 32 bytes in base64 (what hellos carry on the wire).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import Refused, UserError
from shared.messages import Envelope

COORDINATOR_KEY = "coordinator.key"
COORDINATOR_PUB = "coordinator.pub"


def canonical(envelope: Envelope) -> bytes:
    """The bytes a signature covers: every field but `sig`, canonically encoded."""
    data = envelope.model_dump(mode="json", exclude={"sig"}, serialize_as_any=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def public_text(key: Ed25519PublicKey) -> str:
    """A public key as one line: its raw bytes in base64."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_from_text(text: str) -> Ed25519PublicKey:
    """The public key written by `public_text`; ValueError if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not an Ed25519 public key: {e}") from e


def fingerprint(public: str) -> str:
    """A short, stable name for a public key (for operators and logs)."""
    return "SHA256:" + hashlib.sha256(public.encode()).hexdigest()[:16]


class Signer:
    """Signs envelopes with one private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = public_text(key.public_key())

    def sign(self, envelope: Envelope) -> Envelope:
        signature = self._key.sign(canonical(envelope))
        return envelope.model_copy(update={"sig": base64.b64encode(signature).decode()})


def check(envelope: Envelope, public: Ed25519PublicKey) -> None:
    """Raise `Refused` unless `envelope` carries a valid signature by `public`."""
    if not envelope.sig:
        raise Refused("unsigned", f"{envelope.kind} {envelope.id} carries no signature")
    try:
        signature = base64.b64decode(envelope.sig, validate=True)
        public.verify(signature, canonical(envelope))
    except (binascii.Error, ValueError, InvalidSignature) as e:
        raise Refused(
            "bad_signature", f"{envelope.kind} {envelope.id} is not signed by the trusted key"
        ) from e


# --- key files --------------------------------------------------------------------


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_pair(directory: Path, name: str, key: Ed25519PrivateKey) -> tuple[Path, Path]:
    """Write `<name>.key` (0600) and `<name>.pub` into `directory`; never overwrites."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise UserError(str(path), "already exists; refusing to overwrite a key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(public_text(key.public_key()) + "\n")
    return private, public


def load_private(path: Path) -> Ed25519PrivateKey:
    """The private key at `path`; `UserError` if missing, readable by others, or not one."""
    try:
        with path.open("rb") as f:  # one open: the mode checked is the file read
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(64 * 1024)
    except FileNotFoundError as e:
        raise UserError(str(path), "no such key file") from e
    except OSError as e:
        raise UserError(str(path), f"cannot read the key: {e}") from e
    if not stat.S_ISREG(mode):
        raise UserError(str(path), "not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(str(path), f"permissions {oct(mode & 0o777)} are too open; chmod 600")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as e:
        raise UserError(str(path), f"not a PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(str(path), "not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """The public key at `path` (one base64 line); `UserError` naming the file."""
    try:
        return public_from_text(path.read_text())
    except FileNotFoundError as e:
        raise UserError(str(path), "no such key file") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(str(path), str(e)) from e


def own_key(state_dir: Path, name: str = "agent") -> Ed25519PrivateKey:
    """The key pair kept in `state_dir` (an agent's), made on first use."""
    path = state_dir / f"{name}.key"
    if not path.exists():
        write_pair(state_dir, name, generate())
    return load_private(path)
