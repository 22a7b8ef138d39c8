package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/runner"
)

// runLong documents every key of dualkey.yaml: `dualkey run --help` is
// the reference (docs/run.md explains the rest).
const runLong = `Run everything on embedded defaults, in one process: the vault (a directory),
the state store (SQLite), the PostgreSQL agent (WAL streaming, a first base
backup, then a schedule), the tripwire and the gate. Given --pg URL it protects
that server; given nothing, it initialises and starts a PostgreSQL 15 of its own
under the data directory (as the postgres OS user when run as root), so that
there is something to protect.

On first start it creates, and later reuses, ./dualkey-data:

  vault/                  the vault; its password in secrets/vault.password (0600)
  state.db, ledger.key    people, the quorum policy, requests; the audit ledger's key
  people/NAME/            NAME's gate password; approvers: keys/NAME.key, passphrase
  pg/                     the local server: data/, postgres.log (without --pg)
  secrets/                the local server's passwords (0600)
  gate.yaml, gate.crt     the gate's effective config (rewritten at each start) and certificate

People by default: alice (an operator), bob and carol (approvers; 2 must approve).
It prints what runs where, the gate's address, how to connect, how to approve a
held statement and how to restore; Ctrl-C (or SIGTERM) stops it all cleanly.

The config file (--config; ./dualkey.yaml when it exists) may set everything.
Every key is optional; relative paths are taken from data_dir. Unknown keys and
bad values are errors naming file:line.

  data_dir: ./dualkey-data        everything dualkey run creates
  vault:
    repo: vault                   the directory vault
    password_file: secrets/vault.password   created 0600 when missing
    min_retention: 720h           shortest retention lock, fixed when the vault is made
  state: state.db                 SQLite file, or postgres://... (several gates)
  pg:
    url: postgres://...           protect this server (superuser, or REPLICATION);
                                  without it a local server runs
    gate_url: postgres://...      the gate's brokered role (default: url)
    databases: [app]              offered through the gate (default: app, created on
                                  the local server; else the url's database)
    local:
      dir: pg                     the local server's data/ and postgres.log
      port: 0                     on 127.0.0.1; 0: a free port at each start
      settings: ["name = value"]  extra postgresql.conf lines, at initdb
  agent:
    slot: dualkey                 replication slot
    synchronous: false            commits wait until the vault holds them (RPO zero)
    flush_every: 200ms            the RPO when not synchronous
    base_every: 24h               base backups on a schedule ("off": none)
    first_base_backup: true       one at start when the vault has none of this server
    retain_warn: 1073741824       warn when the slot holds more WAL (bytes)
  tripwire:
    enabled: true                 decode the WAL: drops, truncates, mass deletes
    mass_rows: 10000              rows one transaction deletes or updates in a table
    names_every: 30s              how often table names are reread
  gate:                           gate.yaml's keys (docs/gate.md) but upstreams, state
    listen: 127.0.0.1:6543        when the default is taken, a free port
    tls: {generate: true}         generate, cert, key, require_tls (default true)
    request_expiry: 1h
    webhook: https://...
    limits: {max_rows: 1000, max_message_bytes: 67108864}
    groups: {dba: [alice]}
    rules: [...]                  default: unknown denied; destructive, privileged
                                  held; read, write, ddl allowed (max_rows 1000)
  users:                          made on first start, added when new
    - name: alice
      groups: [operators]
    - name: bob
      approver: true              gets an approver key
  quorum:
    threshold: 2                  approvals needed; the requester never counts

Example with every key: docs/dualkey.example.yaml.`

func (a *app) runCmd() *cobra.Command {
	var (
		config  string
		pgURL   string
		dataDir string
	)
	cmd := &cobra.Command{
		Use:   "run [--config dualkey.yaml] [--pg URL] [--data DIR]",
		Short: "Run everything in one process: vault, state, agent, tripwire and gate (a local PostgreSQL unless --pg)",
		Long:  runLong,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.runConfig(config, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			if pgURL != "" || dataDir != "" {
				// The flags win over the file; the file is read again so
				// that its defaults follow (the URL's database, say).
				if cfg, err = runOverride(cfg, pgURL, dataDir); err != nil {
					return err
				}
			}
			log := a.log
			if a.verbose == 0 {
				log = newInfoLogger(a.stderr)
			}
			exe := "dualkey"
			if len(os.Args) > 0 && strings.Contains(os.Args[0], "/") {
				exe = os.Args[0]
			}
			return runner.Run(cmd.Context(), cfg, runner.Options{Log: log, Exe: exe}, a.stdout)
		},
	}
	f := cmd.Flags()
	f.StringVar(&config, "config", "dualkey.yaml", "the config file (read when it exists, unless given explicitly)")
	f.StringVar(&pgURL, "pg", "", "protect this PostgreSQL server instead of a local one (pg.url; env DUALKEY_PG)")
	f.StringVar(&dataDir, "data", "", "the data directory (data_dir; default ./dualkey-data)")
	if v := a.getenv("DUALKEY_PG"); v != "" {
		pgURL = v
	}
	return cmd
}

// runConfig loads the config file; the default name is optional.
func (a *app) runConfig(path string, given bool) (*runner.Config, error) {
	cfg, err := runner.Load(path)
	if err == nil {
		return cfg, nil
	}
	if !given && errors.Is(err, fs.ErrNotExist) {
		return runner.Default(), nil
	}
	return nil, usageError{err}
}

// runOverride applies --pg and --data by re-parsing the file with them set.
func runOverride(cfg *runner.Config, pgURL, dataDir string) (*runner.Config, error) {
	var data []byte
	name := "" // no file: the defaults
	if cfg.File != "" {
		b, err := os.ReadFile(cfg.File)
		if err != nil {
			return nil, err
		}
		data, name = b, cfg.File
	}
	out, err := runner.ParseWith(data, name, runner.Overrides{URL: pgURL, DataDir: dataDir})
	if err != nil {
		return nil, usageError{err}
	}
	if dataDir != "" {
		out.DataDir = filepath.Clean(dataDir)
	}
	return out, nil
}
