package classify

import (
	"encoding/json"
	"fmt"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// PL/pgSQL is read with pg_query's copy of PostgreSQL's PL/pgSQL compiler
// (ParsePlPgSqlToJSON). Every SQL statement and expression in the body
// comes out as a PLpgSQL_expr with its text and parse mode; each is
// classified as SQL, so a DELETE in a DO block counts as a DELETE.
// Dynamic SQL (EXECUTE, FOR ... IN EXECUTE, OPEN ... FOR EXECUTE, RETURN
// QUERY EXECUTE) is built at run time and is Unknown.

// PostgreSQL's RawParseMode for PLpgSQL_expr.parseMode.
const (
	modeDefault = 0 // a whole statement
	modeType    = 1 // a type name
	modeExpr    = 2 // an expression: "x > 1"
	modeAssign1 = 3 // "x := expr" (and 4, 5 for a.b := and a.b.c :=)
	modeAssign3 = 5
)

// dynamicStmts are the PL/pgSQL statements that run SQL built at run
// time, and the field that says so ("" when the statement always is).
var dynamicStmts = map[string]string{
	"PLpgSQL_stmt_dynexecute":   "",
	"PLpgSQL_stmt_dynfors":      "",
	"PLpgSQL_stmt_open":         "dynquery",
	"PLpgSQL_stmt_return_query": "dynquery",
}

// plpgsql classifies the PL/pgSQL body of text (a DO or CREATE FUNCTION
// statement) into v.
func (c *classifier) plpgsql(v *verdict, text, where string, depth int) {
	if depth >= maxDepth {
		v.hit("too.deep", where+"nested deeper than the classifier follows")
		return
	}
	out, err := pg_query.ParsePlPgSqlToJSON(text)
	if err != nil {
		v.hit("plpgsql.error", fmt.Sprintf("%sthe PL/pgSQL body does not parse: %v", where, err))
		return
	}
	var tree any
	if err := json.Unmarshal([]byte(out), &tree); err != nil {
		v.hit("plpgsql.error", fmt.Sprintf("%sunreadable PL/pgSQL tree: %v", where, err))
		return
	}
	c.plWalk(v, tree, where, depth)
}

func (c *classifier) plWalk(v *verdict, n any, where string, depth int) {
	switch x := n.(type) {
	case []any:
		for _, e := range x {
			c.plWalk(v, e, where, depth)
		}
	case map[string]any:
		for k, val := range x {
			if field, ok := dynamicStmts[k]; ok {
				m, _ := val.(map[string]any)
				if _, has := m[field]; field == "" || has {
					v.hit("plpgsql.dynamic", fmt.Sprintf("%sEXECUTE of SQL built at run time (line %v)", where, lineOf(m)))
				}
			}
			if k == "PLpgSQL_expr" {
				if m, ok := val.(map[string]any); ok {
					c.plExpr(v, m, where, depth)
				}
				continue
			}
			c.plWalk(v, val, where, depth)
		}
	}
}

func lineOf(m map[string]any) any {
	if l, ok := m["lineno"]; ok {
		return l
	}
	return "?"
}

// plExpr classifies one PL/pgSQL expression or statement.
func (c *classifier) plExpr(v *verdict, m map[string]any, where string, depth int) {
	q, _ := m["query"].(string)
	mode := modeDefault
	if f, ok := m["parseMode"].(float64); ok {
		mode = int(f)
	}
	if strings.TrimSpace(q) == "" {
		return
	}
	var sql string
	switch {
	case mode == modeDefault:
		sql = q
	case mode == modeType:
		return
	case mode == modeExpr:
		sql = "SELECT " + q
	case mode >= modeAssign1 && mode <= modeAssign3:
		rhs, ok := assignRHS(q)
		if !ok {
			v.hit("plpgsql.error", fmt.Sprintf("%sassignment %q not understood", where, short(q)))
			return
		}
		sql = "SELECT " + rhs
	default:
		v.hit("plpgsql.error", fmt.Sprintf("%sexpression %q in an unknown parse mode %d", where, short(q), mode))
		return
	}
	c.nestedText(v, sql, where, "plpgsql.error", depth)
}

// assignRHS returns the expression of "target := expr" (or "target =
// expr"), found with PostgreSQL's own scanner so that ":=" inside a
// string or a comment is not taken for the assignment.
func assignRHS(q string) (string, bool) {
	res, err := pg_query.Scan(q)
	if err != nil {
		return "", false
	}
	depth := 0
	for _, t := range res.Tokens {
		switch t.Token {
		case pg_query.Token_ASCII_40, pg_query.Token_ASCII_91: // ( [
			depth++
		case pg_query.Token_ASCII_41, pg_query.Token_ASCII_93: // ) ]
			depth--
		case pg_query.Token_COLON_EQUALS, pg_query.Token_ASCII_61:
			if depth == 0 && int(t.End) <= len(q) {
				return q[t.End:], true
			}
		}
	}
	return "", false
}

// defElems reads a DO's or CREATE FUNCTION's options: the language as
// written (PostgreSQL looks it up case-sensitively), and the body ("as").
// hasBody is false when there is none, or not in the shape pg_query's
// PL/pgSQL compiler asserts on: handing it one would abort the process.
func defElems(opts []*pg_query.Node, do bool) (language string, body []string, hasBody bool) {
	for _, o := range opts {
		d, ok := inner(o).(*pg_query.DefElem)
		if !ok {
			continue
		}
		switch d.Defname {
		case "language":
			language = strVal(d.Arg)
		case "as":
			switch a := inner(d.Arg).(type) {
			case *pg_query.String:
				body, hasBody = []string{a.Sval}, do
			case *pg_query.List:
				body, hasBody = nil, !do && len(a.Items) > 0
				for _, it := range a.Items {
					s, ok := inner(it).(*pg_query.String)
					if !ok {
						hasBody = false
						continue
					}
					body = append(body, s.Sval)
				}
			}
		}
	}
	return language, body, hasBody
}

// untrusted reports a language whose code runs as the server's OS user.
func untrusted(lang string) bool {
	lang = strings.ToLower(lang)
	return lang == "c" || lang == "internal" || strings.HasSuffix(lang, "u")
}

func (c *classifier) do(v *verdict, x *pg_query.DoStmt, text string, depth int) {
	lang, _, hasBody := defElems(x.Args, true)
	if lang == "" {
		lang = "plpgsql"
	}
	v.hit("do", "DO block in "+lang)
	switch {
	case lang == "plpgsql":
		if text == "" || !hasBody {
			// DO cannot be nested in another statement; be safe.
			v.hit("plpgsql.error", "a DO block inside another statement")
			return
		}
		in := verdict{}
		c.plpgsql(&in, text, "", depth)
		v.absorb(&in, "in the DO block: ")
	case untrusted(lang):
		v.hit("language.untrusted", "DO block in "+lang+" runs code as the server's OS user")
	default:
		v.hit("language.opaque", "DO block in "+lang+", which the classifier cannot read")
	}
}

func (c *classifier) createFunction(v *verdict, x *pg_query.CreateFunctionStmt, text string, depth int) {
	what := "FUNCTION"
	if x.IsProcedure {
		what = "PROCEDURE"
	}
	name := names(x.Funcname)
	v.hit("create.function", "CREATE "+what+" "+name)
	lang, body, hasBody := defElems(x.Options, false)
	prefix := fmt.Sprintf("in the body of %s: ", name)
	switch {
	case x.SqlBody != nil:
		// BEGIN ATOMIC ... END / RETURN expr: parsed with the statement.
		in := verdict{}
		c.scan(&in, x, depth)
		v.absorb(&in, prefix)
	case lang == "sql":
		if len(body) > 0 {
			in := verdict{}
			c.nestedText(&in, body[0], "", "plpgsql.error", depth)
			v.absorb(&in, prefix)
		}
	case lang == "plpgsql":
		in := verdict{}
		switch {
		case !hasBody:
			in.hit("plpgsql.error", "a PL/pgSQL function without a body")
		case text == "":
			in.hit("plpgsql.error", "a function definition inside another statement")
		default:
			c.plpgsql(&in, text, "", depth)
		}
		v.absorb(&in, prefix)
	case untrusted(lang):
		v.hit("language.untrusted", fmt.Sprintf("CREATE %s %s in %s runs code as the server's OS user", what, name, lang))
	default:
		v.hit("language.opaque", fmt.Sprintf("CREATE %s %s in %s, which the classifier cannot read", what, name, lang))
	}
	// A function's body is its own: what it does is now in v, and it is
	// recorded as the function's, not as a write by this statement.
	v.rowsGuard, v.hidden, v.rowsCounted = false, false, false
	v.tables = nil
}

func (c *classifier) call(v *verdict, x *pg_query.CallStmt, depth int) {
	if x.Funccall == nil {
		v.hit("call.unknown", "CALL of nothing the classifier can name")
		return
	}
	schema, name := funcName(x.Funccall.Funcname)
	qual := name
	if schema != "" {
		qual = schema + "." + name
	}
	found := false
	if c.opts.Lookup != nil {
		_, found = c.opts.Lookup(schema, name)
	}
	if found {
		v.hit("call", "CALL "+qual+": the procedure's body was classified when it was created through the gate")
	} else {
		v.hit("call.unknown", "CALL "+qual+": the catalog lookup does not find the procedure")
	}
	// The arguments are evaluated: look at their function calls.
	c.scan(v, x.Funccall, depth)
}
