package classify

import (
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// dangerousSettings change what the server enforces or records; SET of
// any of them is privileged. Prefixes end in "_" or ".".
var dangerousSettings = []string{
	"session_replication_role", // replica: triggers off, foreign-key checks and audit triggers included
	"allow_system_table_modifications",
	"allow_in_place_tablespaces",
	"zero_damaged_pages",
	"ignore_", // ignore_system_indexes, ignore_checksum_failure, ignore_invalid_pages
	"session_preload_libraries",
	"local_preload_libraries",
	"dynamic_library_path",
	"lo_compat_privileges",
	"fsync",
	"full_page_writes",
	"log_",   // hiding what one does from the server log
	"debug_", // debug_* settings are for developers of PostgreSQL
	"trace_",
	"pgaudit.",
	"wal_", // wal_level, wal_compression...: server-wide, superuser
	"data_sync_retry",
	"jit_provider",
}

func isDangerous(name string) bool {
	for _, d := range dangerousSettings {
		if name == d || (strings.HasSuffix(d, "_") || strings.HasSuffix(d, ".")) && strings.HasPrefix(name, d) {
			return true
		}
	}
	return false
}

func (c *classifier) set(v *verdict, x *pg_query.VariableSetStmt) {
	name := strings.ToLower(x.Name)
	switch x.Kind {
	case pg_query.VariableSetKind_VAR_RESET, pg_query.VariableSetKind_VAR_RESET_ALL, pg_query.VariableSetKind_VAR_SET_DEFAULT:
		// Back to the default, which the server's administrator chose.
		v.hit("set", "RESET "+name+" restores the default")
		return
	case pg_query.VariableSetKind_VAR_SET_MULTI:
		v.hit("transaction", "SET "+name+" sets transaction characteristics")
		return
	}
	c.setting(v, name, x.Args, "SET "+name)
}

// setting classifies setting name to vals (vals may be nil for FROM
// CURRENT); what is how the statement said it.
func (c *classifier) setting(v *verdict, name string, vals []*pg_query.Node, what string) {
	switch {
	case name == "role" || name == "session_authorization":
		if len(vals) == 1 {
			if s, ok := c.constString(vals[0]); ok && strings.EqualFold(s, "none") {
				v.hit("set", what+" NONE returns to the session's own role")
				return
			}
		}
		v.hit("set.role", what+" acts as another role")
	case isDangerous(name):
		v.hit("set.dangerous", what+": "+dangerWhy(name))
	case name == "search_path":
		// pg_catalog is searched first unless listed; listed after
		// another schema, that schema's functions shadow the built-ins
		// this classifier trusts by name.
		for i, n := range vals {
			s, ok := c.constString(n)
			if !ok {
				if cr, isCol := inner(n).(*pg_query.ColumnRef); isCol && len(cr.Fields) == 1 {
					s, ok = strVal(cr.Fields[0]), true
				}
			}
			if !ok {
				v.hit("set.search-path", what+" to a value built at run time")
				return
			}
			for j, part := range strings.Split(s, ",") {
				if strings.EqualFold(strings.Trim(strings.TrimSpace(part), `"`), "pg_catalog") && (i > 0 || j > 0) {
					v.hit("set.search-path", what+" puts pg_catalog after another schema, whose functions then shadow the built-ins")
					return
				}
			}
		}
		v.hit("set", what)
	default:
		v.hit("set", what+" changes an ordinary session setting")
	}
}

func dangerWhy(name string) string {
	switch {
	case name == "session_replication_role":
		return "turns off triggers, foreign-key checks and audit triggers included"
	case strings.HasPrefix(name, "log_") || strings.HasPrefix(name, "pgaudit.") || strings.HasPrefix(name, "debug_") || strings.HasPrefix(name, "trace_"):
		return "changes what the server logs about this session"
	case strings.HasSuffix(name, "_libraries") || name == "dynamic_library_path":
		return "loads shared libraries into the server"
	}
	return "a setting that changes what the server enforces"
}
