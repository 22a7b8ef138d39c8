// Package yamlconf walks the yaml.v3 node tree of a config file and
// reports every problem it finds at its file, line and field, so that a
// config is fixed in one round. Unknown keys are errors: a misspelt key
// must not silently fall back to a default.
//
// A field is the dotted path of a value, with list indexes:
// "rules[2].action". The config parsers of internal/gate/policy and
// internal/runner embed [Parser] and add their own sections.
package yamlconf

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Error is one problem in a config file, at a line.
type Error struct {
	// Prefix names the package reporting it ("policy"); the message
	// starts with it and ": ", or with the location when it is empty.
	Prefix string
	File   string
	Line   int    // 0 when the problem is the whole file
	Field  string // e.g. "rules[2].action"; "" for the file or its syntax
	Msg    string
}

// Error is "prefix: file:line: field: msg", without the line when it is
// 0 and without the field when it is "".
func (e *Error) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Prefix != "" {
		loc = e.Prefix + ": " + loc
	}
	if e.Field == "" {
		return fmt.Sprintf("%s: %s", loc, e.Msg)
	}
	return fmt.Sprintf("%s: %s: %s", loc, e.Field, e.Msg)
}

// Parser collects the problems of one file. Its methods check a node
// and record what is wrong with it; they never stop at the first.
type Parser struct {
	Prefix string // the Prefix of every Error
	File   string // the file's name in messages
	// Errs are the problems found so far, in the order found; a caller
	// may add its own (errors of other kinds too).
	Errs []error
	keys map[string]int // field → the line of its key, set by Fields
}

// Err is the problems found, joined, or nil.
func (p *Parser) Err() error { return errors.Join(p.Errs...) }

// Decode parses data into its document node. A syntax error is returned
// as an *Error at the line yaml.v3 names; Errs is left alone.
func (p *Parser) Decode(data []byte) (*yaml.Node, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		line, msg := syntaxErr(err)
		return nil, &Error{Prefix: p.Prefix, File: p.File, Line: line, Msg: msg}
	}
	return &doc, nil
}

// syntaxErr splits a yaml.v3 syntax error ("yaml: line 4: ...") into the
// line and the message.
func syntaxErr(err error) (int, string) {
	s := strings.TrimPrefix(err.Error(), "yaml: ")
	rest, ok := strings.CutPrefix(s, "line ")
	if !ok {
		return 0, s
	}
	num, msg, ok := strings.Cut(rest, ": ")
	n, err2 := strconv.Atoi(num)
	if !ok || err2 != nil {
		return 0, s
	}
	return n, msg
}

// ErrLine records a problem with field at line (0: the whole file).
func (p *Parser) ErrLine(line int, field, format string, a ...any) {
	p.Errs = append(p.Errs, &Error{Prefix: p.Prefix, File: p.File, Line: line, Field: field, Msg: fmt.Sprintf(format, a...)})
}

// Errf records a problem with field at n's line (0 when n is nil).
func (p *Parser) Errf(n *yaml.Node, field, format string, a ...any) {
	line := 0
	if n != nil {
		line = n.Line
	}
	p.ErrLine(line, field, format, a...)
}

// ErrKey records a problem with a whole field at its key's line, for a
// field that Fields has walked (else at line 0).
func (p *Parser) ErrKey(field, format string, a ...any) {
	p.ErrLine(p.keys[field], field, format, a...)
}

// Fields walks the mapping n at path ("" for the top), calling known's
// function for each key it has with the value and its field. A key
// known lacks is reported with the list of known ones, a key given twice
// at its second place; neither reaches a function.
func (p *Parser) Fields(n *yaml.Node, path string, known map[string]func(v *yaml.Node, field string)) {
	if n.Kind != yaml.MappingNode {
		p.Errf(n, path, "must be a mapping")
		return
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		field := k.Value
		if path != "" {
			field = path + "." + k.Value
		}
		if seen[k.Value] {
			p.Errf(k, field, "given twice")
			continue
		}
		seen[k.Value] = true
		if p.keys == nil {
			p.keys = map[string]int{}
		}
		p.keys[field] = k.Line
		fn, ok := known[k.Value]
		if !ok {
			p.Errf(k, field, "unknown key (known: %s)", strings.Join(slices.Sorted(maps.Keys(known)), ", "))
			continue
		}
		fn(v, field)
	}
}

// Str stores n's text in dst: any scalar but null, "" included.
func (p *Parser) Str(n *yaml.Node, field string, dst *string) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		p.Errf(n, field, "must be a string")
		return
	}
	*dst = n.Value
}

// NonEmptyStr stores n's text in dst: any scalar but null and "".
func (p *Parser) NonEmptyStr(n *yaml.Node, field string, dst *string) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" || n.Value == "" {
		p.Errf(n, field, "must be a non-empty string")
		return
	}
	*dst = n.Value
}

// Bool stores true or false in dst.
func (p *Parser) Bool(n *yaml.Node, field string, dst *bool) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!bool" {
		p.Errf(n, field, "must be true or false")
		return
	}
	*dst = n.Value == "true"
}

// Int reads a whole number (YAML's forms: 0x1F, 1_000) in lo..hi;
// false when it is not one.
func (p *Parser) Int(n *yaml.Node, field string, lo, hi int64) (int64, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
		p.Errf(n, field, "must be a whole number")
		return 0, false
	}
	v, err := strconv.ParseInt(strings.ReplaceAll(n.Value, "_", ""), 0, 64)
	if err != nil || v < lo || v > hi {
		p.Errf(n, field, "%s is out of range %d..%d", n.Value, lo, hi)
		return 0, false
	}
	return v, true
}

// Duration stores the positive duration s (n's text, read by the
// caller) in dst; a bad one is reported with like as the examples of a
// good one ("30m or 1h").
func (p *Parser) Duration(n *yaml.Node, field, s, like string, dst *time.Duration) {
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		p.Errf(n, field, "%q is not a positive duration like %s", s, like)
		return
	}
	*dst = d
}

// List reads a sequence of non-empty strings; an item that is not one
// is reported under its index and left out.
func (p *Parser) List(n *yaml.Node, field string) []string {
	if n.Kind != yaml.SequenceNode {
		p.Errf(n, field, "must be a list of strings")
		return nil
	}
	var out []string
	for i, it := range n.Content {
		var s string
		p.NonEmptyStr(it, fmt.Sprintf("%s[%d]", field, i), &s)
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}
