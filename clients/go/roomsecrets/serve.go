package roomsecrets

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
	"unicode"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// SecretRequestHandler answers an inbound secret request: it returns the value to provide it,
// or an error to reject the request with the error's message (which the requester sees — never
// put a secret in it). Returning nil data and a nil error declines the request.
//
// ctx is cancelled when the request is answered, cancelled or expires elsewhere, and when
// ServeRequests stops.
type SecretRequestHandler func(ctx context.Context, req *SecretRequest) ([]byte, error)

// OAuthRequestHandler answers an inbound OAuth request: it returns the authorization code from
// the provider's redirect, or an error to reject the request with its message. Returning "" and
// a nil error declines the request.
type OAuthRequestHandler func(ctx context.Context, req *OAuthRequest) (code string, err error)

// ServeOption configures [Client.ServeRequests].
type ServeOption func(*serveOptions)

type serveOptions struct {
	oauth         OAuthRequestHandler
	onReady       func(pending int)
	reconnect     bool
	maxConcurrent int
	answerTimeout time.Duration
}

// WithOAuthRequestHandler also answers inbound OAuth requests (without it they are rejected at once).
func WithOAuthRequestHandler(h OAuthRequestHandler) ServeOption {
	return func(o *serveOptions) { o.oauth = h }
}

// WithReadyFunc calls f each time the request stream becomes live (after the replay of pending
// requests), with the number of requests replayed.
func WithReadyFunc(f func(pending int)) ServeOption {
	return func(o *serveOptions) { o.onReady = f }
}

// WithReconnect sets whether ServeRequests reopens the stream after it is lost (default true).
func WithReconnect(reconnect bool) ServeOption {
	return func(o *serveOptions) { o.reconnect = reconnect }
}

// WithMaxConcurrentHandlers bounds how many handlers run at once (default 8).
func WithMaxConcurrentHandlers(n int) ServeOption {
	return func(o *serveOptions) {
		if n > 0 {
			o.maxConcurrent = n
		}
	}
}

// Reasons sent when a request is rejected by the wrapper rather than by a handler.
const (
	reasonDeclined       = "declined"
	reasonStopped        = "the participant stopped answering requests"
	reasonNoOAuthHandler = "no OAuth request handler is registered"
	reasonNoHandler      = "no secret request handler is registered"
	maxReason            = 1000 // the server accepts 1024 characters
)

const (
	firstReconnectDelay = 100 * time.Millisecond
	maxReconnectDelay   = 5 * time.Second
)

// ServeRequests answers inbound requests addressed to the caller with handler (and, with
// [WithOAuthRequestHandler], OAuth requests) until ctx ends. It runs on top of
// [Client.WatchRequests]: each request is handled on its own goroutine; the returned bytes are
// provided with ProvideSecret, a returned error rejects the request with its message. Nobody is
// left waiting: a request with no handler, whose handler fails or panics, or which is still
// queued when serving stops, is rejected at once.
//
// The stream is reopened (with backoff) when the connection drops; requests replayed on
// reconnect are not handled twice. ServeRequests blocks. It returns nil once ctx ends (after the
// running handlers have finished), or the stream's status error when it fails for good (e.g.
// codes.Unauthenticated, or any error when reconnecting is disabled).
func (c *Client) ServeRequests(ctx context.Context, handler SecretRequestHandler, opts ...ServeOption) error {
	o := serveOptions{reconnect: true, maxConcurrent: 8, answerTimeout: 10 * time.Second}
	for _, opt := range opts {
		opt(&o)
	}
	s := &requestServer{
		client:   c,
		secret:   handler,
		opts:     o,
		ctx:      ctx,
		slots:    make(chan struct{}, o.maxConcurrent),
		inflight: map[string]*inflight{},
	}
	defer s.wg.Wait()
	delay := firstReconnectDelay
	for {
		live, err := s.watch()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil && (!o.reconnect || !retryable(status.Code(err))) {
			return err
		}
		if !o.reconnect {
			return nil // the server ended the stream
		}
		if live {
			delay = firstReconnectDelay
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay):
		}
		delay = min(delay*2, maxReconnectDelay)
	}
}

// retryable reports whether a lost stream is worth reopening; a bad token or a missing grant is final.
func retryable(code codes.Code) bool {
	switch code {
	case codes.Unavailable, codes.Canceled, codes.Internal, codes.Unknown,
		codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted:
		return true
	}
	return false
}

type requestServer struct {
	client *Client
	secret SecretRequestHandler
	opts   serveOptions
	ctx    context.Context
	slots  chan struct{}
	wg     sync.WaitGroup

	mu       sync.Mutex
	inflight map[string]*inflight
}

type inflight struct {
	cancel context.CancelFunc
	closed bool // closed elsewhere (RequestClosed): the answer is no longer wanted
}

// watch reads one stream until it ends; live tells whether it got as far as WatchReady.
func (s *requestServer) watch() (live bool, err error) {
	stream, err := s.client.WatchRequests(s.ctx)
	if err != nil {
		return false, err
	}
	defer stream.Close()
	for {
		event, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return live, nil
		}
		if err != nil {
			return live, err
		}
		switch e := event.(type) {
		case *WatchReady:
			live = true
			if s.opts.onReady != nil {
				s.opts.onReady(e.Pending)
			}
		case *SecretRequest:
			s.dispatch(e.RequestID, e.Deadline, func(ctx context.Context) { s.answerSecret(ctx, e) })
		case *OAuthRequest:
			s.dispatch(e.RequestID, e.Deadline, func(ctx context.Context) { s.answerOAuth(ctx, e) })
		case *RequestClosed:
			s.mu.Lock()
			if f := s.inflight[e.RequestID]; f != nil {
				f.closed = true
				f.cancel()
			}
			s.mu.Unlock()
		}
	}
}

func (s *requestServer) dispatch(requestID string, deadline time.Time, answer func(ctx context.Context)) {
	s.mu.Lock()
	if _, seen := s.inflight[requestID]; seen { // replayed after a reconnect: already being handled
		s.mu.Unlock()
		return
	}
	var ctx context.Context
	var cancel context.CancelFunc
	if deadline.IsZero() {
		ctx, cancel = context.WithCancel(s.ctx)
	} else {
		ctx, cancel = context.WithDeadline(s.ctx, deadline)
	}
	s.inflight[requestID] = &inflight{cancel: cancel}
	s.mu.Unlock()

	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() {
			cancel()
			s.mu.Lock()
			delete(s.inflight, requestID)
			s.mu.Unlock()
		}()
		select {
		case s.slots <- struct{}{}:
			defer func() { <-s.slots }()
			answer(ctx)
		case <-ctx.Done():
			if !s.closedElsewhere(requestID) {
				s.reject(requestID, false, reasonStopped)
			}
		}
	}()
}

func (s *requestServer) closedElsewhere(requestID string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.inflight[requestID]
	return f != nil && f.closed
}

func (s *requestServer) answerSecret(ctx context.Context, req *SecretRequest) {
	if s.secret == nil {
		s.reject(req.RequestID, false, reasonNoHandler)
		return
	}
	var data []byte
	err := runHandler(func() (err error) {
		data, err = s.secret(ctx, req)
		return err
	})
	if s.closedElsewhere(req.RequestID) {
		return
	}
	switch {
	case err != nil:
		s.reject(req.RequestID, false, handlerReason(ctx, err))
	case data == nil:
		s.reject(req.RequestID, false, reasonDeclined)
	default:
		s.provide(req.RequestID, false, func(actx context.Context) error {
			return s.client.ProvideSecret(actx, req.RequestID, data)
		})
	}
}

func (s *requestServer) answerOAuth(ctx context.Context, req *OAuthRequest) {
	if s.opts.oauth == nil {
		s.reject(req.RequestID, true, reasonNoOAuthHandler)
		return
	}
	var code string
	err := runHandler(func() (err error) {
		code, err = s.opts.oauth(ctx, req)
		return err
	})
	if s.closedElsewhere(req.RequestID) {
		return
	}
	switch {
	case err != nil:
		s.reject(req.RequestID, true, handlerReason(ctx, err))
	case code == "":
		s.reject(req.RequestID, true, reasonDeclined)
	default:
		s.provide(req.RequestID, true, func(actx context.Context) error {
			return s.client.ProvideOAuthAuthorization(actx, req.RequestID, code, req.State)
		})
	}
}

// runHandler calls f, turning a panic into an error.
func runHandler(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("handler panicked: %v", r)
		}
	}()
	return f()
}

// handlerReason is the rejection reason for a handler's error.
func handlerReason(ctx context.Context, err error) string {
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return reasonStopped
	}
	return err.Error()
}

// answerContext outlives the serving context, so answers go out even while stopping.
func (s *requestServer) answerContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(s.ctx), s.opts.answerTimeout)
}

func (s *requestServer) provide(requestID string, oauth bool, call func(ctx context.Context) error) {
	ctx, cancel := s.answerContext()
	defer cancel()
	err := call(ctx)
	switch status.Code(err) {
	case codes.OK:
	case codes.FailedPrecondition, codes.NotFound: // closed before it was answered
	default:
		s.reject(requestID, oauth, "could not provide the answer: "+status.Convert(err).Message())
	}
}

func (s *requestServer) reject(requestID string, oauth bool, reason string) {
	reason = cleanReason(reason)
	ctx, cancel := s.answerContext()
	defer cancel()
	if oauth {
		_ = s.client.RejectOAuthAuthorization(ctx, requestID, reason)
	} else {
		_ = s.client.RejectSecret(ctx, requestID, reason)
	}
}

// cleanReason makes one line the server accepts: no control characters, at most maxReason runes.
func cleanReason(text string) string {
	text = strings.Join(strings.FieldsFunc(text, unicode.IsControl), " ")
	text = strings.TrimSpace(text)
	if r := []rune(text); len(r) > maxReason {
		text = string(r[:maxReason-3]) + "..."
	}
	if text == "" {
		return "rejected"
	}
	return text
}
