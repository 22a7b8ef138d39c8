package classify

import (
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// classifier carries one Classify call's options.
type classifier struct {
	opts Options
}

// classifyText parses sql and classifies each statement; the error is
// the parser's.
func (c *classifier) classifyText(sql string, depth int) ([]Statement, error) {
	tree, err := pg_query.Parse(sql)
	if err != nil {
		return nil, err
	}
	var out []Statement
	for _, raw := range tree.Stmts {
		text := stmtText(sql, raw)
		out = append(out, Statement{Text: text, Class: Unknown, Rule: "unknown.node", Kind: kind(inner(raw.Stmt)),
			Reason: "not classified yet"})
	}
	return out, nil
}

// stmtText cuts one statement out of the string the client sent.
func stmtText(sql string, raw *pg_query.RawStmt) string {
	start := int(raw.StmtLocation)
	end := len(sql)
	if raw.StmtLen > 0 {
		end = start + int(raw.StmtLen)
	}
	if start < 0 || start > len(sql) || end > len(sql) || end < start {
		return strings.TrimSpace(sql)
	}
	return strings.TrimSpace(sql[start:end])
}
