// Package classify tells what a PostgreSQL statement may do, from
// PostgreSQL's own parse tree (pg_query), never from its text.
//
// Terms: a query string holds one or more statements; each statement gets
// a [Class] (read, write, ddl, destructive, privileged, unknown) from the
// rules of one table, [Rules], and the strictest class of a string is the
// string's. The classifier looks inside everything that runs: WITH
// clauses, sub-selects, function calls anywhere, DO blocks and function
// bodies in PL/pgSQL, PREPARE, EXPLAIN ANALYZE, COPY of a query, SQL
// passed as a constant string to query_to_xml. What it cannot see (dynamic
// EXECUTE, unknown functions, EXECUTE of a statement prepared earlier,
// SQL that does not parse) is [Unknown], which the policy never allows by
// default.
//
// The package is pure: it imports pg_query and the standard library only,
// and reaches the database solely through [Options.Lookup].
package classify
