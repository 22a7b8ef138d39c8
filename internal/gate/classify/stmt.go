package classify

import (
	"fmt"
	"slices"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// classifier carries one Classify call's options.
type classifier struct {
	opts Options
	// constRead is set when a verdict looked at the value of a constant
	// (WHERE 1=1, query_to_xml('...'), set_config('name', ...)): only a
	// classification that never did may be reused for the same statement
	// with other constants (Cache's shapes).
	constRead bool
	tree      *pg_query.ParseResult // the top-level string's
}

// verdict accumulates what one statement does; the strictest hit wins.
type verdict struct {
	class  Class
	rule   string
	reason string
	set    bool

	tables      []string
	rowsGuard   bool // an UPDATE/DELETE/MERGE with a WHERE somewhere in it
	rowsCounted bool // ... and it is the top-level statement, counted by the tag
	hidden      bool // an UPDATE/DELETE/MERGE the tag does not count
	target      bool // a top-level UPDATE/DELETE/MERGE, with or without WHERE
	nestedWrite bool // a statement inside this one writes (WITH, DO, SQL in a string...)
	effects     bool // calls a function that is neither a computing built-in nor immutable/stable
}

// hit records that rule matched, with reason in words; the verdict keeps
// the strictest (the first among equals).
func (v *verdict) hit(rule, reason string) {
	c := ruleClass(rule)
	if !v.set || c.Severity() > v.class.Severity() {
		v.class, v.rule, v.reason, v.set = c, rule, reason, true
	}
}

func (v *verdict) table(names ...string) {
	for _, n := range names {
		if n != "" && !slices.Contains(v.tables, n) {
			v.tables = append(v.tables, n)
		}
	}
}

// absorb merges a statement found inside this one (a WITH's DELETE, a DO
// body's statement); prefix says where it was.
func (v *verdict) absorb(in *verdict, prefix string) {
	if in.set {
		c := in.class
		if !v.set || c.Severity() > v.class.Severity() {
			v.class, v.rule, v.reason, v.set = c, in.rule, prefix+in.reason, true
		}
	}
	v.table(in.tables...)
	v.effects = v.effects || in.effects
	if in.set && in.class != Read || in.nestedWrite || in.target || in.rowsGuard {
		v.nestedWrite = true
	}
	if in.rowsGuard || in.hidden {
		v.rowsGuard = true
		v.hidden = true
	}
}

// classifyText parses sql and classifies each statement; the error is
// the parser's.
func (c *classifier) classifyText(sql string, depth int) ([]Statement, error) {
	tree, err := pg_query.Parse(sql)
	if err != nil {
		return nil, err
	}
	if depth == 0 {
		c.tree = tree
	}
	out := make([]Statement, 0, len(tree.Stmts))
	for _, raw := range tree.Stmts {
		text := stmtText(sql, raw)
		node := inner(raw.Stmt)
		v := c.stmt(node, text, depth)
		out = append(out, Statement{
			Text: text, Class: v.class, Rule: v.rule, Reason: v.reason, Kind: kind(node),
			Tables:      v.tables,
			RowsGuard:   v.rowsGuard,
			RowsCounted: v.rowsGuard && v.rowsCounted && !v.hidden,
			Counted:     v.target && !v.nestedWrite && !v.hidden,
			SideEffects: v.effects,
		})
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

// nestedText classifies SQL found inside a statement (a PL/pgSQL
// statement, a query_to_xml string) into v.
func (c *classifier) nestedText(v *verdict, sql, prefix, errRule string, depth int) {
	if depth >= maxDepth {
		v.hit("too.deep", prefix+"nested deeper than the classifier follows")
		return
	}
	stmts, err := c.classifyText(sql, depth+1)
	if err != nil {
		v.hit(errRule, fmt.Sprintf("%s%q does not parse: %v", prefix, short(sql), err))
		return
	}
	for _, s := range stmts {
		in := verdict{class: s.Class, rule: s.Rule, reason: s.Reason, set: true, tables: s.Tables, hidden: s.RowsGuard, effects: s.SideEffects}
		v.absorb(&in, prefix)
	}
}

// sub classifies a statement node found inside another into v.
func (c *classifier) sub(v *verdict, node any, prefix string, depth int) {
	if depth >= maxDepth {
		v.hit("too.deep", prefix+"nested deeper than the classifier follows")
		return
	}
	in := c.stmt(node, "", depth+1)
	v.absorb(&in, prefix)
}

func short(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 60 {
		return s[:57] + "..."
	}
	return s
}

// scan looks through everything below root for what runs with it:
// function calls, row locks, SELECT INTO, and statements nested in WITH
// clauses, rule actions, SQL function bodies and the like.
func (c *classifier) scan(v *verdict, root any, depth int) {
	walk(root, func(m any) bool {
		switch x := m.(type) {
		case *pg_query.FuncCall:
			c.funcCall(v, x, depth)
			return true
		case *pg_query.SelectStmt:
			c.selectClauses(v, x)
			return true
		case *pg_query.CommonTableExpr:
			if q := inner(x.Ctequery); q != nil {
				if _, isSelect := q.(*pg_query.SelectStmt); !isSelect {
					c.sub(v, q, fmt.Sprintf("WITH %s: ", x.Ctename), depth)
					return false
				}
			}
			return true
		case *pg_query.ReturnStmt, *pg_query.PLAssignStmt, *pg_query.RawStmt:
			return true
		}
		if k := kind(m); strings.HasSuffix(k, "Stmt") {
			c.sub(v, m, "", depth)
			return false
		}
		return true
	})
}

// selectClauses checks the parts of a SELECT that make it more than a read.
func (c *classifier) selectClauses(v *verdict, s *pg_query.SelectStmt) {
	if len(s.LockingClause) > 0 {
		v.hit("select.for-update", "SELECT ... FOR UPDATE/SHARE locks rows against writers until the transaction ends")
	}
	if s.IntoClause != nil && s.IntoClause.Rel != nil {
		v.hit("select.into", "SELECT INTO creates table "+rangeName(s.IntoClause.Rel))
	}
}

func rangeName(r *pg_query.RangeVar) string {
	if r == nil {
		return ""
	}
	if r.Schemaname != "" {
		return r.Schemaname + "." + r.Relname
	}
	return r.Relname
}

// names joins a qualified name (a list of String nodes): "public.t".
func names(list []*pg_query.Node) string {
	var parts []string
	for _, n := range list {
		if s := strVal(n); s != "" {
			parts = append(parts, s)
		}
	}
	return strings.Join(parts, ".")
}

// objectNames renders DROP's objects: lists of names, or single names.
func objectNames(objs []*pg_query.Node) []string {
	var out []string
	for _, o := range objs {
		switch x := inner(o).(type) {
		case *pg_query.List:
			out = append(out, names(x.Items))
		case *pg_query.String:
			out = append(out, x.Sval)
		case *pg_query.ObjectWithArgs:
			out = append(out, names(x.Objname))
		case *pg_query.TypeName:
			out = append(out, names(x.Names))
		}
	}
	return out
}

// stmt classifies one statement node; text is its SQL when it is a
// top-level statement (needed for PL/pgSQL), else "".
func (c *classifier) stmt(node any, text string, depth int) verdict {
	var v verdict
	switch x := node.(type) {
	case nil:
		v.hit("empty", "an empty statement: nothing runs")

	case *pg_query.SelectStmt:
		v.hit("select", "SELECT reads rows")
		c.selectClauses(&v, x)
		c.scan(&v, x, depth)

	case *pg_query.InsertStmt:
		t := rangeName(x.Relation)
		v.table(t)
		v.hit("insert", "INSERT adds rows to "+t)
		c.scan(&v, x, depth)

	case *pg_query.UpdateStmt:
		t := rangeName(x.Relation)
		c.where(&v, "update", "UPDATE "+t, t, "rewrites every row", x.WhereClause, depth)
		c.scan(&v, x, depth)

	case *pg_query.DeleteStmt:
		t := rangeName(x.Relation)
		c.where(&v, "delete", "DELETE FROM "+t, t, "removes every row", x.WhereClause, depth)
		c.scan(&v, x, depth)

	case *pg_query.MergeStmt:
		t := rangeName(x.Relation)
		v.table(t)
		v.target = depth == 0
		v.hit("merge", "MERGE into "+t)
		v.rowsGuard, v.rowsCounted = true, true
		if c.truth(x.JoinCondition) == 1 && mergeDeletes(x) {
			v.hit("merge.delete-all", "MERGE into "+t+" ON a condition always true, WHEN MATCHED THEN DELETE, removes every row")
		}
		c.scan(&v, x, depth)

	case *pg_query.TruncateStmt:
		var ts []string
		for _, r := range x.Relations {
			if rv, ok := inner(r).(*pg_query.RangeVar); ok {
				ts = append(ts, rangeName(rv))
			}
		}
		v.table(ts...)
		v.hit("truncate", "TRUNCATE removes every row of "+strings.Join(ts, ", "))

	case *pg_query.DropStmt:
		c.drop(&v, x)
	case *pg_query.DropdbStmt:
		v.hit("drop.database", "DROP DATABASE "+x.Dbname)
	case *pg_query.DropRoleStmt:
		v.hit("role.drop", "DROP ROLE removes a role and what it may do")
	case *pg_query.DropOwnedStmt:
		v.hit("drop.owned", "DROP OWNED drops every object the role owns")
	case *pg_query.DropTableSpaceStmt:
		v.hit("drop", "DROP TABLESPACE "+x.Tablespacename)
	case *pg_query.DropSubscriptionStmt:
		v.hit("drop", "DROP SUBSCRIPTION "+x.Subname)
	case *pg_query.DropUserMappingStmt:
		v.hit("drop", "DROP USER MAPPING")

	case *pg_query.AlterTableStmt:
		c.alterTable(&v, x, depth)

	case *pg_query.CopyStmt:
		c.copy(&v, x, depth)

	case *pg_query.ExplainStmt:
		if c.explainAnalyze(x.Options) {
			v.hit("explain.analyze", "EXPLAIN ANALYZE runs the statement")
			c.sub(&v, inner(x.Query), "EXPLAIN ANALYZE runs it: ", depth)
			if v.rowsGuard {
				v.hidden = true
			}
		} else {
			v.hit("explain", "EXPLAIN without ANALYZE only plans the statement")
		}

	case *pg_query.PrepareStmt:
		v.hit("prepare", "PREPARE "+x.Name)
		in := c.stmt(inner(x.Query), "", depth+1)
		// The prepared statement runs at EXECUTE, where its tag counts
		// its rows: keep its guard as it is.
		guard, counted := in.rowsGuard, in.rowsCounted && !in.hidden
		v.absorb(&in, "PREPARE "+x.Name+": ")
		v.rowsGuard, v.rowsCounted, v.hidden = guard, counted, !counted && guard
	case *pg_query.ExecuteStmt:
		v.hit("execute", "EXECUTE "+x.Name+" runs a statement prepared earlier, which a stateless classifier cannot see (the gate classifies it at PREPARE)")
		c.scan(&v, x, depth)
	case *pg_query.DeallocateStmt:
		v.hit("deallocate", "DEALLOCATE forgets a prepared statement")

	case *pg_query.DeclareCursorStmt:
		v.hit("cursor", "DECLARE cursor "+x.Portalname)
		c.sub(&v, inner(x.Query), "DECLARE "+x.Portalname+": ", depth)
	case *pg_query.FetchStmt, *pg_query.ClosePortalStmt:
		v.hit("cursor", "FETCH, MOVE or CLOSE reads from a declared cursor")

	case *pg_query.DoStmt:
		c.do(&v, x, text, depth)
	case *pg_query.CreateFunctionStmt:
		c.createFunction(&v, x, text, depth)
	case *pg_query.CallStmt:
		c.call(&v, x, depth)

	case *pg_query.VariableSetStmt:
		c.set(&v, x)
	case *pg_query.VariableShowStmt:
		v.hit("set", "SHOW "+x.Name)
	case *pg_query.AlterSystemStmt:
		v.hit("alter.system", "ALTER SYSTEM changes the server's configuration file")
	case *pg_query.LoadStmt:
		v.hit("load", "LOAD "+x.Filename+" loads a shared library into the server")

	case *pg_query.TransactionStmt:
		switch x.Kind {
		case pg_query.TransactionStmtKind_TRANS_STMT_PREPARE:
			v.hit("transaction.prepare", "PREPARE TRANSACTION keeps the transaction's locks after the session")
		case pg_query.TransactionStmtKind_TRANS_STMT_COMMIT_PREPARED, pg_query.TransactionStmtKind_TRANS_STMT_ROLLBACK_PREPARED:
			v.hit("transaction.prepared", "COMMIT/ROLLBACK PREPARED decides transaction "+x.Gid+", prepared by another session")
		default:
			v.hit("transaction", "transaction control")
		}
	case *pg_query.ConstraintsSetStmt:
		v.hit("transaction", "SET CONSTRAINTS")
	case *pg_query.ListenStmt, *pg_query.UnlistenStmt, *pg_query.DiscardStmt:
		v.hit("listen", kind(node)+" changes only this session")
	case *pg_query.NotifyStmt:
		v.hit("notify", "NOTIFY "+x.Conditionname+" wakes listeners in other sessions")
	case *pg_query.LockStmt:
		v.hit("lock", "LOCK TABLE blocks other sessions until the transaction ends")

	case *pg_query.VacuumStmt:
		switch {
		case !x.IsVacuumcmd:
			v.hit("maintenance", "ANALYZE collects statistics")
		case c.hasOption(x.Options, "full"):
			v.hit("maintenance.rewrite", "VACUUM FULL rewrites tables under an exclusive lock")
		default:
			v.hit("maintenance", "VACUUM reclaims space without an exclusive lock")
		}
	case *pg_query.ClusterStmt:
		v.hit("maintenance.rewrite", "CLUSTER rewrites a table under an exclusive lock")
	case *pg_query.ReindexStmt:
		v.hit("maintenance.rewrite", "REINDEX rebuilds indexes under a lock")
	case *pg_query.RefreshMatViewStmt:
		v.hit("maintenance.rewrite", "REFRESH MATERIALIZED VIEW "+rangeName(x.Relation)+" replaces its contents")
		c.scan(&v, x, depth)
	case *pg_query.CheckPointStmt:
		v.hit("server", "CHECKPOINT forces a checkpoint (server-wide I/O)")

	case *pg_query.CreateTableAsStmt:
		if x.Into != nil {
			v.table(rangeName(x.Into.Rel))
		}
		v.hit("select.into", "CREATE TABLE AS / MATERIALIZED VIEW creates "+rangeName(x.Into.GetRel())+" from a query it runs")
		c.scan(&v, x, depth)

	case *pg_query.CreateRoleStmt:
		v.hit("role", "CREATE ROLE "+x.Role)
	case *pg_query.AlterRoleStmt, *pg_query.AlterRoleSetStmt:
		v.hit("role", "ALTER ROLE changes a role's rights or settings")
	case *pg_query.GrantStmt:
		v.hit("grant", grantWord(x.IsGrant)+" changes who may do what")
	case *pg_query.GrantRoleStmt:
		v.hit("grant", grantWord(x.IsGrant)+" changes role membership")
	case *pg_query.AlterDefaultPrivilegesStmt:
		v.hit("grant", "ALTER DEFAULT PRIVILEGES changes the rights on future objects")
	case *pg_query.AlterOwnerStmt:
		v.hit("grant", "ALTER ... OWNER TO hands an object to another role")
	case *pg_query.ReassignOwnedStmt:
		v.hit("grant", "REASSIGN OWNED hands a role's objects to another")
	case *pg_query.CreatePolicyStmt, *pg_query.AlterPolicyStmt:
		v.hit("security", kind(node)+" changes row-level security: who sees which rows")
	case *pg_query.SecLabelStmt:
		v.hit("security", "SECURITY LABEL")
	case *pg_query.CreateUserMappingStmt, *pg_query.AlterUserMappingStmt:
		v.hit("security", "a user mapping stores credentials for a foreign server")

	case *pg_query.CreateExtensionStmt:
		v.hit("server", "CREATE EXTENSION "+x.Extname+" runs its install script with elevated rights")
	case *pg_query.AlterExtensionStmt, *pg_query.AlterExtensionContentsStmt,
		*pg_query.CreateFdwStmt, *pg_query.AlterFdwStmt, *pg_query.CreateForeignServerStmt, *pg_query.AlterForeignServerStmt,
		*pg_query.CreateEventTrigStmt, *pg_query.AlterEventTrigStmt, *pg_query.CreatePLangStmt,
		*pg_query.CreateTableSpaceStmt, *pg_query.AlterTableSpaceOptionsStmt, *pg_query.CreateAmStmt,
		*pg_query.CreatePublicationStmt, *pg_query.AlterPublicationStmt,
		*pg_query.CreateSubscriptionStmt, *pg_query.AlterSubscriptionStmt,
		*pg_query.AlterDatabaseStmt, *pg_query.AlterDatabaseSetStmt:
		v.hit("server", kind(node)+" changes the server, not just a schema")

	case *pg_query.CreateStmt:
		v.table(rangeName(x.Relation))
		v.hit("ddl", "CREATE TABLE "+rangeName(x.Relation))
		c.scan(&v, x, depth)
	case *pg_query.IndexStmt:
		v.hit("ddl", "CREATE INDEX on "+rangeName(x.Relation))
		c.scan(&v, x, depth)
	case *pg_query.ViewStmt:
		// The view's query does not run now, but it will whenever the
		// view is read: what it would do is judged now, once.
		v.hit("ddl", "CREATE VIEW "+rangeName(x.View))
		c.scan(&v, x, depth)
	case *pg_query.RuleStmt:
		v.hit("ddl", "CREATE RULE "+x.Rulename+" on "+rangeName(x.Relation))
		c.scan(&v, x, depth)
	case *pg_query.CreateTrigStmt, *pg_query.CreateSchemaStmt, *pg_query.CreateSeqStmt, *pg_query.AlterSeqStmt,
		*pg_query.CompositeTypeStmt, *pg_query.CreateEnumStmt, *pg_query.CreateRangeStmt, *pg_query.AlterEnumStmt,
		*pg_query.CreateDomainStmt, *pg_query.AlterDomainStmt, *pg_query.DefineStmt, *pg_query.CommentStmt,
		*pg_query.RenameStmt, *pg_query.AlterObjectSchemaStmt, *pg_query.AlterObjectDependsStmt,
		*pg_query.AlterFunctionStmt, *pg_query.CreateStatsStmt, *pg_query.AlterStatsStmt,
		*pg_query.CreateForeignTableStmt, *pg_query.ImportForeignSchemaStmt, *pg_query.CreateCastStmt,
		*pg_query.CreateConversionStmt, *pg_query.CreateTransformStmt, *pg_query.CreateOpClassStmt,
		*pg_query.CreateOpFamilyStmt, *pg_query.AlterOpFamilyStmt, *pg_query.AlterOperatorStmt, *pg_query.AlterTypeStmt,
		*pg_query.AlterTSDictionaryStmt, *pg_query.AlterTSConfigurationStmt, *pg_query.AlterCollationStmt,
		*pg_query.CreatedbStmt, *pg_query.AlterDatabaseRefreshCollStmt, *pg_query.AlterTableMoveAllStmt:
		v.hit("ddl", kind(node)+" changes the schema")
		c.scan(&v, node, depth)

	default:
		v.hit("unknown.node", "no rule covers "+kind(node))
	}
	return v
}

func grantWord(g bool) string {
	if g {
		return "GRANT"
	}
	return "REVOKE"
}

func mergeDeletes(m *pg_query.MergeStmt) bool {
	for _, w := range m.MergeWhenClauses {
		if mw, ok := inner(w).(*pg_query.MergeWhenClause); ok && mw.CommandType == pg_query.CmdType_CMD_DELETE {
			return true
		}
	}
	return false
}

// where judges an UPDATE or DELETE of table t by its WHERE: none, or one
// that is always true, reaches every row (rule.no-where,
// rule.always-true); any other is counted and kept under the row limit.
func (c *classifier) where(v *verdict, rule, what, t, all string, where *pg_query.Node, depth int) {
	v.table(t)
	v.target = depth == 0
	switch {
	case where == nil:
		v.hit(rule+".no-where", what+" without WHERE "+all)
	case c.truth(where) == 1:
		v.hit(rule+".always-true", what+" with a WHERE that is always true "+all)
	default:
		v.hit(rule, what+" with a WHERE")
		v.rowsGuard, v.rowsCounted = true, true
	}
}

func (c *classifier) drop(v *verdict, x *pg_query.DropStmt) {
	objs := objectNames(x.Objects)
	what := strings.ToLower(strings.TrimPrefix(x.RemoveType.String(), "OBJECT_"))
	what = strings.ReplaceAll(what, "_", " ")
	switch x.RemoveType {
	case pg_query.ObjectType_OBJECT_INDEX:
		v.hit("drop.index", "DROP INDEX "+strings.Join(objs, ", ")+": no rows lost, but queries may turn into full scans and a unique index stops enforcing uniqueness")
	case pg_query.ObjectType_OBJECT_TABLE, pg_query.ObjectType_OBJECT_FOREIGN_TABLE, pg_query.ObjectType_OBJECT_MATVIEW,
		pg_query.ObjectType_OBJECT_VIEW, pg_query.ObjectType_OBJECT_SEQUENCE:
		v.table(objs...)
		v.hit("drop", "DROP "+strings.ToUpper(what)+" "+strings.Join(objs, ", "))
	default:
		v.hit("drop", "DROP "+strings.ToUpper(what)+" "+strings.Join(objs, ", "))
	}
	if x.Behavior == pg_query.DropBehavior_DROP_CASCADE {
		v.reason += " (CASCADE: and everything that depends on it)"
	}
}

func (c *classifier) alterTable(v *verdict, x *pg_query.AlterTableStmt, depth int) {
	t := rangeName(x.Relation)
	v.table(t)
	v.hit("ddl", "ALTER "+t)
	for _, cn := range x.Cmds {
		cmd, ok := inner(cn).(*pg_query.AlterTableCmd)
		if !ok {
			continue
		}
		switch cmd.Subtype {
		case pg_query.AlterTableType_AT_DropColumn:
			v.hit("alter.drop-column", "ALTER TABLE "+t+" DROP COLUMN "+cmd.Name+": the column's data is gone")
		case pg_query.AlterTableType_AT_DisableTrig, pg_query.AlterTableType_AT_DisableTrigAll,
			pg_query.AlterTableType_AT_DisableTrigUser, pg_query.AlterTableType_AT_EnableReplicaTrig,
			pg_query.AlterTableType_AT_EnableAlwaysTrig, pg_query.AlterTableType_AT_DisableRule,
			pg_query.AlterTableType_AT_EnableReplicaRule, pg_query.AlterTableType_AT_EnableAlwaysRule:
			v.hit("alter.disable-trigger", "ALTER TABLE "+t+" changes when triggers or rules fire (foreign-key checks, audit triggers)")
		case pg_query.AlterTableType_AT_DisableRowSecurity, pg_query.AlterTableType_AT_NoForceRowSecurity:
			v.hit("alter.row-security", "ALTER TABLE "+t+" turns row-level security off")
		case pg_query.AlterTableType_AT_ChangeOwner:
			v.hit("grant", "ALTER TABLE "+t+" OWNER TO hands the table to another role")
		}
	}
	// USING and DEFAULT expressions run on every existing row.
	c.scan(v, x, depth)
}

func (c *classifier) copy(v *verdict, x *pg_query.CopyStmt, depth int) {
	t := rangeName(x.Relation)
	switch {
	case x.IsProgram:
		v.hit("copy.program", fmt.Sprintf("COPY ... PROGRAM %q runs a shell command on the database server", x.Filename))
	case x.Filename != "":
		v.hit("copy.file", fmt.Sprintf("COPY reads or writes the server file %q", x.Filename))
	case x.IsFrom:
		v.table(t)
		v.hit("copy.from", "COPY "+t+" FROM STDIN loads rows")
	default:
		v.hit("copy.to", "COPY TO STDOUT sends rows to the client")
	}
	if q := inner(x.Query); q != nil {
		c.sub(v, q, "COPY runs: ", depth)
	}
	c.scan(v, x, depth)
}

func (c *classifier) explainAnalyze(opts []*pg_query.Node) bool {
	for _, o := range opts {
		d, ok := inner(o).(*pg_query.DefElem)
		if !ok || d.Defname != "analyze" {
			continue
		}
		return c.defTrue(d)
	}
	return false
}

func (c *classifier) hasOption(opts []*pg_query.Node, name string) bool {
	for _, o := range opts {
		if d, ok := inner(o).(*pg_query.DefElem); ok && d.Defname == name {
			return c.defTrue(d)
		}
	}
	return false
}

// defTrue reads an option's boolean: absent means true (EXPLAIN (ANALYZE)).
func (c *classifier) defTrue(d *pg_query.DefElem) bool {
	if d.Arg == nil {
		return true
	}
	c.constRead = true
	switch a := inner(d.Arg).(type) {
	case *pg_query.String:
		b, ok := parseBool(a.Sval)
		return !ok || b
	case *pg_query.Integer:
		return a.Ival != 0
	case *pg_query.Boolean:
		return a.Boolval
	case *pg_query.A_Const:
		if t := c.truth(d.Arg); t != 0 {
			return t == 1
		}
	}
	return true
}
