package roomsecrets_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The tests run against the real Python server, started once by TestMain:
//
//	roomsecrets serve --data-dir <tmp> --listen 127.0.0.1:0
//
// The binary is $ROOMSECRETS_BIN, or the repository's .venv/bin/roomsecrets.
var server *serverProcess

var serving = regexp.MustCompile(`roomsecrets: serving on (\S+) \(`)

func TestMain(m *testing.M) {
	os.Exit(runWithServer(m))
}

func runWithServer(m *testing.M) int {
	bin, err := serverBinary()
	if err != nil {
		fmt.Fprintln(os.Stderr, "roomsecrets tests:", err)
		return 1
	}
	dataDir, err := os.MkdirTemp("", "roomsecrets-go-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "roomsecrets tests:", err)
		return 1
	}
	defer os.RemoveAll(dataDir)
	server, err = startServer(bin, dataDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "roomsecrets tests:", err)
		return 1
	}
	code := m.Run()
	if err := server.stop(); err != nil {
		fmt.Fprintln(os.Stderr, "roomsecrets tests:", err)
	}
	if code != 0 {
		fmt.Fprintf(os.Stderr, "--- server log ---\n%s------------------\n", server.log())
	}
	return code
}

// serverProcess is a running `roomsecrets serve`.
type serverProcess struct {
	bin     string
	dataDir string
	addr    string

	cmd     *exec.Cmd
	exited  chan error
	drained chan struct{}
	logMu   sync.Mutex
	logBuf  bytes.Buffer
}

// startServer runs `bin serve --data-dir dataDir --listen 127.0.0.1:0 extra...` and waits until
// it prints the address it serves on (on stderr).
func startServer(bin, dataDir string, extra ...string) (*serverProcess, error) {
	args := append([]string{"serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0"}, extra...)
	s := &serverProcess{bin: bin, dataDir: dataDir, cmd: exec.Command(bin, args...),
		exited: make(chan error, 1), drained: make(chan struct{})}
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	addrc := make(chan string, 1)
	go func() { // keep reading stderr so the server never blocks on a full pipe
		defer close(s.drained)
		scanner := bufio.NewScanner(stderr)
		scanner.Buffer(make([]byte, 64<<10), 1<<20)
		for scanner.Scan() {
			line := scanner.Text()
			s.logMu.Lock()
			s.logBuf.WriteString(line + "\n")
			s.logMu.Unlock()
			if match := serving.FindStringSubmatch(line); match != nil {
				select {
				case addrc <- match[1]:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	go func() {
		<-s.drained // Wait closes the pipe: read it all first
		s.exited <- s.cmd.Wait()
	}()
	select {
	case s.addr = <-addrc:
		return s, nil
	case err := <-s.exited:
		return nil, fmt.Errorf("the server exited before serving (%v):\n%s", err, s.log())
	case <-time.After(60 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return nil, fmt.Errorf("the server did not start within 60 s:\n%s", s.log())
	}
}

// stop sends SIGTERM (the server drains and exits) and kills the server if it hangs.
func (s *serverProcess) stop() error {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		return nil
	case <-time.After(20 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return errors.New("the server did not stop on SIGTERM; killed")
	}
}

func (s *serverProcess) log() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.logBuf.String()
}

// serverBinary is $ROOMSECRETS_BIN or ../../.venv/bin/roomsecrets relative to the module root
// (clients/go), as an absolute path.
func serverBinary() (string, error) {
	if bin := os.Getenv("ROOMSECRETS_BIN"); bin != "" {
		return filepath.Abs(bin)
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the test directory")
		}
		dir = parent
	}
	bin := filepath.Join(dir, "..", "..", ".venv", "bin", "roomsecrets")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("server binary %s not found (build the venv with `make test`, or set ROOMSECRETS_BIN): %w", bin, err)
	}
	return filepath.Clean(bin), nil
}

// mintToken returns a participant JWT for identity in room, minted by the CLI of the test server.
func mintToken(t *testing.T, identity, room string) string {
	t.Helper()
	return server.mintToken(t, identity, room)
}

func (s *serverProcess) mintToken(t *testing.T, identity, room string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.bin, "token", "--data-dir", s.dataDir, "--identity", identity, "--room", room)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("minting a token for %s in %s: %v\n%s", identity, room, err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}
