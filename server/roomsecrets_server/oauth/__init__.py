"""OAuth flows (request_oauth_token, provide/reject authorization, offline tokens)."""
