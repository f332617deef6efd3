"""Envelope encryption: AES-256-GCM under a fresh data key per value, the data key wrapped by a
key-encryption key (KEK) from the keyring.

The value's ciphertext is bound to its place by associated data, so a sealed blob copied to
another row fails to open. Sealed layout (version 1):

    0x01 | len(kek_id) u8 | kek_id | wrap_nonce(12) | wrapped_dek(32+16) | nonce(12) | ciphertext+tag

Rewrapping replaces only the KEK part; the value ciphertext is untouched. One exception type:
IntegrityError (from ..errors), raised for every failure to open.

Each wrap is one AES-GCM encryption under the KEK with a random nonce, so a KEK may wrap at most
2^32 data keys (NIST SP 800-38D 8.3). Before that, the active key moves to its next *generation*:
"<id>.g<N>" is HKDF-SHA256 of key <id> for generation N (crypto/rotation.py decides when). Every
process holding <id> derives the same generations, so replicas need no new key file to read what
another sealed. A generation renews the nonce budget, not secrecy: it falls with its root key, so
a suspected compromise calls for `rewrap --rotate` (a fresh random key).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError

_VERSION = 1
_DEK = 32
_NONCE = 12
_WRAPPED_DEK = 32 + 16
DEK_CACHE_SIZE = 4096
_GENERATION = re.compile(r"(.+)\.g([1-9][0-9]{0,8})")


def generation_id(root_id: str, generation: int) -> str:
    """The id of generation `generation` of key `root_id` (generation 0 is the key itself)."""
    return root_id if generation == 0 else f"{root_id}.g{generation}"


def split_generation(kek_id: str) -> tuple[str, int]:
    """(root id, generation) of a key id; (kek_id, 0) for an id that names no generation."""
    match = _GENERATION.fullmatch(kek_id)
    return (match[1], int(match[2])) if match else (kek_id, 0)


def _derive(root: bytes, generation: int) -> bytes:
    info = b"roomsecrets.v1 kek generation " + str(generation).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)


def place(*parts: str) -> bytes:
    """Associated data naming where a value lives. Length-prefixed, so parts cannot run together."""
    out = [b"roomsecrets.v1"]
    for part in parts:
        raw = part.encode()
        out.append(len(raw).to_bytes(4, "big"))
        out.append(raw)
    return b"".join(out)


class Envelope:
    """Seals and opens values with the KEKs of a keyring, and their generations; new seals use
    `active_kek_id`. `on_wrap(kek_id)` is told of every data key wrapped (to count KEK use)."""

    def __init__(
        self,
        keks: Mapping[str, bytes],
        active_kek_id: str,
        *,
        on_wrap: Callable[[str], None] | None = None,
    ) -> None:
        for kek_id, key in keks.items():
            if len(key) != 32 or not 0 < len(kek_id.encode()) < 200:
                raise ValueError("key-encryption keys must be 32 bytes with a short id")
        self._roots = dict(keks)
        self._keks = {kek_id: AESGCM(key) for kek_id, key in keks.items()}
        if self._kek(active_kek_id) is None:
            raise ValueError("active key-encryption key is not in the keyring")
        self._dek_ciphers: dict[bytes, AESGCM] = {}
        self._on_wrap = on_wrap
        self.active_kek_id = active_kek_id

    def __contains__(self, kek_id: str) -> bool:
        return self._kek(kek_id) is not None

    def _kek(self, kek_id: str) -> AESGCM | None:
        kek = self._keks.get(kek_id)
        if kek is None:
            root_id, generation = split_generation(kek_id)
            root = self._roots.get(root_id)
            if root is None or generation == 0:
                return None
            kek = self._keks[kek_id] = AESGCM(_derive(root, generation))
        return kek

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        # The data key and both nonces come from one read of the OS generator: each os.urandom
        # call releases the GIL, which under load costs a thread switch.
        fresh = os.urandom(_DEK + 2 * _NONCE)
        dek, nonce, wrap_nonce = fresh[:_DEK], fresh[_DEK : _DEK + _NONCE], fresh[_DEK + _NONCE :]
        ciphertext = AESGCM(dek).encrypt(nonce, plaintext, aad)
        return self._wrap(self.active_kek_id, dek, wrap_nonce) + nonce + ciphertext

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        # Unwrapped data keys are cached by their wrapped bytes (bounded): a hot read then costs
        # one AES-GCM decrypt, not two. A tampered header is a different key, so a cache miss.
        wrap_end = 2 + (sealed[1] if len(sealed) > 1 else 0) + _NONCE + _WRAPPED_DEK
        cipher = self._dek_ciphers.get(sealed[:wrap_end])
        if cipher is None:
            _, dek, _ = self._unwrap(sealed)
            cipher = AESGCM(dek)
            if len(self._dek_ciphers) >= DEK_CACHE_SIZE:
                del self._dek_ciphers[next(iter(self._dek_ciphers))]
            self._dek_ciphers[sealed[:wrap_end]] = cipher
        try:
            return cipher.decrypt(sealed[wrap_end : wrap_end + _NONCE], sealed[wrap_end + _NONCE :], aad)
        except InvalidTag:
            raise IntegrityError("stored value failed its integrity check") from None

    def check_key(self, sealed: bytes) -> None:
        """Raise IntegrityError unless this keyring unwraps the value's data key (the right key
        under the right id); the value itself is not decrypted."""
        self._unwrap(sealed)

    def rewrap(self, sealed: bytes) -> bytes:
        """The same value re-wrapped under the active KEK (no change if already under it or
        another generation of it)."""
        kek_id, dek, body = self._unwrap(sealed)
        if split_generation(kek_id)[0] == split_generation(self.active_kek_id)[0]:
            return sealed  # a generation of the active key: the same root, nothing to move
        return self._wrap(self.active_kek_id, dek, os.urandom(_NONCE)) + body

    @staticmethod
    def kek_id_of(sealed: bytes) -> str:
        if len(sealed) < 2 or sealed[0] != _VERSION or len(sealed) < 2 + sealed[1]:
            raise IntegrityError("stored value has an unknown format")
        try:
            return sealed[2 : 2 + sealed[1]].decode()
        except UnicodeDecodeError:
            raise IntegrityError("stored value has a corrupt key id") from None

    def _wrap(self, kek_id: str, dek: bytes, nonce: bytes) -> bytes:
        raw_id = kek_id.encode()
        header = bytes([_VERSION, len(raw_id)]) + raw_id
        kek = self._kek(kek_id)
        assert kek is not None  # only the active key wraps, and __init__ checked it
        if self._on_wrap is not None:
            self._on_wrap(kek_id)
        return header + nonce + kek.encrypt(nonce, dek, header)

    def _unwrap(self, sealed: bytes) -> tuple[str, bytes, bytes]:
        kek_id = self.kek_id_of(sealed)
        header_len = 2 + sealed[1]
        kek = self._kek(kek_id)
        if kek is None:
            raise IntegrityError(f"stored value is sealed under unknown key-encryption key {kek_id!r}")
        wrap_end = header_len + _NONCE + _WRAPPED_DEK
        if len(sealed) < wrap_end + _NONCE + 16:
            raise IntegrityError("stored value is truncated")
        nonce = sealed[header_len : header_len + _NONCE]
        try:
            dek = kek.decrypt(nonce, sealed[header_len + _NONCE : wrap_end], sealed[:header_len])
        except InvalidTag:
            raise IntegrityError("stored data key failed its integrity check") from None
        return kek_id, dek, sealed[wrap_end:]
