package classify

import (
	"reflect"
	"strings"
	"testing"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// FuzzClassify feeds arbitrary SQL: Classify must not panic, must answer
// the same twice, must agree with the cache (also for every other text of
// the same shape, checkShapes), and must never call read a string whose
// parse tree holds a DROP or TRUNCATE anywhere.
func FuzzClassify(f *testing.F) {
	for _, c := range ruleCases {
		f.Add(c.sql)
	}
	for _, c := range bypasses {
		f.Add(c.sql)
	}
	for _, q := range analytical {
		f.Add(q)
	}
	cache := NewCache(64)
	f.Fuzz(func(t *testing.T, sql string) {
		if len(sql) > 8<<10 {
			return // deeply nested input only makes the parser slow
		}
		a := Classify(sql, withLookup)
		b := Classify(sql, withLookup)
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("Classify(%q) not deterministic:\n%+v\n%+v", sql, a, b)
		}
		if c := cache.Classify(sql, withLookup); !sameResult(a, c) {
			t.Fatalf("cache disagrees for %q:\n%+v\n%+v", sql, a, c)
		}
		checkShapes(t, sql)
		if !a.Class.Valid() {
			t.Fatalf("Classify(%q) = invalid class %q", sql, a.Class)
		}
		for _, s := range a.Statements {
			if s.Class.Severity() > a.Class.Severity() {
				t.Fatalf("Classify(%q): statement %s stricter than the result %s", sql, s.Class, a.Class)
			}
			if _, ok := ruleByID[s.Rule]; !ok {
				t.Fatalf("Classify(%q): rule %q not in the table", sql, s.Rule)
			}
		}
		if tree, err := pg_query.Parse(sql); err == nil && hasDrop(tree) && a.Class.Severity() < Destructive.Severity() {
			t.Fatalf("Classify(%q) = %s, but it drops or truncates", sql, a.Class)
		}
	})
}

func hasDrop(tree *pg_query.ParseResult) bool {
	found := false
	walk(tree, func(m any) bool {
		switch m.(type) {
		case *pg_query.DropStmt, *pg_query.TruncateStmt, *pg_query.DropdbStmt, *pg_query.DropRoleStmt, *pg_query.DropOwnedStmt:
			found = true
		}
		return !found
	})
	return found
}

// sameResult compares results but for the fingerprint, which a Cache
// does not compute.
func sameResult(a, b Result) bool {
	a.Fingerprint, b.Fingerprint = "", ""
	return reflect.DeepEqual(a, b)
}

// Literal values to put in a shape's places: the ones the classifier's
// rules care about (booleans, equal and unequal numbers, LIKE's '%', SQL
// in a string, a dangerous setting's name) and plain ones.
var shapeValues = map[string][]string{
	"\x00i": {"1", "0", "2", "7", "2147483647", "00"},
	"\x00f": {"1.5", "0.0", "1e3", "2147483648", "1.", "1.e-2", "99999999999999999999"},
	"\x00s": {"'t'", "'f'", "''", "'%'", "'1'", "'a'", "'yes'", "'DELETE FROM orders RETURNING 1'",
		"'session_replication_role'", "'replica'", "'a''b'", "'%%'"},
}

// checkShapes is the property the shape cache rests on: a cache that has
// seen sql answers for any other text of sql's shape exactly what a full
// parse of that text answers. The other texts put the same value in every
// place (1 = 1) and different ones (1 = 2).
func checkShapes(t *testing.T, sql string) {
	shape, n, ok := shapeOf(sql)
	if !ok || n == 0 || n > 16 {
		return
	}
	c := NewCache(8)
	c.Classify(sql, withLookup)
	// A session's Recent in front of the cache must answer the same.
	r := NewRecent(c, func(res Result) Class { return res.Class })
	for k := range 12 {
		for _, same := range []bool{true, false} {
			v := fillShape(shape, k, same)
			if vs, _, ok := shapeOf(v); !ok || vs != shape {
				t.Fatalf("shape of %q is %q, its variant %q has %q (ok %v)", sql, shape, v, vs, ok)
			}
			want := Classify(v, withLookup)
			if got := c.Classify(v, withLookup); !sameResult(want, got) {
				t.Fatalf("after %q, the cache classifies %q as %s (%s), a full parse as %s (%s)",
					sql, v, got.Class, got.Reason, want.Class, want.Reason)
			}
			if got, class, ok := r.Cached(v); !ok || class != want.Class || !sameResult(want, got) {
				t.Fatalf("after %q, a session's recent hits give %q as %s (%s, found %v), a full parse as %s (%s)",
					sql, v, got.Class, class, ok, want.Class, want.Reason)
			}
		}
	}
}

// checkLiterals: Literals finds literals where the shape has markers, in
// order, and what lies between them is the shape's text between markers.
func checkLiterals(t *testing.T, sql, shape string, has bool) {
	spans, ok := Literals([]int{-1}, sql)
	if spans[0] != -1 || ok != has || ok != (len(spans) > 1) {
		t.Fatalf("Literals(%q) = %v, %v; the shape %q says %v", sql, spans, ok, shape, has)
	}
	if !ok {
		return
	}
	spans = spans[1:]
	var rebuilt strings.Builder
	last := 0
	for i := 0; i < len(spans); i += 2 {
		if spans[i] < last || spans[i+1] <= spans[i] || spans[i+1] > len(sql) {
			t.Fatalf("Literals(%q): spans %v out of order", sql, spans)
		}
		rebuilt.WriteString(sql[last:spans[i]])
		rebuilt.WriteString("\x00")
		if rebuilt.Len() >= len(shape) {
			t.Fatalf("Literals(%q) = %v: more literals than its shape %q has", sql, spans, shape)
		}
		rebuilt.WriteByte(shape[rebuilt.Len()])
		last = spans[i+1]
	}
	rebuilt.WriteString(sql[last:])
	if rebuilt.String() != shape {
		t.Fatalf("Literals(%q) = %v: cut there it is %q, its shape %q", sql, spans, rebuilt.String(), shape)
	}
}

// fillShape replaces a shape's markers with values: the k-th of each list,
// or (same false) the (k+place)-th.
func fillShape(shape string, k int, same bool) string {
	var b strings.Builder
	place := 0
	for {
		i := strings.IndexByte(shape, 0)
		if i < 0 || i+1 >= len(shape) {
			b.WriteString(shape)
			return b.String()
		}
		b.WriteString(shape[:i])
		vals := shapeValues[shape[i:i+2]]
		j := k
		if !same {
			j += place
		}
		b.WriteString(vals[j%len(vals)])
		place++
		shape = shape[i+2:]
	}
}

// FuzzShape is FuzzClassify's shape property on its own, seeded with the
// statements the shape cache is for (pgbench's, with literals of every
// kind) and the ones where a constant decides the class: for any text with
// a shape, a cache that has seen it answers for a dozen other texts of the
// same shape exactly as a full parse does.
func FuzzShape(f *testing.F) {
	for _, s := range []string{
		"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
		"UPDATE pgbench_accounts SET abalance = abalance + -4242 WHERE aid = 17;",
		"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 9, 77, CURRENT_TIMESTAMP);",
		"DELETE FROM t WHERE 1 = 2", "DELETE FROM t WHERE 'a' = 'b' OR x LIKE 'a%'",
		"DELETE FROM t WHERE 5 BETWEEN 1 AND 3 AND 0::bool", "UPDATE t SET a = 1.5e3 WHERE id IN (1, 2, 2147483648)",
		"SELECT query_to_xml('SELECT 1', true, true, '')", "SELECT set_config('application_name', 'x', false)",
		"SELECT 1::float(53), 'x'::text, $1", `SELECT "a'b" FROM "x""y" WHERE c = 'it''s'`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, sql string) {
		if len(sql) > 4<<10 {
			return
		}
		s1, n1, ok1 := shapeOf(sql)
		s2, n2, ok2 := shapeOf(sql)
		if s1 != s2 || n1 != n2 || ok1 != ok2 {
			t.Fatalf("shapeOf(%q) not deterministic", sql)
		}
		if ok1 && strings.Count(s1, "\x00") != n1 {
			t.Fatalf("shapeOf(%q) = %q with %d markers, says %d", sql, s1, strings.Count(s1, "\x00"), n1)
		}
		checkLiterals(t, sql, s1, ok1 && n1 > 0)
		checkShapes(t, sql)
	})
}
