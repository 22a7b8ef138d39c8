package pgtest

import (
	"strings"
	"testing"
	"time"
)

func TestPrimaryAndStandby(t *testing.T) {
	p := Start(t, Options{})
	if v := p.Query("postgres", "SHOW server_version"); !strings.HasPrefix(v, "15.") {
		t.Fatalf("server_version = %s, want 15.x", v)
	}
	p.Exec("postgres", "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)")
	sb := p.StartStandby(t)
	if v := sb.Query("postgres", "SELECT pg_is_in_recovery()"); v != "true" {
		t.Fatalf("standby in recovery = %s", v)
	}
	p.Exec("postgres", "INSERT INTO t VALUES (1001)")
	deadline := time.Now().Add(30 * time.Second)
	for sb.Query("postgres", "SELECT count(*) FROM t") != "1001" {
		if time.Now().After(deadline) {
			t.Fatal("the standby did not replay the insert")
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.Restart()
	if v := p.Query("postgres", "SELECT count(*) FROM t"); v != "1001" {
		t.Fatalf("after restart count = %s", v)
	}
}
