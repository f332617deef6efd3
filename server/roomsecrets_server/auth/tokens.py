"""Verifies `authorization: Bearer <JWT>` and caches verified tokens until they expire
(signature verification is the most expensive step of a read).

Keys are looked up by `kid` (header, else claim). The algorithm comes from the key's type, never
from the token, so an HS256 token cannot be verified against a public key (alg confusion).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from ..errors import Unauthenticated
from .principal import Principal, principal_from_claims

CACHE_LIMIT = 10_000
LEEWAY_SECONDS = 5


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    algorithm: str
    key: Any


def hs256_key(kid: str, secret: bytes) -> VerificationKey:
    return VerificationKey(kid, "HS256", secret)


def public_key_from_pem(kid: str, pem: bytes) -> VerificationKey:
    key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        return VerificationKey(kid, "RS256", key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return VerificationKey(kid, "ES256", key)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return VerificationKey(kid, "EdDSA", key)
    raise ValueError(f"unsupported public key type for kid {kid!r}")


def keys_from_jwks(path: Path) -> list[VerificationKey]:
    out = []
    for jwk in json.loads(path.read_text())["keys"]:
        parsed = jwt.PyJWK(jwk)
        kid = jwk.get("kid")
        if not kid:
            raise ValueError(f"{path}: every JWK needs a 'kid'")
        out.append(public_key_from_pem(kid, _pem_of(parsed.key)))
    return out


def _pem_of(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


class TokenVerifier:
    def __init__(
        self,
        keys: Iterable[VerificationKey],
        *,
        issuer: str = "",
        audience: str = "",
        clock: Any = time.time,
    ) -> None:
        self._keys = {k.kid: k for k in keys}
        if not self._keys:
            raise ValueError("no token verification keys configured")
        # Configured: every token must carry this `iss` / name this server in `aud`. A token with
        # an `aud` is refused when no audience is configured (RFC 7519 §4.1.3: it is meant for
        # someone else).
        self._issuer = issuer or None
        self._audience = audience or None
        self._required = ["exp", "name", *(["iss"] if issuer else []), *(["aud"] if audience else [])]
        self._clock = clock
        self._cache: dict[str, Principal] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at + LEEWAY_SECONDS > now:
                return cached
            del self._cache[token]
            raise Unauthenticated("token has expired")
        principal = self._verify_uncached(token)
        if len(self._cache) >= CACHE_LIMIT:
            self._evict(now)
        self._cache[token] = principal
        return principal

    def _verify_uncached(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid") or jwt.decode(token, options={"verify_signature": False}).get("kid")
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("token is signed with an unknown key id (kid)")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                options={"require": self._required},
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer (iss) is not the one this server trusts") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience (aud) does not name this server") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token has no '{exc.claim}' claim") from None
        except jwt.PyJWTError:
            raise Unauthenticated("token is invalid") from None
        return principal_from_claims(claims)

    def _evict(self, now: float) -> None:
        expired = [t for t, p in self._cache.items() if p.expires_at + LEEWAY_SECONDS <= now]
        for t in expired:
            del self._cache[t]
        while len(self._cache) >= CACHE_LIMIT:  # still full: drop the oldest insertions
            del self._cache[next(iter(self._cache))]
