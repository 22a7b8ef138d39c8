// Package policy is the gate's YAML configuration: where it listens and
// with which certificate, the upstream databases and their brokered
// credentials, groups of people, and the ordered rules that map who ×
// which database × which class of statement to allow, deny or hold.
//
// Rules are read top to bottom; the first that matches decides. No match
// denies. The class "unknown" is matched only by a rule that names it:
// "*" means every class but unknown, so nothing the classifier cannot
// read is ever allowed by accident. Every validation error names the
// file and line.
package policy

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/gate/classify"
)

// Action is what a rule does with a statement.
type Action string

// The actions, least strict first.
const (
	Allow Action = "allow" // run it (an UPDATE/DELETE within the rule's max_rows)
	Hold  Action = "hold"  // open a request; run it once a quorum approves
	Deny  Action = "deny"  // refuse it
)

// strictness orders actions so the strictest decision of several wins.
func (a Action) strictness() int {
	switch a {
	case Allow:
		return 0
	case Hold:
		return 1
	}
	return 2
}

// Decision is the policy's answer for one statement class.
type Decision struct {
	Action Action
	// Rule names the rule that decided, with its place in the file:
	// `rules[3] "dbas" (gate.yaml:41)`, or "default: no rule matched".
	Rule string
	// RowLimit is the blast-radius limit for an allowed UPDATE, DELETE or
	// MERGE: more rows than this and the gate rolls it back and holds it
	// instead. 0 means no limit.
	RowLimit int64
	// Message is the rule's message for the person refused or held, if any.
	Message string
}

// Config is a parsed, validated gate.yaml.
type Config struct {
	File string // the path or name it was read from, for messages

	Listen        string // host:port for clients (default ":6432")
	TLS           TLS    // the certificate offered to clients
	State         string // state store DSN; "" means the command line's --state
	Upstreams     map[string]*Upstream
	Groups        map[string][]string // group name → user names
	Rules         []Rule
	RequestExpiry time.Duration // how long a held statement may be approved and run (default 1h)
	Webhook       string        // URL told about held statements; "" for none
	Limits        Limits
	// LedgerSync (ledger_sync) bounds how long the statements the gate
	// recorded may wait to be flushed to a SQLite state's disk: a killed
	// gate loses none of them, a crashed machine up to this much (state's
	// WithLedgerSync). 0 flushes every batch. Default [DefaultLedgerSync].
	LedgerSync time.Duration
	// NoEventLoop (event_loop: false) serves every session on goroutines:
	// a way out should the event loop (docs/gate.md) misbehave somewhere.
	NoEventLoop bool
	// LoopBackend (event_loop: epoll or io_uring) chooses what the event
	// loop runs on; "" (event_loop: true) is io_uring where the kernel has
	// it, else epoll.
	LoopBackend string
	// EventLoops (event_loops: N) is the number of event loops the
	// sessions are spread over; 0 (not given) is one.
	EventLoops int
	// LoopCPUs (event_loop_cpus: [N, ...]) are the CPUs the event loops'
	// threads are pinned to, loop i to LoopCPUs[i mod len]. Not given
	// (auto), loop i is pinned to the i-th CPU the gate may run on;
	// NoLoopPin (event_loop_cpus: none) leaves them to the scheduler.
	LoopCPUs  []int
	NoLoopPin bool
}

// TLS is the certificate the gate offers.
type TLS struct {
	// Cert and Key are PEM files. With Generate, a self-signed pair is
	// created there on first start when they do not exist.
	Cert, Key string
	Generate  bool
	// RequireTLS refuses clients that do not start TLS (default true: a
	// gate that carries production data in clear text is not one).
	RequireTLS bool
}

// Upstream is one database the gate offers under its name, reached with
// credentials operators never see.
type Upstream struct {
	Name   string // what clients ask for (the key in upstreams)
	Host   string
	Port   int    // default 5432
	DBName string // default Name
	User   string
	// Password is given inline (discouraged) or read from PasswordFile
	// when the gate connects, so `policy check` in CI needs no secret.
	Password     string
	PasswordFile string // absolute, resolved against the config's directory
	SSLMode      string // disable, prefer (default), require, verify-ca, verify-full
	SSLRootCert  string
	Line         int // where it is defined
}

// Rule is one entry of rules.
type Rule struct {
	Name      string
	Users     []string // user names, or "*" for everyone
	Groups    []string // group names, from groups here or the state store
	Databases []string // upstream names, or "*"
	Classes   []classify.Class
	AnyClass  bool // classes: ["*"]: every class but unknown
	Action    Action
	MaxRows   int64  // blast-radius limit for allow; 0 = Limits.MaxRows
	Message   string // shown to the person refused or held
	Index     int    // position in rules, from 0
	Line      int    // line of the rule in the file

	label string // Label(File), made once by Parse: decisions name their rule on every statement
}

// Limits bound what one session may do.
type Limits struct {
	MaxRows         int64 // default blast-radius limit of allow rules without max_rows; 0 = none
	MaxMessageBytes int   // largest client message (default 64 MiB)
	MaxConnections  int   // sessions at once, everyone together; 0 = unlimited
	// MaxConnectionsPerUser bounds one person's sessions at once; 0 = unlimited.
	MaxConnectionsPerUser int
	// DryRunTimeout bounds the dry run of a held UPDATE or DELETE (0 = the gate's default, 5 s).
	DryRunTimeout time.Duration
	// NoDryRun turns dry runs off (dry_run: false).
	NoDryRun bool
	// PoolIdle is pool_idle, the idle upstream connections kept per
	// database for reuse: 0 = the gate's default (20), -1 = none (pool_idle: 0).
	PoolIdle int
	// PoolIdleTimeout and PoolLifetime: pool_idle_timeout and pool_lifetime
	// (0 = the gate's defaults, 10m and 1h).
	PoolIdleTimeout, PoolLifetime time.Duration
}

// Label names r the way decisions and logs do.
func (r *Rule) Label(file string) string {
	s := fmt.Sprintf("rules[%d]", r.Index)
	if r.Name != "" {
		s += fmt.Sprintf(" %q", r.Name)
	}
	return fmt.Sprintf("%s (%s:%d)", s, file, r.Line)
}

// matches reports whether r covers this person, database and class.
func (c *Config) matches(r *Rule, user string, groups []string, db string, class classify.Class) bool {
	if !slices.Contains(r.Databases, "*") && !slices.Contains(r.Databases, db) {
		return false
	}
	if class == classify.Unknown || !r.AnyClass {
		if !slices.Contains(r.Classes, class) {
			return false
		}
	}
	if slices.Contains(r.Users, "*") || slices.Contains(r.Users, user) {
		return true
	}
	for _, g := range r.Groups {
		if g == "*" || slices.Contains(groups, g) || slices.Contains(c.Groups[g], user) {
			return true
		}
	}
	return false
}

// Decide returns what the policy does with a statement of class, sent by
// user (a member of groups, per the state store) to database db: the
// first matching rule's action, or deny when none matches. Unknown is
// allowed only by a rule that names it.
func (c *Config) Decide(user string, groups []string, db string, class classify.Class) Decision {
	if !class.Valid() {
		class = classify.Unknown
	}
	for i := range c.Rules {
		r := &c.Rules[i]
		if !c.matches(r, user, groups, db, class) {
			continue
		}
		label := r.label
		if label == "" {
			label = r.Label(c.File)
		}
		d := Decision{Action: r.Action, Rule: label, Message: r.Message}
		if r.Action == Allow {
			d.RowLimit = r.MaxRows
			if d.RowLimit == 0 {
				d.RowLimit = c.Limits.MaxRows
			}
		}
		return d
	}
	return Decision{Action: Deny, Rule: "default: no rule matched"}
}

// DecideResult decides every statement of a classified string and returns
// the strictest decision (deny over hold over allow; the smallest row
// limit among allows). Deciding on the strictest class alone is not
// enough: a policy may hold writes yet allow ddl, and "UPDATE ...; CREATE
// ..." must then be held.
func (c *Config) DecideResult(user string, groups []string, db string, res classify.Result) Decision {
	if len(res.Statements) == 0 {
		return c.Decide(user, groups, db, res.Class)
	}
	var out Decision
	for i, s := range res.Statements {
		d := c.Decide(user, groups, db, s.Class)
		switch {
		case i == 0 || d.Action.strictness() > out.Action.strictness():
			out = d
		case d.Action == out.Action && d.Action == Allow && d.RowLimit > 0 && (out.RowLimit == 0 || d.RowLimit < out.RowLimit):
			out.RowLimit = d.RowLimit
		}
	}
	return out
}

// Secret returns the upstream's password: the inline one, or the
// password file's first line, read now so that a rotated file is picked
// up by the next connection.
func (u *Upstream) Secret() (string, error) {
	if u.PasswordFile == "" {
		return u.Password, nil
	}
	b, err := os.ReadFile(u.PasswordFile)
	if err != nil {
		return "", fmt.Errorf("policy: upstream %s: password_file: %w", u.Name, err)
	}
	s, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimRight(s, "\r"), nil
}

// DSN returns a connection URL for the upstream, password included: hand
// it to the connection, never to a log.
func (u *Upstream) DSN() (string, error) {
	pw, err := u.Secret()
	if err != nil {
		return "", err
	}
	q := url.Values{}
	q.Set("sslmode", u.SSLMode)
	if u.SSLRootCert != "" {
		q.Set("sslrootcert", u.SSLRootCert)
	}
	ui := url.User(u.User)
	if pw != "" {
		ui = url.UserPassword(u.User, pw)
	}
	d := url.URL{Scheme: "postgres", User: ui, Host: net.JoinHostPort(u.Host, strconv.Itoa(u.Port)), Path: "/" + u.DBName, RawQuery: q.Encode()}
	return d.String(), nil
}
