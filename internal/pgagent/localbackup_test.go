package pgagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/restorer"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

func TestRelFileName(t *testing.T) {
	tests := []struct {
		name       string
		node, fork string
		temp, ok   bool
	}{
		{"16384", "16384", "", false, true},
		{"16384.12", "16384", "", false, true},
		{"16384_fsm", "16384", "fsm", false, true},
		{"16384_vm.1", "16384", "vm", false, true},
		{"16384_init", "16384", "init", false, true},
		{"t3_16384", "16384", "", true, true},
		{"t12_16384_fsm.2", "16384", "fsm", true, true},
		{"PG_VERSION", "", "", false, false},
		{"pg_filenode.map", "", "", false, false},
		{"16384_foo", "", "", false, false},
		{"16384.", "", "", false, false},
		{"16384.x", "", "", false, false},
		{"t_16384", "", "", false, false},
		{"12345678901", "", "", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			node, fork, temp, ok := relFileName(tt.name)
			if node != tt.node || fork != tt.fork || temp != tt.temp || ok != tt.ok {
				t.Errorf("relFileName(%q) = %q, %q, %v, %v; want %q, %q, %v, %v", tt.name, node, fork, temp, ok,
					tt.node, tt.fork, tt.temp, tt.ok)
			}
		})
	}
}

func TestExcludedName(t *testing.T) {
	for name, want := range map[string]bool{
		"postmaster.pid": true, "postmaster.opts": true, "pg_internal.init": true, "pg_internal.init.123": true,
		"postgresql.auto.conf.tmp": true, "current_logfiles.tmp": true, "backup_label": true, "tablespace_map": true,
		"backup_manifest": true, "pgsql_tmp": true, "pgsql_tmp123.4": true,
		"postgresql.auto.conf": false, "current_logfiles": false, "PG_VERSION": false, "pg_control": false,
		"backup_label.old": false, "16384": false,
	} {
		if got := excludedName(name); got != want {
			t.Errorf("excludedName(%q) = %v, want %v", name, got, want)
		}
	}
}

// TestBuildManifest reads back what buildManifest writes, odd paths and
// every algorithm included.
func TestBuildManifest(t *testing.T) {
	for _, alg := range []string{"NONE", "CRC32C", "SHA256", "SHA512"} {
		t.Run(alg, func(t *testing.T) {
			var files []ManifestFile
			for _, p := range []string{"base/1/1259", "odd \"name\"\\\t\x01", "not utf-8 \xff", "backup_label"} {
				h, _ := NewFileHash(alg)
				f := ManifestFile{Path: p, Size: int64(len(p)), LastModified: manifestTime(time.Unix(1700000000, 0)), Algorithm: alg}
				if h != nil {
					h.Write([]byte(p))
					f.Checksum = h.Sum(nil)
				}
				files = append(files, f)
			}
			wal := []WALRange{{Timeline: 1, Start: 0x2000028, End: 0x2000100}}
			m, err := ParseManifest(buildManifest(files, wal))
			if err != nil {
				t.Fatal(err)
			}
			if len(m.Files) != len(files) || len(m.WAL) != 1 || m.WAL[0] != wal[0] {
				t.Fatalf("read back %+v", m)
			}
			for i, f := range m.Files {
				if f.Path != files[i].Path || f.Size != files[i].Size || f.Algorithm != alg ||
					fmt.Sprintf("%x", f.Checksum) != fmt.Sprintf("%x", files[i].Checksum) || f.LastModified != "2023-11-14 22:13:20 GMT" {
					t.Errorf("file %d: %+v, want %+v", i, f, files[i])
				}
			}
		})
	}
}

// snapshotPaths lists a snapshot's paths with their types.
func snapshotPaths(t *testing.T, r *repo.Repository, id repo.ID) map[string]snapshot.NodeType {
	t.Helper()
	sn, err := r.LoadSnapshot(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]snapshot.NodeType{}
	err = restorer.Walk(context.Background(), r, sn.Tree, func(p string, n *snapshot.Node) error {
		out[p] = n.Type
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestLocalBaseBackup takes a local base backup under concurrent writes of
// a server with a tablespace, an unlogged and a temporary table: the
// snapshot has BASE_BACKUP's layout without the excluded files, its
// manifest passes pg_verifybackup, and it restores to a point in time.
func TestLocalBaseBackup(t *testing.T) {
	if testing.Short() {
		t.Skip("restores and starts a server")
	}
	ctx := context.Background()
	v := newPGVault(t)
	pg := pgtest.Start(t, pgtest.Options{})
	ts := tablespaceDir(t)
	pg.Exec("postgres", "CREATE TABLESPACE extra LOCATION '"+ts+"'")
	pg.Exec("postgres", "CREATE DATABASE app")
	pg.Exec("app", `CREATE TABLE known (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
		CREATE TABLE important (id int PRIMARY KEY, v text) TABLESPACE extra;
		INSERT INTO important SELECT g, md5(g::text) FROM generate_series(1, 1000) g;
		CREATE UNLOGGED TABLE scratch (id int); INSERT INTO scratch SELECT generate_series(1, 1000)`)
	unlogged := pg.Query("app", "SELECT pg_relation_filepath('scratch')")
	// A temporary table lives as long as its session.
	tmpConn := pg.Conn("app")
	defer tmpConn.Close(ctx)
	if _, err := tmpConn.Exec(ctx, "CREATE TEMP TABLE tmp AS SELECT generate_series(1, 1000) g"); err != nil {
		t.Fatal(err)
	}
	var tmpPath string
	if err := tmpConn.QueryRow(ctx, "SELECT pg_relation_filepath('tmp')").Scan(&tmpPath); err != nil {
		t.Fatal(err)
	}

	actx, stopAgent := context.WithCancel(ctx)
	defer stopAgent()
	agent := NewAgent(v.r, AgentOptions{URL: pg.URL("postgres"), FlushEvery: 100 * time.Millisecond, Slot: "local_test"})
	agentDone := make(chan error, 1)
	go func() { agentDone <- agent.Run(actx) }()

	wr := startWriter(t, pg.URL("app"))
	time.Sleep(200 * time.Millisecond)
	// BASE_BACKUP of the same server just before: the same tree. (The
	// local backup is the newer one, so restore picks it.)
	bb, err := BaseBackup(ctx, v.r, pg.ReplicationURL(), BaseBackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	res, err := BaseBackup(ctx, v.r, pg.URL("postgres"), BaseBackupOptions{DataDir: pg.Dir, Label: "local"})
	if err != nil {
		t.Fatal(err)
	}
	m := res.Meta
	t.Logf("local base backup: %d files, %d KiB, %s–%s in %v", m.Files, m.Size>>10, m.StartLSN, m.EndLSN,
		time.Since(t0).Round(time.Millisecond))
	if m.SystemID == 0 || m.Timeline != 1 || m.EndTimeline != 1 || m.EndLSN <= m.StartLSN || m.CheckpointLSN.IsZero() ||
		m.Label != "local" || !strings.HasPrefix(m.ServerVersion, "15") || m.BackupFrom != "primary" ||
		m.FileChecksums != "CRC32C" || len(m.ManifestChecksum) != 64 || m.Files < 100 {
		t.Errorf("meta %+v", m)
	}
	if len(m.Tablespaces) != 1 || m.Tablespaces[0].Location != ts {
		t.Errorf("tablespaces %+v, want one at %s", m.Tablespaces, ts)
	}
	if fmt.Sprint(bb.Meta.Tablespaces) != fmt.Sprint(m.Tablespaces) {
		t.Errorf("tablespaces: local %+v, BASE_BACKUP %+v", m.Tablespaces, bb.Meta.Tablespaces)
	}
	local, streamed := snapshotPaths(t, v.r, res.ID), snapshotPaths(t, v.r, bb.ID)
	// The two backups are taken one after the other under writes: a free
	// space or visibility map fork that (auto)vacuum creates in between
	// is in one of them only, rightly (seen in a clean-clone run).
	lazyFork := func(p string) bool { return strings.HasSuffix(p, "_fsm") || strings.HasSuffix(p, "_vm") }
	var diff []string
	for p, typ := range local {
		if st, ok := streamed[p]; (!ok && !lazyFork(p)) || (ok && st != typ) {
			diff = append(diff, fmt.Sprintf("local only: %s (%v)", p, typ))
		}
	}
	for p, typ := range streamed {
		if lt, ok := local[p]; (!ok && !lazyFork(p)) || (ok && lt != typ) {
			diff = append(diff, fmt.Sprintf("BASE_BACKUP only: %s (%v)", p, typ))
		}
	}
	sort.Strings(diff)
	if len(diff) > 0 {
		t.Errorf("the snapshots differ:\n%s", strings.Join(diff, "\n"))
	}
	for p, want := range map[string]bool{
		"postmaster.pid": false, "postmaster.opts": false, "backup_label": true, ManifestName: true,
		"pg_wal": true, "pg_wal/archive_status": true, "global/pg_control": true,
		unlogged: false, unlogged + "_init": true, tmpPath: false,
	} {
		if _, ok := local[p]; ok != want {
			t.Errorf("%s in the snapshot: %v, want %v", p, ok, want)
		}
	}
	var tsFiles int
	for p, typ := range local {
		if strings.HasPrefix(p, "pg_wal/") && p != "pg_wal/archive_status" {
			t.Errorf("%s in the snapshot", p)
		}
		if strings.HasPrefix(p, "pg_tblspc/") && typ == snapshot.File {
			tsFiles++
		}
		if p == "pg_tblspc/"+strconv.FormatUint(uint64(m.Tablespaces[0].OID), 10) && typ != snapshot.Dir {
			t.Errorf("%s is a %v", p, typ)
		}
	}
	if tsFiles == 0 {
		t.Error("no tablespace files in the snapshot")
	}
	label := string(readNode(t, v.r, res, "backup_label"))
	if !strings.Contains(label, "START WAL LOCATION: "+m.StartLSN.String()) || !strings.Contains(label, "LABEL: local") {
		t.Errorf("backup_label:\n%s", label)
	}
	man, err := ParseManifest(readNode(t, v.r, res, ManifestName))
	if err != nil {
		t.Fatal(err)
	}
	if len(man.WAL) != 1 || man.WAL[0] != (WALRange{1, m.StartLSN, m.EndLSN}) {
		t.Errorf("manifest WAL %+v", man.WAL)
	}

	pg.Pgbench("-i", "-s", "1", "-q", "app") // more WAL after the backup
	time.Sleep(500 * time.Millisecond)
	T := time.Now()
	time.Sleep(500 * time.Millisecond)
	pg.Exec("app", "DELETE FROM important")
	rows := wr.finish(t)
	waitAgentHolds(t, agent, pg, 30*time.Second)
	stopAgent()
	if err := <-agentDone; err != nil {
		t.Fatal(err)
	}
	pg.Stop()
	v.readable(t)

	o := v.opts(newTarget(t))
	o.Time = T
	// The original tablespace directory still holds the stopped server's
	// files: restore the tablespace elsewhere.
	moved := tablespaceDir(t)
	o.TablespaceMap = map[string]string{ts: moved}
	rres, err := Restore(ctx, v.r, o)
	if err != nil {
		t.Fatal(err)
	}
	if rres.Backup.ID != res.ID {
		t.Fatalf("restored from %s, not the local base backup %s", rres.Backup.ID, res.ID)
	}
	vb := exec.Command(pgtest.Bin("pg_verifybackup"), "--no-parse-wal", o.Target)
	pgtest.RunAsOSUser(vb)
	if out, err := vb.CombinedOutput(); err != nil {
		t.Fatalf("pg_verifybackup: %v\n%s", err, out)
	} else {
		t.Logf("pg_verifybackup: %s", strings.TrimSpace(string(out)))
	}
	srv := pgtest.Attach(t, o.Target)
	srv.Start()
	waitPrimary(t, srv)
	if got := srv.Query("postgres", "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'extra'"); got != moved {
		t.Errorf("tablespace extra at %q, want %s", got, moved)
	}
	checkKnown(t, srv, rows, T)
	if got := srv.Query("app", "SELECT count(*) FROM important"); got != "1000" {
		t.Errorf("important (in the tablespace) holds %s rows, want 1000", got)
	}
	if got := srv.Query("app", "SELECT count(*) FROM scratch"); got != "0" {
		t.Errorf("unlogged scratch holds %s rows after recovery, want 0", got)
	}
}

// TestLocalBaseBackupDroppedTable drops a table as the walk reaches its
// file: the backup goes on without it.
func TestLocalBaseBackupDroppedTable(t *testing.T) {
	ctx := context.Background()
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", "CREATE TABLE doomed (id int); INSERT INTO doomed SELECT generate_series(1, 100000)")
	pg.Exec("postgres", "VACUUM doomed") // makes its _fsm and _vm forks
	doomed := pg.Query("postgres", "SELECT pg_relation_filepath('doomed')")
	env := repotest.New(t, time.Hour)
	var dropped bool
	opts := BaseBackupOptions{DataDir: pg.Dir, beforeFile: func(p string) error {
		if p == doomed {
			// The first segment is only truncated at commit and unlinked
			// at the next checkpoint; the other forks go at once.
			pg.Exec("postgres", "DROP TABLE doomed")
			pg.Exec("postgres", "CHECKPOINT")
			dropped = true
		}
		return nil
	}}
	res, err := BaseBackup(ctx, env.Repo, pg.URL("postgres"), opts)
	if err != nil {
		t.Fatal(err)
	}
	if !dropped {
		t.Fatalf("the walk never reached %s", doomed)
	}
	paths := snapshotPaths(t, env.Repo, res.ID)
	for _, p := range []string{doomed, doomed + "_fsm", doomed + "_vm"} {
		if _, ok := paths[p]; ok {
			t.Errorf("%s, dropped before it was read, is in the snapshot", p)
		}
	}
	man, err := ParseManifest(readNode(t, env.Repo, res, ManifestName))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range man.Files {
		if strings.HasPrefix(f.Path, doomed) {
			t.Errorf("the manifest lists %s", f.Path)
		}
	}
}

// TestLocalBaseBackupRefused: a data directory of another cluster, or none,
// is refused before pg_backup_start.
func TestLocalBaseBackupRefused(t *testing.T) {
	ctx := context.Background()
	pg := pgtest.Start(t, pgtest.Options{})
	other := pgtest.Start(t, pgtest.Options{})
	env := repotest.New(t, time.Hour)
	tests := []struct {
		name, dir string
		is        error
		msg       string
	}{
		{"another cluster", other.Dir, ErrOtherCluster, "system"},
		{"not a data directory", t.TempDir(), nil, "not a PostgreSQL data directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			started := false
			_, err := BaseBackup(ctx, env.Repo, pg.URL("postgres"), BaseBackupOptions{DataDir: tt.dir,
				beforeFile: func(string) error { started = true; return nil }})
			if err == nil || (tt.is != nil && !errors.Is(err, tt.is)) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tt.is, tt.msg)
			}
			t.Log(err)
			if started {
				t.Error("the walk started")
			}
		})
	}
	all, _, err := env.Repo.Snapshots(ctx)
	if err != nil || len(all) != 0 {
		t.Errorf("snapshots after refused backups: %v, %v", all, err)
	}
}

// TestLocalBaseBackupAbandoned: an error mid-walk fails the backup, commits
// nothing, and the server takes another backup at once.
func TestLocalBaseBackupAbandoned(t *testing.T) {
	ctx := context.Background()
	pg := pgtest.Start(t, pgtest.Options{})
	env := repotest.New(t, time.Hour)
	boom := errors.New("unreadable")
	n := 0
	_, err := BaseBackup(ctx, env.Repo, pg.URL("postgres"), BaseBackupOptions{DataDir: pg.Dir,
		beforeFile: func(p string) error {
			if n++; n == 200 {
				return fmt.Errorf("%s: %w", p, boom)
			}
			return nil
		}})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want the walk's error", err)
	}
	t.Log(err)
	all, _, err := env.Repo.Snapshots(ctx)
	if err != nil || len(all) != 0 {
		t.Errorf("snapshots after a failed backup: %v, %v", all, err)
	}
	// The vault is opened again, as each `dualkey pg basebackup` does: a
	// Repository keeps the error of an upload that the abandoned backup's
	// end cancelled (repo's upErr), and refuses to save after it.
	t0 := time.Now()
	res, err := BaseBackup(ctx, env.Reopen(t), pg.URL("postgres"), BaseBackupOptions{DataDir: filepath.Clean(pg.Dir + "/"),
		ManifestChecksums: "SHA256"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the next backup took %v", time.Since(t0).Round(time.Millisecond))
	if res.Meta.FileChecksums != "SHA256" {
		t.Errorf("file checksums %q", res.Meta.FileChecksums)
	}
	// The server ended the abandoned backup when its session closed.
	if log, _ := os.ReadFile(pg.LogFile()); !strings.Contains(string(log), "aborting backup due to backend exiting before pg_backup_stop was called") {
		t.Errorf("the server did not abort the backup; its log:\n%s", tailString(string(log), 2000))
	}
}

// TestReadPiece reads files of awkward sizes as sendFile does, with
// O_DIRECT where the file system allows it: the content is exact.
func TestReadPiece(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int{0, 3, alignBlock - 1, alignBlock, readSize, readSize + 1, 3*readSize + 100} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			want := make([]byte, size)
			for i := range want {
				want[i] = byte(i * 7 / 3)
			}
			p := filepath.Join(dir, strconv.Itoa(size))
			if err := os.WriteFile(p, want, 0o600); err != nil {
				t.Fatal(err)
			}
			f, direct, err := openForBackup(p, true)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			t.Logf("O_DIRECT: %v", direct)
			buf := alignedBuffer(readSize)
			var got []byte
			// Ask for more than there is, as for a file that shrank.
			for left := int64(size) + 10; left > 0; {
				n, err := readPiece(f, buf, left, &direct)
				got = append(got, buf[:n]...)
				left -= int64(n)
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(got, want) {
				t.Errorf("read %d bytes, want %d (equal prefix: %v)", len(got), len(want), bytes.HasPrefix(want, got))
			}
		})
	}
}
