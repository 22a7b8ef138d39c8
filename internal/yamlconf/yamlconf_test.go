package yamlconf

import (
	"errors"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// conf is what the test parser fills in.
type conf struct {
	name, word string
	on         bool
	n          int64
	every      time.Duration
	tags       []string
}

// parse walks a small config with every helper, the way policy and
// runner do, and returns the joined problems.
func parse(t *testing.T, src string) (conf, error) {
	t.Helper()
	p := &Parser{Prefix: "test", File: "x.yaml"}
	doc, err := p.Decode([]byte(src))
	if err != nil {
		return conf{}, err
	}
	var c conf
	p.Fields(doc.Content[0], "", map[string]func(*yaml.Node, string){
		"name": func(v *yaml.Node, f string) { p.Str(v, f, &c.name) },
		"word": func(v *yaml.Node, f string) { p.NonEmptyStr(v, f, &c.word) },
		"on":   func(v *yaml.Node, f string) { p.Bool(v, f, &c.on) },
		"n": func(v *yaml.Node, f string) {
			if x, ok := p.Int(v, f, 1, 100); ok {
				c.n = x
			}
		},
		"every": func(v *yaml.Node, f string) {
			var s string
			p.NonEmptyStr(v, f, &s)
			if s != "" {
				p.Duration(v, f, s, "30m or 1h", &c.every)
			}
		},
		"tags": func(v *yaml.Node, f string) { c.tags = p.List(v, f) },
		"sub": func(v *yaml.Node, f string) {
			p.Fields(v, f, map[string]func(*yaml.Node, string){
				"a": func(v *yaml.Node, f string) { p.Bool(v, f, new(bool)) },
			})
			p.ErrKey(f, "checked as a whole")
		},
	})
	return c, p.Err()
}

func TestConfigErrors(t *testing.T) {
	tests := []struct {
		name, yaml string
		want       []string // each error, in order; nil: none
	}{
		{"good", "name: \"\"\nword: w\non: true\nn: 0x10\nevery: 90s\ntags: [a, b]\n", nil},
		{"syntax", "name: [\n", []string{"test: x.yaml:1: did not find expected node content"}},
		{"syntax without a line", "a: *x\n", []string{"test: x.yaml: unknown anchor 'x' referenced"}},
		{"not a mapping", "- a\n", []string{"test: x.yaml:1: must be a mapping"}},
		{"unknown key", "nmae: x\n", []string{"test: x.yaml:1: nmae: unknown key (known: every, n, name, on, sub, tags, word)"}},
		{"unknown nested", "sub:\n  b: 1\n", []string{"test: x.yaml:2: sub.b: unknown key (known: a)", "test: x.yaml:1: sub: checked as a whole"}},
		{"given twice", "on: true\non: false\n", []string{"test: x.yaml:2: on: given twice"}},
		{"sub not a mapping", "sub: 3\n", []string{"test: x.yaml:1: sub: must be a mapping", "test: x.yaml:1: sub: checked as a whole"}},
		{"str null", "name: ~\n", []string{"test: x.yaml:1: name: must be a string"}},
		{"str list", "name: [a]\n", []string{"test: x.yaml:1: name: must be a string"}},
		{"empty word", "word: \"\"\n", []string{"test: x.yaml:1: word: must be a non-empty string"}},
		{"bool", "\non: yes\n", []string{"test: x.yaml:2: on: must be true or false"}},
		{"int text", "n: ten\n", []string{"test: x.yaml:1: n: must be a whole number"}},
		{"int float", "n: 1.5\n", []string{"test: x.yaml:1: n: must be a whole number"}},
		{"int range", "n: 1_000\n", []string{"test: x.yaml:1: n: 1_000 is out of range 1..100"}},
		{"duration", "every: soon\n", []string{`test: x.yaml:1: every: "soon" is not a positive duration like 30m or 1h`}},
		{"duration negative", "every: -1h\n", []string{`test: x.yaml:1: every: "-1h" is not a positive duration like 30m or 1h`}},
		{"list scalar", "tags: a\n", []string{"test: x.yaml:1: tags: must be a list of strings"}},
		{"list items", "tags:\n  - a\n  - \"\"\n  - [b]\n", []string{"test: x.yaml:3: tags[1]: must be a non-empty string", "test: x.yaml:4: tags[2]: must be a non-empty string"}},
		{"all at once", "n: 0\non: 1\n", []string{"test: x.yaml:1: n: 0 is out of range 1..100", "test: x.yaml:2: on: must be true or false"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(t, tt.yaml)
			var got []string
			if j, ok := err.(interface{ Unwrap() []error }); ok {
				for _, e := range j.Unwrap() {
					got = append(got, e.Error())
				}
			} else if err != nil {
				got = []string{err.Error()}
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("parse(%q):\ngot  %q\nwant %q", tt.yaml, got, tt.want)
			}
			var e *Error
			if err != nil && !errors.As(err, &e) {
				t.Errorf("parse(%q) = %v, not an *Error", tt.yaml, err)
			}
		})
	}
}

func TestConfigValues(t *testing.T) {
	c, err := parse(t, "name: \"\"\nword: w\non: true\nn: 0x10\nevery: 90s\ntags: [a, b]\n")
	if err != nil {
		t.Fatal(err)
	}
	want := conf{word: "w", on: true, n: 16, every: 90 * time.Second, tags: []string{"a", "b"}}
	if c.name != want.name || c.word != want.word || c.on != want.on || c.n != want.n || c.every != want.every || strings.Join(c.tags, ",") != "a,b" {
		t.Fatalf("parsed %+v, want %+v", c, want)
	}
}

func TestConfigErrorFormat(t *testing.T) {
	tests := []struct {
		e    Error
		want string
	}{
		{Error{Prefix: "policy", File: "g.yaml", Line: 3, Field: "rules[0].action", Msg: "bad"}, "policy: g.yaml:3: rules[0].action: bad"},
		{Error{Prefix: "policy", File: "g.yaml", Msg: "empty config"}, "policy: g.yaml: empty config"},
		{Error{Prefix: "runner", File: "d.yaml", Field: "gate", Msg: "bad"}, "runner: d.yaml: gate: bad"},
		{Error{File: "d.yaml", Line: 1, Msg: "no prefix"}, "d.yaml:1: no prefix"},
	}
	for _, tt := range tests {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("%+v.Error() = %q, want %q", tt.e, got, tt.want)
		}
	}
}
