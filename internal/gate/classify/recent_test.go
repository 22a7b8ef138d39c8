package classify

import (
	"fmt"
	"testing"
)

// TestRecent: a session's memory in front of the cache gives exactly what
// the cache gives (class and text), derives its value once per entry, and
// never lets a shape stand for a text the cache kept by text only.
func TestRecent(t *testing.T) {
	c := NewCache(64)
	values := 0
	r := NewRecent(c, func(res Result) string { values++; return string(res.Class) })
	check := func(sql string, wantOK bool) {
		t.Helper()
		want, inCache := c.Cached(sql)
		res, v, ok := r.Cached(sql)
		if ok != wantOK || ok != inCache {
			t.Fatalf("%q: Recent ok=%v, cache ok=%v, want %v", sql, ok, inCache, wantOK)
		}
		if ok && (!sameResult(res, want) || v != string(want.Class) || res.Statements[0].Text != want.Statements[0].Text) {
			t.Fatalf("%q: Recent %+v (value %q), cache %+v", sql, res, v, want)
		}
	}

	// Nothing is found before the cache has it.
	check("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", false)
	tpcb := []string{
		"BEGIN;",
		"UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = 7;",
		"SELECT abalance FROM pgbench_accounts WHERE aid = %d;",
		"UPDATE pgbench_tellers SET tbalance = tbalance + 3 WHERE tid = %d;",
		"UPDATE pgbench_branches SET bbalance = bbalance + 3 WHERE bid = %d;",
		"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, %d, -5, CURRENT_TIMESTAMP);",
		"END;",
	}
	text := func(q string, i int) string {
		if q == "BEGIN;" || q == "END;" {
			return q
		}
		return fmt.Sprintf(q, i*7919+1)
	}
	for _, q := range tpcb {
		c.Classify(text(q, 0), withLookup)
	}
	for i := range 30 {
		for _, q := range tpcb {
			check(text(q, i+1), true)
		}
	}
	if values != len(tpcb) {
		t.Fatalf("value derived %d times for %d statements", values, len(tpcb))
	}

	// Two texts of one shape that the cache keeps by text (the class reads
	// a constant): each gets its own class, never the other's.
	for _, p := range [][2]string{
		{"DELETE FROM t WHERE 1 = 2", "DELETE FROM t WHERE 1 = 1"},
		{"SELECT set_config('application_name', 'x', false)", "SELECT set_config('session_replication_role', 'replica', false)"},
	} {
		c.Classify(p[0], withLookup)
		check(p[0], true)
		check(p[1], false)
		c.Classify(p[1], withLookup)
		check(p[1], true)
		check(p[0], true)
	}

	// Reset empties the cache, and the session's memory with it.
	c.Reset()
	check("BEGIN;", false)
	c.Classify("BEGIN;", withLookup)
	before := values
	check("BEGIN;", true)
	if values != before+1 {
		t.Fatal("a value from before Reset was kept")
	}
}
