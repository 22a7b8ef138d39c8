package classify

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
)

func TestCache(t *testing.T) {
	c := NewCache(2)
	calls := 0
	opts := Options{Lookup: func(s, n string) (byte, bool) { calls++; return 'v', true }}
	r1 := c.Classify("SELECT f()", opts)
	r2 := c.Classify("SELECT f()", opts)
	if r1.Class != Write || r2.Class != Write || calls != 1 {
		t.Fatalf("second call not cached: %s %s, %d lookups", r1.Class, r2.Class, calls)
	}
	// Same fingerprint, different class: the cache must key on the text.
	if c.Classify("DELETE FROM t WHERE 1 = 2", opts).Class != Write || c.Classify("DELETE FROM t WHERE 1 = 1", opts).Class != Destructive {
		t.Fatal("texts with one fingerprint share a cached class")
	}
	if c.Len() != 2 {
		t.Fatalf("Len = %d, want the bound 2", c.Len())
	}
	c.Classify("SELECT f()", opts) // evicted: classified again
	if calls != 2 {
		t.Fatalf("least recently used entry not evicted: %d lookups", calls)
	}
	if h, m := c.Stats(); h != 1 || m != 4 {
		t.Fatalf("stats = %d hits, %d misses", h, m)
	}
	c.Reset()
	if c.Len() != 0 {
		t.Fatal("Reset kept entries")
	}
}

func TestCacheConcurrent(t *testing.T) {
	c := NewCache(8)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				q := fmt.Sprintf("SELECT %d", (g+i)%16)
				if r := c.Classify(q, Options{}); r.Class != Read {
					t.Errorf("%s: %s", q, r.Class)
					return
				}
			}
		}()
	}
	wg.Wait()
	if c.Len() > 8 {
		t.Fatalf("Len = %d over the bound", c.Len())
	}
}

func BenchmarkClassify(b *testing.B) {
	q := "SELECT abalance FROM pgbench_accounts WHERE aid = 48213"
	b.ReportAllocs()
	for b.Loop() {
		Classify(q, Options{})
	}
}

func BenchmarkCacheHit(b *testing.B) {
	q := "SELECT abalance FROM pgbench_accounts WHERE aid = 48213"
	c := NewCache(0)
	c.Classify(q, Options{})
	b.ReportAllocs()
	for b.Loop() {
		c.Classify(q, Options{})
	}
}

func TestShapeOf(t *testing.T) {
	tests := []struct {
		sql, shape string // shape "" means shapeOf gives up
	}{
		{"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;", "SELECT abalance FROM pgbench_accounts WHERE aid = \x00i;"},
		{"UPDATE t SET x = x + -5 WHERE id = 2147483648", "UPDATE t SET x = x + -\x00i WHERE id = \x00f"},
		{"INSERT INTO h VALUES (1, 2.5, 1e3, 'it''s', $1, now())", "INSERT INTO h VALUES (\x00i, \x00f, \x00f, \x00s, $1, now())"},
		{`SELECT "a'b", t1.c2 FROM "x""y" t1`, `SELECT "a'b", t1.c2 FROM "x""y" t1`},
		{"SELECT 1::float(53), 'x'::text", "SELECT \x00i::float(\x00i), \x00s::text"},
		{"SELECT 1 -- comment", ""},
		{"SELECT /* c */ 1", ""},
		{"SELECT $$x$$", ""},
		{"SELECT $q$x$q$", ""},
		{"SELECT E'a\\'; DROP TABLE t; --'", ""},
		{"SELECT 'a\\'", ""},
		{"SELECT e'x', B'101', X'1F', N'x'", ""},
		{"SELECT U&'\\0041', U&\"d\\0061t\\+000061\"", ""},
		{"SELECT 1; DELETE FROM t", ""},
		{"SELECT 1;;", ""},
		{"SELECT 0x1F", ""},
		{"SELECT 1_000", ""},
		{"SELECT 123abc", ""},
		{"SELECT 1e", ""},
		{"SELECT 1.2.3", ""},
		{"SELECT .5", ""},
		{"SELECT a..b", ""},
		{"SELECT 'unterminated", ""},
		{"SELECT \"unterminated", ""},
		{"SELECT 1\x00; DROP TABLE t", ""},
		{"SELECT '\xff'", ""},
		{"SELECT date'2020-01-01'", ""},
		{"SELECT {1}", ""},
	}
	for _, tt := range tests {
		shape, _, ok := shapeOf(tt.sql)
		if tt.shape == "" {
			if ok {
				t.Errorf("shapeOf(%q) = %q, want it to give up", tt.sql, shape)
			}
			continue
		}
		if !ok || shape != tt.shape {
			t.Errorf("shapeOf(%q) = %q, %v; want %q", tt.sql, shape, ok, tt.shape)
		}
	}
}

// TestCacheShapes: statements that differ only in constants share a
// cached classification only when the classification never read a
// constant. Each pair is classified in order through one cache; the
// second must come out as a full parse says, which for these is stricter.
func TestCacheShapes(t *testing.T) {
	pairs := []struct{ first, second string }{
		{"DELETE FROM t WHERE 1 = 2", "DELETE FROM t WHERE 1 = 1"},
		{"DELETE FROM t WHERE 'a' = 'b'", "DELETE FROM t WHERE 'a' = 'a'"},
		{"UPDATE t SET x = 1 WHERE id = 1 OR 1 = 2", "UPDATE t SET x = 1 WHERE id = 1 OR 1 = 1"},
		{"DELETE FROM t WHERE 2 > 3", "DELETE FROM t WHERE 3 > 2"},
		{"DELETE FROM t WHERE name LIKE 'a%'", "DELETE FROM t WHERE name LIKE '%'"},
		{"DELETE FROM t WHERE 5 BETWEEN 1 AND 3", "DELETE FROM t WHERE 2 BETWEEN 1 AND 3"},
		{"DELETE FROM t WHERE 1 IN (2, 3)", "DELETE FROM t WHERE 1 IN (1, 2)"},
		{"DELETE FROM t WHERE 0::bool", "DELETE FROM t WHERE 1::bool"},
		{"DELETE FROM t WHERE 'no'", "DELETE FROM t WHERE 'yes'"},
		{"DELETE FROM t WHERE 'f'::boolean", "DELETE FROM t WHERE 't'::boolean"},
		{"DELETE FROM t WHERE x = x + 1", "DELETE FROM t WHERE x = x + 0"},
		{"DELETE FROM t WHERE 1 + 1 = 3", "DELETE FROM t WHERE 1 + 1 = 2"},
		{"DELETE FROM t WHERE -1 = 1", "DELETE FROM t WHERE -1 = -1"},
		{"DELETE FROM t WHERE 1 IS NOT DISTINCT FROM 2", "DELETE FROM t WHERE 1 IS NOT DISTINCT FROM 1"},
		{"DELETE FROM t WHERE coalesce('f'::bool, false)", "DELETE FROM t WHERE coalesce('t'::bool, false)"},
		{"DELETE FROM t WHERE id = 3 OR (2 = 2)", "DELETE FROM t WHERE id = 3 OR (2 = 2)"},
		{"SELECT query_to_xml('SELECT 1', true, true, '')", "SELECT query_to_xml('DELETE FROM t RETURNING 1', true, true, '')"},
		{"SELECT set_config('application_name', 'x', false)", "SELECT set_config('session_replication_role', 'replica', false)"},
		{"WITH d AS (SELECT 1) SELECT * FROM d WHERE 1 = 1", "WITH d AS (DELETE FROM t WHERE 1 = 1 RETURNING *) SELECT * FROM d"},
		{"SELECT ts_rewrite('a'::tsquery, 'SELECT 1')", "SELECT ts_rewrite('a'::tsquery, 'DELETE FROM t RETURNING 1')"},
		{"SELECT 1::float(53)", "SELECT 1::float(99999999999)"},
		{"SELECT 1::float(53)", "SELECT 1::float(0)"}, // the grammar checks the precision: 0 does not parse
		{"SELECT 'a'\n'b'", "SELECT 'a'\n'DELETE'"},
		{"SELECT * FROM t WHERE x = 'a' OR x = 'b'", "DELETE FROM t WHERE x = 'a' OR x = x"},
	}
	for _, p := range pairs {
		c := NewCache(16)
		c.Classify(p.first, withLookup)
		want := Classify(p.second, withLookup)
		if got := c.Classify(p.second, withLookup); !sameResult(got, want) {
			t.Errorf("after %q, cache says %q is %s (%s); a full parse says %s (%s)",
				p.first, p.second, got.Class, got.Reason, want.Class, want.Reason)
		}
	}

	// What the shapes are for: pgbench's statements, new constants each
	// time, parsed once per shape.
	c := NewCache(16)
	for i := range 50 {
		for _, q := range []string{
			"SELECT abalance FROM pgbench_accounts WHERE aid = %d;",
			"UPDATE pgbench_accounts SET abalance = abalance + -%d WHERE aid = 7;",
			"UPDATE pgbench_tellers SET tbalance = tbalance + 3 WHERE tid = %d;",
			"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, %d, -5, CURRENT_TIMESTAMP);",
			"DELETE FROM t WHERE id = %d",
		} {
			sql := fmt.Sprintf(q, i*7919+1)
			got, want := c.Classify(sql, withLookup), Classify(sql, withLookup)
			if !sameResult(got, want) {
				t.Fatalf("%q: cache %+v, full parse %+v", sql, got, want)
			}
		}
	}
	if h, m := c.Stats(); m != 5 || h != 245 {
		t.Fatalf("pgbench statements: %d hits, %d misses; want one miss per shape", h, m)
	}
	if c.Classify("DELETE FROM t WHERE id = 1", withLookup).Statements[0].Text != "DELETE FROM t WHERE id = 1" {
		t.Fatal("a shape hit carries another text")
	}
}

// Cached never classifies: a miss until Classify has seen the text (or its
// shape), then what Classify returns, text included.
func TestCacheCached(t *testing.T) {
	c := NewCache(16)
	opts := Options{}
	for _, sql := range []string{"SELECT f()", "SELECT abalance FROM a WHERE aid = 1"} {
		if _, ok := c.Cached(sql); ok {
			t.Fatalf("%q cached before it was classified", sql)
		}
		want := c.Classify(sql, opts)
		got, ok := c.Cached(sql)
		if !ok || got.Class != want.Class || len(got.Statements) != 1 || got.Statements[0].Text != sql {
			t.Fatalf("%q: Cached = %+v, %v; Classify said %s", sql, got, ok, want.Class)
		}
	}
	// by shape: another constant, never classified itself
	got, ok := c.Cached("SELECT abalance FROM a WHERE aid = 42")
	if !ok || got.Class != Read || got.Statements[0].Text != "SELECT abalance FROM a WHERE aid = 42" {
		t.Fatalf("shape hit: %+v, %v", got, ok)
	}
	if h, m := c.Stats(); m != 2 || h != 3 {
		t.Fatalf("stats = %d hits, %d misses; Cached must not count a miss as a classification", h, m)
	}
}

// BenchmarkCacheShapeHit is pgbench's select-only statement as it comes:
// a new aid each time, so the text misses and the shape hits.
func BenchmarkCacheShapeHit(b *testing.B) {
	c := NewCache(0)
	c.Classify("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", Options{})
	texts := make([]string, 1024)
	for i := range texts {
		texts[i] = fmt.Sprintf("SELECT abalance FROM pgbench_accounts WHERE aid = %d;", 1000+i*7919)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, ok := c.Cached(texts[i%len(texts)]); !ok {
			b.Fatal("shape missed")
		}
		i++
	}
}

// Literals cuts a text where its shape has markers; a text without a
// shape, or without literals, is not cut.
func TestLiterals(t *testing.T) {
	for _, tt := range []struct {
		sql  string
		want []string // the literals; nil: none
	}{
		{"UPDATE pgbench_accounts SET abalance = abalance + -4242 WHERE aid = 17;", []string{"4242", "17"}},
		{`SELECT "a'b", 'it''s', 1.5e3, x1 FROM t WHERE c = ''`, []string{"'it''s'", "1.5e3", "''"}},
		{"SELECT $1 FROM t", nil},
		{"BEGIN", nil},
		{"SELECT 'a' -- a comment", nil},
		{"SELECT E'a\\n'", nil},
		{"SELECT 1; SELECT 2", nil},
		{"SELECT '" + strings.Repeat("x", maxCachedText) + "'", nil},
	} {
		spans, ok := Literals(nil, tt.sql)
		var got []string
		for i := 0; i < len(spans); i += 2 {
			got = append(got, tt.sql[spans[i]:spans[i+1]])
		}
		if ok != (tt.want != nil) || !slices.Equal(got, tt.want) {
			t.Errorf("Literals(%q) = %q, %v; want %q", tt.sql, got, ok, tt.want)
		}
	}
}
