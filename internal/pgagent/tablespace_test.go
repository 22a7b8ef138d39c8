package pgagent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/pgwal"
)

func TestParseTablespaceMapping(t *testing.T) {
	tests := []struct {
		in, from, to string
		ok           bool
	}{
		{"16384=/srv/ts", "16384", "/srv/ts", true},
		{"/old/ts=/new/ts", "/old/ts", "/new/ts", true},
		{`/old/a\=b=/new/c\=d`, "/old/a=b", "/new/c=d", true},
		{"/old", "", "", false},
		{"=/new", "", "", false},
		{"/old=", "", "", false},
		{"/a=/b=/c", "", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			from, to, err := ParseTablespaceMapping(tt.in)
			if (err == nil) != tt.ok || from != tt.from || to != tt.to {
				t.Errorf("ParseTablespaceMapping(%q) = %q, %q, %v", tt.in, from, to, err)
			}
		})
	}
}

func TestPlaceTablespaces(t *testing.T) {
	dir := t.TempDir()
	full := filepath.Join(dir, "full")
	os.MkdirAll(full, 0o700)
	os.WriteFile(filepath.Join(full, "f"), nil, 0o600)
	target := filepath.Join(dir, "data")
	tss := []Tablespace{{OID: 16384, Location: "/old/a"}, {OID: 16385, Location: "/old/b"}}
	tests := []struct {
		name    string
		mapping map[string]string
		delta   bool
		want    []string // locations, or nil for an error
		err     error
	}{
		{"none", nil, false, []string{"/old/a", "/old/b"}, nil},
		{"by oid", map[string]string{"16384": "/new/a"}, false, []string{"/new/a", "/old/b"}, nil},
		{"by path", map[string]string{"/old/b/": "/new/b"}, false, []string{"/old/a", "/new/b"}, nil},
		{"both ways, same place", map[string]string{"16384": "/new/a", "/old/a": "/new/a"}, false, []string{"/new/a", "/old/b"}, nil},
		{"both ways, two places", map[string]string{"16384": "/new/a", "/old/a": "/new/x"}, false, nil, nil},
		{"unknown", map[string]string{"16386": "/new/a"}, false, nil, nil},
		{"inside target", map[string]string{"16384": filepath.Join(target, "ts")}, false, nil, ErrTablespaceInTarget},
		{"is target", map[string]string{"16384": target}, false, nil, ErrTablespaceInTarget},
		{"holds target", map[string]string{"16384": dir}, false, nil, ErrTablespaceInTarget},
		{"shared", map[string]string{"16384": "/new/a", "16385": "/new/a/b"}, false, nil, nil},
		{"not empty", map[string]string{"16384": full}, false, nil, ErrTargetNotEmpty},
		{"not empty, delta", map[string]string{"16384": full}, true, []string{full, "/old/b"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := placeTablespaces(target, tss, tt.mapping, tt.delta)
			if tt.want == nil {
				if err == nil || (tt.err != nil && !errors.Is(err, tt.err)) {
					t.Fatalf("placeTablespaces = %+v, %v; want error %v", got, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for i, ts := range got {
				if ts.Location != tt.want[i] || ts.Original != tss[i].Location || ts.OID != tss[i].OID {
					t.Errorf("tablespace %d: %+v, want location %s", i, ts, tt.want[i])
				}
			}
		})
	}
}

// TestRestoreTablespaces restores a cluster with a tablespace after the
// cluster and the tablespace's directory are gone: into the original
// location and, from a BASE_BACKUP one, into a mapped one; the server
// starts without allow_in_place_tablespaces and the table in the
// tablespace holds its rows. A delta restore rewrites a damaged file
// inside the tablespace. A location that is not empty, or inside the
// target, is refused before anything is written.
func TestRestoreTablespaces(t *testing.T) {
	if testing.Short() {
		t.Skip("restores and starts servers")
	}
	ctx := context.Background()
	v := newPGVault(t)
	pg := pgtest.Start(t, pgtest.Options{})
	ts := tablespaceDir(t)
	pg.Exec("postgres", "CREATE TABLESPACE extra LOCATION '"+ts+"'")
	pg.Exec("postgres", "CREATE DATABASE app")
	pg.Exec("app", `CREATE TABLE important (id int PRIMARY KEY, v text) TABLESPACE extra;
		INSERT INTO important SELECT g, md5(g::text) FROM generate_series(1, 1000) g`)
	oid := pg.Query("postgres", "SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
	ag := runAgent(t, v.r, AgentOptions{URL: pg.URL("postgres"), Slot: "ts_test"})

	// BASE_BACKUP, rows, an LSN between the two backups, then the local one.
	bb, err := BaseBackup(ctx, v.r, pg.ReplicationURL(), BaseBackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pg.Exec("app", "INSERT INTO important SELECT g, md5(g::text) FROM generate_series(1001, 1500) g")
	between, err := pgwal.ParseLSN(pg.Query("postgres", "SELECT pg_current_wal_lsn()::text"))
	if err != nil {
		t.Fatal(err)
	}
	pg.Exec("postgres", "SELECT pg_switch_wal()")
	lb, err := BaseBackup(ctx, v.r, pg.URL("postgres"), BaseBackupOptions{DataDir: pg.Dir})
	if err != nil {
		t.Fatal(err)
	}
	pg.Exec("app", "INSERT INTO important SELECT g, md5(g::text) FROM generate_series(1501, 2000) g")
	ag.waitDurable(t, currentLSN(t, pg), 30*time.Second)
	ag.stop(t)
	pg.Stop()
	// The disaster: the data directory and the tablespace's are gone (the
	// location itself stays, empty, as after an rm -rf of its contents).
	ents, _ := os.ReadDir(ts)
	for _, e := range ents {
		os.RemoveAll(filepath.Join(ts, e.Name()))
	}
	os.RemoveAll(pg.Dir)
	v.readable(t)

	t.Run("refused", func(t *testing.T) {
		full := t.TempDir()
		if err := os.WriteFile(filepath.Join(full, "keep"), []byte("mine"), 0o600); err != nil {
			t.Fatal(err)
		}
		o := v.opts(newTarget(t))
		o.Latest = true
		o.TablespaceMap = map[string]string{oid: full}
		if _, err := Restore(ctx, v.r, o); !errors.Is(err, ErrTargetNotEmpty) || !strings.Contains(err.Error(), full) {
			t.Errorf("restore into a non-empty tablespace location: %v, want ErrTargetNotEmpty naming it", err)
		}
		if ents, _ := os.ReadDir(full); len(ents) != 1 {
			t.Errorf("the non-empty location holds %d entries after the refusal", len(ents))
		}
		if _, err := os.Lstat(o.Target); !os.IsNotExist(err) {
			t.Errorf("target written despite the refusal: %v", err)
		}
		o.TablespaceMap = map[string]string{ts: filepath.Join(o.Target, "ts")}
		if _, err := Restore(ctx, v.r, o); !errors.Is(err, ErrTablespaceInTarget) {
			t.Errorf("restore of a tablespace into the target: %v, want ErrTablespaceInTarget", err)
		}
		if _, err := os.Lstat(o.Target); !os.IsNotExist(err) {
			t.Errorf("target written despite the refusal: %v", err)
		}
	})

	t.Run("original location, local backup, delta", func(t *testing.T) {
		o := v.opts(newTarget(t))
		o.Latest = true
		res, err := Restore(ctx, v.r, o)
		if err != nil {
			t.Fatal(err)
		}
		if res.Backup.ID != lb.ID {
			t.Fatalf("restored from %s, want the local backup %s", res.Backup.ID, lb.ID)
		}
		checkLink(t, o.Target, oid, ts, res)
		// The tablespace location is not empty now: refused without delta.
		o2 := v.opts(newTarget(t))
		o2.Latest = true
		if _, err := Restore(ctx, v.r, o2); !errors.Is(err, ErrTargetNotEmpty) {
			t.Errorf("second restore to the same tablespace location: %v, want ErrTargetNotEmpty", err)
		}
		// Damage a file in the tablespace; delta rewrites it through the link.
		var victim string
		filepath.WalkDir(ts, func(p string, d os.DirEntry, err error) error {
			if victim == "" && err == nil && d.Type().IsRegular() {
				if fi, _ := d.Info(); fi.Size() >= 16384 {
					victim = p
				}
			}
			return nil
		})
		if victim == "" {
			t.Fatal("no relation file in the restored tablespace")
		}
		f, err := os.OpenFile(victim, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte("not a page"), 100)
		f.Close()
		stray := filepath.Join(ts, "stray")
		os.WriteFile(stray, []byte("x"), 0o600)
		o.Delta = true
		dres, err := Restore(ctx, v.r, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("delta: %d rewritten, %d unchanged, %d removed", dres.Rewritten, dres.Unchanged, dres.Removed)
		// The damaged file and postgresql.auto.conf; the stray file and
		// what recovery preparation added (recovery.signal).
		if dres.Rewritten != 2 || dres.Removed == 0 || dres.Unchanged == 0 {
			t.Errorf("delta: %d rewritten, %d removed, %d unchanged; want 2, some, many", dres.Rewritten, dres.Removed, dres.Unchanged)
		}
		if _, err := os.Lstat(stray); !os.IsNotExist(err) {
			t.Errorf("stray file in the tablespace kept: %v", err)
		}
		checkLink(t, o.Target, oid, ts, dres)
		srv := pgtest.Attach(t, o.Target)
		srv.Start()
		waitPrimary(t, srv)
		if got := srv.Query("app", "SELECT count(*) FROM important"); got != "2000" {
			t.Errorf("important holds %s rows, want 2000", got)
		}
		if got := srv.Query("app", "SELECT count(*) FROM important WHERE v <> md5(id::text)"); got != "0" {
			t.Errorf("%s rows of important differ", got)
		}
		if got := srv.Query("postgres", "SELECT pg_tablespace_location("+oid+")"); got != ts {
			t.Errorf("the restored server has tablespace %s at %q, want %s", oid, got, ts)
		}
		srv.Stop()
	})

	t.Run("mapped location, BASE_BACKUP", func(t *testing.T) {
		moved := filepath.Join(filepath.Dir(newTarget(t)), "elsewhere", "ts")
		o := v.opts(newTarget(t))
		o.LSN = between
		o.TablespaceMap = map[string]string{ts: moved}
		res, err := Restore(ctx, v.r, o)
		if err != nil {
			t.Fatal(err)
		}
		if res.Backup.ID != bb.ID {
			t.Fatalf("restored from %s, want the BASE_BACKUP one %s", res.Backup.ID, bb.ID)
		}
		checkLink(t, o.Target, oid, moved, res)
		srv := pgtest.Attach(t, o.Target)
		srv.Start()
		waitPrimary(t, srv)
		if got := srv.Query("app", "SELECT count(*) FROM important"); got != "1500" {
			t.Errorf("important holds %s rows, want 1500", got)
		}
		if got := srv.Query("app", "SELECT count(*) FROM important WHERE v <> md5(id::text)"); got != "0" {
			t.Errorf("%s rows of important differ", got)
		}
		if got := srv.Query("postgres", "SELECT pg_tablespace_location("+oid+")"); got != moved {
			t.Errorf("the restored server has tablespace %s at %q, want %s", oid, got, moved)
		}
		srv.Stop()
	})
}

// checkLink checks that pg_tblspc/<oid> links to loc, a directory owned
// like the data directory, and that the result says so.
func checkLink(t *testing.T, target, oid, loc string, res *RestoreResult) {
	t.Helper()
	link := filepath.Join(target, "pg_tblspc", oid)
	if got, err := os.Readlink(link); err != nil || got != loc {
		t.Errorf("%s links to %q (%v), want %s", link, got, err, loc)
	}
	if len(res.Tablespaces) != 1 || strconv.FormatUint(uint64(res.Tablespaces[0].OID), 10) != oid || res.Tablespaces[0].Location != loc {
		t.Errorf("result tablespaces %+v, want %s at %s", res.Tablespaces, oid, loc)
	}
	fi, err := os.Stat(loc)
	if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("tablespace location %s: %v %v", loc, fi, err)
	}
	dfi, err := os.Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := ownerOf(fi), ownerOf(dfi); a != b {
		t.Errorf("tablespace location owned by %d, data directory by %d", a, b)
	}
}

func ownerOf(fi os.FileInfo) uint32 { return fi.Sys().(*syscall.Stat_t).Uid }
