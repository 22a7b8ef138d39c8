package policy

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/dualkey/dualkey/internal/gate/classify"
	"github.com/dualkey/dualkey/internal/yamlconf"
)

// ConfigError is one problem in a config file, at a line; its message
// starts "policy: ".
type ConfigError = yamlconf.Error

// Load reads and validates the config at path. Relative paths inside it
// (password_file, tls cert and key) are taken from the file's directory.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	c, err := Parse(data, path)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	c.TLS.Cert, c.TLS.Key = abs(c.TLS.Cert), abs(c.TLS.Key)
	for _, u := range c.Upstreams {
		u.PasswordFile = abs(u.PasswordFile)
		u.SSLRootCert = abs(u.SSLRootCert)
	}
	return c, nil
}

// Parse validates a config held in memory; name is used in messages.
// Every problem found is reported (joined), each naming name:line.
func Parse(data []byte, name string) (*Config, error) {
	p := &parser{yamlconf.Parser{Prefix: "policy", File: name}}
	doc, err := p.Decode(data)
	if err != nil {
		return nil, err
	}
	c := &Config{File: name, Upstreams: map[string]*Upstream{}, Groups: map[string][]string{}}
	if len(doc.Content) == 0 {
		return nil, &ConfigError{Prefix: "policy", File: name, Msg: "empty config"}
	}
	p.config(doc.Content[0], c)
	if err := p.Err(); err != nil {
		return nil, err
	}
	return c, nil
}

// DefaultLedgerSync is ledger_sync when not given: one flush a second
// instead of ~20 under load (docs/ledger.md).
const DefaultLedgerSync = time.Second

// parser reads gate.yaml; yamlconf.Parser has the walk and the scalars.
type parser struct {
	yamlconf.Parser
}

// duration reads a positive duration; "" leaves dst as it is.
func (p *parser) duration(n *yaml.Node, field string, dst *time.Duration) {
	var s string
	p.Str(n, field, &s)
	if s != "" {
		p.Duration(n, field, s, "30m or 1h", dst)
	}
}

// list reads a sequence of strings; a single string is taken as a list
// of one.
func (p *parser) list(n *yaml.Node, field string) []string {
	if n.Kind == yaml.ScalarNode && n.Tag != "!!null" {
		if n.Value == "" {
			p.Errf(n, field, "must not be empty")
			return nil
		}
		return []string{n.Value}
	}
	return p.List(n, field)
}

func (p *parser) config(root *yaml.Node, c *Config) {
	c.Listen = ":6432"
	c.RequestExpiry = time.Hour
	c.TLS.RequireTLS = true
	c.Limits.MaxMessageBytes = 64 << 20
	c.LedgerSync = DefaultLedgerSync
	var upstreamsNode, rulesNode *yaml.Node
	p.Fields(root, "", map[string]func(*yaml.Node, string){
		"listen": func(v *yaml.Node, f string) {
			p.Str(v, f, &c.Listen)
			if _, _, err := net.SplitHostPort(c.Listen); err != nil {
				p.Errf(v, f, "%q is not host:port", c.Listen)
			}
		},
		"tls":   func(v *yaml.Node, f string) { p.tls(v, f, &c.TLS) },
		"state": func(v *yaml.Node, f string) { p.Str(v, f, &c.State) },
		"upstreams": func(v *yaml.Node, f string) {
			upstreamsNode = v
			p.upstreams(v, f, c)
		},
		"groups": func(v *yaml.Node, f string) { p.groups(v, f, c) },
		"rules": func(v *yaml.Node, f string) {
			rulesNode = v
		},
		"request_expiry": func(v *yaml.Node, f string) { p.duration(v, f, &c.RequestExpiry) },
		"webhook": func(v *yaml.Node, f string) {
			p.Str(v, f, &c.Webhook)
			if u, err := url.Parse(c.Webhook); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
				p.Errf(v, f, "%q is not an http(s) URL", c.Webhook)
			}
		},
		"limits": func(v *yaml.Node, f string) { p.limits(v, f, &c.Limits) },
		"ledger_sync": func(v *yaml.Node, f string) {
			var str string
			p.Str(v, f, &str)
			d, err := time.ParseDuration(str)
			if str == "0" {
				d, err = 0, nil
			}
			if err != nil || d < 0 || d > time.Minute {
				p.Errf(v, f, "%q is not a duration from 0 (flush every batch) to 1m, like 1s", str)
				return
			}
			c.LedgerSync = d
		},
		"event_loops": func(v *yaml.Node, f string) {
			if n, ok := p.Int(v, f, 1, 256); ok {
				c.EventLoops = int(n)
			}
		},
		"event_loop_cpus": func(v *yaml.Node, f string) {
			c.LoopCPUs, c.NoLoopPin = nil, false
			switch {
			case v.Kind == yaml.ScalarNode && v.Value == "auto":
			case v.Kind == yaml.ScalarNode && v.Value == "none":
				c.NoLoopPin = true
			case v.Kind == yaml.SequenceNode && len(v.Content) > 0:
				for _, n := range v.Content {
					if x, ok := p.Int(n, f, 0, 1023); ok {
						c.LoopCPUs = append(c.LoopCPUs, int(x))
					}
				}
			default:
				p.Errf(v, f, "must be auto, none or a list of CPU numbers like [0, 2]")
			}
		},
		"event_loop": func(v *yaml.Node, f string) {
			switch v.Value {
			case "true", "false":
				on := true
				p.Bool(v, f, &on)
				c.NoEventLoop = !on
			case "epoll", "io_uring":
				c.LoopBackend = v.Value
			default:
				p.Errf(v, f, "must be true, false, epoll or io_uring")
			}
		},
	})
	if upstreamsNode == nil {
		p.Errf(root, "upstreams", "missing: name at least one database the gate offers")
	}
	// Rules last: they name upstreams.
	if rulesNode == nil {
		p.Errf(root, "rules", "missing: without rules every statement is denied")
	} else {
		p.rules(rulesNode, "rules", c)
	}
	if (c.TLS.Cert == "") != (c.TLS.Key == "") {
		p.Errf(root, "tls", "cert and key go together")
	}
	if c.TLS.RequireTLS && c.TLS.Cert == "" && !c.TLS.Generate {
		p.Errf(root, "tls", "require_tls needs a certificate: give cert and key, or generate: true")
	}
}

func (p *parser) tls(n *yaml.Node, path string, t *TLS) {
	p.Fields(n, path, map[string]func(*yaml.Node, string){
		"cert":        func(v *yaml.Node, f string) { p.Str(v, f, &t.Cert) },
		"key":         func(v *yaml.Node, f string) { p.Str(v, f, &t.Key) },
		"generate":    func(v *yaml.Node, f string) { p.Bool(v, f, &t.Generate) },
		"require_tls": func(v *yaml.Node, f string) { p.Bool(v, f, &t.RequireTLS) },
	})
	if t.Generate && t.Cert == "" {
		t.Cert, t.Key = "gate.crt", "gate.key"
	}
}

func (p *parser) limits(n *yaml.Node, path string, l *Limits) {
	p.Fields(n, path, map[string]func(*yaml.Node, string){
		"max_rows": func(v *yaml.Node, f string) {
			if x, ok := p.Int(v, f, 0, 1<<62); ok {
				l.MaxRows = x
			}
		},
		"max_message_bytes": func(v *yaml.Node, f string) {
			// Below 8 KiB ordinary queries fail; above 1 GiB is beyond
			// what PostgreSQL itself accepts.
			if x, ok := p.Int(v, f, 8<<10, 1<<30); ok {
				l.MaxMessageBytes = int(x)
			}
		},
		"max_connections": func(v *yaml.Node, f string) {
			if x, ok := p.Int(v, f, 0, 1<<20); ok {
				l.MaxConnections = int(x)
			}
		},
		"max_connections_per_user": func(v *yaml.Node, f string) {
			if x, ok := p.Int(v, f, 0, 1<<20); ok {
				l.MaxConnectionsPerUser = int(x)
			}
		},
		"dry_run_timeout": func(v *yaml.Node, f string) { p.duration(v, f, &l.DryRunTimeout) },
		"dry_run": func(v *yaml.Node, f string) {
			on := true
			p.Bool(v, f, &on)
			l.NoDryRun = !on
		},
		"pool_idle": func(v *yaml.Node, f string) {
			if x, ok := p.Int(v, f, 0, 1<<16); ok {
				l.PoolIdle = int(x)
				if x == 0 {
					l.PoolIdle = -1
				}
			}
		},
		"pool_idle_timeout": func(v *yaml.Node, f string) { p.duration(v, f, &l.PoolIdleTimeout) },
		"pool_lifetime":     func(v *yaml.Node, f string) { p.duration(v, f, &l.PoolLifetime) },
	})
}

var sslModes = []string{"disable", "prefer", "require", "verify-ca", "verify-full"}

func (p *parser) upstreams(n *yaml.Node, path string, c *Config) {
	if n.Kind != yaml.MappingNode || len(n.Content) == 0 {
		p.Errf(n, path, "must map database names to connection settings")
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		name := k.Value
		f := path + "." + name
		if name == "" || name == "*" {
			p.Errf(k, f, "not a database name")
			continue
		}
		if _, dup := c.Upstreams[name]; dup {
			p.Errf(k, f, "given twice")
			continue
		}
		u := &Upstream{Name: name, Port: 5432, DBName: name, SSLMode: "prefer", Line: k.Line}
		p.Fields(v, f, map[string]func(*yaml.Node, string){
			"host":   func(v *yaml.Node, f string) { p.Str(v, f, &u.Host) },
			"dbname": func(v *yaml.Node, f string) { p.Str(v, f, &u.DBName) },
			"user":   func(v *yaml.Node, f string) { p.Str(v, f, &u.User) },
			"port": func(v *yaml.Node, f string) {
				if x, ok := p.Int(v, f, 1, 65535); ok {
					u.Port = int(x)
				}
			},
			"password":      func(v *yaml.Node, f string) { p.Str(v, f, &u.Password) },
			"password_file": func(v *yaml.Node, f string) { p.Str(v, f, &u.PasswordFile) },
			"sslmode": func(v *yaml.Node, f string) {
				p.Str(v, f, &u.SSLMode)
				if !slices.Contains(sslModes, u.SSLMode) {
					p.Errf(v, f, "%q is not one of %s", u.SSLMode, strings.Join(sslModes, ", "))
				}
			},
			"sslrootcert": func(v *yaml.Node, f string) { p.Str(v, f, &u.SSLRootCert) },
		})
		if u.Host == "" {
			p.Errf(v, f+".host", "missing")
		}
		if u.User == "" {
			p.Errf(v, f+".user", "missing: the brokered role the gate connects as")
		}
		if u.Password != "" && u.PasswordFile != "" {
			p.Errf(v, f, "password and password_file: give one")
		}
		c.Upstreams[name] = u
	}
}

func (p *parser) groups(n *yaml.Node, path string, c *Config) {
	if n.Kind != yaml.MappingNode {
		p.Errf(n, path, "must map group names to lists of users")
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		f := path + "." + k.Value
		if k.Value == "" || k.Value == "*" {
			p.Errf(k, f, "not a group name")
			continue
		}
		if _, dup := c.Groups[k.Value]; dup {
			p.Errf(k, f, "given twice")
			continue
		}
		c.Groups[k.Value] = p.list(v, f)
	}
}

var actions = []Action{Allow, Deny, Hold}

func (p *parser) rules(n *yaml.Node, path string, c *Config) {
	if n.Kind != yaml.SequenceNode || len(n.Content) == 0 {
		p.Errf(n, path, "must be a non-empty list: without rules every statement is denied")
		return
	}
	for i, rn := range n.Content {
		f := fmt.Sprintf("%s[%d]", path, i)
		r := Rule{Index: i, Line: rn.Line}
		var actionNode, maxRowsNode, classesNode, dbNode *yaml.Node
		p.Fields(rn, f, map[string]func(*yaml.Node, string){
			"name":      func(v *yaml.Node, f string) { p.Str(v, f, &r.Name) },
			"users":     func(v *yaml.Node, f string) { r.Users = p.list(v, f) },
			"groups":    func(v *yaml.Node, f string) { r.Groups = p.list(v, f) },
			"databases": func(v *yaml.Node, f string) { dbNode = v; r.Databases = p.list(v, f) },
			"classes":   func(v *yaml.Node, f string) { classesNode = v; p.classes(v, f, &r) },
			"action": func(v *yaml.Node, f string) {
				actionNode = v
				var s string
				p.Str(v, f, &s)
				r.Action = Action(s)
				if s != "" && !slices.Contains(actions, r.Action) {
					p.Errf(v, f, "%q is not one of allow, deny, hold", s)
				}
			},
			"max_rows": func(v *yaml.Node, f string) {
				maxRowsNode = v
				if x, ok := p.Int(v, f, 1, 1<<62); ok {
					r.MaxRows = x
				}
			},
			"message": func(v *yaml.Node, f string) { p.Str(v, f, &r.Message) },
		})
		if rn.Kind != yaml.MappingNode {
			continue
		}
		if len(r.Users) == 0 && len(r.Groups) == 0 {
			p.Errf(rn, f, "names nobody: give users or groups (\"*\" for everyone)")
		}
		if dbNode == nil {
			p.Errf(rn, f+".databases", "missing (\"*\" for every upstream)")
		}
		for j, db := range r.Databases {
			if db != "*" && c.Upstreams[db] == nil {
				line := rn.Line
				if dbNode != nil && dbNode.Kind == yaml.SequenceNode && j < len(dbNode.Content) {
					line = dbNode.Content[j].Line
				}
				p.ErrLine(line, fmt.Sprintf("%s.databases[%d]", f, j), "%q is not an upstream", db)
			}
		}
		if classesNode == nil {
			p.Errf(rn, f+".classes", "missing (\"*\" for every class but unknown)")
		}
		if actionNode == nil {
			p.Errf(rn, f+".action", "missing: allow, deny or hold")
		}
		if maxRowsNode != nil && r.Action != Allow && r.Action != "" {
			p.Errf(maxRowsNode, f+".max_rows", "only an allow rule has a row limit")
		}
		r.label = r.Label(p.File)
		c.Rules = append(c.Rules, r)
	}
}

func (p *parser) classes(n *yaml.Node, f string, r *Rule) {
	for j, s := range p.list(n, f) {
		if s == "*" {
			r.AnyClass = true
			continue
		}
		cl := classify.Class(s)
		if !cl.Valid() {
			line := n.Line
			if n.Kind == yaml.SequenceNode && j < len(n.Content) {
				line = n.Content[j].Line
			}
			names := make([]string, len(classify.Classes))
			for i, k := range classify.Classes {
				names[i] = string(k)
			}
			p.ErrLine(line, fmt.Sprintf("%s[%d]", f, j), "%q is not a class (%s, or \"*\")", s, strings.Join(names, ", "))
			continue
		}
		r.Classes = append(r.Classes, cl)
	}
}
