// Package roomsecrets is a thin, idiomatic Go client for the roomsecrets room Secrets API
// (the RoomSecrets gRPC service in proto/roomsecrets/v1).
//
// Connect with [Dial] (which owns its connection) or wrap an existing connection with [New]:
//
//	client, err := roomsecrets.Dial(ctx, "127.0.0.1:50051", roomsecrets.WithToken(token))
//	if err != nil { ... }
//	defer client.Close()
//
//	_, err = client.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "db", Type: "text/plain", Data: []byte("postgres://...")})
//	secret, err := client.GetSecret(ctx, "db") // nil, nil when there is no such secret
//
// Every call is authenticated with a participant JWT sent as `authorization: Bearer <token>`
// metadata and is scoped to the room named in the token.
//
// Errors are the gRPC status errors returned by the server, unwrapped: use
// [google.golang.org/grpc/status.Code] to branch on them (codes.Unauthenticated,
// codes.InvalidArgument, codes.Aborted for a stale etag, codes.PermissionDenied for a rejected
// request, codes.DeadlineExceeded for an expired one, ...). Failures detected by the client itself
// (a value that does not match its CRC32C, invalid arguments) are status errors too
// (codes.DataLoss, codes.InvalidArgument).
//
// The inbound side of secret requests is [Client.WatchRequests] (the raw event stream) and
// [Client.ServeRequests], which answers each request with a handler function.
//
// The generated messages and stubs live in package
// github.com/roomsecrets/roomsecrets/clients/go/roomsecretsv1.
package roomsecrets
