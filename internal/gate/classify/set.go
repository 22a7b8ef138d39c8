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
	// The two that change how the server reads the text itself, which the
	// gate parses the way a default session does (see lexerSafe).
	"standard_conforming_strings",
	"client_encoding",
}

// SafeClientEncoding reports whether a session may use client_encoding enc
// through the gate: not one of the client-only multibyte encodings (SJIS,
// BIG5, GBK, UHC, GB18030, JOHAB and their aliases), in which a quote or
// backslash byte can be half of a character, so that the server would
// split a statement where the gate's parser does not.
func SafeClientEncoding(enc string) bool { return !unsafeEncoding(enc) }

// lexerSafe reports whether setting name to the value s leaves the server
// reading statements as pg_query does (standard_conforming_strings on, an
// encoding where a quote or backslash byte is always that character).
// With standard_conforming_strings off the server takes a backslash in
// '...' as an escape, so 'x\' , 'y; DROP TABLE t; --' is one string to the
// gate and a DROP to the server; in SJIS, BIG5, GBK, UHC, GB18030 or
// JOHAB a backslash or quote byte can be the second half of a character.
func lexerSafe(name, s string) bool {
	v := strings.ToLower(strings.TrimSpace(s))
	switch name {
	case "standard_conforming_strings":
		b, ok := parseBool(v)
		return ok && b
	case "client_encoding":
		return !unsafeEncoding(v)
	}
	return false
}

// unsafeEncoding reports whether a client_encoding name is one of
// PostgreSQL's client-only multibyte encodings (or an alias of one), or
// not a name at all.
func unsafeEncoding(enc string) bool {
	n := strings.NewReplacer("-", "", "_", "", " ", "").Replace(strings.ToLower(enc))
	if n == "" {
		return true
	}
	for _, bad := range []string{"sjis", "shiftjis", "mskanji", "win932", "cp932", "big5", "win950", "cp950",
		"gbk", "win936", "cp936", "uhc", "win949", "cp949", "gb18030", "johab"} {
		if n == bad {
			return true
		}
	}
	return false
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
	case (name == "standard_conforming_strings" || name == "client_encoding") && len(vals) == 1 && c.lexerSafeValue(name, vals[0]):
		v.hit("set", what+" keeps the server reading statements as the gate does")
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

// lexerSafeValue is lexerSafe for a SET's value: a string, or a word
// (SET standard_conforming_strings = on).
func (c *classifier) lexerSafeValue(name string, n *pg_query.Node) bool {
	s, ok := c.constString(n)
	if !ok {
		if cr, isCol := inner(n).(*pg_query.ColumnRef); isCol && len(cr.Fields) == 1 {
			s, ok = strVal(cr.Fields[0]), true
		}
	}
	return ok && lexerSafe(name, s)
}

func dangerWhy(name string) string {
	switch {
	case name == "standard_conforming_strings" || name == "client_encoding":
		return "changes how the server reads statement text, which the gate would then parse differently (quotes and backslashes)"
	case name == "session_replication_role":
		return "turns off triggers, foreign-key checks and audit triggers included"
	case strings.HasPrefix(name, "log_") || strings.HasPrefix(name, "pgaudit.") || strings.HasPrefix(name, "debug_") || strings.HasPrefix(name, "trace_"):
		return "changes what the server logs about this session"
	case strings.HasSuffix(name, "_libraries") || name == "dynamic_library_path":
		return "loads shared libraries into the server"
	}
	return "a setting that changes what the server enforces"
}
