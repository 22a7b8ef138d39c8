package runner

import (
	"fmt"
	"net"
	"strings"
	"text/tabwriter"
)

// Banner says what runs where, how to connect, how to approve a held
// statement and how to restore: what `dualkey run` prints once started.
func (r *Runner) Banner() string {
	in := r.info
	exe := r.opts.Exe
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	how := "reused"
	if in.Created {
		how = "created now"
	}
	fmt.Fprintf(&b, "dualkey run: the whole system in this process; Ctrl-C stops all of it.\n\n")
	fmt.Fprintf(w, "data\t%s (%s)\n", in.DataDir, how)
	fmt.Fprintf(w, "vault\t%s (id %s), password in %s\n", in.Vault, short(in.VaultID), in.VaultPasswordFile)
	fmt.Fprintf(w, "state\t%s, ledger key %s\n", in.State, in.LedgerKey)
	if l := in.Local; l != nil {
		fmt.Fprintf(w, "PostgreSQL\t127.0.0.1:%d, a local server (data %s, log %s)\n", l.Port, l.DataDir, l.LogFile)
		fmt.Fprintf(w, "\tsuperuser postgres, password in %s\n", l.PasswordFile)
	} else {
		fmt.Fprintf(w, "PostgreSQL\t%s\n", in.PG)
	}
	sched := "no schedule"
	if in.BaseEvery > 0 {
		sched = "then every " + strings.TrimSuffix(strings.TrimSuffix(in.BaseEvery.String(), "0s"), "0m")
	}
	fmt.Fprintf(w, "agent\tstreams WAL into the vault (slot %s); base backup at first start, %s\n", in.Slot, sched)
	if in.Tripwire {
		fmt.Fprintf(w, "tripwire\tdecodes that WAL: drops, truncates, mass deletes become incidents, printed here\n")
		fmt.Fprintf(w, "\t(%s incidents list%s)\n", exe, stateFlag(in))
	} else {
		fmt.Fprintf(w, "tripwire\toff (tripwire.enabled: false)\n")
	}
	tls := "no TLS"
	if in.GateFingerprint != "" {
		tls = "TLS " + in.GateFingerprint
	}
	fmt.Fprintf(w, "gate\t%s (%s), databases %s\n", in.GateAddr, tls, strings.Join(in.Databases, ", "))
	fmt.Fprintf(w, "\tpolicy %s (check one statement: %s policy check --config %s --user alice --db %s \"DROP TABLE t\")\n", in.GateConfig, exe, in.GateConfig, in.Databases[0])
	if in.GateListenNote != "" {
		fmt.Fprintf(w, "\t(%s)\n", in.GateListenNote)
	}
	w.Flush()

	fmt.Fprintf(&b, "\npeople\n")
	var operator, approvers []Person
	for _, p := range in.People {
		role := "operator"
		if p.Approver {
			role = "approver"
			approvers = append(approvers, p)
		} else if operator == nil {
			operator = append(operator, p)
		}
		pw := "password in " + p.PasswordFile
		if p.PasswordFile == "" {
			pw = "password set earlier (change it: " + exe + " users passwd " + p.Name + stateFlag(in) + ")"
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\n", p.Name, role, strings.Join(p.Groups, ","), pw)
	}
	w.Flush()

	host, port, _ := net.SplitHostPort(in.GateAddr)
	if len(operator) == 0 && len(in.People) > 0 {
		operator = in.People[:1]
	}
	if len(operator) > 0 {
		p := operator[0]
		fmt.Fprintf(&b, "\nconnect as %s (through the gate):\n", p.Name)
		pw := ""
		if p.PasswordFile != "" {
			pw = "PGPASSWORD=$(cat " + p.PasswordFile + ") "
		}
		fmt.Fprintf(&b, "  %spsql \"postgres://%s@%s/%s?sslmode=require\"\n", pw, p.Name, net.JoinHostPort(host, port), in.Databases[0])
		fmt.Fprintf(&b, "reads, writes and CREATE run; DROP, TRUNCATE, DELETE without WHERE are held:\n")
		fmt.Fprintf(&b, "  ERROR: dualkey: statement held for approval: request ID; ...\n")
	}
	if len(approvers) > 0 {
		fmt.Fprintf(&b, "\napprove a held statement (each approver, ID from the error or the list):\n")
		if isPostgresDSN(in.State) {
			fmt.Fprintf(&b, "  (first: export DUALKEY_STATE='<the state DSN of dualkey.yaml>' DUALKEY_LEDGER_KEY=%s)\n", in.LedgerKey)
		}
		fmt.Fprintf(&b, "  %s approvals list%s\n", exe, stateFlag(in))
		fmt.Fprintf(&b, "  %s approvals show ID%s\n", exe, stateFlag(in))
		for _, p := range approvers {
			fmt.Fprintf(&b, "  DUALKEY_CONFIG_DIR=%s DUALKEY_KEY_PASSPHRASE_FILE=%s %s approvals approve ID --as %s%s\n",
				p.ConfigDir, p.PassphraseFile, exe, p.Name, stateFlag(in))
		}
		fmt.Fprintf(&b, "then the same statement, again from the same person, runs once.\n")
	}

	repo := fmt.Sprintf("--repo %s --password-file %s", in.Vault, in.VaultPasswordFile)
	fmt.Fprintf(&b, "\nrestore (from the vault: base backups plus WAL):\n")
	fmt.Fprintf(&b, "  %s pg backups %s\n", exe, repo)
	pgpw := ""
	if in.Local != nil {
		pgpw = "PGPASSWORD=$(cat " + in.Local.PasswordFile + ") "
	}
	fmt.Fprintf(&b, "  %s%s pg restore %s --target /tmp/dualkey-restore --latest --start --port 5499\n", pgpw, exe, repo)
	fmt.Fprintf(&b, "  (or --before-incident ID, --time T, --lsn L, --before-xid X instead of --latest; docs/postgres.md)\n\n")
	return b.String()
}

// stateFlag is the --state flag the CLI needs to find this state, and the
// ledger key when the CLI would not look for it where it is.
func stateFlag(in Info) string {
	if isPostgresDSN(in.State) {
		// The DSN holds a password: the banner names the variable, not it.
		return ` --state "$DUALKEY_STATE"`
	}
	return " --state " + in.State
}

func short(id string) string {
	if len(id) > 10 {
		return id[:10]
	}
	return id
}
