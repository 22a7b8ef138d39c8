package gate

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

// The real clients of issue 6 (psycopg2, node-postgres, pgJDBC), each
// running a script in testdata/ through the gate against real PostgreSQL:
// SCRAM over TLS, an ordinary and a parameterised query, COPY in and out,
// and a DELETE without WHERE held, approved by two approvers, run once and
// held again. The scripts print "key<TAB>value" lines; runClient asserts on
// them and on the database itself.

// need returns the path of a client tool, failing the test when it is
// missing: make test must run these clients, so absence is an error.
func need(t *testing.T, path, what string) string {
	t.Helper()
	if strings.ContainsRune(path, '/') {
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("%s: %s is missing; run scripts/setup.sh (or go test -short to skip the real clients)", what, path)
		}
		return path
	}
	p, err := exec.LookPath(path)
	if err != nil {
		t.Fatalf("%s: %s not found; run scripts/setup.sh (or go test -short to skip the real clients)", what, path)
	}
	return p
}

// csvRows is what every script copies in, and so what it must copy out.
func csvRows() string {
	var b strings.Builder
	for i := 100; i < 1100; i++ {
		fmt.Fprintf(&b, "%d,row %d\n", i, i)
	}
	return b.String()
}

// runClient runs cmd (a script given HOST PORT DB USER PASSWORD TABLE),
// approves its first held request through the quorum, and checks what the
// script reports and what the database holds.
func (e *env) runClient(t *testing.T, ctx context.Context, cmd *exec.Cmd, table string) {
	t.Helper()
	host, port, _ := net.SplitHostPort(e.addr)
	cmd.Args = append(cmd.Args, host, port, "shop", "alice", alicePW, table)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	}()

	var got []string // key=value in order, for the failure message
	var holds []string
	counts := []string{}
	seen := map[string]string{}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		key, val, _ := strings.Cut(sc.Text(), "\t")
		got = append(got, key+"="+val)
		switch key {
		case "held":
			code, msg, _ := strings.Cut(val, " ")
			if code != "42501" {
				t.Fatalf("a DELETE without WHERE answered %s %q, want 42501 (held)", code, msg)
			}
			m := requestRE.FindStringSubmatch(msg)
			if m == nil || !strings.Contains(msg, "held for approval") || !strings.Contains(msg, "dualkey approvals approve "+m[1]) {
				t.Fatalf("the hold does not name its request and the command: %q", msg)
			}
			holds = append(holds, m[1])
			if len(holds) == 1 {
				if n := count(t, e.srv, "shop", table); n != 1003 {
					t.Fatalf("%s has %d rows while the DELETE is held, want 1003", table, n)
				}
				sum, err := e.svc.Show(ctx, cert.ID(m[1]))
				if err != nil {
					t.Fatal(err)
				}
				if r := sum.Request; r.Requester != "alice" || r.SQL.Text != "DELETE FROM "+table || r.SQL.Database != "shop" || r.SQL.Class != "destructive" {
					t.Fatalf("the request binds %+v %+v", r, r.SQL)
				}
				e.approve(m[1])
			}
			if _, err := io.WriteString(stdin, "next\n"); err != nil {
				t.Fatal(err)
			}
		case "count":
			counts = append(counts, val)
		default:
			seen[key] = val
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%s: %v\nprinted: %v\nstderr:\n%s", cmd.Path, err, got, stderr.String())
	}
	t.Logf("%s: %v", seen["done"], got)

	want := sha256.Sum256([]byte(csvRows()))
	for key, v := range map[string]string{"user": "app_owner", "param": "item 2", "copyin": "1000",
		"copyout": hex.EncodeToString(want[:]), "ran": "1003"} {
		if seen[key] != v {
			t.Errorf("%s = %q, want %q (printed: %v)", key, seen[key], v, got)
		}
	}
	if tls, ok := seen["tls"]; ok && !strings.EqualFold(tls, "true") {
		t.Errorf("the client says its connection is not TLS (%s)", tls)
	}
	// held (nothing ran), ran once (all gone), held again under a new request
	if len(holds) != 2 || holds[0] == holds[1] || strings.Join(counts, ",") != "1003,0,0" {
		t.Fatalf("holds %v, counts after each try %v; want two different requests and 1003,0,0 (printed: %v)", holds, counts, got)
	}
	if sum, _ := e.svc.Show(ctx, cert.ID(holds[0])); sum.Status != state.StatusConsumed {
		t.Errorf("the approved request is %s, want consumed", sum.Status)
	}
	if n := count(t, e.srv, "shop", table); n != 0 {
		t.Errorf("%s has %d rows after the approved DELETE", table, n)
	}
}

func TestRealClients(t *testing.T) {
	if testing.Short() {
		t.Skip("real clients (psycopg2, node-postgres, pgJDBC): not with -short")
	}
	// require_tls: every client below got in over TLS, or not at all.
	e := newEnv(t, func(c *Config) { c.RequireTLS = true })
	ctx := ctxT(t, 10*time.Minute)

	t.Run("psycopg2", func(t *testing.T) {
		py := need(t, "/usr/bin/python3", "psycopg2")
		if out, err := exec.Command(py, "-c", "import psycopg2").CombinedOutput(); err != nil {
			t.Fatalf("psycopg2: python3 cannot import it (Debian's python3-psycopg2); run scripts/setup.sh\n%s", out)
		}
		script, _ := filepath.Abs("testdata/psycopg2_client.py")
		e.runClient(t, ctx, exec.CommandContext(ctx, py, script), "clients_psycopg2")
	})

	t.Run("node-postgres", func(t *testing.T) {
		node := need(t, "node", "node-postgres")
		dir, _ := filepath.Abs("testdata/node")
		if _, err := os.Stat(filepath.Join(dir, "node_modules", "pg-copy-streams", "package.json")); err != nil {
			npm := need(t, "npm", "node-postgres")
			cmd := exec.CommandContext(ctx, npm, "ci", "--no-audit", "--no-fund")
			cmd.Dir = dir
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("npm ci in %s: %v\n%s", dir, err, out)
			}
		}
		e.runClient(t, ctx, exec.CommandContext(ctx, node, filepath.Join(dir, "client.js")), "clients_node")
	})

	t.Run("pgjdbc", func(t *testing.T) {
		jar := need(t, "/usr/share/java/postgresql.jar", "pgJDBC (Debian's libpostgresql-jdbc-java)")
		javac, java := need(t, "javac", "pgJDBC (a JDK)"), need(t, "java", "pgJDBC (a JDK)")
		classes := t.TempDir()
		src, _ := filepath.Abs("testdata/jdbc/GateClient.java")
		if out, err := exec.CommandContext(ctx, javac, "-cp", jar, "-d", classes, src).CombinedOutput(); err != nil {
			t.Fatalf("javac: %v\n%s", err, out)
		}
		cp := classes + string(os.PathListSeparator) + jar
		e.runClient(t, ctx, exec.CommandContext(ctx, java, "-cp", cp, "GateClient"), "clients_jdbc")
	})

	// Every client's session is in the ledger under its application_name.
	for n, _ := e.g.Sessions(""); n > 0; n, _ = e.g.Sessions("") {
		select { // the clients have exited; their sessions end soon after
		case <-ctx.Done():
			t.Fatalf("%d sessions never ended", n)
		case <-time.After(10 * time.Millisecond):
		}
	}
	e.g.rec.flush()
	apps := map[string]bool{}
	if err := e.db.Ledger().Read(ctx, 1, func(_ uint64, rec []byte) error {
		r, err := ledger.ParseRecord(rec)
		if err != nil {
			return err
		}
		var d struct {
			App     string `json:"application_name"`
			Refused string `json:"refused"`
		}
		if r.Kind == ledger.KindSessionOpen && json.Unmarshal(r.Data, &d) == nil && d.Refused == "" {
			apps[d.App] = true
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !t.Failed() && (!apps["psycopg2"] || !apps["node-postgres"] || !apps["pgjdbc"]) {
		t.Errorf("session records by application_name: %v", apps)
	}
}
