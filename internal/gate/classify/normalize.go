package classify

import (
	"strings"
	"unicode/utf8"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// shapeOf returns the shape of a one-statement SQL text: the text with
// every numeric and plain string literal replaced by a marker of its
// token type, everything else byte for byte. Two texts of one shape are
// the same token sequence but for the literals' values, so the parser
// builds them the same tree but for the constants in it; whether their
// classification is the same too is the classifier's to say
// (classifier.constRead), not the shape's.
//
// It is a lexer, not a parser, and a deliberately timid one: anything it
// is not certain to split exactly as PostgreSQL's scanner does (comments,
// dollar quotes, E'x' B'1' X'f' N'x' U&'x' strings, backslashes in strings,
// Unicode identifiers with U&, numbers with junk, hexadecimal or
// underscores, a NUL, invalid UTF-8, several statements, an unterminated
// quote) makes it give up (ok false), and the text is parsed instead. It
// does not allocate when it gives up early, and never needs the parser.
//
// The markers are "\x00i" (an integer that fits in 32 bits: the
// grammar's ICONST), "\x00f" (any other number: FCONST) and "\x00s" (a
// string: SCONST). A text holding a NUL is refused, so a marker never
// stands for itself. n counts the literals replaced.
func shapeOf(sql string) (shape string, n int, ok bool) {
	b, n, ok := appendShape(nil, sql, nil)
	switch {
	case !ok:
		return "", 0, false
	case n == 0:
		return sql, 0, true
	}
	return string(b), n, true
}

// appendShape appends sql's shape to dst (all of it, the text itself when
// n is 0), so that a caller with a buffer of its own finds a shape in a
// map without allocating; it appends to *spans (when not nil) the start
// and end offsets of each literal it replaced. On !ok what it appended is
// to be ignored.
func appendShape(dst []byte, sql string, spans *[]int) (shape []byte, n int, ok bool) {
	if !utf8.ValidString(sql) || strings.IndexByte(sql, 0) >= 0 {
		return dst, 0, false
	}
	b := dst
	last := 0 // sql[last:i] is still to be copied
	i := 0
	for i < len(sql) {
		ch := sql[i]
		switch {
		case ch == 0 || ch == '\\' || ch == '{' || ch == '}' || ch == '$' && !isDigit(at(sql, i+1)):
			// $ not followed by a digit: a dollar quote (or junk).
			return dst, 0, false
		case ch == '$': // a parameter, $1
			i++
			for i < len(sql) && isDigit(sql[i]) {
				i++
			}
			if isIdent(at(sql, i)) {
				return dst, 0, false
			}
		case ch == '-' && at(sql, i+1) == '-', ch == '/' && at(sql, i+1) == '*':
			return dst, 0, false // a comment
		case ch == '.' && at(sql, i+1) == '.':
			return dst, 0, false // the scanner's DOT_DOT; "..5" is not ". .5"
		case ch == ';':
			// One statement only, and the semicolon last.
			if strings.TrimLeft(sql[i+1:], " \t\n\r\f\v") != "" {
				return dst, 0, false
			}
			i++
		case ch == '"':
			end := quoted(sql, i, '"')
			if end < 0 {
				return dst, 0, false
			}
			i = end
		case ch == '\'':
			// A prefix glued to the quote makes another kind of string
			// (E'', B'', X'', N'', U&''), or a typed literal: give up.
			if i > 0 && (isIdent(sql[i-1]) || strings.IndexByte("&\"$.", sql[i-1]) >= 0) {
				return dst, 0, false
			}
			end := quoted(sql, i, '\'')
			if end < 0 || strings.IndexByte(sql[i:end], '\\') >= 0 {
				return dst, 0, false
			}
			b = append(b, sql[last:i]...)
			b = append(b, "\x00s"...)
			n++
			if spans != nil {
				*spans = append(*spans, i, end)
			}
			i, last = end, end
		case ch == '&' && (at(sql, i+1) == '\'' || at(sql, i+1) == '"'):
			return dst, 0, false // U&'...' or U&"..."
		case ch == '.' && isDigit(at(sql, i+1)):
			// .5 is a number, t.5 an error or worse: rare enough to parse.
			return dst, 0, false
		case isDigit(ch):
			end, isInt := number(sql, i)
			if end < 0 {
				return dst, 0, false
			}
			b = append(b, sql[last:i]...)
			if spans != nil {
				*spans = append(*spans, i, end)
			}
			if isInt {
				b = append(b, "\x00i"...)
			} else {
				b = append(b, "\x00f"...)
			}
			n++
			i, last = end, end
		case isIdentStart(ch):
			for i < len(sql) && isIdent(sql[i]) {
				i++
			}
		case ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v',
			strings.IndexByte("()[],:.+*/<>=~!@#%^&|`?-", ch) >= 0:
			i++
		default:
			return dst, 0, false
		}
	}
	return append(b, sql[last:]...), n, true
}

// Literals appends to spans the start and end offsets in sql of each
// literal its shape replaces (the cache's notion: numbers and plain
// strings), in order, and reports whether it found any: false too when the
// shape's lexer gives up on sql. The texts of one shape are cut at their
// literals alike, which is what lets the gate's ledger write a shape once
// and each statement's literals (sql is exactly the pieces between the
// spans and the literals, whatever they are).
func Literals(spans []int, sql string) ([]int, bool) {
	if len(sql) > maxCachedText {
		return spans, false
	}
	n0 := len(spans)
	var buf [512]byte // the shape, unused: on the stack for most texts
	if _, n, ok := appendShape(buf[:0], sql, &spans); !ok || n == 0 {
		return spans[:n0], false
	}
	return spans, true
}

func at(s string, i int) byte {
	if i < len(s) {
		return s[i]
	}
	return 0
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// isIdentStart and isIdent follow PostgreSQL's scanner: letters,
// underscore and any byte with the high bit set; then digits and $ too.
func isIdentStart(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c >= 0x80
}

func isIdent(c byte) bool { return isIdentStart(c) || isDigit(c) || c == '$' }

// quoted returns the index after the quoted token starting at sql[i]
// (a doubled quote stands for itself), or -1 when it is not closed.
func quoted(sql string, i int, q byte) int {
	for j := i + 1; j < len(sql); j++ {
		if sql[j] == q {
			if at(sql, j+1) == q {
				j++
				continue
			}
			return j + 1
		}
	}
	return -1
}

// number scans a decimal number at sql[i] (a digit) the way PostgreSQL's scanner
// does (digits, a fraction, an exponent) and returns its end and whether
// the grammar sees an integer (ICONST: digits only, fitting in 32 bits).
// Anything glued to it that the scanner would take as junk or as another
// kind of number (1abc, 0x1F, 1_000, 1.2.3, 1e) gives -1.
func number(sql string, i int) (end int, isInt bool) {
	j := i
	for j < len(sql) && isDigit(sql[j]) {
		j++
	}
	isInt = true
	if at(sql, j) == '.' {
		isInt = false
		j++
		for j < len(sql) && isDigit(sql[j]) {
			j++
		}
	}
	if c := at(sql, j); c == 'e' || c == 'E' {
		isInt = false
		j++
		if c := at(sql, j); c == '+' || c == '-' {
			j++
		}
		k := j
		for j < len(sql) && isDigit(sql[j]) {
			j++
		}
		if j == k {
			return -1, false
		}
	}
	if c := at(sql, j); isIdent(c) || c == '.' || c == '\'' || c == '"' {
		return -1, false // junk, or glued to a quote: parse such odd text
	}
	if isInt {
		// ICONST only if it fits in an int32; longer is FCONST.
		v := strings.TrimLeft(sql[i:j], "0")
		isInt = len(v) < 10 || len(v) == 10 && v <= "2147483647"
	}
	return j, isInt
}

// constsAt reports whether the parse tree has a constant (A_Const) for
// every literal in spans: at the literal itself, or at a minus sign
// before it (the grammar folds "-5" into one constant located at the "-").
// A literal the grammar consumed without leaving a constant, such as the
// precision in float(53), which it checks (float(0) does not parse) and
// turns into a type name, makes the text's parse depend on a value: such
// a shape must not be cached.
func constsAt(sql string, tree *pg_query.ParseResult, spans []int) bool {
	at := map[int]bool{}
	walk(tree, func(m any) bool {
		if k, ok := m.(*pg_query.A_Const); ok {
			at[int(k.Location)] = true
		}
		return true
	})
	for i := 0; i < len(spans); i += 2 {
		s := spans[i]
		if at[s] {
			continue
		}
		found := false
		for j := s - 1; j >= 0 && !found; j-- {
			c := sql[j]
			if c == '-' {
				found = at[j]
				continue
			}
			if c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '\f' && c != '\v' {
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
