package evloop_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/dualkey/dualkey/internal/evloop"
)

// backend is what the tests' loops run on: every test runs once on epoll
// and once on io_uring where the kernel has it (go.dev/issue/23129: M.Run
// may be called more than once).
var backend = evloop.Epoll

func newLoop() (*evloop.Loop, error) { return evloop.NewBackend(backend) }

func TestMain(m *testing.M) {
	code := m.Run()
	l, err := evloop.NewBackend(evloop.IOURing)
	if err != nil {
		fmt.Fprintf(os.Stderr, "evloop: the tests ran on epoll only: %v\n", err)
		os.Exit(code)
	}
	go l.Run()
	l.Stop()
	backend = evloop.IOURing
	fmt.Fprintln(os.Stderr, "evloop: the tests again, on io_uring")
	if c := m.Run(); code == 0 {
		code = c
	}
	os.Exit(code)
}
