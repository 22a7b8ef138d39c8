package gate

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/evloop"
)

// TestPipelinedAfterLogin: a client may send its first query in the same
// write as its last login message, before the gate's ReadyForQuery. The
// gate must neither lose it (it once sat in the startup reader's buffer
// when the session's sockets moved to the event loop, and the client
// waited for ever) nor run it before the login completes. On the loop, on
// the loop under TLS, and on goroutines.
func TestPipelinedAfterLogin(t *testing.T) {
	first := newEnv(t, nil)
	for _, tc := range []struct {
		name        string
		tls, noLoop bool
		backend     evloop.Backend
	}{
		{"event loop", false, false, evloop.Auto},
		{"event loop, TLS", true, false, evloop.Auto},
		{"event loop on epoll", false, false, evloop.Epoll},
		{"event loop on epoll, TLS", true, false, evloop.Epoll},
		{"goroutines", false, true, evloop.Auto},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startGate(t, first.srv, func(c *Config) { c.NoEventLoop = tc.noLoop; c.LoopBackend = tc.backend })
			conn, err := net.DialTimeout("tcp", e.addr, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(15 * time.Second))
			var c net.Conn = conn
			if tc.tls {
				req, _ := (&pgproto3.SSLRequest{}).Encode(nil)
				if _, err := conn.Write(req); err != nil {
					t.Fatal(err)
				}
				b := make([]byte, 1)
				if _, err := conn.Read(b); err != nil || b[0] != 'S' {
					t.Fatalf("SSLRequest: %q %v", b, err)
				}
				c = tls.Client(conn, &tls.Config{InsecureSkipVerify: true})
			}
			fe := pgproto3.NewFrontend(c, c)
			query := &pgproto3.Query{String: "SELECT 'pipelined'"}
			scramLogin(t, c, fe, "alice", alicePW, "shop", query)
			want := []string{"RowDescription", "DataRow pipelined", "CommandComplete SELECT 1", "ReadyForQuery"}
			for i, w := range want {
				m, err := fe.Receive()
				if err != nil {
					t.Fatalf("the pipelined query's message %d (%s): %v", i+1, w, err)
				}
				if got := describe(m); got != w {
					t.Fatalf("the pipelined query's message %d = %s, want %s", i+1, got, w)
				}
			}
			if entered, _, _ := e.g.loopCounts(); !tc.noLoop && entered != 1 {
				t.Errorf("%d sessions went on the event loops, want 1", entered)
			}
		})
	}
}

func describe(m pgproto3.BackendMessage) string {
	switch m := m.(type) {
	case *pgproto3.DataRow:
		return "DataRow " + string(m.Values[0])
	case *pgproto3.CommandComplete:
		return "CommandComplete " + string(m.CommandTag)
	case *pgproto3.ErrorResponse:
		return "ErrorResponse " + m.Code + " " + m.Message
	}
	return strings.TrimPrefix(fmt.Sprintf("%T", m), "*pgproto3.")
}

// scramLogin logs in with SCRAM-SHA-256 and writes next in the same write
// as the last SASL message; it returns after the login's ReadyForQuery.
func scramLogin(t *testing.T, c net.Conn, fe *pgproto3.Frontend, user, pw, db string, next pgproto3.FrontendMessage) {
	t.Helper()
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{"user": user, "database": db}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	receive := func() pgproto3.BackendMessage {
		t.Helper()
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("login: %s %s", e.Code, e.Message)
		}
		return m
	}
	if _, ok := receive().(*pgproto3.AuthenticationSASL); !ok {
		t.Fatal("no SASL offered")
	}
	nonce := make([]byte, 18)
	rand.Read(nonce)
	clientFirstBare := "n=,r=" + base64.StdEncoding.EncodeToString(nonce)
	fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: "SCRAM-SHA-256", Data: []byte("n,," + clientFirstBare)})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	cont, ok := receive().(*pgproto3.AuthenticationSASLContinue)
	if !ok {
		t.Fatal("no server-first message")
	}
	serverFirst := string(cont.Data)
	var r, salt string
	var iters int
	for _, kv := range strings.Split(serverFirst, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "r":
			r = v
		case "s":
			salt = v
		case "i":
			iters, _ = strconv.Atoi(v)
		}
	}
	saltB, err := base64.StdEncoding.DecodeString(salt)
	if err != nil || iters == 0 {
		t.Fatalf("server-first %q: %v", serverFirst, err)
	}
	salted, err := pbkdf2.Key(sha256.New, pw, saltB, iters, 32)
	if err != nil {
		t.Fatal(err)
	}
	mac := func(key []byte, s string) []byte {
		h := hmac.New(sha256.New, key)
		h.Write([]byte(s))
		return h.Sum(nil)
	}
	clientKey := mac(salted, "Client Key")
	stored := sha256.Sum256(clientKey)
	withoutProof := "c=biws,r=" + r
	sig := mac(stored[:], clientFirstBare+","+serverFirst+","+withoutProof)
	for i := range clientKey {
		clientKey[i] ^= sig[i]
	}
	final := &pgproto3.SASLResponse{Data: []byte(withoutProof + ",p=" + base64.StdEncoding.EncodeToString(clientKey))}
	buf, err := final.Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	if buf, err = next.Encode(buf); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(buf); err != nil { // one write: one TCP segment, one TLS record
		t.Fatal(err)
	}
	for {
		if _, ok := receive().(*pgproto3.ReadyForQuery); ok {
			return
		}
	}
}
