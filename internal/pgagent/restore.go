package pgagent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/restorer"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// PGBinDir holds the PostgreSQL 15 programs restore starts the server
// with (Debian's layout).
const PGBinDir = "/usr/lib/postgresql/15/bin"

// PGOSUser is the OS user a restored data directory is handed to, and the
// server run as, when restoring as root: PostgreSQL refuses to run as root.
const PGOSUser = "postgres"

// RestoreOptions say what to restore where. Exactly one target must be
// set: Time, LSN, BeforeLSN, BeforeXID or Latest.
type RestoreOptions struct {
	// Target is the data directory to create. It must be missing or empty
	// unless Delta.
	Target string

	// Time restores every transaction committed at or before this instant
	// (recovery_target_time, inclusive; PostgreSQL keeps microseconds).
	Time time.Time
	// LSN replays WAL up to this position (recovery_target_lsn).
	LSN pgwal.LSN
	// BeforeLSN replays WAL up to, not including, the record at this
	// position (recovery_target_lsn, recovery_target_inclusive = false):
	// the state just before that record's change. A tripwire incident's
	// restore point.
	BeforeLSN pgwal.LSN
	// BeforeXID restores the state just before transaction BeforeXID
	// committed (recovery_target_xid, recovery_target_inclusive = false).
	// The 32-bit xid: txid_current()'s value modulo 2^32.
	BeforeXID uint32
	// Latest replays every byte of WAL the vault holds.
	Latest bool

	// Delta allows a non-empty Target: files equal to the base backup's
	// (size and every content blob's ID) are kept, others rewritten, and
	// files the backup does not have are removed.
	Delta bool

	// TablespaceMap moves tablespaces: a tablespace's OID ("16384") or
	// original location → the directory to restore it into instead of
	// that location. Every tablespace is restored outside Target and
	// linked from pg_tblspc/<oid>; its location must be missing or empty
	// unless Delta, and outside Target. A key naming no tablespace of
	// the backup is an error.
	TablespaceMap map[string]string

	// Repo is the repository location restore_command passes to
	// "dualkey pg wal-fetch --repo" (the server runs it, not this process).
	Repo string
	// PasswordFile, if set, is put into restore_command as
	// DUALKEY_PASSWORD_FILE=…: the server's process needs the password to
	// read the vault. The password itself is never written anywhere.
	PasswordFile string
	// Env are further NAME=VALUE assignments for restore_command, such as
	// DUALKEY_TOKEN_FILE or DUALKEY_TLS_FINGERPRINT. Never secrets: the
	// command is stored in postgresql.auto.conf.
	Env []string
	// WalFetchCommand replaces "<this binary> pg wal-fetch --repo <Repo>";
	// " %f %p" is appended. The default command also serves segments
	// already spooled by the prefetcher without starting dualkey
	// (spoolFastPath); one given here runs for every file.
	WalFetchCommand string
	// Executable is the dualkey binary the default restore_command runs;
	// default this process's own.
	Executable string

	// Start starts the restored server on Port and waits until recovery has
	// finished and it accepts connections as a primary.
	Start bool
	Port  int
	// ServerSettings are "name=value" settings the server is started with
	// (postgres -c), e.g. a unix_socket_directories that exists here.
	ServerSettings []string
	// LogFile receives the started server's log; default Target + ".log".
	LogFile string
	// StartTimeout bounds the wait for recovery; default 1 hour.
	StartTimeout time.Duration

	// Workers is the restorer's parallelism; 0: 2 × cores.
	Workers  int
	Progress func(restorer.Stats)
	Log      *slog.Logger

	now func() time.Time
}

// RestoreResult is what a Restore did.
type RestoreResult struct {
	Backup BaseBackupInfo `json:"backup"`
	Target string         `json:"target"`
	// Stats are the restorer's; with Delta only of the files rewritten.
	Stats restorer.Stats `json:"stats"`
	// Delta counts, with Delta: files rewritten, kept and removed.
	Rewritten int `json:"rewritten"`
	Unchanged int `json:"unchanged"`
	Removed   int `json:"removed"`
	// Tablespaces say where each tablespace was restored.
	Tablespaces []RestoredTablespace `json:"tablespaces,omitempty"`
	// Settings are the lines appended to postgresql.auto.conf.
	Settings []string `json:"settings"`
	// RestoreTook is the time to restore the files; ReplayTook, with
	// Start, from starting the server until it finished recovery and
	// accepted connections as a primary.
	RestoreTook time.Duration `json:"restore_ns"`
	ReplayTook  time.Duration `json:"replay_ns"`
	LogFile     string        `json:"log_file,omitempty"`
	// Warnings say where the restored state may fall short of what the
	// vault holds, such as a gap in its WAL that replay cannot cross.
	Warnings []string `json:"warnings,omitempty"`
}

var (
	// ErrBadTarget means the options do not name exactly one target.
	ErrBadTarget = errors.New("pgagent: give exactly one restore target: a time, an LSN, a transaction or latest")
	// ErrTargetNotEmpty means Target holds files and Delta was not set.
	ErrTargetNotEmpty = errors.New("pgagent: target directory is not empty (use delta to restore into it)")
	// ErrRecovery means the started server did not finish recovery.
	ErrRecovery = errors.New("pgagent: the restored server did not finish recovery")
)

func (o *RestoreOptions) check() error {
	n := 0
	for _, set := range []bool{!o.Time.IsZero(), o.LSN != 0, o.BeforeLSN != 0, o.BeforeXID != 0, o.Latest} {
		if set {
			n++
		}
	}
	if n != 1 {
		return ErrBadTarget
	}
	if o.BeforeXID != 0 && o.BeforeXID < 3 {
		return fmt.Errorf("pgagent: transaction %d is a special xid, never a user's", o.BeforeXID)
	}
	if o.Target == "" {
		return errors.New("pgagent: no target directory given")
	}
	if o.Start && o.Port <= 0 {
		return errors.New("pgagent: starting the restored server needs a port")
	}
	for k, v := range o.TablespaceMap {
		// An empty path would be taken as the current directory.
		if k == "" || v == "" {
			return fmt.Errorf("pgagent: tablespace mapping %q=%q: want a tablespace and a directory", k, v)
		}
	}
	if o.Repo == "" && o.WalFetchCommand == "" {
		return errors.New("pgagent: no repository location for restore_command")
	}
	for _, e := range o.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || !envName(k) {
			return fmt.Errorf("pgagent: restore_command environment %q: want NAME=VALUE", e)
		}
		if strings.HasPrefix(e, "DUALKEY_PASSWORD=") || strings.HasPrefix(e, "DUALKEY_TOKEN=") {
			return fmt.Errorf("pgagent: refusing to write a secret (%s) into postgresql.auto.conf: pass a file instead", strings.SplitN(e, "=", 2)[0])
		}
	}
	return nil
}

func envName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		if c != '_' && (c < 'A' || c > 'Z') && (c < 'a' || c > 'z') && (i == 0 || c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// Restore restores the base backup that best reaches the target into
// opts.Target and prepares it to recover to the target from the vault's
// WAL: it picks the newest usable base backup that ends before the target,
// restores it in parallel, removes a stale postmaster.pid, empties pg_wal
// (every WAL byte comes from the vault through restore_command), creates
// recovery.signal and appends the recovery settings to
// postgresql.auto.conf. Each tablespace is restored into its own
// location (opts.TablespaceMap, else its original one) and linked from
// pg_tblspc/<oid>, as pg_basebackup does. As root it hands the directory
// and the tablespaces to PGOSUser. With
// opts.Start it starts the server and waits until recovery has finished.
func Restore(ctx context.Context, r *repo.Repository, opts RestoreOptions) (*RestoreResult, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.now == nil {
		opts.now = time.Now
	}
	target, err := filepath.Abs(opts.Target)
	if err != nil {
		return nil, fmt.Errorf("pgagent: target: %w", err)
	}
	if !opts.Delta {
		if err := checkEmpty(target); err != nil {
			return nil, err
		}
	}
	bs, ws, win, err := load(ctx, r)
	if err != nil {
		return nil, err
	}
	b, err := chooseBackup(ctx, r, bs, win, &opts)
	if err != nil {
		return nil, err
	}
	opts.Log.Info("restoring base backup", "snapshot", b.ID.String()[:10], "start_lsn", b.Meta.StartLSN,
		"end_lsn", b.Meta.EndLSN, "wal_reach", b.WALReach.String(), "timeline", ws.path.target())

	tss, err := placeTablespaces(target, b.Meta.Tablespaces, opts.TablespaceMap, opts.Delta)
	if err != nil {
		return nil, err
	}
	res := &RestoreResult{Backup: *b, Target: target}
	if w := walBeyondGap(ws, b); w != "" {
		// Replay stops at the gap: say so rather than restore an earlier
		// state than the caller may believe.
		res.Warnings = append(res.Warnings, w)
		opts.Log.Warn(w)
	}
	start := time.Now()
	if err := makeServerDir(target, "target"); err != nil {
		return res, err
	}
	ropts := restorer.Options{Workers: opts.Workers, Progress: opts.Progress, Log: opts.Log}
	switch {
	case len(tss) > 0:
		err = restoreWithTablespaces(ctx, r, b.Tree, target, tss, opts.Delta, ropts, res)
	case opts.Delta:
		err = deltaRestore(ctx, r, b.Tree, target, nil, ropts, res)
	default:
		res.Stats, err = restorer.Restore(ctx, r, b.Tree, target, ropts)
	}
	if err != nil {
		return res, fmt.Errorf("pgagent: restore base backup %s: %w", b.ID.String()[:10], err)
	}
	if err := prepareRecovery(target, &opts, b, res); err != nil {
		return res, err
	}
	res.RestoreTook = time.Since(start)
	opts.Log.Info("base backup restored", "target", target, "files", res.Stats.Files, "took", res.RestoreTook)
	for _, ts := range res.Tablespaces {
		opts.Log.Info("tablespace restored", "oid", ts.OID, "location", ts.Location, "original", ts.Original)
	}
	if !opts.Start {
		return res, nil
	}
	start = time.Now()
	stopPrefetch := prefetchForServer(ctx, r, target, b, &opts)
	err = startServer(ctx, target, &opts, res)
	stopPrefetch()
	if err != nil {
		return res, err
	}
	res.ReplayTook = time.Since(start)
	// Segments fetched ahead past the target are not needed any more.
	_ = os.RemoveAll(DefaultSpool(filepath.Join(target, "pg_wal", "RECOVERYXLOG")))
	opts.Log.Info("restored server recovered", "port", opts.Port, "took", res.ReplayTook)
	return res, nil
}

// prefetchForServer fetches WAL ahead into the spool of the server about
// to start, from the vault this process already holds open, beginning with
// the segment the backup starts in: the server's first requests find their
// segments there, and no restore_command pays for opening the vault. It
// returns a function that stops it. A custom restore_command may not read
// the spool: then it does nothing.
func prefetchForServer(ctx context.Context, r *repo.Repository, target string, b *BaseBackupInfo, o *RestoreOptions) func() {
	if o.WalFetchCommand != "" {
		return func() {}
	}
	fo := FetchOptions{Spool: DefaultSpool(filepath.Join(target, "pg_wal", "RECOVERYXLOG")), Log: o.Log}
	if uid, gid, ok, err := pgUser(); err != nil {
		return func() {}
	} else if ok {
		fo.owner = &[2]int{uid, gid}
	}
	if err := os.MkdirAll(fo.Spool, 0o700); err != nil {
		return func() {}
	}
	fo.own(fo.Spool)
	checkBoot(fo.Spool)
	fo.own(filepath.Join(fo.Spool, bootName))
	writeWant(fo.Spool, b.Meta.Timeline, pgwal.SegmentOf(b.Meta.StartLSN, pgwal.DefaultSegmentSize), false)
	fo.own(filepath.Join(fo.Spool, wantName))
	ctx, cancel := context.WithCancel(ctx)
	done, ready := make(chan struct{}), make(chan struct{})
	fo.ready = func() { close(ready) }
	go func() {
		defer close(done)
		err := RunPrefetcher(ctx, func(context.Context) (*repo.Repository, error) { return r, nil }, fo)
		if err != nil && ctx.Err() == nil {
			o.Log.Warn("fetching WAL ahead for the restored server failed; restore_command fetches it", "err", err)
		}
	}()
	// The server starts once the spool knows what the vault holds: its
	// first requests (history files of later timelines, the first
	// segment) must not find an empty spool and open the vault
	// themselves, which cost ~1.8 s of a restore (a key derivation and the
	// index, as the server's OS user).
	select {
	case <-ready:
	case <-done:
	}
	return func() { cancel(); <-done }
}

func checkEmpty(dir string) error {
	d, err := os.Open(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pgagent: target: %w", err)
	}
	defer d.Close()
	names, err := d.Readdirnames(1)
	if err != nil && err != io.EOF {
		return fmt.Errorf("pgagent: target %s: %w", dir, err)
	}
	if len(names) > 0 {
		return fmt.Errorf("%w: %s", ErrTargetNotEmpty, dir)
	}
	return nil
}

// chooseBackup picks the newest usable base backup that can reach the
// target. A backup can reach it when recovery becomes consistent (its end)
// before the target, and the WAL from its start is contiguous up to the
// target (for an LSN), or as far as the vault goes (for a time or a
// transaction, whose position only replay finds).
func chooseBackup(ctx context.Context, r *repo.Repository, bs []BaseBackupInfo, win Window, o *RestoreOptions) (*BaseBackupInfo, error) {
	var xidOf func(b *BaseBackupInfo) (uint32, error)
	if o.BeforeXID != 0 {
		xidOf = func(b *BaseBackupInfo) (uint32, error) { return backupNextXID(ctx, r, b) }
	}
	return choose(bs, win, o, xidOf)
}

// choose is chooseBackup's decision; nextXID reads a backup's next
// transaction ID (only for BeforeXID).
func choose(bs []BaseBackupInfo, win Window, o *RestoreOptions, nextXID func(*BaseBackupInfo) (uint32, error)) (*BaseBackupInfo, error) {
	if win.IsZero() {
		if len(bs) == 0 {
			return nil, fmt.Errorf("%w: the vault holds no base backup", ErrNoBackup)
		}
		return nil, fmt.Errorf("%w: no base backup has its WAL (start to end) in the vault", ErrNoBackup)
	}
	if !o.Time.IsZero() && o.Time.Before(win.Earliest) {
		return nil, fmt.Errorf("%w: %s is before the recoverable window (%s to %s)", ErrNoBackup,
			o.Time.Format(time.RFC3339Nano), win.Earliest.Format(time.RFC3339Nano), win.Latest.Format(time.RFC3339Nano))
	}
	if !o.Time.IsZero() && o.Time.After(win.Latest) {
		return nil, fmt.Errorf("%w: %s is after the last WAL the vault holds (%s); restore to the latest state instead", ErrNoBackup,
			o.Time.Format(time.RFC3339Nano), win.Latest.Format(time.RFC3339Nano))
	}
	var why []string
	for i := len(bs) - 1; i >= 0; i-- {
		b := &bs[i]
		end := b.Meta.EndLSN
		switch {
		case !b.Usable:
			why = append(why, fmt.Sprintf("%s: its WAL reaches only %s, short of its end %s", b.ID.String()[:10], b.WALReach, end))
			continue
		case o.LSN != 0 && end > o.LSN:
			why = append(why, fmt.Sprintf("%s: ends at %s, after the target", b.ID.String()[:10], end))
			continue
		case o.LSN != 0 && b.WALReach < o.LSN:
			why = append(why, fmt.Sprintf("%s: its WAL reaches only %s", b.ID.String()[:10], b.WALReach))
			continue
		case o.BeforeLSN != 0 && end > o.BeforeLSN:
			why = append(why, fmt.Sprintf("%s: ends at %s, after the target", b.ID.String()[:10], end))
			continue
		case o.BeforeLSN != 0 && b.WALReach <= o.BeforeLSN:
			// Recovery stops on reading the record at the target: it
			// must be in the vault.
			why = append(why, fmt.Sprintf("%s: its WAL reaches only %s", b.ID.String()[:10], b.WALReach))
			continue
		case !o.Time.IsZero() && !b.Meta.EndTime.Before(o.Time):
			why = append(why, fmt.Sprintf("%s: ended %s, not before the target", b.ID.String()[:10], b.Meta.EndTime.Format(time.RFC3339Nano)))
			continue
		}
		if o.BeforeXID != 0 && nextXID != nil {
			next, err := nextXID(b)
			if err != nil {
				return nil, err
			}
			// The backup can only be used if the transaction began after
			// its checkpoint: xids are assigned in order, modulo 2^32.
			if int32(o.BeforeXID-next) < 0 {
				why = append(why, fmt.Sprintf("%s: transactions up to %d had begun when it was taken", b.ID.String()[:10], next))
				continue
			}
		}
		return b, nil
	}
	return nil, fmt.Errorf("%w: %s", ErrNoBackup, strings.Join(why, "; "))
}

// controlNextXIDOffset is where ControlFileData.checkPointCopy.nextXid
// sits in global/pg_control (PostgreSQL 15, 64-bit): system_identifier 0,
// version 8, catalog 12, state 16, time 24, checkPoint 32, checkPointCopy
// 40 {redo 40, tli 48, prevtli 52, fullPageWrites 56, nextXid 64}.
const controlNextXIDOffset = 64

// backupNextXID reads the next transaction ID of the checkpoint recorded in
// the backup's pg_control: every transaction with a smaller xid began
// before that checkpoint.
func backupNextXID(ctx context.Context, r *repo.Repository, b *BaseBackupInfo) (uint32, error) {
	var buf bytes.Buffer
	if err := restorer.Dump(ctx, r, b.Tree, "global/pg_control", &buf); err != nil {
		return 0, fmt.Errorf("pgagent: base backup %s: read pg_control: %w", b.ID.String()[:10], err)
	}
	return parseControlNextXID(buf.Bytes())
}

func parseControlNextXID(data []byte) (uint32, error) {
	if len(data) < controlNextXIDOffset+8 {
		return 0, fmt.Errorf("pgagent: pg_control of %d bytes is too short", len(data))
	}
	full := binary.LittleEndian.Uint64(data[controlNextXIDOffset:])
	return uint32(full), nil
}

// recoverySettings returns the lines for postgresql.auto.conf.
func recoverySettings(o *RestoreOptions, b *BaseBackupInfo, now time.Time, exe string) []string {
	cmd := o.WalFetchCommand
	if cmd == "" {
		cmd = shellQuote(exe) + " pg wal-fetch --repo " + shellQuote(o.Repo)
	}
	var env []string
	if o.PasswordFile != "" {
		env = append(env, "DUALKEY_PASSWORD_FILE="+shellQuote(o.PasswordFile))
	}
	for _, e := range o.Env {
		k, v, _ := strings.Cut(e, "=")
		env = append(env, k+"="+shellQuote(v))
	}
	if len(env) > 0 {
		cmd = strings.Join(env, " ") + " " + cmd
	}
	// %f and %p are PostgreSQL's: any other % must be doubled.
	cmd = strings.ReplaceAll(cmd, "%", "%%") + " %f %p"
	if o.WalFetchCommand == "" {
		cmd = spoolFastPath + cmd
	}
	lines := []string{
		fmt.Sprintf("# dualkey pg restore %s: base backup %s, WAL from the vault", now.UTC().Format(time.RFC3339), b.ID),
		"restore_command = " + confQuote(cmd),
	}
	switch {
	case !o.Time.IsZero():
		lines = append(lines, "recovery_target_time = "+confQuote(FormatTargetTime(o.Time)))
	case o.LSN != 0:
		lines = append(lines, "recovery_target_lsn = "+confQuote(o.LSN.String()))
	case o.BeforeLSN != 0:
		lines = append(lines, "recovery_target_lsn = "+confQuote(o.BeforeLSN.String()), "recovery_target_inclusive = false")
	case o.BeforeXID != 0:
		lines = append(lines, "recovery_target_xid = "+confQuote(strconv.FormatUint(uint64(o.BeforeXID), 10)),
			"recovery_target_inclusive = false")
	}
	lines = append(lines, "recovery_target_timeline = 'latest'", "recovery_target_action = 'promote'")
	return lines
}

// spoolFastPath goes before the default restore_command: a shell test
// that serves a segment the prefetcher has already spooled without
// starting dualkey. PostgreSQL runs restore_command through /bin/sh once
// per 16 MiB segment while replay waits, and starting this binary costs
// 20-50 ms against a few for the shell and mv: a second or more of a
// restore's replay. It does what FetchWAL does for a spooled segment: the
// boot check (a spool written before a crash is not trusted), the want
// file before the segment leaves the spool (the prefetcher reads it, see
// readWant), then a rename. Timeline 1's history file, which PostgreSQL
// asks for at the end of every recovery, never exists: refused at once.
// Other history files, segments not spooled and a spool of an earlier boot
// go on to dualkey. The paths are relative: restore_command runs in the
// data directory, and %p is in pg_wal.
const spoolFastPath = `[ "%f" = ` + timeline1History + ` ] && exit 1; ` +
	`s=pg_wal/` + spoolDirName + `; if [ -f "$s/%f" ] && read b </proc/sys/kernel/random/boot_id && read o <"$s/` + bootName + `" && [ "$b" = "$o" ]; then ` +
	`case "%f" in *.history) ;; *) echo "%f true" >"$s/` + wantName + `" && mv -f "$s/%f" "%p" && exit 0 ;; esac; fi; `

// FormatTargetTime writes t as recovery_target_time wants it: UTC with
// microseconds, PostgreSQL's resolution (finer digits are cut, so a commit
// at exactly the truncated instant is included).
func FormatTargetTime(t time.Time) string {
	return t.UTC().Truncate(time.Microsecond).Format("2006-01-02 15:04:05.000000") + "+00"
}

// ParseTargetTime parses a restore target time: RFC 3339
// ("2024-05-01T12:00:00.25Z", "…+02:00"), or PostgreSQL's text form with a
// zone ("2024-05-01 12:00:00.25+00"), or without one in local time
// ("2024-05-01 12:00:00").
func ParseTargetTime(s string) (time.Time, error) {
	s = strings.TrimSpace(s)
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02 15:04:05.999999999Z07:00", "2006-01-02 15:04:05.999999999Z07"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	for _, layout := range []string{"2006-01-02 15:04:05.999999999", "2006-01-02T15:04:05.999999999", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("pgagent: time %q: want RFC 3339 (2024-05-01T12:00:00Z) or 2024-05-01 12:00:00[.ffffff][+00]", s)
}

// shellQuote quotes s for sh.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(c rune) bool {
		return !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("/._-:+,=@", c))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// confQuote quotes s as a postgresql.conf string.
func confQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// prepareRecovery turns a restored base backup into a data directory that
// recovers from the vault.
func prepareRecovery(target string, o *RestoreOptions, b *BaseBackupInfo, res *RestoreResult) error {
	// A postmaster.pid copied from a running server would make pg_ctl
	// believe one runs here; BASE_BACKUP leaves it out, a delta target
	// may still have one.
	if err := os.Remove(filepath.Join(target, "postmaster.pid")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pgagent: %w", err)
	}
	for _, name := range []string{"postmaster.opts", "recovery.done", "standby.signal"} {
		_ = os.Remove(filepath.Join(target, name))
	}
	if err := emptyWALDir(filepath.Join(target, "pg_wal")); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(target, "recovery.signal"), nil, 0o600); err != nil {
		return fmt.Errorf("pgagent: %w", err)
	}
	exe := o.Executable
	if o.WalFetchCommand == "" && exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("pgagent: find the dualkey binary for restore_command: %w", err)
		}
	}
	res.Settings = recoverySettings(o, b, o.now(), exe)
	auto := filepath.Join(target, "postgresql.auto.conf")
	old, err := os.ReadFile(auto)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pgagent: %w", err)
	}
	if hasSyncStandbys(old) {
		// An agent in synchronous mode wrote itself there; the restored
		// server would hold every commit until that standby connects.
		res.Settings = append(res.Settings, "synchronous_standby_names = ''  # no synchronous standby follows a restored server yet")
	}
	var buf bytes.Buffer
	buf.Write(old)
	if len(old) > 0 && old[len(old)-1] != '\n' {
		buf.WriteByte('\n')
	}
	for _, l := range res.Settings {
		buf.WriteString(l + "\n")
	}
	if err := writeFileAtomic(auto, buf.Bytes(), 0o600, true); err != nil {
		return err
	}
	if err := os.Chmod(target, 0o700); err != nil {
		return fmt.Errorf("pgagent: %w", err)
	}
	return ownToPG(target)
}

// hasSyncStandbys reports whether an auto.conf names synchronous standbys.
func hasSyncStandbys(conf []byte) bool {
	val := ""
	sc := bufio.NewScanner(bytes.NewReader(conf))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok && strings.TrimSpace(k) == "synchronous_standby_names" {
			val = strings.Trim(strings.TrimSpace(v), "'")
		}
	}
	return val != ""
}

// emptyWALDir removes every WAL file from pg_wal and keeps (or creates) the
// directory and its archive_status subdirectory, empty.
func emptyWALDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Join(dir, "archive_status"), 0o700); err != nil {
			return fmt.Errorf("pgagent: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("pgagent: %w", err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if e.Name() == "archive_status" && e.IsDir() {
			if err := emptyWALDir(p); err != nil {
				return err
			}
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("pgagent: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "archive_status"), 0o700); err != nil {
		return fmt.Errorf("pgagent: %w", err)
	}
	return nil
}

// writeFileAtomic writes p through a temporary file renamed into place,
// fsynced first when sync is set.
func writeFileAtomic(p string, data []byte, mode os.FileMode, sync bool) error {
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".dualkey-tmp*")
	if err != nil {
		return fmt.Errorf("pgagent: %w", err)
	}
	tmp := f.Name()
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("pgagent: write %s: %w", p, err)
	}
	return nil
}

// pgUser returns the uid and gid of PGOSUser when this process is root,
// and ok false otherwise.
func pgUser() (uid, gid int, ok bool, err error) {
	if os.Geteuid() != 0 {
		return 0, 0, false, nil
	}
	u, err := user.Lookup(PGOSUser)
	if err != nil {
		return 0, 0, false, fmt.Errorf("pgagent: OS user %s (PostgreSQL refuses to run as root): %w", PGOSUser, err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid, true, nil
}

// ownToPG hands dir and everything below it to PGOSUser when running as
// root.
func ownToPG(dir string) error {
	uid, gid, ok, err := pgUser()
	if err != nil || !ok {
		return err
	}
	return filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
}

// pgCommand builds a PostgreSQL program's command, run as PGOSUser when
// this process is root.
func pgCommand(ctx context.Context, dir, name string, args ...string) (*exec.Cmd, error) {
	c := exec.CommandContext(ctx, filepath.Join(PGBinDir, name), args...)
	c.Dir = dir
	c.Env = append(os.Environ(), "LC_ALL=C")
	uid, gid, ok, err := pgUser()
	if err != nil {
		return nil, err
	}
	if ok {
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	}
	return c, nil
}

// startGrace is how long a started server may take to write postmaster.pid.
const startGrace = 30 * time.Second

// startServer starts the restored server and waits until it has left
// recovery: the postmaster says "ready" and a connection finds
// pg_is_in_recovery() false.
func startServer(ctx context.Context, target string, o *RestoreOptions, res *RestoreResult) error {
	timeout := o.StartTimeout
	if timeout <= 0 {
		timeout = time.Hour
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	logFile := o.LogFile
	if logFile == "" {
		logFile = target + ".log"
	}
	res.LogFile = logFile
	lf, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("pgagent: server log: %w", err)
	}
	logStart, _ := lf.Seek(0, io.SeekEnd) // what this start logs comes after
	lf.Close()
	if uid, gid, ok, err := pgUser(); err != nil {
		return err
	} else if ok {
		if err := os.Chown(logFile, uid, gid); err != nil {
			return fmt.Errorf("pgagent: server log: %w", err)
		}
	}
	pgOpts := "-p " + strconv.Itoa(o.Port)
	for _, s := range o.ServerSettings {
		pgOpts += " -c " + shellQuote(s)
	}
	// -W: do not wait; readiness is judged below, where a server that dies
	// in recovery is noticed at once.
	c, err := pgCommand(ctx, target, "pg_ctl", "-D", target, "-l", logFile, "-W", "-o", pgOpts, "start")
	if err != nil {
		return err
	}
	if out, err := c.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: pg_ctl start: %v: %s%s", ErrRecovery, err, bytes.TrimSpace(out), logTail(logFile))
	}
	url := fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=5", PGOSUser, o.Port)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	started, seen := time.Now(), false
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %v%s", ErrRecovery, ctx.Err(), logTail(logFile))
		case <-tick.C:
		}
		status := pmStatus(target)
		if status != "" {
			seen = true
		}
		if status == "ready" {
			if ok, err := notInRecovery(ctx, url); ok {
				return nil
			} else if err != nil {
				o.Log.Debug("restored server not accepting connections yet", "err", err)
			}
		}
		// pg_ctl -W returns before the postmaster has written
		// postmaster.pid; on a busy machine that takes longer than a
		// tick, and "no server running" then means "not yet". Until the
		// file has appeared, a start has failed only once the log says so
		// (a bad setting) or after a long silence.
		if !seen && time.Since(started) < startGrace && !loggedFatal(logFile, logStart) {
			continue
		}
		if !running(ctx, target) {
			// pg_ctl status can catch postmaster.pid while the server
			// rewrites it (it does at the end of recovery): ask again.
			time.Sleep(300 * time.Millisecond)
			if !running(ctx, target) {
				return fmt.Errorf("%w: the server stopped%s", ErrRecovery, logTail(logFile))
			}
		}
	}
}

// notInRecovery connects and asks pg_is_in_recovery(). A server that
// refuses the connection for lack of a password accepts connections, and
// the postmaster already said it runs as a primary.
func notInRecovery(ctx context.Context, url string) (bool, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, url)
	if err != nil {
		var pe interface{ SQLState() string }
		if errors.As(err, &pe) && strings.HasPrefix(pe.SQLState(), "28") {
			return true, nil
		}
		return false, err
	}
	defer conn.Close(context.Background())
	var rec bool
	if err := conn.QueryRow(cctx, "SELECT pg_is_in_recovery()").Scan(&rec); err != nil {
		return false, err
	}
	return !rec, nil
}

// pmStatus returns the postmaster's status line in postmaster.pid:
// "starting", "standby" (in recovery, read-only), "ready" (a primary
// accepting connections: recovery is over) or "stopping"; "" if none. pg_ctl
// -w reads the same line. pg_control cannot tell: a base backup's copy says
// "in production" before recovery has even begun.
func pmStatus(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, "postmaster.pid"))
	if err != nil {
		return ""
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) < 8 {
		return ""
	}
	return strings.TrimSpace(lines[7])
}

func running(ctx context.Context, dir string) bool {
	c, err := pgCommand(ctx, dir, "pg_ctl", "-D", dir, "status")
	if err != nil {
		return false
	}
	return c.Run() == nil
}

// loggedFatal reports whether the server log, from offset on, has a FATAL
// or PANIC line.
func loggedFatal(p string, offset int64) bool {
	f, err := os.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	b, err := io.ReadAll(io.NewSectionReader(f, offset, 1<<20))
	return err == nil && (bytes.Contains(b, []byte("FATAL:")) || bytes.Contains(b, []byte("PANIC:")))
}

func logTail(p string) string {
	b, err := os.ReadFile(p)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return "\nserver log (" + p + "):\n" + string(b)
}

// deltaRestore restores root into a non-empty target, rewriting only what
// differs: a file is kept when its size and the IDs of its content, cut at
// the lengths of the snapshot's blobs, are equal; everything the snapshot
// does not hold is removed. The restorer then writes the differing paths
// only (as includes), with Overwrite.
//
// Paths in skip (tablespaces restored elsewhere) are neither compared nor
// removed; ropts.Include, if set, must leave them out too.
func deltaRestore(ctx context.Context, r *repo.Repository, root repo.ID, target string, skip map[string]bool, ropts restorer.Options, res *RestoreResult) error {
	if fi, err := os.Lstat(target); errors.Is(err, fs.ErrNotExist) {
		res.Stats, err = restorer.Restore(ctx, r, root, target, ropts)
		return err
	} else if err != nil {
		return err
	} else if !fi.IsDir() {
		return fmt.Errorf("pgagent: target %s is not a directory", target)
	}
	nodes := map[string]*snapshot.Node{}
	err := restorer.Walk(ctx, r, root, func(p string, n *snapshot.Node) error {
		if skip[p] {
			if n.Type == snapshot.Dir {
				return fs.SkipDir
			}
			return nil
		}
		nodes[p] = n
		return nil
	})
	if err != nil {
		return err
	}
	// Remove what the snapshot does not have, or has as another type.
	var removed int
	err = filepath.WalkDir(target, func(abs string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if abs == target {
			return nil
		}
		rel, _ := filepath.Rel(target, abs)
		rel = filepath.ToSlash(rel)
		if skip[rel] {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		n := nodes[rel]
		if n != nil && sameType(n, d.Type()) {
			return nil
		}
		if err := os.RemoveAll(abs); err != nil {
			return err
		}
		removed++
		if d.IsDir() {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("pgagent: delta: %w", err)
	}
	res.Removed = removed

	// Compare what remains, in parallel.
	var (
		mu      sync.Mutex
		differ  []string
		kept    atomic.Int64
		workers = ropts.Workers
	)
	if workers <= 0 {
		workers = 2 * runtime.NumCPU()
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(workers)
	for p, n := range nodes {
		if n.Type == snapshot.Dir {
			abs := filepath.Join(target, filepath.FromSlash(p))
			if holdsSkipped(p, skip) {
				// Including it would restore the skipped paths below it.
				if err := os.MkdirAll(abs, 0o700); err != nil {
					return fmt.Errorf("pgagent: delta: %w", err)
				}
				continue
			}
			if _, err := os.Lstat(abs); err != nil {
				mu.Lock()
				differ = append(differ, p)
				mu.Unlock()
			}
			continue
		}
		g.Go(func() error {
			same, err := sameContent(gctx, r, filepath.Join(target, filepath.FromSlash(p)), n)
			if err != nil {
				return err
			}
			if same {
				kept.Add(1)
				return nil
			}
			mu.Lock()
			differ = append(differ, p)
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return fmt.Errorf("pgagent: delta: %w", err)
	}
	res.Unchanged = int(kept.Load())
	res.Rewritten = 0
	for _, p := range differ {
		if nodes[p].Type != snapshot.Dir {
			res.Rewritten++
		}
	}
	if len(differ) == 0 {
		return nil
	}
	ropts.Overwrite = true
	// Each include is matched against every path; beyond a few thousand,
	// restoring everything costs less than matching.
	if len(differ) <= maxDeltaIncludes {
		ropts.Include = nil
		for _, p := range differ {
			ropts.Include = append(ropts.Include, globEscape(p))
		}
	}
	st, err := restorer.Restore(ctx, r, root, target, ropts)
	res.Stats = st
	return err
}

// holdsSkipped reports whether a path in skip is below dir.
func holdsSkipped(dir string, skip map[string]bool) bool {
	for p := range skip {
		if strings.HasPrefix(p, dir+"/") {
			return true
		}
	}
	return false
}

// maxDeltaIncludes bounds the paths a delta restore names one by one.
const maxDeltaIncludes = 2000

func globEscape(p string) string {
	var b strings.Builder
	for _, c := range p {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func sameType(n *snapshot.Node, t fs.FileMode) bool {
	switch n.Type {
	case snapshot.Dir:
		return t.IsDir()
	case snapshot.File:
		return t.IsRegular()
	case snapshot.Symlink:
		return t&fs.ModeSymlink != 0
	}
	return false // specials are recreated
}

// sameContent reports whether the file at abs equals node n: same type,
// size and content blob IDs. Metadata that differs is fixed in place.
func sameContent(ctx context.Context, r *repo.Repository, abs string, n *snapshot.Node) (bool, error) {
	fi, err := os.Lstat(abs)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	switch n.Type {
	case snapshot.Symlink:
		t, err := os.Readlink(abs)
		return err == nil && t == n.LinkTarget, nil
	case snapshot.File:
	default:
		return false, nil
	}
	if !fi.Mode().IsRegular() || fi.Size() != int64(n.Size) {
		return false, nil
	}
	f, err := os.OpenFile(abs, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return false, err
	}
	defer f.Close()
	rd := bufio.NewReaderSize(f, 1<<20)
	var buf []byte
	var off int64
	for _, id := range n.Content {
		if err := ctx.Err(); err != nil {
			return false, err
		}
		loc, ok := r.Index().Lookup(id)
		if !ok {
			return false, nil // the restorer reports it
		}
		want := min(int64(loc.RawLength), int64(n.Size)-off)
		if int64(cap(buf)) < want {
			buf = make([]byte, want)
		}
		b := buf[:want]
		if _, err := io.ReadFull(rd, b); err != nil {
			return false, nil
		}
		if want < int64(loc.RawLength) || r.BlobID(b) != id {
			return false, nil
		}
		off += want
	}
	if off != int64(n.Size) {
		return false, nil
	}
	// Equal content: set mode, owner and times as the restorer would.
	if err := os.Chmod(abs, n.Mode&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)); err != nil {
		return false, err
	}
	if os.Geteuid() == 0 {
		_ = os.Lchown(abs, int(n.UID), int(n.GID))
	}
	if !n.ModTime.IsZero() {
		at := n.AccessTime
		if at.IsZero() {
			at = n.ModTime
		}
		_ = os.Chtimes(abs, at, n.ModTime)
	}
	return true, nil
}

// walBeyondGap describes WAL the vault holds past a gap that replay from b
// cannot cross, or returns "".
func walBeyondGap(ws *walState, b *BaseBackupInfo) string {
	tli := ws.path.target()
	var last pgwal.LSN
	for _, p := range ws.cat.Pieces() {
		if !p.History && p.Timeline == tli && p.End > last {
			last = p.End
		}
	}
	if last <= b.WALReach {
		return ""
	}
	return fmt.Sprintf("the vault's WAL has a gap at %s (timeline %d): replay stops there, though WAL up to %s is stored",
		b.WALReach, tli, last)
}
