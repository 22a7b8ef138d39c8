package classify

import (
	"reflect"
	"strings"
	"sync"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// The parse tree has some 270 node types. Walking it by reflection, over
// exported fields only, means a node type added by a new PostgreSQL
// version is still searched for function calls and nested statements
// instead of silently skipped by a hand-written walker.

// inner returns the node a *pg_query.Node wraps (a *pg_query.DeleteStmt,
// a *pg_query.FuncCall...), or nil.
func inner(n *pg_query.Node) any {
	if n == nil || n.Node == nil {
		return nil
	}
	v := reflect.ValueOf(n.Node) // *pg_query.Node_DeleteStmt
	if v.IsNil() {
		return nil
	}
	f := v.Elem().Field(0)
	if f.IsNil() {
		return nil
	}
	return f.Interface()
}

// kind names a node's type: "DeleteStmt".
func kind(m any) string {
	t := reflect.TypeOf(m)
	if t == nil {
		return ""
	}
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t.Name()
}

// fieldsOf caches, per struct type, the exported fields that can hold
// other nodes (pointers, interfaces, slices of them).
var fieldsOf sync.Map // reflect.Type → []int

func nodeFields(t reflect.Type) []int {
	if f, ok := fieldsOf.Load(t); ok {
		return f.([]int)
	}
	var idx []int
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		switch f.Type.Kind() {
		case reflect.Pointer, reflect.Interface:
			idx = append(idx, i)
		case reflect.Slice:
			if k := f.Type.Elem().Kind(); k == reflect.Pointer || k == reflect.Interface {
				idx = append(idx, i)
			}
		}
	}
	fieldsOf.Store(t, idx)
	return idx
}

// walk calls fn for every node below root (not root itself), depth
// first, unwrapping *pg_query.Node. When fn returns false the node's
// children are skipped.
func walk(root any, fn func(m any) bool) {
	v := reflect.ValueOf(root)
	if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
		return
	}
	walkFields(v.Elem(), fn)
}

func walkFields(s reflect.Value, fn func(any) bool) {
	for _, i := range nodeFields(s.Type()) {
		walkValue(s.Field(i), fn)
	}
}

func walkValue(v reflect.Value, fn func(any) bool) {
	switch v.Kind() {
	case reflect.Interface:
		if !v.IsNil() {
			walkValue(v.Elem(), fn)
		}
	case reflect.Slice:
		for i := range v.Len() {
			walkValue(v.Index(i), fn)
		}
	case reflect.Pointer:
		if v.IsNil() || v.Elem().Kind() != reflect.Struct {
			return
		}
		m := v.Interface()
		if n, ok := m.(*pg_query.Node); ok {
			if in := inner(n); in != nil {
				walkValue(reflect.ValueOf(in), fn)
			}
			return
		}
		// The oneof wrappers (*pg_query.Node_DeleteStmt, *A_Const_Sval)
		// are not nodes: look through them.
		if strings.Contains(v.Elem().Type().Name(), "_") && v.Elem().NumField() == 1 {
			walkFields(v.Elem(), fn)
			return
		}
		if fn(m) {
			walkFields(v.Elem(), fn)
		}
	}
}

// sameExpr reports whether two expressions are the same tree, ignoring
// where in the text they are: "x = x" compares a column with itself.
func sameExpr(a, b *pg_query.Node) bool {
	if a == nil || b == nil {
		return false
	}
	return (&comparer{}).same(reflect.ValueOf(a), reflect.ValueOf(b))
}

// sameExpr is [sameExpr], noting in c.constRead when the answer depends on
// the values of constants: when the trees are alike but for constants
// ("1 = 1" and "1 = 2" are; "aid = 5" is not, whatever the 5).
func (c *classifier) sameExpr(a, b *pg_query.Node) bool {
	if a == nil || b == nil {
		return false
	}
	loose := &comparer{loose: true}
	if !loose.same(reflect.ValueOf(a), reflect.ValueOf(b)) {
		return false
	}
	if !loose.sawConst {
		return true
	}
	c.constRead = true
	return sameExpr(a, b)
}

var aConstType = reflect.TypeFor[*pg_query.A_Const]()

// comparer compares parse trees; loose takes any two constants as equal
// (and notes that it saw some).
type comparer struct {
	loose, sawConst bool
}

func (cm *comparer) same(a, b reflect.Value) bool {
	if a.Type() != b.Type() {
		return false
	}
	switch a.Kind() {
	case reflect.Pointer, reflect.Interface:
		if a.IsNil() || b.IsNil() {
			return a.IsNil() == b.IsNil()
		}
		if cm.loose && a.Type() == aConstType {
			cm.sawConst = true
			return true
		}
		return cm.same(a.Elem(), b.Elem())
	case reflect.Slice:
		if a.Len() != b.Len() {
			return false
		}
		for i := range a.Len() {
			if !cm.same(a.Index(i), b.Index(i)) {
				return false
			}
		}
		return true
	case reflect.Struct:
		t := a.Type()
		for i := range t.NumField() {
			f := t.Field(i)
			if !f.IsExported() || f.Name == "Location" {
				continue
			}
			if !cm.same(a.Field(i), b.Field(i)) {
				return false
			}
		}
		return true
	case reflect.String:
		return a.String() == b.String()
	case reflect.Bool:
		return a.Bool() == b.Bool()
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return a.Int() == b.Int()
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return a.Uint() == b.Uint()
	case reflect.Float32, reflect.Float64:
		return a.Float() == b.Float()
	}
	return false
}
