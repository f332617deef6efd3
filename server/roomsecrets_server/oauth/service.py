"""OAuth flows. Defined in the contract now; implemented by the OAuth issue. Until then every
method refuses with UNIMPLEMENTED and says so — never a fake success."""

from __future__ import annotations

from ..auth.principal import Principal
from ..errors import NotImplementedYet


class OAuthService:
    @staticmethod
    def _unimplemented(method: str) -> NotImplementedYet:
        return NotImplementedYet(
            f"{method} is not implemented yet: OAuth flows are not available on this server"
        )

    async def request_oauth_token(self, p: Principal) -> None:
        p.require_secrets()
        raise self._unimplemented("RequestOAuthToken")

    async def provide_oauth_authorization(self, p: Principal) -> None:
        p.require_secrets()
        raise self._unimplemented("ProvideOAuthAuthorization")

    async def reject_oauth_authorization(self, p: Principal) -> None:
        p.require_secrets()
        raise self._unimplemented("RejectOAuthAuthorization")

    async def get_offline_oauth_token(self, p: Principal) -> None:
        p.require_secrets()
        raise self._unimplemented("GetOfflineOAuthToken")
