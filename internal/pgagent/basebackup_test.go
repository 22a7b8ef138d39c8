package pgagent

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/restorer"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

var update = flag.Bool("update", false, "rewrite testdata/backup_manifest from a real server")

func TestIsRelationFile(t *testing.T) {
	tests := []struct {
		path string
		want bool
	}{
		{"base/1/1259", true},
		{"base/16384/16397.1", true},
		{"base/16384/16397_fsm", true},
		{"base/16384/16397_vm", true},
		{"base/16384/16397_init", true},
		{"global/1262", true},
		{"pg_tblspc/16385/PG_15_202209061/5/16386", true},
		{"global/pg_control", false},
		{"global/pg_filenode.map", false},
		{"base/1/PG_VERSION", false},
		{"base/1/pg_filenode.map", false},
		{"pg_xact/0000", false},
		{"pg_multixact/offsets/0000", false},
		{"16384", false},
		{"base/16384/16397.x", false},
	}
	for _, tt := range tests {
		if got := IsRelationFile(tt.path); got != tt.want {
			t.Errorf("IsRelationFile(%q) = %v, want %v", tt.path, got, tt.want)
		}
	}
}

// tablespaceDir makes a directory the server's OS user can use as a
// tablespace location.
func tablespaceDir(t *testing.T) string {
	base, err := os.MkdirTemp("", "pgagent-ts-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	dir := filepath.Join(base, "ts")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := pgtest.Own(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestBaseBackup takes a base backup of a server with a tablespace, checks
// what the snapshot holds, restores it, adds the server's WAL and starts it.
func TestBaseBackup(t *testing.T) {
	ctx := context.Background()
	srv := pgtest.Start(t, pgtest.Options{})
	ts := tablespaceDir(t)
	srv.Exec("postgres", "CREATE TABLESPACE extra LOCATION '"+ts+"'")
	srv.Exec("postgres", `CREATE TABLE t (id int PRIMARY KEY, v text);
		INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g;
		CREATE TABLE u (id int) TABLESPACE extra; INSERT INTO u SELECT generate_series(1, 1000)`)
	env := repotest.New(t, time.Hour)

	res, err := BaseBackup(ctx, env.Repo, srv.ReplicationURL(), BaseBackupOptions{Label: "it's a test", Tags: []string{"t"}})
	if err != nil {
		t.Fatal(err)
	}
	m := res.Meta
	t.Logf("meta: %+v", m)
	if m.SystemID == 0 || m.Timeline != 1 || m.StartLSN.IsZero() || m.EndLSN <= m.StartLSN || m.CheckpointLSN.IsZero() ||
		m.Label != "it's a test" || !strings.HasPrefix(m.ServerVersion, "15") || m.BackupFrom != "primary" ||
		m.FileChecksums != "CRC32C" || len(m.ManifestChecksum) != 64 || m.Files < 100 || m.Size < 2<<20 {
		t.Errorf("meta %+v", m)
	}
	if len(m.Tablespaces) != 1 || m.Tablespaces[0].Location != ts {
		t.Errorf("tablespaces %+v, want one at %s", m.Tablespaces, ts)
	}
	if res.Summary.Bytes != m.Size+int64(len(readNode(t, env.Repo, res, ManifestName))) {
		t.Errorf("summary bytes %d, meta size %d", res.Summary.Bytes, m.Size)
	}

	sn, err := env.Repo.LoadSnapshot(ctx, res.ID)
	if err != nil {
		t.Fatal(err)
	}
	if sn.Kind != snapshot.KindPGBase || sn.Hostname == "" || !strings.Contains(strings.Join(sn.Tags, ","), BaseTag) {
		t.Errorf("snapshot %+v", sn)
	}
	got, err := DecodeBaseMeta(sn.Meta)
	if err != nil || got.StartLSN != m.StartLSN || got.EndLSN != m.EndLSN || got.SystemID != m.SystemID {
		t.Errorf("stored meta %s: %+v, %v", sn.Meta, got, err)
	}
	if !strings.Contains(string(sn.Meta), `"start_lsn":"`+m.StartLSN.String()+`"`) {
		t.Errorf("meta JSON does not show LSNs as text: %s", sn.Meta)
	}

	label := string(readNode(t, env.Repo, res, "backup_label"))
	if !strings.Contains(label, "START WAL LOCATION: "+m.StartLSN.String()) || !strings.Contains(label, "LABEL: it's a test") {
		t.Errorf("backup_label:\n%s", label)
	}
	t.Logf("backup_label:\n%s", label)
	man, err := ParseManifest(readNode(t, env.Repo, res, ManifestName))
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile("testdata/backup_manifest", readNode(t, env.Repo, res, ManifestName), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// Relation files are in pages, the rest in content-defined chunks; the
	// tablespace's files are under pg_tblspc/<oid>/, where no symlink is.
	var rels, tsFiles int
	err = restorer.Walk(ctx, env.Repo, sn.Tree, func(p string, n *snapshot.Node) error {
		if n.Type != snapshot.File {
			if strings.HasPrefix(p, "pg_tblspc/") && n.Type == snapshot.Symlink {
				t.Errorf("%s is a symlink", p)
			}
			return nil
		}
		want := "cdc"
		if IsRelationFile(p) {
			want = "pages:8192"
			rels++
		}
		if n.Chunking != want {
			t.Errorf("%s cut %q, want %q", p, n.Chunking, want)
		}
		if strings.HasPrefix(p, "pg_tblspc/") {
			tsFiles++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if rels < 100 || tsFiles == 0 {
		t.Errorf("%d relation files, %d in the tablespace", rels, tsFiles)
	}
	var manTS int
	for _, f := range man.Files {
		if strings.HasPrefix(f.Path, "pg_tblspc/") {
			manTS++
		}
	}
	if manTS != tsFiles {
		t.Errorf("manifest lists %d tablespace files, the snapshot holds %d", manTS, tsFiles)
	}

	// The backup plus the WAL from its start is a cluster that starts.
	srv.Exec("postgres", "SELECT pg_switch_wal()")
	target := filepath.Join(t.TempDir(), "restored")
	if _, err := restorer.Restore(ctx, env.Repo, sn.Tree, target, restorer.Options{}); err != nil {
		t.Fatal(err)
	}
	walDir := filepath.Join(target, "pg_wal")
	if err := os.MkdirAll(walDir, 0o700); err != nil {
		t.Fatal(err)
	}
	segs, _ := filepath.Glob(filepath.Join(srv.Dir, "pg_wal", "0000000*"))
	for _, s := range segs {
		b, err := os.ReadFile(s)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(walDir, filepath.Base(s)), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// What restore must do with a tablespace: move pg_tblspc/<oid> to a
	// location of its own (here a new one) and link it back.
	for _, tsp := range m.Tablespaces {
		in := filepath.Join(target, "pg_tblspc", strconv.FormatUint(uint64(tsp.OID), 10))
		loc := filepath.Join(tablespaceDir(t), "moved")
		if err := os.Rename(in, loc); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(loc, in); err != nil {
			t.Fatal(err)
		}
		if err := pgtest.Own(loc); err != nil {
			t.Fatal(err)
		}
	}
	restored := pgtest.Attach(t, target)
	restored.Start()
	if n := restored.Query("postgres", "SELECT count(*) FROM t"); n != "20000" {
		t.Errorf("restored t has %s rows", n)
	}
	if n := restored.Query("postgres", "SELECT sum(id) FROM u"); n != "500500" {
		t.Errorf("restored u (in the tablespace) sums to %s", n)
	}
}

// readNode reads the file at p in a backup's snapshot.
func readNode(t *testing.T, r *repo.Repository, res *BaseBackupResult, p string) []byte {
	t.Helper()
	var buf bytes.Buffer
	sn, err := r.LoadSnapshot(context.Background(), res.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := restorer.Dump(context.Background(), r, sn.Tree, p, &buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestBaseBackupCorrupted damages one file in transit: the manifest check
// fails the backup, naming the file, and nothing is committed.
func TestBaseBackupCorrupted(t *testing.T) {
	ctx := context.Background()
	srv := pgtest.Start(t, pgtest.Options{})
	env := repotest.New(t, time.Hour)
	opts := BaseBackupOptions{corrupt: func(p string, r io.Reader) io.Reader {
		if p != "PG_VERSION" {
			return r
		}
		b, _ := io.ReadAll(r)
		b[0] ^= 1
		return bytes.NewReader(b)
	}}
	_, err := BaseBackup(ctx, env.Repo, srv.ReplicationURL(), opts)
	if !errors.Is(err, ErrManifest) || !strings.Contains(err.Error(), "PG_VERSION: CRC32C checksum") {
		t.Fatalf("err = %v, want a manifest mismatch naming PG_VERSION", err)
	}
	t.Log(err)
	all, _, err := env.Repo.Snapshots(ctx)
	if err != nil || len(all) != 0 {
		t.Errorf("snapshots after a failed backup: %v, %v", all, err)
	}
	// The same server backs up fine without the damage, checksummed with
	// SHA-256 this time.
	res, err := BaseBackup(ctx, env.Repo, srv.ReplicationURL(), BaseBackupOptions{ManifestChecksums: "sha256"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Meta.FileChecksums != "SHA256" {
		t.Errorf("file checksums %q", res.Meta.FileChecksums)
	}
}

// relPages maps each relation file of a snapshot to its page blob IDs.
func relPages(t *testing.T, r *repo.Repository, tree repo.ID) map[string][]repo.ID {
	out := map[string][]repo.ID{}
	err := restorer.Walk(context.Background(), r, tree, func(p string, n *snapshot.Node) error {
		if n.Type == snapshot.File && IsRelationFile(p) {
			out[p] = n.Content
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// pageLSN is a page's pd_lsn: its first 8 bytes, xlogid and xrecoff, each
// a little-endian uint32 on this platform.
func pageLSN(b []byte) uint64 {
	if len(b) < 8 {
		return 0
	}
	return uint64(binary.LittleEndian.Uint32(b[0:4]))<<32 | uint64(binary.LittleEndian.Uint32(b[4:8]))
}

// TestSecondBaseBackupStoresChangedPages measures what issue 4 asks: a
// second base backup after a pgbench run must store little more than the
// pages whose LSN moved.
func TestSecondBaseBackupStoresChangedPages(t *testing.T) {
	if testing.Short() {
		t.Skip("pgbench scale 10")
	}
	ctx := context.Background()
	srv := pgtest.Start(t, pgtest.Options{})
	srv.Pgbench("-i", "-s", "10", "-q", "postgres")
	env := repotest.New(t, time.Hour)

	t0 := time.Now()
	first, err := BaseBackup(ctx, env.Repo, srv.ReplicationURL(), BaseBackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d1 := time.Since(t0)
	srv.Pgbench("-c", "2", "-T", "5", "postgres")
	srv.Exec("postgres", "CHECKPOINT")
	t0 = time.Now()
	second, err := BaseBackup(ctx, env.Repo, srv.ReplicationURL(), BaseBackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d2 := time.Since(t0)

	s1, err := env.Repo.LoadSnapshot(ctx, first.ID)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := env.Repo.LoadSnapshot(ctx, second.ID)
	if err != nil {
		t.Fatal(err)
	}
	p1, p2 := relPages(t, env.Repo, s1.Tree), relPages(t, env.Repo, s2.Tree)
	load := func(id repo.ID) []byte {
		b, err := env.Repo.LoadBlob(ctx, pack.Data, id)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var pages, lsnMoved, contentChanged int64
	for p, ids := range p2 {
		old := p1[p]
		for i, id := range ids {
			pages++
			if i < len(old) && old[i] == id {
				continue // the same content, so the same LSN
			}
			contentChanged++
			if i >= len(old) || pageLSN(load(id)) != pageLSN(load(old[i])) {
				lsnMoved++
			}
		}
	}
	// Everything that is not a relation file may be new in full: it is
	// cut into content-defined chunks (pg_xact, pg_control, the manifest,
	// ...). That, not a percentage, is the honest allowance; it must itself
	// be small for the bound to mean anything.
	var other int64
	err = restorer.Walk(ctx, env.Repo, s2.Tree, func(p string, n *snapshot.Node) error {
		if n.Type == snapshot.File && !IsRelationFile(p) {
			other += int64(n.Size)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A page can also change without its LSN moving: hint bits set by a
	// reader are not WAL-logged unless data checksums or wal_log_hints are
	// on. Such a page is new content and costs a page; it is counted on
	// its own and must stay rare, or the bound would stop measuring LSNs.
	hintOnly := contentChanged - lsnMoved
	added := second.Summary.BytesAdded
	bound := (lsnMoved+hintOnly)*PageSize + other
	t.Logf("full base backup: %d bytes in %d files, %d relation pages; first backup took %v and added %d bytes",
		second.Meta.Size, second.Meta.Files, pages, d1.Round(time.Millisecond), first.Summary.BytesAdded)
	t.Logf("after pgbench -c 2 -T 5 and CHECKPOINT: %d pages with a moved LSN (%d bytes), %d more with only hint bits changed; non-relation files %d bytes",
		lsnMoved, lsnMoved*PageSize, hintOnly, other)
	t.Logf("second backup took %v and added %d bytes (%.1f%% of the full backup; %.2f× the changed pages)",
		d2.Round(time.Millisecond), added, 100*float64(added)/float64(second.Meta.Size), float64(added)/float64(max(lsnMoved*PageSize, 1)))
	if other > 16<<20 {
		t.Errorf("non-relation files are %d bytes: the allowance would hide page-level dedup failing", other)
	}
	if hintOnly > lsnMoved/100+16 {
		t.Errorf("%d pages changed without their LSN moving, against %d that moved", hintOnly, lsnMoved)
	}
	if lsnMoved == 0 || lsnMoved > pages*9/10 {
		t.Errorf("%d of %d pages moved: the workload did not do what the test needs", lsnMoved, pages)
	}
	if added > bound {
		t.Errorf("second backup added %d bytes, more than (%d moved + %d hint-bit) pages × 8192 + %d bytes of other files = %d",
			added, lsnMoved, hintOnly, other, bound)
	}
}

// TestBaseBackupOpensVaultMeanwhile: given Open instead of a repository,
// the backup opens the vault while the server starts, and an Open that
// fails fails the backup with its own error and commits nothing.
func TestBaseBackupOpensVaultMeanwhile(t *testing.T) {
	ctx := context.Background()
	srv := pgtest.Start(t, pgtest.Options{})
	srv.Exec("postgres", "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 5000) g")
	env := repotest.New(t, time.Hour)

	wrong := errors.New("test: wrong password")
	_, err := BaseBackup(ctx, nil, srv.ReplicationURL(), BaseBackupOptions{Open: func(context.Context) (*repo.Repository, error) {
		time.Sleep(100 * time.Millisecond) // still opening when the stream starts
		return nil, wrong
	}})
	if !errors.Is(err, wrong) {
		t.Fatalf("err = %v, want the Open error", err)
	}
	if snaps, _, err := env.Repo.Snapshots(ctx); err != nil || len(snaps) != 0 {
		t.Fatalf("%d snapshots after a failed open (%v)", len(snaps), err)
	}
	if _, err := BaseBackup(ctx, nil, srv.ReplicationURL(), BaseBackupOptions{}); err == nil {
		t.Fatal("no repository and no Open: accepted")
	}

	res, err := BaseBackup(ctx, nil, srv.ReplicationURL(), BaseBackupOptions{Open: func(context.Context) (*repo.Repository, error) {
		return env.Repo, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	if snaps, _, err := env.Repo.Snapshots(ctx); err != nil || len(snaps) != 1 || snaps[0].ID != res.ID {
		t.Fatalf("snapshots %v (%v), want the one backup %s", snaps, err, res.ID)
	}
}
