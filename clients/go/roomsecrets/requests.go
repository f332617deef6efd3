package roomsecrets

import (
	"context"
	"math"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/roomsecrets/roomsecrets/clients/go/roomsecretsv1"
)

// RequestSecretOptions qualifies [Client.RequestSecret].
type RequestSecretOptions struct {
	// Type of the wanted secret; default [DefaultType].
	Type string
	// Timeout is how long to wait for an answer (rounded up to whole seconds); default
	// [DefaultRequestTimeout]. The context's deadline, if sooner, also bounds the wait.
	Timeout time.Duration
	// DelegateTo is the identity the provided secret is delegated to (usually the requester).
	DelegateTo string
}

// RequestSecret asks participant from for a secret (url says what is wanted, e.g. a repository
// URL for git credentials) and waits until it is provided, rejected or timed out. opts may be nil.
//
// Errors: PERMISSION_DENIED when the participant rejects the request (the message carries its
// reason), DEADLINE_EXCEEDED when it expires, FAILED_PRECONDITION when nobody is answering
// requests for that identity. Cancelling ctx cancels the request.
func (c *Client) RequestSecret(ctx context.Context, from, url string, opts *RequestSecretOptions) ([]byte, error) {
	if opts == nil {
		opts = &RequestSecretOptions{}
	}
	seconds, deadline, err := requestTimeout(opts.Timeout)
	if err != nil {
		return nil, err
	}
	typ := opts.Type
	if typ == "" {
		typ = DefaultType
	}
	ctx, cancel, err := c.callWithTimeout(ctx, deadline)
	if err != nil {
		return nil, err
	}
	defer cancel()
	reply, err := c.stub.RequestSecret(ctx, &pb.RequestSecretRequest{
		FromParticipantId: from,
		Url:               url,
		Type:              typ,
		Timeout:           seconds,
		DelegateTo:        opts.DelegateTo,
	})
	if err != nil {
		return nil, err
	}
	return verified(reply.GetData(), reply.GetDataCrc32C(), "request "+reply.GetRequestId())
}

// ProvideSecret answers an inbound secret request with the value. The value is stored as the
// caller's secret, keyed by the request's (url, type) and delegated as the request asked.
func (c *Client) ProvideSecret(ctx context.Context, requestID string, data []byte) error {
	if data == nil {
		data = []byte{}
	}
	sum := checksum(data)
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	_, err = c.stub.ProvideSecret(ctx, &pb.ProvideSecretRequest{RequestId: requestID, Data: data, DataCrc32C: &sum})
	return err
}

// RejectSecret refuses an inbound secret request; reason is passed to the requester.
func (c *Client) RejectSecret(ctx context.Context, requestID, reason string) error {
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	_, err = c.stub.RejectSecret(ctx, &pb.RejectSecretRequest{RequestId: requestID, Error: reason})
	return err
}

// OAuthClientConfig is an OAuth 2.0 client registration given inline. Its client secret is
// used by the server only and never reaches the participant asked to authorize.
type OAuthClientConfig struct {
	ClientID              string
	ClientSecret          string
	AuthorizationEndpoint string
	TokenEndpoint         string
	// Scopes are space-joined into the `scope` parameter.
	Scopes []string
	// NoPKCE disables PKCE (S256 is used by default).
	NoPKCE bool
	// ExtraParams are extra authorization-URL parameters (e.g. access_type=offline).
	ExtraParams map[string]string
	// TokenEndpointAuthMethod is "client_secret_basic" (the default), "client_secret_post" or "none".
	TokenEndpointAuthMethod string
}

func (o *OAuthClientConfig) toPB() *pb.OAuthClientConfig {
	return &pb.OAuthClientConfig{
		ClientId:                o.ClientID,
		ClientSecret:            o.ClientSecret,
		AuthorizationEndpoint:   o.AuthorizationEndpoint,
		TokenEndpoint:           o.TokenEndpoint,
		Scopes:                  o.Scopes,
		NoPkce:                  o.NoPKCE,
		ExtraParams:             o.ExtraParams,
		TokenEndpointAuthMethod: o.TokenEndpointAuthMethod,
	}
}

// ConnectorRef references an OAuth client registration held by the server (a connector), so the
// caller never sees its client secret.
type ConnectorRef struct {
	// Name of a connector configured on the server.
	Name string
	// ClientSecretID is the id of a stored secret holding the client credentials.
	ClientSecretID string
	// ServerURL is the URL of an MCP-style server whose OAuth metadata describes the provider.
	ServerURL string
}

func (r *ConnectorRef) toPB() *pb.ConnectorRef {
	return &pb.ConnectorRef{Name: r.Name, ClientSecretId: r.ClientSecretID, ServerUrl: r.ServerURL}
}

// OAuthTokenRequestInput is what [Client.RequestOAuthToken] asks for. Give OAuth or Connector.
type OAuthTokenRequestInput struct {
	OAuth     *OAuthClientConfig
	Connector *ConnectorRef
	// FromParticipantID is the identity asked to authorize (usually the human's app).
	FromParticipantID string
	RedirectURI       string
	// DelegateTo is the identity the token is delegated to.
	DelegateTo string
	// Timeout is how long to wait (rounded up to whole seconds); default [DefaultRequestTimeout].
	Timeout time.Duration
}

// RequestOAuthToken obtains an OAuth access token that another participant authorizes. When a
// valid stored token already exists for that provider, client and delegation, it is returned
// (refreshed if needed) without prompting. It returns "" when the provider returned no token.
func (c *Client) RequestOAuthToken(ctx context.Context, in OAuthTokenRequestInput) (string, error) {
	seconds, deadline, err := requestTimeout(in.Timeout)
	if err != nil {
		return "", err
	}
	req := &pb.RequestOAuthTokenRequest{
		FromParticipantId: in.FromParticipantID,
		RedirectUri:       in.RedirectURI,
		DelegateTo:        in.DelegateTo,
		Timeout:           seconds,
	}
	switch {
	case in.OAuth != nil && in.Connector != nil:
		return "", status.Error(codes.InvalidArgument, "roomsecrets: give OAuth or Connector, not both")
	case in.OAuth != nil:
		req.Provider = &pb.RequestOAuthTokenRequest_Oauth{Oauth: in.OAuth.toPB()}
	case in.Connector != nil:
		req.Provider = &pb.RequestOAuthTokenRequest_Connector{Connector: in.Connector.toPB()}
	}
	ctx, cancel, err := c.callWithTimeout(ctx, deadline)
	if err != nil {
		return "", err
	}
	defer cancel()
	reply, err := c.stub.RequestOAuthToken(ctx, req)
	if err != nil {
		return "", err
	}
	return reply.GetAccessToken(), nil
}

// ProvideOAuthAuthorization answers an inbound OAuth request with the authorization code from
// the provider's redirect; state is the redirect's `state` (checked by the server when given).
func (c *Client) ProvideOAuthAuthorization(ctx context.Context, requestID, code, state string) error {
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	_, err = c.stub.ProvideOAuthAuthorization(ctx, &pb.ProvideOAuthAuthorizationRequest{RequestId: requestID, Code: code, State: state})
	return err
}

// RejectOAuthAuthorization refuses an inbound OAuth request; reason is passed to the requester.
func (c *Client) RejectOAuthAuthorization(ctx context.Context, requestID, reason string) error {
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	_, err = c.stub.RejectOAuthAuthorization(ctx, &pb.RejectOAuthAuthorizationRequest{RequestId: requestID, Error: reason})
	return err
}

// OfflineOAuthTokenInput is what [Client.GetOfflineOAuthToken] looks up. Give OAuth or Connector.
type OfflineOAuthTokenInput struct {
	OAuth       *OAuthClientConfig
	Connector   *ConnectorRef
	DelegatedTo string
	// DelegatedBy is the identity that obtained the token and delegated it to the caller.
	DelegatedBy string
}

// GetOfflineOAuthToken returns the stored access token for that provider and delegation,
// refreshed with its refresh token when it has expired. It never prompts: it returns "" and a
// nil error when no usable token is stored.
func (c *Client) GetOfflineOAuthToken(ctx context.Context, in OfflineOAuthTokenInput) (string, error) {
	req := &pb.GetOfflineOAuthTokenRequest{DelegatedTo: in.DelegatedTo, DelegatedBy: in.DelegatedBy}
	switch {
	case in.OAuth != nil && in.Connector != nil:
		return "", status.Error(codes.InvalidArgument, "roomsecrets: give OAuth or Connector, not both")
	case in.OAuth != nil:
		req.Provider = &pb.GetOfflineOAuthTokenRequest_Oauth{Oauth: in.OAuth.toPB()}
	case in.Connector != nil:
		req.Provider = &pb.GetOfflineOAuthTokenRequest_Connector{Connector: in.Connector.toPB()}
	}
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return "", err
	}
	defer cancel()
	reply, err := c.stub.GetOfflineOAuthToken(ctx, req)
	if err != nil {
		return "", err
	}
	return reply.GetAccessToken(), nil
}

// requestTimeout returns the whole seconds sent on the wire and the gRPC deadline of a waiting
// call with this timeout (0 means DefaultRequestTimeout).
func requestTimeout(timeout time.Duration) (int32, time.Duration, error) {
	if timeout == 0 {
		timeout = DefaultRequestTimeout
	}
	if timeout < 0 {
		return 0, 0, status.Error(codes.InvalidArgument, "roomsecrets: timeout must be positive")
	}
	seconds := math.Ceil(timeout.Seconds())
	if seconds > math.MaxInt32 {
		seconds = math.MaxInt32
	}
	return int32(seconds), time.Duration(seconds)*time.Second + requestDeadlineMargin, nil
}
