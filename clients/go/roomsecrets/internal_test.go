package roomsecrets

import (
	"context"
	"strings"
	"testing"
)

func TestIsLoopback(t *testing.T) {
	for target, want := range map[string]bool{
		"127.0.0.1:50051":          true,
		"localhost:50051":          true,
		"[::1]:50051":              true,
		"dns:///localhost:50051":   true,
		"unix:///tmp/rs.sock":      true,
		"10.0.0.5:50051":           false,
		"secrets.example.com:443":  false,
		"dns:///secrets.example:1": false,
	} {
		if got := isLoopback(target); got != want {
			t.Errorf("isLoopback(%q) = %v, want %v", target, got, want)
		}
	}
}

func TestDialRefusesRemotePlaintext(t *testing.T) {
	if _, err := Dial(context.Background(), "secrets.example.com:443", WithToken("t")); err == nil {
		t.Fatal("Dial accepted plaintext to a remote address")
	}
	client, err := Dial(context.Background(), "secrets.example.com:443", WithToken("t"), WithInsecure())
	if err != nil {
		t.Fatalf("Dial with WithInsecure: %v", err)
	}
	_ = client.Close()
}

func TestCleanReason(t *testing.T) {
	if got := cleanReason("no\nway\x00 "); got != "no way" {
		t.Errorf("cleanReason = %q", got)
	}
	if got := cleanReason(""); got != "rejected" {
		t.Errorf("cleanReason(\"\") = %q", got)
	}
	if got := cleanReason(strings.Repeat("é", 2000)); len([]rune(got)) != maxReason {
		t.Errorf("cleanReason kept %d runes", len([]rune(got)))
	}
}
