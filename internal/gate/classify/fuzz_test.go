package classify

import (
	"reflect"
	"testing"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// FuzzClassify feeds arbitrary SQL: Classify must not panic, must answer
// the same twice, must agree with the cache, and must never call read a
// string whose parse tree holds a DROP or TRUNCATE anywhere.
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
		if c := cache.Classify(sql, withLookup); !reflect.DeepEqual(a, c) {
			t.Fatalf("cache disagrees for %q", sql)
		}
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
