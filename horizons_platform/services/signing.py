"""Ed25519 signatures over the audit chain's heads and retention checkpoints (pure).

A hash chain kept in the file it protects proves nothing against someone who can write
that file: they can cut the tail, or edit a row and recompute every later hash. A
signed head — (seq, hash) of the chain at a moment, signed with a key that is not in
the database — pins the chain up to there: rows can no longer be rewritten or cut
below it without the key. Heads are also published to Kafka, a witness outside the
database, so deleting the newest heads together with the rows they cover shows too.
Retention checkpoints (which legitimately remove rows) are signed and chained the same
way, so a forged one cannot excuse a deleted range.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

HEAD_KEY = b"audit.head"  # Kafka key of published heads: they all land in one partition
HEAD_ACTION = "audit.head.signed"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_pem(text: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(text.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class SignedHead:
    seq: int
    hash: str
    signed_at: datetime
    key_id: str
    signature: str  # hex

    def message(self) -> bytes:
        text = f"horizons-audit-head|{self.seq}|{self.hash}|{_iso(self.signed_at)}|{self.key_id}"
        return text.encode()

    def row(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "signed_at": self.signed_at,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    def as_json(self) -> dict[str, Any]:
        return {**self.row(), "signed_at": _iso(self.signed_at)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SignedHead:
        signed_at = data["signed_at"]
        if isinstance(signed_at, str):
            signed_at = datetime.fromisoformat(signed_at.replace("Z", "+00:00"))
        return cls(
            int(data["seq"]),
            str(data["hash"]),
            signed_at,
            str(data["key_id"]),
            str(data["signature"]),
        )


def sign_head(
    private: Ed25519PrivateKey, seq: int, digest: str, at: datetime | None = None
) -> SignedHead:
    at = (at or datetime.now(UTC)).astimezone(UTC)
    unsigned = SignedHead(seq, digest, at, key_id(private.public_key()), "")
    return SignedHead(seq, digest, at, unsigned.key_id, private.sign(unsigned.message()).hex())


def head_is_signed_by(public: Ed25519PublicKey, head: SignedHead) -> bool:
    if head.key_id != key_id(public):
        return False
    try:
        public.verify(bytes.fromhex(head.signature), head.message())
    except (InvalidSignature, ValueError):
        return False
    return True


# --- retention checkpoints -------------------------------------------------------------

CHECKPOINT_FIELDS = (
    "checkpoint_id",
    "created_at",
    "cutoff",
    "removed_count",
    "first_removed_seq",
    "last_removed_seq",
    "last_removed_hash",
    "removed_ranges",
    "prev_checkpoint_id",
)


def checkpoint_message(cp: dict[str, Any]) -> bytes:
    content = {}
    for name in CHECKPOINT_FIELDS:
        value = cp.get(name)
        if isinstance(value, datetime):
            value = _iso(value)
        elif name == "removed_ranges" and isinstance(value, str):
            value = json.loads(value)
        content[name] = value
    return (
        b"horizons-audit-checkpoint|"
        + json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    )


def sign_checkpoint(private: Ed25519PrivateKey, cp: dict[str, Any]) -> dict[str, Any]:
    """``cp`` with its key_id and signature."""
    return {
        **cp,
        "key_id": key_id(private.public_key()),
        "signature": private.sign(checkpoint_message(cp)).hex(),
    }


def checkpoint_is_signed_by(public: Ed25519PublicKey, cp: dict[str, Any]) -> bool:
    if not cp.get("signature") or cp.get("key_id") != key_id(public):
        return False
    try:
        public.verify(bytes.fromhex(cp["signature"]), checkpoint_message(cp))
    except (InvalidSignature, ValueError):
        return False
    return True
