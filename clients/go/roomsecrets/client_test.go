package roomsecrets_test

import (
	"bytes"
	"context"
	"errors"
	"hash/crc32"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/roomsecrets/roomsecrets/clients/go/roomsecrets"
)

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// dial connects to the test server as the holder of token.
func dial(t *testing.T, token string) *roomsecrets.Client {
	t.Helper()
	client, err := roomsecrets.Dial(testContext(t), server.addr, roomsecrets.WithToken(token), roomsecrets.WithBlock())
	if err != nil {
		t.Fatalf("Dial(%s): %v", server.addr, err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// participant connects as identity in room.
func participant(t *testing.T, identity, room string) *roomsecrets.Client {
	t.Helper()
	return dial(t, mintToken(t, identity, room))
}

func wantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("got code %v (%v), want %v", got, err, want)
	}
}

func ids(infos []roomsecrets.SecretInfo) []string {
	out := make([]string, 0, len(infos))
	for _, info := range infos {
		out = append(out, info.ID)
	}
	return out
}

func TestSetGetListDelete(t *testing.T) {
	ctx := testContext(t)
	alice := participant(t, "alice", "crud")
	value := []byte("postgres://user:pw@db/app")

	info, err := alice.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "db", Type: "text/plain", Name: "database", Data: value})
	if err != nil {
		t.Fatalf("SetSecret: %v", err)
	}
	if info.ID != "db" || info.Type != "text/plain" || info.Name != "database" || info.Etag == "" {
		t.Errorf("SetSecret returned %+v", info)
	}
	if info.Size != int64(len(value)) || info.CRC32C != crc32.Checksum(value, crc32.MakeTable(crc32.Castagnoli)) {
		t.Errorf("SetSecret size/crc = %d/%d", info.Size, info.CRC32C)
	}

	exists, err := alice.Exists(ctx, "db", nil)
	if err != nil || !exists {
		t.Fatalf("Exists(db) = %v, %v; want true", exists, err)
	}

	got, err := alice.GetSecret(ctx, "db")
	if err != nil {
		t.Fatalf("GetSecret: %v", err)
	}
	if got == nil || !bytes.Equal(got.Data, value) || got.Type != "text/plain" || got.Name != "database" || got.Etag != info.Etag {
		t.Fatalf("GetSecret = %+v", got)
	}

	if _, err := alice.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "api-key", Data: []byte("sk-1")}); err != nil {
		t.Fatalf("SetSecret(api-key): %v", err)
	}
	list, err := alice.ListSecrets(ctx)
	if err != nil {
		t.Fatalf("ListSecrets: %v", err)
	}
	if !slices.Contains(ids(list), "db") || !slices.Contains(ids(list), "api-key") {
		t.Fatalf("ListSecrets = %v, want db and api-key", ids(list))
	}

	// Another participant of the room sees none of alice's secrets.
	bob := participant(t, "bob", "crud")
	if got, err := bob.GetSecret(ctx, "db"); err != nil || got != nil {
		t.Fatalf("bob GetSecret(db) = %v, %v; want nil, nil", got, err)
	}

	if err := alice.DeleteSecret(ctx, "db", nil); err != nil {
		t.Fatalf("DeleteSecret: %v", err)
	}
	if got, err := alice.GetSecret(ctx, "db"); err != nil || got != nil {
		t.Fatalf("GetSecret after delete = %v, %v; want nil, nil", got, err)
	}
	if exists, err := alice.Exists(ctx, "db", nil); err != nil || exists {
		t.Fatalf("Exists after delete = %v, %v; want false", exists, err)
	}
	list, err = alice.ListSecrets(ctx)
	if err != nil {
		t.Fatalf("ListSecrets: %v", err)
	}
	if slices.Contains(ids(list), "db") {
		t.Fatalf("ListSecrets after delete = %v", ids(list))
	}
}

func TestSetAndGetByTypeAndName(t *testing.T) {
	ctx := testContext(t)
	alice := participant(t, "alice", "typename")
	info, err := alice.SetSecret(ctx, roomsecrets.SetSecretInput{Type: "git", Name: "github", Data: []byte("ghp_x")})
	if err != nil {
		t.Fatalf("SetSecret: %v", err)
	}
	if info.ID == "" {
		t.Fatal("the server assigned no id")
	}
	got, err := alice.GetSecretWith(ctx, roomsecrets.GetSecretInput{Type: "git", Name: "github"})
	if err != nil || got == nil || string(got.Data) != "ghp_x" || got.ID != info.ID {
		t.Fatalf("GetSecretWith(git, github) = %+v, %v", got, err)
	}
}

func TestGetMissingSecretIsNil(t *testing.T) {
	alice := participant(t, "alice", "missing")
	got, err := alice.GetSecret(testContext(t), "no-such-secret")
	if err != nil || got != nil {
		t.Fatalf("GetSecret(missing) = %v, %v; want nil, nil", got, err)
	}
}

func TestErrorCodes(t *testing.T) {
	ctx := testContext(t)

	t.Run("Unauthenticated for a bad token", func(t *testing.T) {
		_, err := dial(t, "not-a-jwt").ListSecrets(ctx)
		wantCode(t, err, codes.Unauthenticated)
		_, err = dial(t, "").GetSecret(ctx, "db")
		wantCode(t, err, codes.Unauthenticated)
	})

	alice := participant(t, "alice", "errors")

	t.Run("InvalidArgument for an empty id", func(t *testing.T) {
		_, err := alice.GetSecret(ctx, "")
		wantCode(t, err, codes.InvalidArgument)
		wantCode(t, alice.DeleteSecret(ctx, "", nil), codes.InvalidArgument)
	})

	t.Run("Aborted for a stale etag", func(t *testing.T) {
		first, err := alice.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "cas", Data: []byte("v1")})
		if err != nil {
			t.Fatal(err)
		}
		second, err := alice.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "cas", Data: []byte("v2"), Etag: first.Etag})
		if err != nil {
			t.Fatalf("SetSecret with the current etag: %v", err)
		}
		_, err = alice.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "cas", Data: []byte("v3"), Etag: first.Etag})
		wantCode(t, err, codes.Aborted)
		wantCode(t, alice.DeleteSecret(ctx, "cas", &roomsecrets.DeleteOptions{Etag: first.Etag}), codes.Aborted)
		if err := alice.DeleteSecret(ctx, "cas", &roomsecrets.DeleteOptions{Etag: second.Etag}); err != nil {
			t.Fatalf("DeleteSecret with the current etag: %v", err)
		}
	})
}

func TestNewOnAnExistingConnection(t *testing.T) {
	ctx := testContext(t)
	conn, err := grpc.NewClient(server.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	client := roomsecrets.New(conn, mintToken(t, "alice", "new"))
	if _, err := client.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "k", Data: []byte("v")}); err != nil {
		t.Fatalf("SetSecret: %v", err)
	}
	if got, err := client.GetSecret(ctx, "k"); err != nil || got == nil || string(got.Data) != "v" {
		t.Fatalf("GetSecret = %+v, %v", got, err)
	}
	_, err = roomsecrets.New(conn, "").ListSecrets(ctx)
	wantCode(t, err, codes.Unauthenticated)
}

// serve runs ServeRequests for client until the test ends and waits until its stream is live.
// It returns a function waiting for ServeRequests to return (stopping it) and giving its error.
func serve(t *testing.T, client *roomsecrets.Client, handler roomsecrets.SecretRequestHandler) func() error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	var once sync.Once
	done := make(chan error, 1)
	go func() {
		done <- client.ServeRequests(ctx, handler, roomsecrets.WithReadyFunc(func(int) { once.Do(func() { close(ready) }) }))
	}()
	stop := func() error {
		cancel()
		select {
		case err := <-done:
			done <- err
			return err
		case <-time.After(30 * time.Second):
			return errors.New("ServeRequests did not return")
		}
	}
	t.Cleanup(func() { _ = stop() })
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("ServeRequests returned before it was ready: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("ServeRequests was not ready within 30 s")
	}
	return stop
}

func TestRequestSecretProvidedByHandler(t *testing.T) {
	ctx := testContext(t)
	const url = "https://git.example/repo.git"
	bob := participant(t, "bob", "request")
	alice := participant(t, "alice", "request")

	var mu sync.Mutex
	var seen []*roomsecrets.SecretRequest
	stop := serve(t, bob, func(_ context.Context, req *roomsecrets.SecretRequest) ([]byte, error) {
		mu.Lock()
		seen = append(seen, req)
		mu.Unlock()
		return []byte("password-for " + req.URL), nil
	})

	data, err := alice.RequestSecret(ctx, "bob", url, &roomsecrets.RequestSecretOptions{Type: "git", Timeout: 30 * time.Second, DelegateTo: "alice"})
	if err != nil {
		t.Fatalf("RequestSecret: %v", err)
	}
	if string(data) != "password-for "+url {
		t.Fatalf("RequestSecret = %q", data)
	}
	mu.Lock()
	if len(seen) != 1 || seen[0].RequestedBy != "alice" || seen[0].URL != url || seen[0].Type != "git" ||
		seen[0].DelegateTo != "alice" || seen[0].RequestID == "" || seen[0].Deadline.IsZero() {
		t.Errorf("the handler saw %+v", seen)
	}
	mu.Unlock()

	// The provided value is stored as bob's secret, found by (url, type, delegated_to).
	if err := bob.DeleteRequestedSecret(ctx, url, "git", "alice"); err != nil {
		t.Fatalf("DeleteRequestedSecret: %v", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("ServeRequests returned %v after its context ended; want nil", err)
	}
}

func TestRequestSecretRejectedByHandler(t *testing.T) {
	ctx := testContext(t)
	bob := participant(t, "bob", "reject")
	alice := participant(t, "alice", "reject")
	serve(t, bob, func(_ context.Context, req *roomsecrets.SecretRequest) ([]byte, error) {
		if strings.Contains(req.URL, "panic") {
			panic("boom")
		}
		return nil, errors.New("the user refused to share " + req.URL)
	})

	_, err := alice.RequestSecret(ctx, "bob", "db-password", &roomsecrets.RequestSecretOptions{Timeout: 30 * time.Second})
	wantCode(t, err, codes.PermissionDenied)
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "the user refused to share db-password") {
		t.Fatalf("rejection message %q does not carry the handler's reason", msg)
	}

	// A panicking handler rejects too, instead of leaving the asker waiting.
	_, err = alice.RequestSecret(ctx, "bob", "panic", &roomsecrets.RequestSecretOptions{Timeout: 30 * time.Second})
	wantCode(t, err, codes.PermissionDenied)
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "boom") {
		t.Fatalf("rejection message %q does not mention the panic", msg)
	}
}

func TestWatchRequestsStream(t *testing.T) {
	ctx := testContext(t)
	carol := participant(t, "carol", "watch")
	alice := participant(t, "alice", "watch")

	stream, err := carol.WatchRequests(ctx)
	if err != nil {
		t.Fatalf("WatchRequests: %v", err)
	}
	defer stream.Close()
	event, err := stream.Recv()
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	if ready, ok := event.(*roomsecrets.WatchReady); !ok || ready.Pending != 0 {
		t.Fatalf("first event = %#v, want WatchReady{Pending: 0}", event)
	}

	type result struct {
		data []byte
		err  error
	}
	asked := make(chan result, 1)
	go func() {
		data, err := alice.RequestSecret(ctx, "carol", "vault://token", &roomsecrets.RequestSecretOptions{Timeout: 30 * time.Second})
		asked <- result{data, err}
	}()

	event, err = stream.Recv()
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	req, ok := event.(*roomsecrets.SecretRequest)
	if !ok || req.URL != "vault://token" || req.RequestedBy != "alice" || req.Type != roomsecrets.DefaultType {
		t.Fatalf("event = %#v, want alice's SecretRequest", event)
	}
	if err := carol.ProvideSecret(ctx, req.RequestID, []byte("tok-42")); err != nil {
		t.Fatalf("ProvideSecret: %v", err)
	}
	event, err = stream.Recv()
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	if closed, ok := event.(*roomsecrets.RequestClosed); !ok || closed.RequestID != req.RequestID || closed.State != roomsecrets.RequestProvided {
		t.Fatalf("event = %#v, want RequestClosed(provided)", event)
	}
	got := <-asked
	if got.err != nil || string(got.data) != "tok-42" {
		t.Fatalf("RequestSecret = %q, %v", got.data, got.err)
	}

	// Answering twice fails: the request is no longer pending.
	wantCode(t, carol.RejectSecret(ctx, req.RequestID, "too late"), codes.FailedPrecondition)

	stream.Close()
	if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("Recv after Close = %v, want Canceled", err)
	}
}

func TestServeRequestsStopsOnBadToken(t *testing.T) {
	client := dial(t, "not-a-jwt")
	err := client.ServeRequests(testContext(t), func(context.Context, *roomsecrets.SecretRequest) ([]byte, error) {
		return nil, nil
	})
	wantCode(t, err, codes.Unauthenticated)
}

func TestOAuthTokenNoneStored(t *testing.T) {
	ctx := testContext(t)
	alice := participant(t, "alice", "oauth")
	oauth := &roomsecrets.OAuthClientConfig{
		ClientID:              "client-1",
		AuthorizationEndpoint: "https://auth.example/authorize",
		TokenEndpoint:         "https://auth.example/token",
		Scopes:                []string{"read"},
	}
	token, err := alice.GetOfflineOAuthToken(ctx, roomsecrets.OfflineOAuthTokenInput{OAuth: oauth})
	if err != nil || token != "" {
		t.Fatalf("GetOfflineOAuthToken = %q, %v; want \"\", nil", token, err)
	}
	_, err = alice.GetOfflineOAuthToken(ctx, roomsecrets.OfflineOAuthTokenInput{OAuth: oauth, Connector: &roomsecrets.ConnectorRef{Name: "x"}})
	wantCode(t, err, codes.InvalidArgument)
}
