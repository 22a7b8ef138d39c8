package gate

import (
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
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

// FuzzClient feeds arbitrary bytes to the gate as a client. The upstream
// is a listener that only counts connections: the gate must never panic,
// and never connect upstream (let alone forward anything) for a client
// that has not authenticated.
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
	led, err := ledger.Open(ctx, db.Ledger(), nil, ed25519.NewKeyFromSeed(make([]byte, 32)), ledger.Options{})
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
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	go g.Serve(ln)
	defer g.Close(ctx)

	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		go func() {
			c.Write(data)
			c.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(io.Discard, c)
		if n := upstreamConns.Load(); n != 0 {
			t.Fatalf("an unauthenticated client made the gate connect upstream (%d times)", n)
		}
	})
}
