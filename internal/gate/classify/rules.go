package classify

// Rule is one line of the classifier's table: what it matches and the
// class it gives. The matching itself is in the code that cites the id;
// the class lives here only.
type Rule struct {
	ID    string
	Class Class
	Desc  string
}

// Rules is the classifier's table, in the order docs/gate.md presents it.
// Where a statement matches several rules (a SELECT calling
// pg_terminate_backend), the strictest class wins and its rule is named.
// Rules marked "at least" give their class and let what they contain
// (the prepared or explained statement, a DO body) raise it.
var Rules = []Rule{
	// Parsing.
	{"parse.error", Unknown, "the SQL does not parse: what cannot be parsed does not run"},
	{"empty", Read, "an empty query or only comments"},
	{"unknown.node", Unknown, "a statement the parser accepts but no rule covers"},
	{"too.deep", Unknown, "SQL nested in SQL (bodies, strings) deeper than the classifier follows"},
	{"internal", Unknown, "the classifier failed; reported as unknown rather than crash the gate"},

	// Queries and row changes.
	{"select", Read, "SELECT, VALUES, TABLE, with built-in functions without side effects"},
	{"select.for-update", Write, "SELECT ... FOR UPDATE/SHARE: takes row locks that block writers until the transaction ends, and needs UPDATE privilege"},
	{"select.into", DDL, "SELECT ... INTO a new table, CREATE TABLE AS: creates a table"},
	{"insert", Write, "INSERT (ON CONFLICT DO UPDATE included)"},
	{"update", Write, "UPDATE with a WHERE: measured by the blast-radius guard"},
	{"update.no-where", Destructive, "UPDATE without WHERE: rewrites every row"},
	{"update.always-true", Destructive, "UPDATE whose WHERE is always true (true, 1=1, x=x, OR true, NOT false, LIKE '%'...)"},
	{"delete", Write, "DELETE with a WHERE: measured by the blast-radius guard"},
	{"delete.no-where", Destructive, "DELETE without WHERE: removes every row"},
	{"delete.always-true", Destructive, "DELETE whose WHERE is always true"},
	{"merge", Write, "MERGE: measured by the blast-radius guard"},
	{"merge.delete-all", Destructive, "MERGE ... ON <always true> WHEN MATCHED THEN DELETE: removes every row"},
	{"copy.from", Write, "COPY ... FROM STDIN: loads rows sent by the client"},
	{"copy.to", Read, "COPY ... TO STDOUT: sends rows to the client (a COPY of a data-modifying query is classified as that query)"},
	{"copy.program", Privileged, "COPY ... PROGRAM: runs a shell command on the database server as its OS user"},
	{"copy.file", Privileged, "COPY to or from a file on the database server"},
	{"truncate", Destructive, "TRUNCATE: removes every row, without a WHERE and without row triggers"},
	{"lock", Write, "LOCK TABLE: blocks other sessions until the transaction ends; needs write privilege"},

	// Functions called anywhere in a statement.
	{"func.builtin", Read, "a built-in function without side effects (aggregates, window functions, maths, text, dates, JSON...)"},
	{"func.sequence", Write, "nextval, setval: advances or resets a sequence"},
	{"func.notify", Write, "pg_notify: wakes listeners in other sessions"},
	{"func.lo-write", Write, "lo_create, lo_from_bytea, lo_put, lowrite...: writes large objects"},
	{"func.lo-unlink", Destructive, "lo_unlink, lo_truncate: deletes or cuts large objects"},
	{"func.drop-slot", Destructive, "pg_drop_replication_slot, pg_logical_slot_get_changes, pg_replication_slot_advance: discards WAL or changes a consumer (a standby, the backup agent) still needs"},
	{"func.server-control", Privileged, "pg_terminate_backend, pg_cancel_backend, pg_reload_conf, pg_rotate_logfile, pg_promote, pg_switch_wal, backup and replay control, slot creation, statistics resets: controls the server or other sessions"},
	{"func.server-files", Privileged, "pg_read_file, pg_ls_dir, pg_stat_file, lo_import, lo_export, adminpack's pg_file_*: reads or writes files on the database server"},
	{"func.dblink", Privileged, "dblink, dblink_exec and friends: runs SQL over a connection the gate does not see"},
	{"func.sql-string", Unknown, "query_to_xml, ts_stat, ts_rewrite with a query that is not a constant: runs SQL built at run time (a constant query is classified as that SQL)"},
	{"func.set-config", Unknown, "set_config with a setting name that is not a constant (a constant one is classified like SET)"},
	{"func.volatile", Write, "a user-defined function the database reports volatile: it may change data"},
	{"func.unknown", Unknown, "a function that is neither a known built-in nor found by the catalog lookup"},

	// Data-modifying statements inside other statements are classified as
	// themselves: WITH d AS (DELETE ...) SELECT, COPY (DELETE ... RETURNING)
	// TO STDOUT, EXPLAIN ANALYZE, PREPARE, rule actions, function bodies.
	{"explain", Read, "EXPLAIN without ANALYZE: plans the statement, does not run it"},
	{"explain.analyze", Read, "EXPLAIN ANALYZE: runs the statement, so at least that statement's class"},
	{"prepare", Read, "PREPARE: at least the class of the prepared statement, which EXECUTE will run"},
	{"execute", Unknown, "EXECUTE name: runs a statement prepared earlier, which a stateless classifier cannot see (the gate classifies it at PREPARE)"},
	{"deallocate", Read, "DEALLOCATE a prepared statement"},
	{"cursor", Read, "DECLARE (at least the class of its query), FETCH, MOVE, CLOSE"},

	// Procedural code.
	{"do", Read, "DO in PL/pgSQL: at least the class of every statement and expression in its body"},
	{"plpgsql.dynamic", Unknown, "PL/pgSQL EXECUTE, FOR ... IN EXECUTE, OPEN ... FOR EXECUTE, RETURN QUERY EXECUTE: SQL built at run time"},
	{"plpgsql.error", Unknown, "a PL/pgSQL body or one of its statements does not parse"},
	{"language.untrusted", Privileged, "code in C, internal or an untrusted language (plpython3u, plperlu...): runs as the server's OS user"},
	{"language.opaque", Unknown, "a body in a language the classifier cannot read (plv8, plperl, pltcl...)"},
	{"create.function", DDL, "CREATE FUNCTION/PROCEDURE: at least ddl, and at least the class of its SQL or PL/pgSQL body, so a hidden DROP is seen when the function is created"},
	{"call", Write, "CALL of a procedure the catalog lookup finds: its body was classified when it was created"},
	{"call.unknown", Unknown, "CALL of a procedure the catalog lookup does not find"},

	// Schema changes.
	{"ddl", DDL, "CREATE and ALTER of tables, indexes, views, types, sequences, triggers, rules, schemas, databases; COMMENT; RENAME"},
	{"alter.drop-column", Destructive, "ALTER TABLE ... DROP COLUMN: the column's data is gone"},
	{"alter.disable-trigger", Privileged, "ALTER TABLE ... DISABLE TRIGGER (or ENABLE REPLICA/ALWAYS): turns off foreign-key checks and audit triggers"},
	{"alter.row-security", Privileged, "ALTER TABLE ... DISABLE/NO FORCE ROW LEVEL SECURITY"},
	{"maintenance", Read, "VACUUM, ANALYZE: change no rows and take no exclusive lock"},
	{"maintenance.rewrite", DDL, "VACUUM FULL, CLUSTER, REINDEX, REFRESH MATERIALIZED VIEW: rewrite under an exclusive lock"},

	// Drops.
	{"drop", Destructive, "DROP of a table, schema, view, function, type, sequence... (every DROP)"},
	{"drop.index", Destructive, "DROP INDEX: loses no rows, but can turn every query into a full scan and take production down, and a unique index stops enforcing uniqueness"},
	{"drop.database", Destructive, "DROP DATABASE"},
	{"drop.owned", Destructive, "DROP OWNED BY: drops every object a role owns"},

	// Roles, grants and the server.
	{"role", Privileged, "CREATE ROLE/USER, ALTER ROLE (and ALTER ROLE ... SET)"},
	{"role.drop", Destructive, "DROP ROLE/USER"},
	{"grant", Privileged, "GRANT, REVOKE, GRANT role, ALTER DEFAULT PRIVILEGES, ALTER ... OWNER TO, REASSIGN OWNED"},
	{"security", Privileged, "CREATE/ALTER POLICY (row-level security), SECURITY LABEL, user mappings (stored credentials)"},
	{"server", Privileged, "extensions, foreign data wrappers and servers, event triggers, languages, tablespaces, access methods, publications, subscriptions, ALTER DATABASE, CHECKPOINT"},
	{"alter.system", Privileged, "ALTER SYSTEM: changes the server's configuration file"},
	{"load", Privileged, "LOAD: loads a shared library into the server"},

	// Session.
	{"set", Read, "SET/RESET/SHOW of ordinary settings (search_path, timezone, statement_timeout, work_mem...)"},
	{"set.dangerous", Privileged, "SET session_replication_role (disables triggers, foreign-key checks included), allow_system_table_modifications, zero_damaged_pages, ignore_*, *_preload_libraries, log_*, debug_*, pgaudit.*..."},
	{"set.role", Privileged, "SET ROLE, SET SESSION AUTHORIZATION: act as someone else"},
	{"set.search-path", Privileged, "SET search_path with pg_catalog after another schema: lets other schemas' functions shadow built-ins"},
	{"transaction", Read, "BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION, SET CONSTRAINTS"},
	{"transaction.prepare", Write, "PREPARE TRANSACTION: keeps a transaction's locks past the session"},
	{"transaction.prepared", Privileged, "COMMIT PREPARED, ROLLBACK PREPARED: decide a transaction another session prepared"},
	{"listen", Read, "LISTEN, UNLISTEN, DISCARD"},
	{"notify", Write, "NOTIFY: changes no rows, but other sessions act on it"},
}

// ruleByID indexes Rules; a rule the code cites that is not in the table
// is a bug, and panics.
var ruleByID = func() map[string]Rule {
	m := make(map[string]Rule, len(Rules))
	for _, r := range Rules {
		if _, dup := m[r.ID]; dup {
			panic("classify: rule " + r.ID + " twice in the table")
		}
		m[r.ID] = r
	}
	return m
}()

func ruleClass(id string) Class {
	r, ok := ruleByID[id]
	if !ok {
		panic("classify: rule " + id + " not in the table")
	}
	return r.Class
}
