package classify

import (
	"math"
	"strconv"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// Deciding whether a WHERE clause is always true is undecidable in
// general; this catches the forms people type and the ones used to slip a
// full-table DELETE past a "must have a WHERE" check: constants (true,
// 'yes', 1::bool), comparisons of constants (1=1, 2>1, 'a'='a'), an
// expression compared with itself (x=x, x>=x, x IS NOT DISTINCT FROM x),
// OR with any true branch, AND of true branches, NOT of something always
// false, x IS NULL OR x IS NOT NULL, x OR NOT x, x LIKE '%', EXISTS
// (SELECT 1), and so on. What it misses (id > 0) is left to the
// blast-radius guard, which counts the rows.

// truth is 1 when e is always true, -1 when always false (or always
// NULL, which WHERE treats alike), 0 when it depends on the row.
func (c *classifier) truth(e *pg_query.Node) int {
	switch x := inner(e).(type) {
	case *pg_query.A_Const:
		c.constRead = true
		if x.Isnull {
			return -1
		}
		if b := x.GetBoolval(); b != nil {
			return boolTruth(b.Boolval)
		}
		if s := x.GetSval(); s != nil {
			if b, ok := parseBool(s.Sval); ok {
				return boolTruth(b)
			}
		}
		return 0
	case *pg_query.TypeCast:
		if k, ok := inner(x.Arg).(*pg_query.A_Const); ok && isBoolType(x.TypeName) {
			c.constRead = true
			if i := k.GetIval(); i != nil && !k.Isnull {
				return boolTruth(i.Ival != 0)
			}
		}
		return c.truth(x.Arg)
	case *pg_query.BoolExpr:
		switch x.Boolop {
		case pg_query.BoolExprType_NOT_EXPR:
			if len(x.Args) == 1 {
				return -c.truth(x.Args[0])
			}
		case pg_query.BoolExprType_AND_EXPR:
			all := 1
			for _, a := range x.Args {
				switch c.truth(a) {
				case -1:
					return -1
				case 0:
					all = 0
				}
			}
			return all
		case pg_query.BoolExprType_OR_EXPR:
			all := -1
			for _, a := range x.Args {
				switch c.truth(a) {
				case 1:
					return 1
				case 0:
					all = 0
				}
			}
			if c.complementary(x.Args) {
				return 1
			}
			return all
		}
		return 0
	case *pg_query.A_Expr:
		return c.exprTruth(x)
	case *pg_query.NullTest:
		if k, ok := inner(x.Arg).(*pg_query.A_Const); ok {
			c.constRead = true
			isNull := k.Isnull
			if x.Nulltesttype == pg_query.NullTestType_IS_NULL {
				return boolTruth(isNull)
			}
			return boolTruth(!isNull)
		}
		return 0
	case *pg_query.BooleanTest:
		t := c.truth(x.Arg)
		switch x.Booltesttype {
		case pg_query.BoolTestType_IS_TRUE, pg_query.BoolTestType_IS_NOT_FALSE:
			return t
		case pg_query.BoolTestType_IS_FALSE, pg_query.BoolTestType_IS_NOT_TRUE:
			return -t
		}
		return 0
	case *pg_query.SubLink:
		// EXISTS (SELECT 1): a subquery with no FROM and no filter
		// always returns its one row.
		if x.SubLinkType == pg_query.SubLinkType_EXISTS_SUBLINK {
			if s, ok := inner(x.Subselect).(*pg_query.SelectStmt); ok && len(s.FromClause) == 0 &&
				s.WhereClause == nil && s.HavingClause == nil && s.LimitCount == nil && len(s.ValuesLists) == 0 && s.Larg == nil {
				return 1
			}
		}
		return 0
	case *pg_query.CoalesceExpr:
		if len(x.Args) > 0 && c.truth(x.Args[0]) == 1 {
			return 1
		}
		return 0
	}
	return 0
}

func boolTruth(b bool) int {
	if b {
		return 1
	}
	return -1
}

// parseBool accepts what PostgreSQL's boolean input accepts: t, true, y,
// yes, on, 1 and their negations, any case, unique prefixes, blanks around.
func parseBool(s string) (bool, bool) {
	s = strings.ToLower(strings.TrimSpace(s))
	if s == "" {
		return false, false
	}
	for _, w := range []string{"true", "yes"} {
		if strings.HasPrefix(w, s) {
			return true, true
		}
	}
	for _, w := range []string{"false", "no"} {
		if strings.HasPrefix(w, s) {
			return false, true
		}
	}
	switch s {
	case "on", "1":
		return true, true
	case "of", "off", "0":
		return false, true
	}
	return false, false
}

func isBoolType(t *pg_query.TypeName) bool {
	if t == nil || len(t.Names) == 0 {
		return false
	}
	n := strVal(t.Names[len(t.Names)-1])
	return n == "bool" || n == "boolean"
}

// complementary finds, among OR branches, "x IS NULL" with "x IS NOT
// NULL", or "x" with "NOT x": together they cover every row.
func (c *classifier) complementary(args []*pg_query.Node) bool {
	for i, a := range args {
		for _, b := range args[i+1:] {
			na, oka := inner(a).(*pg_query.NullTest)
			nb, okb := inner(b).(*pg_query.NullTest)
			if oka && okb && na.Nulltesttype != nb.Nulltesttype && c.sameExpr(na.Arg, nb.Arg) {
				return true
			}
			if c.isNegation(a, b) || c.isNegation(b, a) {
				return true
			}
		}
	}
	return false
}

func (c *classifier) isNegation(a, b *pg_query.Node) bool {
	n, ok := inner(b).(*pg_query.BoolExpr)
	return ok && n.Boolop == pg_query.BoolExprType_NOT_EXPR && len(n.Args) == 1 && c.sameExpr(a, n.Args[0])
}

func (c *classifier) exprTruth(x *pg_query.A_Expr) int {
	op := opName(x.Name)
	switch x.Kind {
	case pg_query.A_Expr_Kind_AEXPR_OP:
		if c.sameExpr(x.Lexpr, x.Rexpr) && x.Lexpr != nil {
			switch op {
			case "=", ">=", "<=":
				return 1
			case "<>", "!=", "<", ">":
				return -1
			}
		}
		// The right side only when the left folds: "aid = 5" then never
		// reads its constant (see classifier.constRead).
		if l, lok := c.fold(x.Lexpr); lok {
			r, rok := c.fold(x.Rexpr)
			if cmp, ok := compare(l, r); ok && rok {
				return compareTruth(op, cmp)
			}
		}
	case pg_query.A_Expr_Kind_AEXPR_NOT_DISTINCT:
		if c.sameExpr(x.Lexpr, x.Rexpr) {
			return 1
		}
		// The right side only when the left folds: "aid = 5" then never
		// reads its constant (see classifier.constRead).
		if l, lok := c.fold(x.Lexpr); lok {
			r, rok := c.fold(x.Rexpr)
			if cmp, ok := compare(l, r); ok && rok {
				return boolTruth(cmp == 0)
			}
		}
	case pg_query.A_Expr_Kind_AEXPR_DISTINCT:
		if c.sameExpr(x.Lexpr, x.Rexpr) {
			return -1
		}
	case pg_query.A_Expr_Kind_AEXPR_IN:
		list, ok := inner(x.Rexpr).(*pg_query.List)
		if !ok {
			return 0
		}
		l, lok := c.fold(x.Lexpr)
		for _, it := range list.Items {
			hit := c.sameExpr(x.Lexpr, it)
			if !hit && lok {
				if r, rok := c.fold(it); rok {
					c, ok := compare(l, r)
					hit = ok && c == 0
				}
			}
			if hit {
				if op == "=" { // IN
					return 1
				}
				return -1 // NOT IN
			}
		}
	case pg_query.A_Expr_Kind_AEXPR_LIKE, pg_query.A_Expr_Kind_AEXPR_ILIKE:
		// x LIKE '%' matches every non-NULL x.
		if k, ok := inner(x.Rexpr).(*pg_query.A_Const); ok {
			c.constRead = true
			if s := k.GetSval(); s != nil && s.Sval != "" && strings.Trim(s.Sval, "%") == "" {
				if op == "~~" || op == "~~*" {
					return 1
				}
				return -1
			}
		}
	case pg_query.A_Expr_Kind_AEXPR_BETWEEN, pg_query.A_Expr_Kind_AEXPR_NOT_BETWEEN:
		list, ok := inner(x.Rexpr).(*pg_query.List)
		if !ok || len(list.Items) != 2 {
			return 0
		}
		v, ok1 := c.fold(x.Lexpr)
		if !ok1 {
			return 0 // and the bounds' constants were never read
		}
		lo, ok2 := c.fold(list.Items[0])
		hi, ok3 := c.fold(list.Items[1])
		if ok2 && ok3 {
			c1, okc1 := compare(v, lo)
			c2, okc2 := compare(v, hi)
			if okc1 && okc2 {
				in := c1 >= 0 && c2 <= 0
				if x.Kind == pg_query.A_Expr_Kind_AEXPR_NOT_BETWEEN {
					in = !in
				}
				return boolTruth(in)
			}
		}
	}
	return 0
}

func compareTruth(op string, c int) int {
	switch op {
	case "=":
		return boolTruth(c == 0)
	case "<>", "!=":
		return boolTruth(c != 0)
	case "<":
		return boolTruth(c < 0)
	case ">":
		return boolTruth(c > 0)
	case "<=":
		return boolTruth(c <= 0)
	case ">=":
		return boolTruth(c >= 0)
	}
	return 0
}

func opName(name []*pg_query.Node) string {
	if len(name) == 0 {
		return ""
	}
	return strVal(name[len(name)-1])
}

// constant is a folded constant: a number or a string.
type constant struct {
	num   float64
	str   string
	isNum bool
}

// fold evaluates constant arithmetic: 1, -1, 1+1, '1', 2*3.
func (c *classifier) fold(e *pg_query.Node) (constant, bool) {
	switch x := inner(e).(type) {
	case *pg_query.A_Const:
		c.constRead = true
		if x.Isnull {
			return constant{}, false
		}
		if i := x.GetIval(); i != nil {
			return constant{num: float64(i.Ival), isNum: true}, true
		}
		if f := x.GetFval(); f != nil {
			v, err := strconv.ParseFloat(f.Fval, 64)
			return constant{num: v, isNum: true}, err == nil
		}
		if s := x.GetSval(); s != nil {
			return constant{str: s.Sval}, true
		}
		if b := x.GetBoolval(); b != nil {
			if b.Boolval {
				return constant{num: 1, isNum: true}, true
			}
			return constant{num: 0, isNum: true}, true
		}
	case *pg_query.TypeCast:
		return c.fold(x.Arg)
	case *pg_query.A_Expr:
		if x.Kind != pg_query.A_Expr_Kind_AEXPR_OP {
			return constant{}, false
		}
		op := opName(x.Name)
		var l constant
		if x.Lexpr != nil {
			// The left side first: "abalance + 5" then never reads its
			// constant (see classifier.constRead).
			var ok bool
			if l, ok = c.fold(x.Lexpr); !ok || !toNum(&l) {
				return constant{}, false
			}
		}
		r, ok := c.fold(x.Rexpr)
		if !ok || !toNum(&r) {
			return constant{}, false
		}
		if x.Lexpr == nil {
			switch op {
			case "-":
				return constant{num: -r.num, isNum: true}, true
			case "+":
				return r, true
			}
			return constant{}, false
		}
		switch op {
		case "+":
			return constant{num: l.num + r.num, isNum: true}, true
		case "-":
			return constant{num: l.num - r.num, isNum: true}, true
		case "*":
			return constant{num: l.num * r.num, isNum: true}, true
		case "/":
			if r.num != 0 {
				return constant{num: l.num / r.num, isNum: true}, true
			}
		case "%":
			if r.num != 0 {
				return constant{num: math.Mod(l.num, r.num), isNum: true}, true
			}
		}
	}
	return constant{}, false
}

func toNum(c *constant) bool {
	if c.isNum {
		return true
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(c.str), 64)
	if err != nil {
		return false
	}
	c.num, c.isNum = v, true
	return true
}

// compare compares two constants as PostgreSQL would coerce them: as
// numbers when either is a number, else as strings.
func compare(a, b constant) (int, bool) {
	if a.isNum || b.isNum {
		if !toNum(&a) || !toNum(&b) {
			return 0, false
		}
		switch {
		case a.num < b.num:
			return -1, true
		case a.num > b.num:
			return 1, true
		}
		return 0, true
	}
	return strings.Compare(a.str, b.str), true
}

// strVal returns a String node's value, or "".
func strVal(n *pg_query.Node) string {
	if s, ok := inner(n).(*pg_query.String); ok {
		return s.Sval
	}
	return ""
}
