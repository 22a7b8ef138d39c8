package restorer

import (
	"fmt"
	"path"
	"strings"
)

// matcher decides which paths an include list selects. A pattern is split
// into slash-separated elements, each matched with path.Match against the
// path element at the same depth; a pattern that matches a directory
// selects everything below it too.
type matcher struct {
	pats [][]string // nil: everything is selected
}

func newMatcher(include []string) (*matcher, error) {
	m := &matcher{}
	for _, p := range include {
		elems := splitPath(p)
		if len(elems) == 0 {
			return nil, fmt.Errorf("restorer: include pattern %q selects nothing (to restore everything, give no patterns)", p)
		}
		for _, e := range elems {
			if _, err := path.Match(e, ""); err != nil {
				return nil, fmt.Errorf("restorer: include pattern %q: %w", p, err)
			}
		}
		m.pats = append(m.pats, elems)
	}
	return m, nil
}

// all reports whether every path is selected.
func (m *matcher) all() bool { return len(m.pats) == 0 }

// selects reports whether a pattern matches elems or one of its ancestors.
func (m *matcher) selects(elems []string) bool {
	if m.all() {
		return true
	}
	for _, p := range m.pats {
		if len(p) <= len(elems) && prefixMatch(p, elems[:len(p)]) {
			return true
		}
	}
	return false
}

// mayContain reports whether something below the directory elems could be
// selected, so that the directory must be read.
func (m *matcher) mayContain(elems []string) bool {
	if m.all() {
		return true
	}
	for _, p := range m.pats {
		if len(p) > len(elems) && prefixMatch(p[:len(elems)], elems) {
			return true
		}
	}
	return false
}

func prefixMatch(pats, elems []string) bool {
	for i, pat := range pats {
		if ok, _ := path.Match(pat, elems[i]); !ok {
			return false
		}
	}
	return true
}

// splitPath turns a snapshot path ("/a/b/", "a//b", "a/./b") into its
// elements. ".." elements are kept and so match nothing.
func splitPath(p string) []string {
	var out []string
	for _, e := range strings.Split(p, "/") {
		if e != "" && e != "." {
			out = append(out, e)
		}
	}
	return out
}
