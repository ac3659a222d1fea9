// Package gosuite runs containerd 1.6's own content test suite (content/testsuite, from
// Debian's golang-github-containerd-containerd-dev) against `contentfs serve`, through
// containerd's content/proxy client: the client containerd itself uses for a content
// proxy plugin. No namespace header is sent, as containerd sends none to a proxy.
//
// Each case gets a fresh store: the suite's temporary directory is the root of a
// `contentfs serve` started for that case (binary: $CONTENTFS_BIN) and stopped after
// it, which must exit 0.
//
// Built by tests/test_go_suite.py with Debian's Go in GOPATH mode, offline:
// GOPATH=/usr/share/gocode GO111MODULE=off go test -c.
package gosuite

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/content/proxy"
	"github.com/containerd/containerd/content/testsuite"
	"google.golang.org/grpc"
)

func TestContentSuite(t *testing.T) {
	bin := os.Getenv("CONTENTFS_BIN")
	if bin == "" {
		t.Fatal("CONTENTFS_BIN is not set: the contentfs entry point to test")
	}
	testsuite.ContentSuite(t, "contentfs", func(ctx context.Context, root string) (context.Context, content.Store, func() error, error) {
		return serve(ctx, bin, root)
	})
}

// serve starts `contentfs serve` on root and returns a proxy content store over it.
func serve(ctx context.Context, bin, root string) (context.Context, content.Store, func() error, error) {
	dir, err := os.MkdirTemp("", "contentfs-gosuite-")
	if err != nil {
		return ctx, nil, nil, err
	}
	sock := filepath.Join(dir, "s.sock")
	cmd := exec.Command(bin, "serve", "--root", root, "--address", "unix://"+sock)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return ctx, nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return ctx, nil, nil, err
	}
	var logged strings.Builder
	ready := make(chan bool, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		said := false
		for sc.Scan() {
			logged.WriteString(sc.Text() + "\n")
			if !said && strings.Contains(sc.Text(), "serving") {
				said = true
				ready <- true
			}
		}
		if !said {
			ready <- false
		}
	}()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		werr := cmd.Wait()
		<-done
		os.RemoveAll(dir)
		if werr != nil {
			return fmt.Errorf("contentfs serve: %v: %s", werr, logged.String())
		}
		return nil
	}
	select {
	case ok := <-ready:
		if !ok {
			stop()
			return ctx, nil, nil, fmt.Errorf("contentfs serve did not start: %s", logged.String())
		}
	case <-time.After(60 * time.Second):
		stop()
		return ctx, nil, nil, fmt.Errorf("contentfs serve did not start in 60 s: %s", logged.String())
	}
	conn, err := grpc.Dial("contentfs", grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)))
	if err != nil {
		stop()
		return ctx, nil, nil, err
	}
	cs := proxy.NewContentStore(contentapi.NewContentClient(conn))
	cleanup := func() error {
		conn.Close()
		return stop()
	}
	return ctx, cs, cleanup, nil
}
