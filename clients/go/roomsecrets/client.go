package roomsecrets

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	pb "github.com/roomsecrets/roomsecrets/clients/go/roomsecretsv1"
)

// DefaultCallTimeout bounds every unary call whose context has no deadline, except the waiting
// ones (RequestSecret, RequestOAuthToken), which are bounded by their own timeout.
const DefaultCallTimeout = 30 * time.Second

// DefaultRequestTimeout is how long RequestSecret and RequestOAuthToken wait by default.
const DefaultRequestTimeout = 300 * time.Second

// requestDeadlineMargin is added to a waiting call's timeout for its gRPC deadline, so that the
// server's own answer (DEADLINE_EXCEEDED, reason REQUEST_EXPIRED) normally arrives first.
const requestDeadlineMargin = 5 * time.Second

// maxMessageSize is the largest message sent or received (values are at most 1 MiB by default).
const maxMessageSize = 64 << 20

// TokenFunc returns the bearer token to send with a call. It is called before every call, so a
// long-lived client can refresh its token.
type TokenFunc func(ctx context.Context) (string, error)

// Client is a connection to the room Secrets API. It is safe for concurrent use.
type Client struct {
	conn        *grpc.ClientConn // owned by the client (Dial); nil when built by New
	cc          grpc.ClientConnInterface
	stub        pb.RoomSecretsClient
	token       TokenFunc // sent as call metadata (New); nil when per-RPC credentials carry it
	callTimeout time.Duration
}

// Option configures [Dial].
type Option func(*dialOptions)

type dialOptions struct {
	token       TokenFunc
	creds       credentials.TransportCredentials
	insecure    bool
	block       bool
	callTimeout time.Duration
	dialOpts    []grpc.DialOption
}

// WithToken sends token (a participant JWT) as `authorization: Bearer <token>` on every call.
func WithToken(token string) Option {
	return func(o *dialOptions) { o.token = staticToken(token) }
}

// WithTokenFunc sends the token f returns, asked before every call, as the bearer token.
func WithTokenFunc(f TokenFunc) Option {
	return func(o *dialOptions) { o.token = f }
}

// WithTLS connects over TLS with cfg; a nil cfg verifies the server against the system roots.
// For mutual TLS, put the client certificate in cfg.Certificates.
func WithTLS(cfg *tls.Config) Option {
	return func(o *dialOptions) {
		if cfg == nil {
			cfg = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		o.creds = credentials.NewTLS(cfg)
	}
}

// WithTransportCredentials connects with the given transport credentials (e.g. from
// credentials.NewClientTLSFromFile).
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(o *dialOptions) { o.creds = creds }
}

// WithInsecure allows a plaintext connection to a non-loopback address. Without it, Dial refuses
// plaintext anywhere but loopback (localhost, 127.0.0.0/8, ::1) and unix sockets, as the server
// does by default: a bearer token sent in clear text can be stolen.
func WithInsecure() Option {
	return func(o *dialOptions) { o.insecure = true }
}

// WithBlock makes Dial wait, up to the end of its context, until the connection is ready.
func WithBlock() Option {
	return func(o *dialOptions) { o.block = true }
}

// WithCallTimeout sets the deadline of unary calls whose context has none (default
// [DefaultCallTimeout]); 0 disables it.
func WithCallTimeout(d time.Duration) Option {
	return func(o *dialOptions) { o.callTimeout = d }
}

// WithDialOptions adds raw gRPC dial options (interceptors, keepalive, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *dialOptions) { o.dialOpts = append(o.dialOpts, opts...) }
}

// Dial connects to the server at address ("host:port", or any gRPC target). The connection is
// plaintext unless WithTLS or WithTransportCredentials is given; plaintext is only allowed to a
// loopback address unless WithInsecure is given. The connection is established lazily unless
// WithBlock is given, in which case ctx bounds the wait. Close the client when done.
func Dial(ctx context.Context, address string, opts ...Option) (*Client, error) {
	o := dialOptions{callTimeout: DefaultCallTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	creds := o.creds
	if creds == nil {
		if !o.insecure && !isLoopback(address) {
			return nil, fmt.Errorf("roomsecrets: refusing a plaintext connection to %q (not loopback): use WithTLS, or WithInsecure", address)
		}
		creds = insecure.NewCredentials()
	}
	dialOpts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageSize), grpc.MaxCallSendMsgSize(maxMessageSize)),
	}
	if o.token != nil {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearer{source: o.token}))
	}
	dialOpts = append(dialOpts, o.dialOpts...)
	conn, err := grpc.NewClient(address, dialOpts...)
	if err != nil {
		return nil, err
	}
	if o.block {
		if err := waitReady(ctx, conn); err != nil {
			_ = conn.Close()
			return nil, err
		}
	}
	c := newClient(conn, nil, o.callTimeout)
	c.conn = conn
	return c, nil
}

// New wraps an existing connection. A non-empty token is sent as the bearer token with every
// call (leave it empty when conn already carries per-RPC credentials, e.g. [BearerToken]).
// Close does not close conn.
func New(conn grpc.ClientConnInterface, token string) *Client {
	var source TokenFunc
	if token != "" {
		source = staticToken(token)
	}
	return newClient(conn, source, DefaultCallTimeout)
}

func newClient(cc grpc.ClientConnInterface, token TokenFunc, callTimeout time.Duration) *Client {
	return &Client{cc: cc, stub: pb.NewRoomSecretsClient(cc), token: token, callTimeout: callTimeout}
}

// Close closes the connection if Dial opened it; it is a no-op for a client built by New.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// Stub returns the generated RoomSecrets stub, for what the wrapper does not cover. Calls made on
// it carry the bearer token only when the client was built by Dial.
func (c *Client) Stub() pb.RoomSecretsClient { return c.stub }

// BearerToken returns per-RPC credentials sending token as `authorization: Bearer <token>`, for
// use with grpc.WithPerRPCCredentials on a connection of your own. They do not require transport
// security, so they also work on a plaintext loopback connection.
func BearerToken(token string) credentials.PerRPCCredentials {
	return bearer{source: staticToken(token)}
}

// bearer is the per-RPC credentials carrying the token. RequireTransportSecurity is false so the
// token also travels on plaintext loopback connections; Dial refuses other plaintext targets.
type bearer struct{ source TokenFunc }

func (b bearer) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	token, err := b.source(ctx)
	if err != nil {
		return nil, fmt.Errorf("roomsecrets: getting the bearer token: %w", err)
	}
	if token == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

func staticToken(token string) TokenFunc {
	return func(context.Context) (string, error) { return token, nil }
}

// call prepares the context of a unary call: the bearer token (for clients built by New) and
// the default deadline when ctx has none.
func (c *Client) call(ctx context.Context) (context.Context, context.CancelFunc, error) {
	return c.callWithTimeout(ctx, c.callTimeout)
}

func (c *Client) callWithTimeout(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc, error) {
	ctx, err := c.authorize(ctx)
	if err != nil {
		return nil, nil, err
	}
	if _, ok := ctx.Deadline(); ok || timeout <= 0 {
		ctx, cancel := context.WithCancel(ctx)
		return ctx, cancel, nil
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	return ctx, cancel, nil
}

func (c *Client) authorize(ctx context.Context) (context.Context, error) {
	if c.token == nil {
		return ctx, nil
	}
	token, err := c.token(ctx)
	if err != nil {
		return nil, fmt.Errorf("roomsecrets: getting the bearer token: %w", err)
	}
	if token == "" {
		return ctx, nil
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token), nil
}

func waitReady(ctx context.Context, conn *grpc.ClientConn) error {
	conn.Connect()
	for {
		state := conn.GetState()
		if state == connectivity.Ready {
			return nil
		}
		if state == connectivity.Shutdown {
			return errors.New("roomsecrets: the connection was closed")
		}
		if !conn.WaitForStateChange(ctx, state) {
			return fmt.Errorf("roomsecrets: connecting: %w (last state %s)", ctx.Err(), state)
		}
	}
}

// isLoopback reports whether a gRPC target names a loopback address or a unix socket.
func isLoopback(target string) bool {
	if strings.HasPrefix(target, "unix:") || strings.HasPrefix(target, "unix-abstract:") {
		return true
	}
	for _, scheme := range []string{"dns:///", "passthrough:///", "dns:", "passthrough:"} {
		if rest, ok := strings.CutPrefix(target, scheme); ok {
			target = rest
			break
		}
	}
	host := target
	if h, _, err := net.SplitHostPort(target); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.IsLoopback()
}
