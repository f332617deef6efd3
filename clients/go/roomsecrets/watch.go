package roomsecrets

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/roomsecrets/roomsecrets/clients/go/roomsecretsv1"
)

// RequestEvent is one event of the WatchRequests stream: a *[SecretRequest], an
// *[OAuthRequest], a *[RequestClosed] or a *[WatchReady].
type RequestEvent interface {
	isRequestEvent()
}

// SecretRequest is an inbound request for a secret addressed to the caller.
type SecretRequest struct {
	RequestID string
	// URL says what is wanted, e.g. a repository URL for git credentials.
	URL string
	// Type is the wanted secret's MIME type or kind.
	Type string
	// DelegateTo is the identity the provided secret will be delegated to.
	DelegateTo string
	// RequestedBy is the identity of the participant who asked.
	RequestedBy string
	// Deadline is when the request expires.
	Deadline time.Time
}

// OAuthRequest is an inbound request to authorize an OAuth client. It never carries a client secret.
type OAuthRequest struct {
	RequestID string
	// AuthorizationURL is ready to open: the endpoint with response_type, client_id,
	// redirect_uri, state, scope and the PKCE challenge.
	AuthorizationURL      string
	AuthorizationEndpoint string
	TokenEndpoint         string
	ClientID              string
	Scopes                []string
	// Challenge is the PKCE S256 code challenge; empty when PKCE is disabled.
	Challenge   string
	RedirectURI string
	State       string
	DelegateTo  string
	RequestedBy string
	Deadline    time.Time
}

// RequestState is the lifecycle state of a request (pending, then provided, rejected, expired
// or cancelled).
type RequestState = pb.RequestState

// The states a request can be in.
const (
	RequestPending   = pb.RequestState_REQUEST_STATE_PENDING
	RequestProvided  = pb.RequestState_REQUEST_STATE_PROVIDED
	RequestRejected  = pb.RequestState_REQUEST_STATE_REJECTED
	RequestExpired   = pb.RequestState_REQUEST_STATE_EXPIRED
	RequestCancelled = pb.RequestState_REQUEST_STATE_CANCELLED
)

// RequestClosed tells that a request addressed to the caller left the pending state.
type RequestClosed struct {
	RequestID string
	State     RequestState
	// Reason says why, for rejected, expired and cancelled requests.
	Reason string
}

// WatchReady is sent once after the replay of pending requests: the stream is registered and live.
type WatchReady struct {
	// Pending is the number of pending requests replayed before it.
	Pending int
}

func (*SecretRequest) isRequestEvent() {}
func (*OAuthRequest) isRequestEvent()  {}
func (*RequestClosed) isRequestEvent() {}
func (*WatchReady) isRequestEvent()    {}

// timeOf is the time of ts, or the zero time when ts is absent.
func timeOf(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}

// eventFromPB converts a stream message; nil for an event this client does not know.
func eventFromPB(m *pb.WatchRequestsResponse) RequestEvent {
	switch e := m.GetEvent().(type) {
	case *pb.WatchRequestsResponse_SecretRequest:
		r := e.SecretRequest
		return &SecretRequest{
			RequestID:   r.GetRequestId(),
			URL:         r.GetUrl(),
			Type:        r.GetType(),
			DelegateTo:  r.GetDelegateTo(),
			RequestedBy: r.GetRequestedBy(),
			Deadline:    timeOf(r.GetDeadline()),
		}
	case *pb.WatchRequestsResponse_OauthRequest:
		r := e.OauthRequest
		return &OAuthRequest{
			RequestID:             r.GetRequestId(),
			AuthorizationURL:      r.GetAuthorizationUrl(),
			AuthorizationEndpoint: r.GetAuthorizationEndpoint(),
			TokenEndpoint:         r.GetTokenEndpoint(),
			ClientID:              r.GetClientId(),
			Scopes:                r.GetScopes(),
			Challenge:             r.GetChallenge(),
			RedirectURI:           r.GetRedirectUri(),
			State:                 r.GetState(),
			DelegateTo:            r.GetDelegateTo(),
			RequestedBy:           r.GetRequestedBy(),
			Deadline:              timeOf(r.GetDeadline()),
		}
	case *pb.WatchRequestsResponse_RequestClosed:
		r := e.RequestClosed
		return &RequestClosed{RequestID: r.GetRequestId(), State: r.GetState(), Reason: r.GetReason()}
	case *pb.WatchRequestsResponse_Ready:
		return &WatchReady{Pending: int(e.Ready.GetPending())}
	}
	return nil
}

// RequestStream is an open WatchRequests stream. Call Recv in a loop; Close ends it.
type RequestStream struct {
	stream grpc.ServerStreamingClient[pb.WatchRequestsResponse]
	cancel context.CancelFunc
}

// WatchRequests opens the inbound side: a stream of the pending secret and OAuth requests
// addressed to the caller. It first replays those still pending, then sends a *[WatchReady],
// then pushes new requests and a *[RequestClosed] when one is answered, cancelled or expired.
// The stream lives until ctx ends or Close is called. Answer requests with ProvideSecret /
// RejectSecret (or use [Client.ServeRequests], which does all this for you).
func (c *Client) WatchRequests(ctx context.Context) (*RequestStream, error) {
	ctx, err := c.authorize(ctx)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	stream, err := c.stub.WatchRequests(ctx, &pb.WatchRequestsRequest{})
	if err != nil {
		cancel()
		return nil, err
	}
	return &RequestStream{stream: stream, cancel: cancel}, nil
}

// Recv returns the next event. It returns io.EOF when the server ends the stream, and the gRPC
// status error otherwise (codes.Canceled after Close or when the stream's context ends).
func (s *RequestStream) Recv() (RequestEvent, error) {
	for {
		m, err := s.stream.Recv()
		if err != nil {
			return nil, err
		}
		if event := eventFromPB(m); event != nil {
			return event, nil
		}
	}
}

// Close ends the stream.
func (s *RequestStream) Close() { s.cancel() }
