"""OAuth flows: the delegated authorization-code request, and offline tokens with refresh.

A asks B (`request_oauth_token`): the server builds the authorization URL (state, PKCE S256,
scopes, redirect_uri) and pushes it on B's WatchRequests stream as a pending request of kind
"oauth" (stored like a secret request; its client config, state and PKCE verifier are sealed in
the request's params). B's app opens the URL, the user consents, and B calls
`provide_oauth_authorization` with the code and the state: the server exchanges it at the token
endpoint and stores the token set as B's secret delegated to `delegate_to`, in the same
transaction that closes the request, and A's call returns the access token.

The state is mandatory (a missing or wrong one is refused, audited, and leaves the request
pending) and single-use: an exchange holds a lease on the request in the store, so across
replicas at most one exchange per request is in flight, and a closed request accepts nothing.
A provider error (a bad or spent code) leaves the request pending, so the user can authorize
again and answer with a new code; the state alone is no use without a code the provider issued
for this client and PKCE verifier.

Offline (`get_offline_oauth_token`) returns the stored token, refreshing it first when it is
(nearly) expired. Refresh is single-flight: an asyncio lock per token row in this process, and a
lease in the store across processes, so concurrent callers cause one call to the token endpoint;
the new token set replaces the old by check-and-set on the row's etag.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import time
import uuid
import weakref
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from .. import validate
from ..audit import AuditLog
from ..auth import authority
from ..auth.principal import Principal
from ..errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotImplementedYet,
    PermissionDenied,
    audited,
)
from ..requests.service import OAUTH, RequestService
from ..secrets.service import SecretsService
from ..store import ABSENT, RequestRecord, RequestState, SecretKey, SecretRecord, Store, WriteCondition
from .connectors import ConnectorService
from .provider import (
    TOKEN_TYPE,
    AuthorizationServer,
    ClientConfig,
    ProviderError,
    TokenSet,
    check_code,
    check_redirect_uri,
    new_state,
    new_verifier,
)

log = logging.getLogger(__name__)

LEASE_POLL_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class ClientRef:
    """Which OAuth client a call means: a config given inline, or a connector."""

    config: ClientConfig | None = None
    connector: str = ""
    client_secret_id: str = ""
    server_url: str = ""


@dataclass(frozen=True, slots=True)
class AccessToken:
    """What a caller gets back: never the refresh token."""

    access_token: str | None
    expires_at: float | None = None
    scopes: tuple[str, ...] = ()
    needs_reauthorization: bool = False
    request_id: str = ""

    @staticmethod
    def of(tokens: TokenSet | None, request_id: str = "") -> AccessToken:
        if tokens is None:
            return AccessToken(None, request_id=request_id)
        if tokens.needs_reauthorization or not tokens.access_token:
            return AccessToken(None, scopes=tokens.scopes, needs_reauthorization=True, request_id=request_id)
        return AccessToken(tokens.access_token, tokens.expires_at, tokens.scopes, request_id=request_id)


@dataclass(frozen=True, slots=True)
class OAuthPrompt:
    """A pending OAuth request as the asked participant sees it: never the client secret or the
    PKCE verifier."""

    request_id: str
    authorization_url: str
    config: ClientConfig
    challenge: str
    redirect_uri: str
    state: str
    delegate_to: str
    requested_by: str
    deadline: float


@dataclass(frozen=True, slots=True)
class _Flow:
    """The sealed parameters of a pending OAuth request."""

    config: ClientConfig
    redirect_uri: str
    state: str
    verifier: str
    authorization_url: str
    prefix: str = "oauth"  # how errors name the client: "oauth" (inline) or "connector"

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "config": self.config.to_json(),
                "redirect_uri": self.redirect_uri,
                "state": self.state,
                "verifier": self.verifier,
                "authorization_url": self.authorization_url,
                "prefix": self.prefix,
            }
        ).encode()

    @staticmethod
    def from_bytes(raw: bytes) -> _Flow:
        doc = json.loads(raw)
        return _Flow(
            ClientConfig.from_json(doc["config"]),
            doc["redirect_uri"],
            doc["state"],
            doc["verifier"],
            doc["authorization_url"],
            str(doc.get("prefix", "oauth")),
        )


class OAuthService:
    def __init__(
        self,
        store: Store,
        secrets: SecretsService,
        requests: RequestService,
        connectors: ConnectorService,
        audit: AuditLog,
        *,
        server: AuthorizationServer,
        refresh_margin: float,
        lease_seconds: float = 30.0,
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._requests = requests
        self._connectors = connectors
        self._audit = audit
        self._server = server
        self.refresh_margin = refresh_margin
        # A lease (refresh, code exchange) outlives the token endpoint call it covers.
        self._lease_seconds = max(lease_seconds, server.call_seconds + 5.0)
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._refreshing: weakref.WeakValueDictionary[SecretKey, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- asking -------------------------------------------------------------------------------
    async def request_oauth_token(
        self,
        p: Principal,
        *,
        client: ClientRef,
        target: str,
        redirect_uri: str,
        delegate_to: str,
        timeout: int,
        call_time_remaining: float | None,
    ) -> AccessToken:
        config, prefix = await self._client(p, client, "request_oauth_token")
        target = validate.identity(target, "from_participant_id", required=True)
        redirect_uri = check_redirect_uri(redirect_uri)
        delegate_to = validate.identity(delegate_to, "delegate_to")
        timeout = validate.timeout(timeout)
        key = SecretKey(p.room, target, delegate_to, config.token_secret_id)

        # A token the caller may read already (its own, or delegated to it): no prompt.
        if p.identity in (target, delegate_to):
            how = authority.reads_as(p, target, delegate_to)
            stored = await self._fresh(key, config, prefix)
            if stored is not None and stored.access_token and not stored.needs_reauthorization:
                await self._audit.record(
                    "request_oauth_token",
                    room=p.room,
                    actor=p.identity,
                    outcome="from_store",
                    secret_id=key.secret_id,
                    owner=target,
                    delegated_to=delegate_to,
                    authority=f"{how}:{p.identity}",
                )
                return AccessToken.of(stored)

        wait = float(timeout) if call_time_remaining is None else min(float(timeout), call_time_remaining)
        deadline = time.time() + wait
        record = await self._store.find_pending_request(
            p.room,
            p.identity,
            target,
            OAUTH,
            config.authorization_endpoint,
            config.token_secret_id,
            delegate_to,
        )
        if record is None:
            request_id = uuid.uuid4().hex
            state, verifier = new_state(), new_verifier()
            url = self._server.authorization_url(config, redirect_uri, state, verifier)
            flow = _Flow(config, redirect_uri, state, verifier, url, prefix)
            record = await self._requests.open_request(
                p,
                OAUTH,
                target,
                config.authorization_endpoint,
                config.token_secret_id,
                delegate_to,
                deadline,
                params=self._secrets.seal_blob(flow.to_bytes(), *_flow_place(p.room, request_id)),
                request_id=request_id,
            )
        closed = await self._requests.await_answer(record, deadline)
        if closed.state is not RequestState.PROVIDED:
            raise self._requests.outcome_error(closed)
        stored_record = await self._store.get_secret(
            SecretKey(closed.room, closed.target, closed.delegate_to, closed.secret_id)
        )
        if stored_record is None:
            raise FailedPrecondition(f"the token obtained by request {closed.request_id} was deleted")
        return AccessToken.of(self._tokens(stored_record), closed.request_id)

    # -- answering ----------------------------------------------------------------------------
    async def provide_oauth_authorization(
        self, p: Principal, *, request_id: str, code: str, state: str
    ) -> None:
        p.require_secrets()
        validate.secret_id(request_id, "request_id")
        code = check_code(code)
        state = validate.text(state, "state", validate.MAX_URL)
        record = await self._requests.answerable(p, request_id, OAUTH)
        await self._check_state(p, record, state)
        # One exchange per request at a time, across replicas: a second answer while the first
        # one's code is at the token endpoint would spend a second code (or the same one twice).
        lease, holder = f"oauth-exchange\n{record.room}\n{request_id}", f"{self._holder}:{uuid.uuid4().hex}"
        if not await self._store.acquire_lease(lease, holder, self._lease_seconds):
            await self._audit.record(
                "provide_oauth", room=p.room, actor=p.identity, outcome="in_progress", request_id=request_id
            )
            raise audited(
                FailedPrecondition(
                    f"request {request_id} is being answered already (a code is being exchanged); "
                    "wait for that answer's outcome",
                    reason="OAUTH_EXCHANGE_IN_PROGRESS",
                )
            )
        try:
            # Answered, rejected or expired meanwhile (perhaps through another replica): its
            # state is spent, and nothing is exchanged.
            record = await self._requests.answerable(p, request_id, OAUTH)
            await self._exchange_and_close(p, record, code)
        finally:
            await self._store.release_lease(lease, holder)

    async def _check_state(self, p: Principal, record: RequestRecord, state: str) -> None:
        """The state from the provider's redirect must be this request's: without it, a code
        the user never meant for this request (a login CSRF's) could be exchanged and stored."""
        if state and hmac.compare_digest(state.encode(), self._flow(record).state.encode()):
            return
        await self._audit.record(
            "provide_oauth",
            room=p.room,
            actor=p.identity,
            outcome="state_missing" if not state else "state_mismatch",
            request_id=record.request_id,
        )
        if not state:
            raise audited(
                InvalidArgument(
                    "state",
                    f"is required: give the state of request {record.request_id} (the `state` of the "
                    "provider's redirect), which ties the code to this request",
                )
            )
        raise audited(InvalidArgument("state", f"does not match the state of request {record.request_id}"))

    async def _exchange_and_close(self, p: Principal, record: RequestRecord, code: str) -> None:
        request_id = record.request_id
        flow = self._flow(record)
        try:
            tokens = await self._server.exchange_code(
                flow.config,
                code=code,
                redirect_uri=flow.redirect_uri,
                verifier=flow.verifier,
                prefix=flow.prefix,
            )
        except ProviderError as exc:
            # The request stays pending: the user may authorize again and answer with a new code.
            await self._audit.record(
                "provide_oauth", room=p.room, actor=p.identity, outcome=exc.error, request_id=request_id
            )
            raise audited(exc) from None
        key = SecretKey(p.room, record.target, record.delegate_to, flow.config.token_secret_id)
        for _ in range(4):
            existing = await self._store.get_secret(key)
            sealed = self._seal_tokens(key, flow.config, tokens)
            condition = WriteCondition(etag=existing.etag) if existing else ABSENT
            try:
                won = await self._requests.close(
                    record, RequestState.PROVIDED, "", secret=sealed, secret_condition=condition
                )
            except (EtagMismatch, AlreadyExists):
                continue
            if not won:
                raise FailedPrecondition(
                    f"request {request_id} is no longer pending", reason="REQUEST_NOT_PENDING"
                )
            await self._audit.record(
                "provide_oauth",
                room=p.room,
                actor=p.identity,
                request_id=request_id,
                secret_id=key.secret_id,
                owner=record.target,
                delegated_to=record.delegate_to,
                target=record.requested_by,  # who receives it, on the answering identity's authority
                authority=f"answer:{p.identity}",
            )
            return
        raise FailedPrecondition(f"request {request_id}: the stored token keeps changing; try again")

    async def reject_oauth_authorization(self, p: Principal, *, request_id: str, error: str) -> None:
        await self._requests.reject(p, request_id=request_id, error=error, kind=OAUTH)

    def prompt(self, record: RequestRecord) -> OAuthPrompt:
        """How a pending OAuth request is shown on the asked participant's stream."""
        flow = self._flow(record)
        query = dict(_query(flow.authorization_url))
        return OAuthPrompt(
            request_id=record.request_id,
            authorization_url=flow.authorization_url,
            config=flow.config,
            challenge=query.get("code_challenge", ""),
            redirect_uri=flow.redirect_uri,
            state=flow.state,
            delegate_to=record.delegate_to,
            requested_by=record.requested_by,
            deadline=record.deadline,
        )

    # -- offline ------------------------------------------------------------------------------
    async def get_offline_oauth_token(
        self, p: Principal, *, client: ClientRef, delegated_to: str, delegated_by: str
    ) -> AccessToken:
        config, prefix = await self._client(p, client, "get_offline_oauth_token")
        owner, delegated_to = authority.readable_scope(p, delegated_to, delegated_by)
        how = authority.reads_as(p, owner, delegated_to)
        key = SecretKey(p.room, owner, delegated_to, config.token_secret_id)
        tokens = await self._fresh(key, config, prefix)
        await self._audit.record(
            "get_offline_oauth_token",
            room=p.room,
            actor=p.identity,
            outcome="ok" if tokens and tokens.access_token else "none",
            secret_id=key.secret_id,
            owner=owner,
            delegated_to=delegated_to,
            authority=f"{how}:{p.identity}",
        )
        return AccessToken.of(tokens)

    async def _fresh(self, key: SecretKey, config: ClientConfig, prefix: str) -> TokenSet | None:
        """The stored token set, refreshed first if it is (nearly) expired. None if none is
        stored. Never a stale access token: a failed refresh raises or marks re-authorization."""
        record = await self._store.get_secret(key)
        if record is None or record.type != TOKEN_TYPE:
            return None
        tokens = self._tokens(record)
        if tokens.needs_reauthorization or not tokens.due(self.refresh_margin):
            return tokens
        lock = self._refreshing.get(key)
        if lock is None:
            lock = self._refreshing[key] = asyncio.Lock()
        async with lock:  # one refresh per row in this process; the lease covers other processes
            while True:
                record = await self._store.get_secret(key)
                if record is None or record.type != TOKEN_TYPE:
                    return None
                tokens = self._tokens(record)
                if tokens.needs_reauthorization or not tokens.due(self.refresh_margin):
                    return tokens  # refreshed meanwhile, here or by another process
                if not tokens.refresh_token:
                    return TokenSet(access_token="", scopes=tokens.scopes, needs_reauthorization=True)
                refreshed = await self._refresh_under_lease(key, config, prefix, record, tokens)
                if refreshed is not None:
                    return refreshed
                await asyncio.sleep(LEASE_POLL_SECONDS)  # another process is refreshing it

    async def _refresh_under_lease(
        self, key: SecretKey, config: ClientConfig, prefix: str, record: SecretRecord, tokens: TokenSet
    ) -> TokenSet | None:
        lease = "oauth-refresh\n" + "\n".join(key)
        if not await self._store.acquire_lease(lease, self._holder, self._lease_seconds):
            return None
        try:
            current = await self._store.get_secret(key)
            if current is None or current.etag != record.etag:
                return None  # changed between our read and the lease: look again
            try:
                new = await self._server.refresh(config, tokens, prefix=prefix)
                outcome = "ok"
            except ProviderError as exc:
                if exc.error != "invalid_grant":
                    raise
                # Revoked or expired refresh token: never hand out the stale access token.
                new = TokenSet(access_token="", scopes=tokens.scopes, needs_reauthorization=True)
                outcome = "invalid_grant"
            try:
                await self._store.put_secret(
                    self._seal_tokens(key, config, new), WriteCondition(etag=record.etag)
                )
            except EtagMismatch:
                return None
            await self._audit.record(
                "refresh_oauth_token",
                room=key.room,
                actor=self._holder,
                outcome=outcome,
                secret_id=key.secret_id,
                owner=key.owner,
                delegated_to=key.delegated_to,
            )
            return new
        finally:
            await self._store.release_lease(lease, self._holder)

    # -- helpers ------------------------------------------------------------------------------
    async def _client(self, p: Principal, client: ClientRef, method: str) -> tuple[ClientConfig, str]:
        """The client a call means, and how errors name it ("oauth" or "connector"), once the
        token's grant allows both its endpoints."""
        grant = p.require_secrets()
        if client.config is not None:
            prefix = "oauth"
            config = self._server.checked(client.config, prefix)
        elif client.connector:
            prefix = "connector"
            config = (
                await self._connectors.resolve(p.room, validate.secret_id(client.connector, "connector.name"))
            ).config
            self._server.check_destination(config, prefix, given=False)
        elif client.client_secret_id or client.server_url:
            raise NotImplementedYet(
                "connector.client_secret_id and connector.server_url are not supported yet: "
                "name a connector (connector.name) or give the client inline (oauth)"
            )
        else:
            raise InvalidArgument("oauth", "give the OAuth client inline (oauth) or a connector name")
        if not grant.can_request_oauth_token(
            config.authorization_endpoint, config.token_endpoint, config.client_id
        ):
            await self._audit.record(
                method, room=p.room, actor=p.identity, outcome="denied", target=config.client_id
            )
            raise audited(
                PermissionDenied(
                    f"the token's secrets grant does not allow OAuth tokens from "
                    f"{config.authorization_endpoint} with the token endpoint {config.token_endpoint} "
                    f"for client {config.client_id!r}"
                )
            )
        return config, prefix

    def _flow(self, record: RequestRecord) -> _Flow:
        try:
            return _Flow.from_bytes(
                self._secrets.open_blob(record.params, *_flow_place(record.room, record.request_id))
            )
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"the parameters of request {record.request_id} are unreadable") from None

    def _tokens(self, record: SecretRecord) -> TokenSet:
        try:
            return TokenSet.from_bytes(self._secrets.open(record))
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"the stored OAuth token {record.key.secret_id} is unreadable") from None

    def _seal_tokens(self, key: SecretKey, config: ClientConfig, tokens: TokenSet) -> SecretRecord:
        return self._secrets.seal(
            key, TOKEN_TYPE, f"{config.client_id} at {config.token_endpoint}", tokens.to_bytes()
        )


def _flow_place(room: str, request_id: str) -> tuple[str, ...]:
    return ("oauth-request", room, request_id)


def _query(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query)
