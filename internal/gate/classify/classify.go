package classify

import (
	"fmt"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// Class is what a statement may do, from harmless to unknowable.
type Class string

// The classes, in order of [Class.Severity].
const (
	Read        Class = "read"        // reads rows or session state; changes nothing durable
	Write       Class = "write"       // changes rows (INSERT, UPDATE/DELETE with a WHERE, COPY FROM STDIN, nextval...)
	DDL         Class = "ddl"         // changes the schema without losing data (CREATE, most ALTER, REINDEX...)
	Destructive Class = "destructive" // loses data or makes it unrecoverable (DROP, TRUNCATE, DELETE without WHERE...)
	Privileged  Class = "privileged"  // acts as an administrator: roles, grants, server files and programs, server settings
	Unknown     Class = "unknown"     // the classifier cannot tell: unparseable, dynamic SQL, unknown functions; never allowed by default
)

// Classes lists every class, least severe first.
var Classes = []Class{Read, Write, DDL, Destructive, Privileged, Unknown}

// Severity orders classes so the strictest of a multi-statement string
// wins. Privileged ranks above destructive because it includes running
// programs on the server (COPY ... PROGRAM), from which everything can be
// destroyed; unknown ranks highest because nothing can be said about it.
// A string that is not a class has the severity of Unknown.
func (c Class) Severity() int {
	switch c {
	case Read:
		return 0
	case Write:
		return 1
	case DDL:
		return 2
	case Destructive:
		return 3
	case Privileged:
		return 4
	}
	return 5
}

// Valid reports whether c is one of [Classes].
func (c Class) Valid() bool {
	for _, k := range Classes {
		if c == k {
			return true
		}
	}
	return false
}

// Statement is one statement of a query string and its class.
type Statement struct {
	Text   string `json:"text"`   // this statement's SQL, as the client sent it
	Class  Class  `json:"class"`  // the strictest of everything the statement does
	Reason string `json:"reason"` // why, in words a policy author understands: the rule and what matched
	Rule   string `json:"rule"`   // the id of the rule in [Rules] that decided the class
	Kind   string `json:"kind"`   // the parse node, e.g. "DeleteStmt"; empty when it did not parse
	// Tables are the relations the statement writes, truncates, drops or
	// alters (schema-qualified when the SQL qualifies them), including
	// those of data-modifying WITH clauses and DO blocks.
	Tables []string `json:"tables,omitempty"`
	// RowsGuard marks a statement that updates, deletes or merges rows
	// under a WHERE, the ones the blast-radius guard should measure.
	RowsGuard bool `json:"rows_guard,omitempty"`
	// RowsCounted says the row count in the statement's command tag is
	// the number of rows its UPDATE/DELETE/MERGE touched (a plain UPDATE,
	// DELETE or MERGE, or a PREPARE of one). It is false when the write
	// hides in a WITH, a DO block, a function body or EXPLAIN ANALYZE: the
	// tag then counts something else, so a row limit cannot be measured
	// and the gate should hold such a statement when a limit applies.
	RowsCounted bool `json:"rows_counted,omitempty"`
	// Counted says the statement is one UPDATE, DELETE or MERGE, with or
	// without a WHERE, whose command tag counts every row it changes:
	// nothing inside it (a data-modifying WITH, SQL in a string) writes
	// too. The gate's dry run of a held statement reads its rows from the
	// tag, and only for such a statement. (A volatile function it calls
	// may write elsewhere; the tag never counts that.)
	Counted bool `json:"counted,omitempty"`
	// SideEffects says the statement calls a function that is neither a
	// built-in that only computes nor one the catalog reports immutable or
	// stable: a volatile or unknown function, nextval/setval, dblink,
	// pg_notify, large objects, server control. Such a call may act where
	// a rollback does not reach (a sequence, another database), so the
	// gate never dry-runs it.
	SideEffects bool `json:"side_effects,omitempty"`
}

// Result is the classification of a whole query string.
type Result struct {
	Statements []Statement `json:"statements"`
	Class      Class       `json:"class"`  // the strictest statement's class; Read for an empty string
	Reason     string      `json:"reason"` // the strictest statement's reason, numbered when there are several
	// Fingerprint is pg_query's fingerprint of the string (hex): equal
	// for statements that differ only in constants. It identifies a
	// statement shape in logs; never key a decision on it, because
	// "WHERE 1=1" and "WHERE 1=2" share one. Empty in results from a
	// [Cache], which does not pay the second parse it costs.
	Fingerprint string `json:"fingerprint,omitempty"`
}

// Options tune Classify.
type Options struct {
	// Lookup tells the volatility of a function that is not one of the
	// built-ins the classifier knows ('i' immutable, 's' stable, 'v'
	// volatile), given its schema ("" when the SQL does not qualify it)
	// and name. A volatile function counts as a write; one Lookup does
	// not find, or any unknown function when Lookup is nil, is Unknown.
	// Built-ins in the classifier's own tables are never looked up, so an
	// answer for pg_catalog's functions does not matter.
	Lookup func(schema, name string) (volatility byte, found bool)
}

// maxDepth bounds how deep SQL found inside SQL (PL/pgSQL bodies,
// query_to_xml strings, PREPARE) is followed; deeper is Unknown.
const maxDepth = 8

// recoverPanics turns a bug in the classifier into an Unknown result
// rather than a crashed gateway; the tests turn it off to see the bug.
var recoverPanics = true

// Classify parses sql with PostgreSQL's own parser (pg_query) and
// classifies every statement; the strictest wins. SQL that does not parse
// gives a Result of class Unknown, never an error: what cannot be parsed
// does not run. Classify is safe for concurrent use.
func Classify(sql string, opts Options) Result {
	res, _, _ := classifyString(sql, opts, true)
	return res
}

// classifyString is Classify; constRead reports that the result depends on
// the values of constants in sql (see classifier.constRead), tree is the
// parse tree (nil when it did not parse), and fingerprint asks for
// Result.Fingerprint, which costs a second parse.
func classifyString(sql string, opts Options, fingerprint bool) (res Result, constRead bool, tree *pg_query.ParseResult) {
	if recoverPanics {
		defer func() {
			if r := recover(); r != nil {
				res = unknownResult(sql, "internal", fmt.Sprintf("classify: internal error: %v", r))
				constRead, tree = true, nil
			}
		}()
	}
	if strings.IndexByte(sql, 0) >= 0 {
		// The parser reads a C string and would stop at the NUL; what
		// follows it must not slip past unread.
		return unknownResult(sql, "parse.error", "does not parse: contains a NUL byte"), true, nil
	}
	c := &classifier{opts: opts}
	stmts, err := c.classifyText(sql, 0)
	if err != nil {
		return unknownResult(sql, "parse.error", "does not parse: "+err.Error()), true, nil
	}
	res.Statements = stmts
	res.Class = Read
	res.Reason = "empty query: nothing runs"
	for i, s := range stmts {
		if i == 0 || s.Class.Severity() > res.Class.Severity() {
			res.Class, res.Reason = s.Class, s.Reason
			if len(stmts) > 1 {
				res.Reason = fmt.Sprintf("statement %d: %s", i+1, s.Reason)
			}
		}
	}
	if fingerprint {
		if fp, err := pg_query.Fingerprint(sql); err == nil {
			res.Fingerprint = fp
		}
	}
	return res, c.constRead, c.tree
}

func unknownResult(sql, rule, reason string) Result {
	return Result{
		Statements: []Statement{{Text: strings.TrimSpace(sql), Class: Unknown, Rule: rule, Reason: reason}},
		Class:      Unknown,
		Reason:     reason,
	}
}
