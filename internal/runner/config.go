package runner

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/yamlconf"
)

// Config is a parsed, validated dualkey.yaml. The zero value is not
// useful: start from Default, Load or Parse.
type Config struct {
	// File is where the config was read from ("" for the defaults).
	File string

	// DataDir holds everything the runner creates; relative paths below
	// are taken from it. Default "dualkey-data".
	DataDir string

	Vault VaultConfig
	// State is the state store: a SQLite file (default "state.db") or
	// postgres://...
	State string
	PG    PGConfig
	Agent AgentConfig
	// Tripwire decodes the WAL the agent receives: drops, truncates and
	// mass deletes become incidents (state, ledger, log).
	Tripwire TripwireConfig
	Gate     GateConfig
	// Users are created on first start (and added when new ones appear):
	// each gets a gate password; approvers get an approver key.
	Users []User
	// Threshold is how many approvers must approve a held statement (and
	// any other guarded action), the requester never counting. Set in the
	// quorum policy on first start; later changes need a quorum
	// (dualkey quorum propose).
	Threshold int
}

// VaultConfig is the vault the agent writes into.
type VaultConfig struct {
	// Repo is a directory vault (default "vault").
	Repo string
	// PasswordFile holds the vault password; created (0600) with a
	// generated password when missing. Default "secrets/vault.password".
	PasswordFile string
	// MinRetention is the shortest retention lock of every snapshot, set
	// when the vault is created (default 720h).
	MinRetention time.Duration
}

// PGConfig says which PostgreSQL server is protected.
type PGConfig struct {
	// URL of the server to protect (a superuser or a role with
	// REPLICATION). Empty: a local server of the runner's own.
	URL string
	// Databases are offered through the gate under their own names.
	// Default: "app" on the local server (created), else the URL's
	// database.
	Databases []string
	// GateURL is the brokered role the gate connects as, for a server
	// given by URL (default: URL itself).
	GateURL string
	Local   LocalPGConfig
}

// LocalPGConfig tunes the local server (when URL is empty).
type LocalPGConfig struct {
	// Dir holds its data directory and log (default "pg").
	Dir string
	// Port on 127.0.0.1; 0 (default) picks a free port at each start.
	Port int
	// Settings are extra postgresql.conf lines, applied at initdb.
	Settings []string
}

// AgentConfig tunes the streaming agent (docs/postgres.md).
type AgentConfig struct {
	Slot        string        // default "dualkey"
	Synchronous bool          // commits wait until the vault holds them
	FlushEvery  time.Duration // default 200ms
	BaseEvery   time.Duration // default 24h; 0 after "off"
	RetainWarn  int64         // default 1 GiB
	// FirstBaseBackup takes a base backup at start when the vault holds
	// none of this server yet (default true).
	FirstBaseBackup bool
}

// TripwireConfig tunes the tripwire (docs/wal-decoding.md).
type TripwireConfig struct {
	Enabled bool // default true
	// MassRows is how many rows of one table one transaction must delete
	// or update to raise an incident (default 10000).
	MassRows int64
	// NamesEvery is how often table names are reread (default 30s).
	NamesEvery time.Duration
}

// GateConfig is the gate's part: gate.yaml's keys (docs/gate.md) except
// upstreams and state, which the runner supplies.
type GateConfig struct {
	// Listen is host:port (default 127.0.0.1:6543, or a free port when
	// that one is taken). Given explicitly, a taken port is an error.
	Listen      string
	listenGiven bool
	// section is the gate mapping's text, dedented, with the lines before
	// and after it blank, so that the policy parser's line numbers are
	// dualkey.yaml's; nil when the file has no gate section.
	section []byte
	has     map[string]bool // keys given in the section
	tlsPath bool            // the section names its own cert/key files
	// Policy is the validated gate configuration with placeholder
	// upstreams (the real ones are known at start).
	Policy *policy.Config
}

// User is one person of the demo setup.
type User struct {
	Name     string
	Groups   []string
	Approver bool
}

// DefaultListen is where the gate listens unless told otherwise.
const DefaultListen = "127.0.0.1:6543"

// DefaultRules is the gate policy when dualkey.yaml names none: reads,
// writes and schema changes run (writes touching more than 1000 rows are
// held), destructive and privileged statements wait for the quorum,
// statements the classifier cannot read are denied.
const DefaultRules = `rules:
  - name: nothing unreadable, ever
    users: ["*"]
    databases: ["*"]
    classes: [unknown]
    action: deny
  - name: destructive and privileged statements need the quorum
    users: ["*"]
    databases: ["*"]
    classes: [destructive, privileged]
    action: hold
    message: approvers run dualkey approvals approve (dualkey run printed how)
  - name: reads, writes and schema changes
    users: ["*"]
    databases: ["*"]
    classes: [read, write, ddl]
    action: allow
    max_rows: 1000
`

// Default is the configuration of `dualkey run` without a config file.
func Default() *Config {
	c := &Config{Agent: AgentConfig{FirstBaseBackup: true}, Tripwire: TripwireConfig{Enabled: true}}
	c.applyDefaults()
	if err := c.validateGate(nil); err != nil {
		panic("runner: default gate config: " + err.Error()) // a bug
	}
	return c
}

func (c *Config) applyDefaults() {
	if c.DataDir == "" {
		c.DataDir = "dualkey-data"
	}
	if c.Vault.Repo == "" {
		c.Vault.Repo = "vault"
	}
	if c.Vault.PasswordFile == "" {
		c.Vault.PasswordFile = filepath.Join("secrets", "vault.password")
	}
	if c.Vault.MinRetention == 0 {
		c.Vault.MinRetention = 720 * time.Hour
	}
	if c.State == "" {
		c.State = "state.db"
	}
	if c.PG.Local.Dir == "" {
		c.PG.Local.Dir = "pg"
	}
	if len(c.PG.Databases) == 0 {
		c.PG.Databases = []string{"app"}
		if c.PG.URL != "" {
			c.PG.Databases = []string{"postgres"}
			if u, err := url.Parse(c.PG.URL); err == nil && strings.Trim(u.Path, "/") != "" {
				c.PG.Databases = []string{strings.Trim(u.Path, "/")}
			}
		}
	}
	if c.Agent.Slot == "" {
		c.Agent.Slot = "dualkey"
	}
	if c.Agent.FlushEvery == 0 {
		c.Agent.FlushEvery = 200 * time.Millisecond
	}
	if c.Agent.BaseEvery == 0 {
		c.Agent.BaseEvery = 24 * time.Hour
	}
	if c.Agent.BaseEvery < 0 {
		c.Agent.BaseEvery = 0
	}
	if c.Agent.RetainWarn == 0 {
		c.Agent.RetainWarn = 1 << 30
	}
	if c.Gate.Listen == "" {
		c.Gate.Listen = DefaultListen
	}
	if c.Tripwire.MassRows == 0 {
		c.Tripwire.MassRows = 10000
	}
	if c.Tripwire.NamesEvery == 0 {
		c.Tripwire.NamesEvery = 30 * time.Second
	}
	if c.Users == nil {
		c.Users = []User{
			{Name: "alice", Groups: []string{"operators"}},
			{Name: "bob", Groups: []string{"approvers"}, Approver: true},
			{Name: "carol", Groups: []string{"approvers"}, Approver: true},
		}
	}
	if c.Threshold == 0 {
		n := 0
		for _, u := range c.Users {
			if u.Approver {
				n++
			}
		}
		c.Threshold = min(2, n)
	}
}

// Path resolves p against the data directory.
func (c *Config) Path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.DataDir, p)
}

// StateDSN is the state store's location, a SQLite path resolved against
// the data directory.
func (c *Config) StateDSN() string {
	if isPostgresDSN(c.State) {
		return c.State
	}
	return c.Path(strings.TrimPrefix(c.State, "sqlite:"))
}

func isPostgresDSN(dsn string) bool {
	return strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://")
}

// ConfigError is one problem in dualkey.yaml, at a line; its message
// starts "runner: ".
type ConfigError = yamlconf.Error

// Load reads and validates dualkey.yaml at path. Relative paths in it are
// taken from the data directory, which is itself relative to the current
// directory (where `dualkey run` starts), not to the file.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("runner: config: %w", err)
	}
	return Parse(data, path)
}

// Parse validates a config held in memory; name is used in messages.
// Every problem found is reported (joined), each naming name:line; unknown
// keys are errors, so a misspelt key never falls back to a default.
func Parse(data []byte, name string) (*Config, error) {
	return ParseWith(data, name, Overrides{})
}

// Overrides are command-line flags that win over the file.
type Overrides struct {
	URL     string // --pg: pg.url
	DataDir string // --data: data_dir
}

// ParseWith is Parse with flags applied before the defaults, so that
// defaults depending on them follow (the URL's database).
func ParseWith(data []byte, name string, o Overrides) (*Config, error) {
	p := &parser{yamlconf.Parser{Prefix: "runner", File: name}}
	doc, err := p.Decode(data)
	if err != nil {
		return nil, err
	}
	// What is on unless the file says otherwise, also when there is no
	// file (flags only): p.config sees only a non-empty document.
	c := &Config{File: name, Agent: AgentConfig{FirstBaseBackup: true}, Tripwire: TripwireConfig{Enabled: true}}
	var gateNode *yaml.Node
	var gateEnd int
	if len(doc.Content) > 0 {
		root := doc.Content[0]
		if root.Kind == yaml.MappingNode {
			for i := 0; i+1 < len(root.Content); i += 2 {
				if root.Content[i].Value == "gate" {
					gateNode = root.Content[i+1]
					if i+2 < len(root.Content) {
						gateEnd = root.Content[i+2].Line - 1
					}
				}
			}
		}
		p.config(root, c)
	}
	if o.URL != "" {
		if err := checkURL(o.URL); err != nil {
			p.Errs = append(p.Errs, fmt.Errorf("runner: --pg: %v", err))
		}
		c.PG.URL = o.URL
	}
	if o.DataDir != "" {
		c.DataDir = o.DataDir
	}
	c.applyDefaults()
	if len(p.Errs) == 0 {
		if gateNode != nil {
			p.gateSection(data, gateNode, gateEnd, c)
		}
		if len(p.Errs) == 0 {
			if err := c.validateGate(p); err != nil {
				p.Errs = append(p.Errs, err)
			}
		}
	}
	if err := p.Err(); err != nil {
		return nil, err
	}
	return c, nil
}

// parser reads dualkey.yaml; yamlconf.Parser has the walk and the
// scalars.
type parser struct {
	yamlconf.Parser
}

// duration reads a positive duration; "off" is -1 when allowed.
func (p *parser) duration(n *yaml.Node, field string, dst *time.Duration, off bool) {
	var s string
	p.NonEmptyStr(n, field, &s)
	switch {
	case s == "":
	case off && s == "off":
		*dst = -1
	case off:
		p.Duration(n, field, s, `30m or 24h, or "off"`, dst)
	default:
		p.Duration(n, field, s, "30m or 24h", dst)
	}
}

func (p *parser) config(root *yaml.Node, c *Config) {
	var usersNode, thresholdNode *yaml.Node
	p.Fields(root, "", map[string]func(*yaml.Node, string){
		"data_dir": func(v *yaml.Node, f string) { p.NonEmptyStr(v, f, &c.DataDir) },
		"vault": func(v *yaml.Node, f string) {
			p.Fields(v, f, map[string]func(*yaml.Node, string){
				"repo":          func(v *yaml.Node, f string) { p.NonEmptyStr(v, f, &c.Vault.Repo) },
				"password_file": func(v *yaml.Node, f string) { p.NonEmptyStr(v, f, &c.Vault.PasswordFile) },
				"min_retention": func(v *yaml.Node, f string) { p.duration(v, f, &c.Vault.MinRetention, false) },
			})
			if strings.Contains(c.Vault.Repo, "://") {
				p.Errf(v, f+".repo", "%q: dualkey run keeps a directory vault; give a directory", c.Vault.Repo)
			}
		},
		"state": func(v *yaml.Node, f string) { p.NonEmptyStr(v, f, &c.State) },
		"pg":    func(v *yaml.Node, f string) { p.pg(v, f, c) },
		"agent": func(v *yaml.Node, f string) { p.agent(v, f, &c.Agent) },
		"tripwire": func(v *yaml.Node, f string) {
			p.Fields(v, f, map[string]func(*yaml.Node, string){
				"enabled": func(v *yaml.Node, f string) { p.Bool(v, f, &c.Tripwire.Enabled) },
				"mass_rows": func(v *yaml.Node, f string) {
					if x, ok := p.Int(v, f, 1, 1<<50); ok {
						c.Tripwire.MassRows = x
					}
				},
				"names_every": func(v *yaml.Node, f string) { p.duration(v, f, &c.Tripwire.NamesEvery, false) },
			})
		},
		"gate": func(v *yaml.Node, f string) {
			if v.Kind != yaml.MappingNode {
				p.Errf(v, f, "must be a mapping")
			} else if v.Style&yaml.FlowStyle != 0 {
				p.Errf(v, f, "write it as a block mapping (one key per line), not {...}")
			}
		},
		"users":  func(v *yaml.Node, f string) { usersNode = v; p.users(v, f, c) },
		"quorum": func(v *yaml.Node, f string) { p.quorum(v, f, c, &thresholdNode) },
	})
	// The first-start agent default is on; only an explicit false turns it off.
	if !p.has(root, "agent", "first_base_backup") {
		c.Agent.FirstBaseBackup = true
	}
	if !p.has(root, "tripwire", "enabled") {
		c.Tripwire.Enabled = true
	}
	approvers := 0
	for _, u := range c.Users {
		if u.Approver {
			approvers++
		}
	}
	if usersNode != nil && approvers == 0 {
		p.Errf(usersNode, "users", "no approver: mark at least one person approver: true")
	}
	if thresholdNode != nil && usersNode != nil && c.Threshold > approvers {
		p.Errf(thresholdNode, "quorum.threshold", "%d is more than the %d approvers", c.Threshold, approvers)
	}
	if thresholdNode != nil && usersNode == nil && c.Threshold > 2 {
		p.Errf(thresholdNode, "quorum.threshold", "%d is more than the 2 default approvers (bob, carol)", c.Threshold)
	}
}

// has reports whether the mapping root has the key path.
func (p *parser) has(root *yaml.Node, keys ...string) bool {
	n := root
	for _, k := range keys {
		if n == nil || n.Kind != yaml.MappingNode {
			return false
		}
		var next *yaml.Node
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == k {
				next = n.Content[i+1]
			}
		}
		n = next
	}
	return n != nil
}

func (p *parser) pg(n *yaml.Node, path string, c *Config) {
	var urlNode, localNode, gateURLNode *yaml.Node
	p.Fields(n, path, map[string]func(*yaml.Node, string){
		"url": func(v *yaml.Node, f string) {
			urlNode = v
			p.NonEmptyStr(v, f, &c.PG.URL)
			if c.PG.URL != "" {
				if err := checkURL(c.PG.URL); err != nil {
					p.Errf(v, f, "%v", err)
				}
			}
		},
		"gate_url": func(v *yaml.Node, f string) {
			gateURLNode = v
			p.NonEmptyStr(v, f, &c.PG.GateURL)
			if c.PG.GateURL != "" {
				if err := checkURL(c.PG.GateURL); err != nil {
					p.Errf(v, f, "%v", err)
				}
			}
		},
		"databases": func(v *yaml.Node, f string) {
			c.PG.Databases = p.List(v, f)
			if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				p.Errf(v, f, "must name at least one database")
			}
		},
		"local": func(v *yaml.Node, f string) {
			localNode = v
			p.Fields(v, f, map[string]func(*yaml.Node, string){
				"dir": func(v *yaml.Node, f string) { p.NonEmptyStr(v, f, &c.PG.Local.Dir) },
				"port": func(v *yaml.Node, f string) {
					if x, ok := p.Int(v, f, 0, 65535); ok {
						c.PG.Local.Port = int(x)
					}
				},
				"settings": func(v *yaml.Node, f string) {
					c.PG.Local.Settings = p.List(v, f)
					for i, s := range c.PG.Local.Settings {
						if !strings.Contains(s, "=") || strings.ContainsAny(s, "\n\r") {
							p.Errf(v.Content[i], fmt.Sprintf("%s[%d]", f, i), "%q is not a postgresql.conf line (name = value)", s)
						}
					}
				},
			})
		},
	})
	if urlNode != nil && localNode != nil {
		p.ErrKey(path+".local", "a server given by url is not local: give url or local, not both")
	}
	if gateURLNode != nil && urlNode == nil {
		p.ErrKey(path+".gate_url", "only with url (the local server's gate role is made by dualkey run)")
	}
}

// checkURL accepts postgres:// URLs with a host.
func checkURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("not a URL: %v", errors.Unwrap(err))
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return fmt.Errorf("%q is not a postgres:// URL", redact(s))
	}
	if u.Host == "" {
		return fmt.Errorf("%q names no host", redact(s))
	}
	return nil
}

func (p *parser) agent(n *yaml.Node, path string, a *AgentConfig) {
	p.Fields(n, path, map[string]func(*yaml.Node, string){
		"slot": func(v *yaml.Node, f string) {
			p.NonEmptyStr(v, f, &a.Slot)
			for _, r := range a.Slot {
				if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_') {
					p.Errf(v, f, "%q: a slot name is lower-case letters, digits and _", a.Slot)
					break
				}
			}
		},
		"synchronous":       func(v *yaml.Node, f string) { p.Bool(v, f, &a.Synchronous) },
		"flush_every":       func(v *yaml.Node, f string) { p.duration(v, f, &a.FlushEvery, false) },
		"base_every":        func(v *yaml.Node, f string) { p.duration(v, f, &a.BaseEvery, true) },
		"first_base_backup": func(v *yaml.Node, f string) { p.Bool(v, f, &a.FirstBaseBackup) },
		"retain_warn": func(v *yaml.Node, f string) {
			if x, ok := p.Int(v, f, 1<<20, 1<<50); ok {
				a.RetainWarn = x
			}
		},
	})
}

func (p *parser) users(n *yaml.Node, path string, c *Config) {
	if n.Kind != yaml.SequenceNode || len(n.Content) == 0 {
		p.Errf(n, path, "must be a non-empty list of people")
		return
	}
	c.Users = []User{}
	seen := map[string]bool{}
	for i, un := range n.Content {
		f := fmt.Sprintf("%s[%d]", path, i)
		var u User
		p.Fields(un, f, map[string]func(*yaml.Node, string){
			"name": func(v *yaml.Node, f string) {
				p.NonEmptyStr(v, f, &u.Name)
				if u.Name == "" {
					return
				}
				if err := cert.ValidName(u.Name); err != nil {
					p.Errf(v, f, "%v", err)
				} else if seen[u.Name] {
					p.Errf(v, f, "%s is listed twice", u.Name)
				}
				seen[u.Name] = true
			},
			"groups":   func(v *yaml.Node, f string) { u.Groups = p.List(v, f) },
			"approver": func(v *yaml.Node, f string) { p.Bool(v, f, &u.Approver) },
		})
		if un.Kind == yaml.MappingNode && u.Name == "" && !p.has(un, "name") {
			p.Errf(un, f+".name", "missing")
		}
		c.Users = append(c.Users, u)
	}
}

func (p *parser) quorum(n *yaml.Node, path string, c *Config, thresholdNode **yaml.Node) {
	p.Fields(n, path, map[string]func(*yaml.Node, string){
		"threshold": func(v *yaml.Node, f string) {
			*thresholdNode = v
			if x, ok := p.Int(v, f, 1, 256); ok {
				c.Threshold = int(x)
			}
		},
	})
}

// gateKeys are the gate.yaml keys dualkey.yaml's gate section may hold;
// upstreams and state come from pg and state.
var gateKeys = []string{"listen", "tls", "request_expiry", "webhook", "limits", "event_loop", "event_loops", "event_loop_cpus", "ledger_sync", "groups", "rules"}

// gateSection cuts the gate mapping out of the file, keeping its lines
// where they are, so that the gate's own config parser (internal/gate/
// policy) validates it and names dualkey.yaml's lines. end is the last
// line that may belong to it (0: the end of the file).
func (p *parser) gateSection(data []byte, n *yaml.Node, end int, c *Config) {
	if len(n.Content) == 0 {
		return
	}
	c.Gate.has = map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if !slices.Contains(gateKeys, k.Value) {
			msg := "unknown key (known: " + strings.Join(slices.Sorted(slices.Values(gateKeys)), ", ") + ")"
			switch k.Value {
			case "upstreams":
				msg = "dualkey run makes the upstreams from pg (pg.databases, pg.url)"
			case "state":
				msg = "set the top-level state instead"
			}
			p.Errf(k, "gate."+k.Value, "%s", msg)
			continue
		}
		c.Gate.has[k.Value] = true
		switch k.Value {
		case "listen":
			if v.Kind == yaml.ScalarNode {
				c.Gate.Listen, c.Gate.listenGiven = v.Value, true
			}
		case "tls":
			c.Gate.tlsPath = p.has(v, "cert")
		}
	}
	lines := strings.Split(string(data), "\n")
	first := n.Content[0].Line // 1-based
	indent := n.Content[0].Column - 1
	if end <= 0 || end > len(lines) {
		end = len(lines)
	}
	out := make([]string, len(lines))
	for i := first - 1; i < end; i++ {
		l := strings.TrimRight(lines[i], "\r")
		switch {
		case len(l) >= indent && strings.TrimSpace(l[:indent]) == "":
			out[i] = l[indent:]
		case strings.TrimSpace(l) == "" || strings.HasPrefix(strings.TrimSpace(l), "#"):
			out[i] = ""
		default:
			out[i] = l // cannot happen in valid YAML; the parser will say
		}
	}
	c.Gate.section = []byte(strings.Join(out, "\n"))
}

// Upstream is how the gate reaches one database (gate.yaml's upstreams).
type Upstream struct {
	Host, User, PasswordFile, SSLMode string
	Port                              int
	DBName                            string
}

// gateYAML is the gate's complete config text: the section (or nothing),
// then what dualkey.yaml left out (listen, tls, rules) and the upstreams.
// With pad, the section keeps its dualkey.yaml line numbers.
func (c *Config) gateYAML(ups map[string]Upstream, pad bool, tlsDir string) []byte {
	var b strings.Builder
	if pad {
		b.Write(c.Gate.section)
	} else {
		for _, l := range strings.Split(string(c.Gate.section), "\n") {
			if strings.TrimSpace(l) != "" {
				b.WriteString(l + "\n")
			}
		}
	}
	b.WriteString("\n")
	has := c.Gate.has
	if !has["listen"] {
		fmt.Fprintf(&b, "listen: %s\n", c.Gate.Listen)
	}
	if !has["tls"] {
		fmt.Fprintf(&b, "tls:\n  generate: true\n  cert: %s\n  key: %s\n", yamlQuote(filepath.Join(tlsDir, "gate.crt")), yamlQuote(filepath.Join(tlsDir, "gate.key")))
	}
	if !has["rules"] {
		b.WriteString(DefaultRules)
	}
	b.WriteString("upstreams:\n")
	names := make([]string, 0, len(ups))
	for n := range ups {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		u := ups[n]
		fmt.Fprintf(&b, "  %s:\n    host: %s\n    port: %d\n    dbname: %s\n    user: %s\n    sslmode: %s\n",
			yamlQuote(n), yamlQuote(u.Host), u.Port, yamlQuote(u.DBName), yamlQuote(u.User), u.SSLMode)
		if u.PasswordFile != "" {
			fmt.Fprintf(&b, "    password_file: %s\n", yamlQuote(u.PasswordFile))
		}
	}
	return []byte(b.String())
}

func yamlQuote(s string) string { return strconv.Quote(s) }

// validateGate parses the gate config with placeholder upstreams, so that
// rules naming a database that is not offered are caught now.
func (c *Config) validateGate(p *parser) error {
	if c.Gate.has == nil {
		c.Gate.has = map[string]bool{}
	}
	if _, _, err := net.SplitHostPort(c.Gate.Listen); err != nil && p == nil {
		return err
	}
	ups := map[string]Upstream{}
	for _, d := range c.PG.Databases {
		ups[d] = Upstream{Host: "127.0.0.1", Port: 5432, DBName: d, User: "placeholder", SSLMode: "prefer"}
	}
	name := c.File
	if name == "" {
		name = "(defaults)"
	}
	pc, err := policy.Parse(c.gateYAML(ups, true, "."), name)
	if err != nil {
		return gateErrors(err)
	}
	c.Gate.Policy = pc
	return nil
}

// gateErrors turns the policy parser's errors into ours, their fields
// under "gate.".
func gateErrors(err error) error {
	var list []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		list = j.Unwrap()
	} else {
		list = []error{err}
	}
	var out []error
	for _, e := range list {
		var ce *policy.ConfigError
		if errors.As(e, &ce) {
			f := "gate"
			if ce.Field != "" {
				f += "." + ce.Field
			}
			out = append(out, &ConfigError{Prefix: "runner", File: ce.File, Line: ce.Line, Field: f, Msg: ce.Msg})
			continue
		}
		out = append(out, fmt.Errorf("runner: gate: %w", e))
	}
	return errors.Join(out...)
}
