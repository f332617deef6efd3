package roomsecrets_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/roomsecrets/roomsecrets/clients/go/roomsecrets"
)

// selfSigned writes a self-signed certificate for 127.0.0.1 and its key into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "roomsecrets test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// TestTLS starts a second server with a TLS certificate and talks to it with WithTLS.
func TestTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a second server")
	}
	ctx := testContext(t)
	dir := t.TempDir()
	certFile, keyFile, pool := selfSigned(t, dir)
	dataDir := filepath.Join(dir, "data")
	tlsServer, err := startServer(server.bin, dataDir, "--tls-cert", certFile, "--tls-key", keyFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tlsServer.stop(); err != nil {
			t.Error(err)
		}
	})
	token := tlsServer.mintToken(t, "alice", "tls")

	client, err := roomsecrets.Dial(ctx, tlsServer.addr, roomsecrets.WithToken(token),
		roomsecrets.WithTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.SetSecret(ctx, roomsecrets.SetSecretInput{ID: "k", Data: []byte("over tls")}); err != nil {
		t.Fatalf("SetSecret over TLS: %v", err)
	}
	if got, err := client.GetSecret(ctx, "k"); err != nil || got == nil || string(got.Data) != "over tls" {
		t.Fatalf("GetSecret over TLS = %+v, %v", got, err)
	}

	// A client that does not trust the certificate cannot connect.
	untrusting, err := roomsecrets.Dial(ctx, tlsServer.addr, roomsecrets.WithToken(token),
		roomsecrets.WithTLS(&tls.Config{RootCAs: x509.NewCertPool(), MinVersion: tls.VersionTLS12}))
	if err != nil {
		t.Fatal(err)
	}
	defer untrusting.Close()
	_, err = untrusting.ListSecrets(ctx)
	wantCode(t, err, codes.Unavailable)
}
