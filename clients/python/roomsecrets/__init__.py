"""roomsecrets: the Python client of the roomsecrets service (the room Secrets API).

    from roomsecrets import SecretsClient

    with SecretsClient("127.0.0.1:50051", token) as client:
        client.set_secret(secret_id="db", type="text/plain", data=b"postgres://...")
        value = client.get_secret(secret_id="db")  # FileContent, or None when missing

`AsyncSecretsClient` (roomsecrets.aio) is the asyncio twin. Errors are typed
(roomsecrets.errors); the generated protobuf and gRPC stubs live in roomsecrets.v1.
"""

from .aio import AsyncRequestStream, AsyncSecretsClient
from .client import DEFAULT_ADDRESS, RequestStream, SecretsClient, TokenSource
from .errors import (
    AbortedError,
    AlreadyExistsError,
    CallCancelledError,
    ChecksumMismatchError,
    DataLossError,
    DeadlineExceededError,
    EtagMismatchError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    NotListeningError,
    PermissionDeniedError,
    RequestCancelledError,
    RequestNotPendingError,
    RequestRejectedError,
    ResourceExhaustedError,
    SecretsError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from .handlers import (
    AsyncOAuthTokenRequestHandler,
    AsyncRequestHandler,
    AsyncSecretRequestHandler,
    OAuthTokenRequestHandler,
    RejectRequest,
    RequestHandlerThread,
    SecretRequestHandler,
)
from .project import AsyncProjectSecretsClient, ProjectSecretsClient
from .types import (
    ConnectorInfo,
    ConnectorRef,
    FileContent,
    OAuthClientConfig,
    OAuthTokenRequest,
    RequestClosed,
    RequestEvent,
    RequestState,
    SecretInfo,
    SecretRequest,
    WatchReady,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncOAuthTokenRequestHandler",
    "AsyncProjectSecretsClient",
    "AsyncRequestHandler",
    "AsyncRequestStream",
    "AsyncSecretRequestHandler",
    "AsyncSecretsClient",
    "CallCancelledError",
    "ChecksumMismatchError",
    "ConnectorInfo",
    "ConnectorRef",
    "DataLossError",
    "DeadlineExceededError",
    "EtagMismatchError",
    "FailedPreconditionError",
    "FileContent",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "NotListeningError",
    "OAuthClientConfig",
    "OAuthTokenRequest",
    "OAuthTokenRequestHandler",
    "PermissionDeniedError",
    "ProjectSecretsClient",
    "RejectRequest",
    "RequestCancelledError",
    "RequestClosed",
    "RequestEvent",
    "RequestHandlerThread",
    "RequestNotPendingError",
    "RequestRejectedError",
    "RequestState",
    "RequestStream",
    "ResourceExhaustedError",
    "SecretInfo",
    "SecretRequest",
    "SecretRequestHandler",
    "SecretsClient",
    "SecretsError",
    "TokenSource",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "WatchReady",
]
