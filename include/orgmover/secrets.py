"""Encrypted attributes of GitLab rows: AES-256-GCM with a per-row IV.

The key is the cell's ``db_key_base`` truncated or zero-padded to 32 bytes (GitLab's
``Settings.attr_encrypted_db_key_base_32``). Two storage layouts are modelled:

* *separate IV*: ``encrypted_value`` = base64(ciphertext || tag), ``encrypted_value_iv`` = base64(12-byte IV)
* *embedded IV*: ``column`` = base64(IV || ciphertext || tag)

Moving a row to another cell decrypts with the source cell's key and encrypts with the target
cell's key and a fresh IV, in memory only: plaintext is never logged, written or returned through
XCom. :class:`ColumnSpec` describes one encrypted column (from the table dictionary).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orgmover.errors import OrgMoverError

IV_BYTES = 12


class SecretError(OrgMoverError):
    """A value could not be decrypted with the cell's key (wrong key or corrupted ciphertext)."""


def key_from_db_key_base(db_key_base: str | bytes) -> bytes:
    raw = db_key_base.encode() if isinstance(db_key_base, str) else db_key_base
    return raw[:32].ljust(32, b"\0")


def encrypt(key: bytes, plaintext: bytes, iv: bytes | None = None) -> tuple[str, str]:
    iv = iv or os.urandom(IV_BYTES)
    ct = AESGCM(key).encrypt(iv, plaintext, None)
    return base64.b64encode(ct).decode(), base64.b64encode(iv).decode()


def decrypt(key: bytes, ciphertext_b64: str, iv_b64: str) -> bytes:
    try:
        return AESGCM(key).decrypt(base64.b64decode(iv_b64), base64.b64decode(ciphertext_b64), None)
    except (InvalidTag, ValueError) as e:
        raise SecretError("cannot decrypt value: wrong key or corrupted ciphertext") from e


def encrypt_embedded(key: bytes, plaintext: bytes) -> str:
    iv = os.urandom(IV_BYTES)
    return base64.b64encode(iv + AESGCM(key).encrypt(iv, plaintext, None)).decode()


def decrypt_embedded(key: bytes, blob_b64: str) -> bytes:
    try:
        raw = base64.b64decode(blob_b64)
        return AESGCM(key).decrypt(raw[:IV_BYTES], raw[IV_BYTES:], None)
    except (InvalidTag, ValueError) as e:
        raise SecretError("cannot decrypt value: wrong key or corrupted ciphertext") from e


@dataclass(frozen=True)
class ColumnSpec:
    """One encrypted column as listed under ``org_mover.encrypted_columns`` in the dictionary."""

    column: str
    iv_column: str | None = None  # None: IV embedded in the value
    algorithm: str = "aes-256-gcm"

    @classmethod
    def from_doc(cls, d: dict) -> "ColumnSpec":
        if d.get("algorithm", "aes-256-gcm") != "aes-256-gcm":
            raise OrgMoverError(f"unsupported encryption algorithm {d.get('algorithm')!r} for column {d['column']}")
        return cls(column=d["column"], iv_column=d.get("iv_column"))

    def decrypt(self, key: bytes, value: str | None, iv: str | None) -> bytes | None:
        if value is None:
            return None
        return decrypt(key, value, iv) if self.iv_column else decrypt_embedded(key, value)

    def reencrypt(self, src_key: bytes, dst_key: bytes, value: str | None, iv: str | None) -> tuple[str | None, str | None]:
        """Return (new value, new iv) for the target key; IV is None for embedded layouts."""
        plain = self.decrypt(src_key, value, iv)
        if plain is None:
            return None, iv
        if self.iv_column:
            return encrypt(dst_key, plain)
        return encrypt_embedded(dst_key, plain), None
