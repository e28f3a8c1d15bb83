"""The audit signing key on disk: created on first use, readable by its owner only.

The private key signs heads and checkpoints (the consumer host, retention runs); the
public key (``<key>.pub``, world-readable) is what verification trusts. Neither lives in
DuckDB: whoever can write the database must not be able to sign.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from horizons_platform.services.signing import load_public_pem, public_pem
from horizons_platform.settings import Settings


class SigningKeyError(RuntimeError):
    """The key file is unusable (unreadable, not Ed25519, too open)."""


def _public_path(private: Path) -> Path:
    return private.with_name(private.name.removesuffix(".pem") + ".pub")


def load_or_create_private(settings: Settings) -> Ed25519PrivateKey:
    path = settings.signing_key_file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return load_or_create_private(settings)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        _public_path(path).write_text(public_pem(key.public_key()))
        return key
    if path.stat().st_mode & 0o077:
        raise SigningKeyError(
            f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}): "
            f"chmod 600 {path}"
        )
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} does not hold an Ed25519 private key")
    key = loaded
    pub = _public_path(path)
    if not pub.exists():
        pub.write_text(public_pem(key.public_key()))
    return key


def load_public(settings: Settings) -> Ed25519PublicKey | None:
    """The trusted public key: from ``<key>.pub`` (or the private key), None if neither."""
    path = settings.signing_key_file
    pub = _public_path(path)
    if pub.exists():
        return load_public_pem(pub.read_text())
    if path.exists():
        return load_or_create_private(settings).public_key()
    return None
