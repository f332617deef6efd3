"""What every RPC passes on its way in and, when refused, on its way out: the caller is
authenticated from its bearer token, and a refused call leaves one audit line (SECURITY.md
"Audit": refusals are recorded too), written here once for every RPC of every service rather than
in each handler. A refusal the domain already recorded with more detail (errors.DomainError
`audited`) is not recorded twice.

The line names the RPC, the caller (empty when it could not be authenticated), its room, the
status reason, and the secret or request id the request named, cut short: ids only, never a
value, token or message text.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc

from ..audit import AuditLog
from ..auth.principal import Principal
from ..auth.tokens import TokenVerifier
from ..errors import DomainError, Unavailable

log = logging.getLogger(__name__)

_ID_FIELDS = ("secret_id", "id", "name")
_MAX_ID = 256
_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")  # GetOfflineOAuthToken -> get_offline_oauth_token


def authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


class Gate:
    def __init__(self, verifier: TokenVerifier, audit: AuditLog) -> None:
        self.verifier = verifier
        self._audit = audit

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        return self.verifier.authenticate(authorization(context))

    async def refused(self, rpc: str, request: object, principal: Principal | None, error: Exception) -> None:
        """One audit line for a call that ends in `error` (a refusal, or an internal error)."""
        if isinstance(error, DomainError) and error.audited:
            return
        reason = error.reason if isinstance(error, DomainError) else "INTERNAL"
        named = next(
            (str(v) for f in _ID_FIELDS if (v := getattr(request, f, "")) and isinstance(v, str)), ""
        )
        try:
            await self._audit.record(
                _WORD.sub("_", rpc).lower(),
                room=principal.room if principal else "",
                actor=principal.identity if principal else "",
                outcome=reason.lower(),
                secret_id=named[:_MAX_ID],
                request_id=str(getattr(request, "request_id", ""))[:_MAX_ID],
            )
        except Unavailable:  # the call is refused anyway; the audit log's own error is logged there
            log.warning("could not audit a refused %s", rpc)
