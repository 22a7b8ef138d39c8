package gate

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/state"
)

// startup returns a startup packet for user and database.
func startup(user, db string) []byte {
	body := binary.BigEndian.AppendUint32(nil, 196608)
	for _, kv := range [][2]string{{"user", user}, {"database", db}} {
		body = append(append(append(append(body, kv[0]...), 0), kv[1]...), 0)
	}
	body = append(body, 0)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body)+4)), body...)
}

func msg(typ byte, body string) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], uint32(len(body)+4))
	return append(b, body...)
}

// memLedger is a ledger.Store in memory that keeps only the last record
// (all the chain needs to go on): every refused login is a record, and a
// long fuzz run makes millions of them, each an fsync in SQLite.
type memLedger struct {
	mu   sync.Mutex
	seq  uint64
	last []byte
}

func (m *memLedger) Append(_ context.Context, seq uint64, rec []byte) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if seq != m.seq+1 {
		return false, nil
	}
	m.seq, m.last = seq, bytes.Clone(rec)
	return true, nil
}

func (m *memLedger) Read(_ context.Context, from uint64, fn func(uint64, []byte) error) error {
	m.mu.Lock()
	seq, last := m.seq, m.last
	m.mu.Unlock()
	switch {
	case from > seq:
		return nil
	case from < seq:
		return fmt.Errorf("memLedger: records before %d are not kept", seq)
	}
	return fn(seq, last)
}

func (m *memLedger) Last(context.Context) (uint64, []byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.seq, m.last, nil
}

// FuzzClient feeds arbitrary bytes to the gate as a client. The upstream
// is a listener that only counts connections: the gate must never panic,
// never connect upstream (let alone forward anything) for a client that
// has not authenticated, and must be done with a client soon after it has
// sent everything and hung up.
//
// Each input is one session over net.Pipe served by serveConn directly (no
// TCP connection, accept or port per input) and must end within 5 s, below
// the fuzz worker's own 10 s limit: the client's old 10 s deadline meant a
// session waiting on a hung-up client would have killed the worker instead
// of failing with this input. No input does today; the seconds-long stalls
// in a -fuzz run are the fuzzer minimizing each new input (thousands of
// runs at ~1 ms, mostly coverage bookkeeping over this large binary), and
// "context deadline exceeded" at the end of a -fuzztime run is Go 1.26's
// coordinator (go.dev/issue/75804; a count such as -fuzztime 20000x avoids it).
func FuzzClient(f *testing.F) {
	f.Add(startup("alice", "shop"))
	f.Add(append(startup("alice", "shop"), msg('p', "SCRAM-SHA-256\x00\x00\x00\x00\x20n,,n=,r=abcdefghijklmnopqrstuvwx")...))
	f.Add(append(startup("alice", "shop"), msg('Q', "DROP TABLE t\x00")...))
	f.Add([]byte{0, 0, 0, 8, 4, 210, 22, 47})                          // SSLRequest
	f.Add([]byte{0, 0, 0, 8, 4, 210, 22, 48})                          // GSSENCRequest
	f.Add([]byte{0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 1, 0, 0, 0, 2}) // CancelRequest
	f.Add(append(startup("mallory", "x"), msg('X', "")...))
	f.Add([]byte{0, 0, 0, 3})
	f.Add([]byte{0x7f, 0xff, 0xff, 0xff})

	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	defer up.Close()
	var upstreamConns atomic.Int64
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			upstreamConns.Add(1)
			c.Close()
		}
	}()
	ctx := context.Background()
	dir := f.TempDir()
	db, err := state.Open(ctx, filepath.Join(dir, "state.db"))
	if err != nil {
		f.Fatal(err)
	}
	defer db.Close()
	led, err := ledger.Open(ctx, &memLedger{}, nil, ed25519.NewKeyFromSeed(make([]byte, 32)), ledger.Options{})
	if err != nil {
		f.Fatal(err)
	}
	defer led.Close(ctx)
	v, _ := NewVerifier(alicePW, 0)
	db.AddUser(ctx, state.User{Name: "alice", Secret: v.String()})
	host, port, _ := net.SplitHostPort(up.Addr().String())
	pc, err := policy.Parse([]byte(`
tls: {require_tls: false}
upstreams:
  shop: {host: `+host+`, port: `+port+`, user: app_owner, sslmode: disable}
rules:
  - {users: ["*"], databases: ["*"], classes: ["*"], action: allow}
`), "fuzz.yaml")
	if err != nil {
		f.Fatal(err)
	}
	dsn, _ := pc.Upstreams["shop"].DSN()
	g, err := New(Config{Upstreams: map[string]Upstream{"shop": {DSN: dsn}}, Policy: pc, State: db,
		Quorum: quorum.New(db, led, quorum.Options{}), Ledger: led, AuthDelay: time.Nanosecond, AuthDelayMax: time.Nanosecond,
		MaxMessageSize: 1 << 16})
	if err != nil {
		f.Fatal(err)
	}
	defer g.Close(ctx)

	f.Fuzz(func(t *testing.T, data []byte) {
		cli, srv := net.Pipe()
		defer cli.Close()
		served := make(chan struct{})
		go func() {
			defer close(served)
			g.serveConn(srv)
		}()
		go io.Copy(io.Discard, cli) // the gate's answers; ends when cli closes
		// A pipe has no half-close: write all, then hang up. The write ends
		// early (ErrClosedPipe) when the gate stops reading and closes; it
		// blocks if the gate stops reading and stays, which the wait below
		// catches.
		go func() {
			cli.Write(data)
			cli.Close()
		}()
		// Below the fuzz worker's own 10 s limit, so that a session that
		// outlives its client fails here, naming the input, rather than
		// killing the worker.
		select {
		case <-served:
		case <-time.After(5 * time.Second):
			t.Fatalf("the gate still serves an unauthenticated client after 5 s (%d bytes of input, then hung up)", len(data))
		}
		if n := upstreamConns.Load(); n != 0 {
			t.Fatalf("an unauthenticated client made the gate connect upstream (%d times)", n)
		}
	})
}
