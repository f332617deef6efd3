// Command roomsecrets-participant is a Go participant for the cross-language tests
// (tests/test_cross_language.py), and an example of the client:
//
//	roomsecrets-participant ask   ADDRESS TOKEN FROM URL  # prints the value, or CODE: message on stderr
//	roomsecrets-participant serve ADDRESS TOKEN           # answers requests until stdin closes
//
// serve provides "go-secret-for:<url>" and rejects URLs containing "deny" with "go says no"; it
// prints "ready" once its WatchRequests stream is live.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	"github.com/roomsecrets/roomsecrets/clients/go/roomsecrets"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: roomsecrets-participant ask|serve ADDRESS TOKEN [FROM URL]")
		return 2
	}
	mode, address, token := args[0], args[1], args[2]
	ctx := context.Background()
	client, err := roomsecrets.Dial(ctx, address, roomsecrets.WithToken(token))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer client.Close()
	switch {
	case mode == "ask" && len(args) == 5:
		value, err := client.RequestSecret(ctx, args[3], args[4], &roomsecrets.RequestSecretOptions{Timeout: 20 * time.Second})
		if err != nil {
			st := status.Convert(err)
			fmt.Fprintf(os.Stderr, "%s: %s\n", strings.ToUpper(toSnake(st.Code().String())), st.Message())
			return 1
		}
		fmt.Println(string(value))
		return 0
	case mode == "serve":
		ctx, cancel := context.WithCancel(ctx)
		go func() { _, _ = io.Copy(io.Discard, os.Stdin); cancel() }()
		handler := func(_ context.Context, req *roomsecrets.SecretRequest) ([]byte, error) {
			if strings.Contains(req.URL, "deny") {
				return nil, errors.New("go says no")
			}
			return []byte("go-secret-for:" + req.URL), nil
		}
		ready := roomsecrets.WithReadyFunc(func(int) { fmt.Println("ready") })
		if err := client.ServeRequests(ctx, handler, ready); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	fmt.Fprintln(os.Stderr, "usage: roomsecrets-participant ask|serve ADDRESS TOKEN [FROM URL]")
	return 2
}

// toSnake turns a codes.Code name such as "PermissionDenied" into "permission_denied".
func toSnake(name string) string {
	var b strings.Builder
	for i, r := range name {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return b.String()
}
