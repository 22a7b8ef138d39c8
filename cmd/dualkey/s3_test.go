package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/s3test"
	"github.com/dualkey/dualkey/internal/vault/backend/s3"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// s3CLI returns a cli for a vault in a new bucket of the test server,
// holding the server's root credentials.
func s3CLI(t *testing.T, srv *s3test.Server, opts s3test.BucketOptions) (*cli, s3.Config) {
	t.Helper()
	cfg := srv.NewBucket(t, opts)
	c := newCLI(t, s3test.Location(cfg))
	for _, kv := range s3test.Env(cfg) {
		k, v, _ := strings.Cut(kv, "=")
		c = c.with(k, v)
	}
	return c, cfg
}

// bucketObject is one version in the bucket as the root account sees it.
type bucketObject struct {
	key, version string
	mode         string
	until        time.Time
}

// objects lists every version under the vault's prefix with its retention,
// read with the root credentials.
func objects(t *testing.T, srv *s3test.Server, cfg s3.Config, typ string) []bucketObject {
	t.Helper()
	ctx := context.Background()
	root, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	prefix := cfg.Prefix + "/" + typ
	if typ != "config" {
		prefix += "/"
	}
	var out []bucketObject
	for o := range root.ListObjectsIter(ctx, cfg.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true, WithVersions: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		if o.IsDeleteMarker {
			continue
		}
		mode, until, err := srv.Retention(ctx, cfg.Bucket, o.Key, o.VersionID)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, bucketObject{key: o.Key, version: o.VersionID, mode: mode, until: until})
	}
	return out
}

// TestS3Vault runs the vault on S3 with Object Lock through the CLI:
// init refuses a bucket without Object Lock; backup, restore and verify
// work; every object is locked in COMPLIANCE mode until at least the date
// its snapshot needs; the bucket's root account cannot delete or overwrite
// a locked pack; extending a lock extends the objects; extend-locks rolls
// the never-removed objects forward.
func TestS3Vault(t *testing.T) {
	srv := s3test.Start(t)

	t.Run("init refuses a bucket without object lock", func(t *testing.T) {
		c, _ := s3CLI(t, srv, s3test.BucketOptions{NoObjectLock: true})
		if e := c.code(exitUsage, "vault", "init"); !strings.Contains(e, "--no-object-lock") || !strings.Contains(e, "Object Lock") {
			t.Errorf("init on a plain bucket: %s", e)
		}
		_, errs, code := c.run("vault", "init", "--no-object-lock")
		if code != exitOK || !strings.Contains(errs, "no Object Lock") {
			t.Errorf("init --no-object-lock: exit %d, %s", code, errs)
		}
		c.ok("backup", makeTree(t))
		if out := c.ok("vault", "extend-locks"); !strings.Contains(out, "no object lock") {
			t.Errorf("extend-locks without object lock: %s", out)
		}
	})

	t.Run("self-signed server", func(t *testing.T) {
		tlsSrv := s3test.StartTLS(t)
		c, _ := s3CLI(t, tlsSrv, s3test.BucketOptions{})
		if e := c.code(exitError, "vault", "init"); !strings.Contains(e, "certificate") {
			t.Errorf("init against an untrusted certificate: %s", e)
		}
		c = c.with("DUALKEY_S3_CACERT", tlsSrv.CACert)
		c.ok("vault", "init")
		c.ok("backup", makeTree(t))
	})

	t.Run("wrong credentials", func(t *testing.T) {
		c, _ := s3CLI(t, srv, s3test.BucketOptions{})
		c.ok("vault", "init")
		if e := c.with("AWS_SECRET_ACCESS_KEY", "wrong").code(exitError, "snapshots"); !strings.Contains(e, "credentials refused") {
			t.Errorf("snapshots with a wrong secret: %s", e)
		}
		if e := c.with("DUALKEY_REPO", "s3:http://127.0.0.1:1/nobucket").code(exitError, "snapshots"); !strings.Contains(e, "connection refused") {
			t.Errorf("snapshots at an unreachable endpoint: %s", e)
		}
		empty, _ := s3CLI(t, srv, s3test.BucketOptions{})
		empty.code(exitNoRepo, "snapshots")
	})

	c, cfg := s3CLI(t, srv, s3test.BucketOptions{})
	c.ok("vault", "init", "--min-retention", "1h")
	src := makeTree(t)
	var first struct {
		Snapshot  string    `json:"snapshot"`
		LockUntil time.Time `json:"lock_until"`
	}
	c.json(&first, "backup", src)
	packs1 := map[string]bool{}
	for _, o := range objects(t, srv, cfg, "data") {
		packs1[o.key] = true
	}
	c.ok("backup", src)

	// Every object the backup wrote is locked until at least its
	// snapshot's lock: packs, indexes, the snapshot, its lock record, and
	// the config and key, which outlive every lock.
	for _, typ := range []string{"config", "keys", "data", "index", "snapshots", "locks"} {
		objs := objects(t, srv, cfg, typ)
		if len(objs) == 0 {
			t.Errorf("no %s objects in the bucket", typ)
		}
		for _, o := range objs {
			if o.mode != "COMPLIANCE" || o.until.Before(first.LockUntil) {
				t.Errorf("%s: retention %q until %v, want COMPLIANCE until at least %v", o.key, o.mode, o.until, first.LockUntil)
			}
		}
	}

	target := filepath.Join(t.TempDir(), "restore")
	c.ok("restore", first.Snapshot[:8], "--target", target)
	sameTree(t, src, filepath.Join(target, "src"))
	c.ok("verify", "--read-data")

	// The bucket's root account attacks a pack: deleting its version,
	// with or without the governance bypass, fails; writing junk over it
	// and hiding it behind a delete marker succeed at the S3 level and
	// change nothing the vault reads.
	root, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, o := range objects(t, srv, cfg, "data") {
		for _, bypass := range []bool{false, true} {
			if err := root.RemoveObject(ctx, cfg.Bucket, o.key, minio.RemoveObjectOptions{VersionID: o.version, GovernanceBypass: bypass}); err == nil {
				t.Fatalf("root deleted locked pack %s (bypass %v)", o.key, bypass)
			}
		}
		if _, err := root.PutObject(ctx, cfg.Bucket, o.key, bytes.NewReader([]byte("junk")), 4, minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := root.RemoveObject(ctx, cfg.Bucket, o.key, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, o := range objects(t, srv, cfg, "snapshots") {
		if err := root.RemoveObject(ctx, cfg.Bucket, o.key, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c.ok("verify", "--read-data")
	target2 := filepath.Join(t.TempDir(), "restore2")
	c.ok("restore", "latest", "--target", target2)
	sameTree(t, src, filepath.Join(target2, "src"))

	// The vault itself refuses to forget, and prune deletes nothing.
	c.code(exitRefused, "forget", first.Snapshot)
	c.ok("prune", "--grace", "1ns")

	// Extending a snapshot's lock extends its snapshot object and packs at
	// once; the key and config follow with extend-locks. (Junk versions
	// written by root above carry no retention: the latest date of each key
	// is the vault's version's.)
	latest := func(typ string) map[string]time.Time {
		m := map[string]time.Time{}
		for _, o := range objects(t, srv, cfg, typ) {
			if o.until.After(m[o.key]) {
				m[o.key] = o.until
			}
		}
		return m
	}
	later := time.Now().Add(72 * time.Hour)
	c.ok("lock", first.Snapshot[:8], "--for", "72h")
	for k, until := range latest("snapshots") {
		if strings.HasSuffix(k, first.Snapshot) && until.Before(later) {
			t.Errorf("snapshot %s retained until %v after lock --for 72h", k, until)
		}
	}
	for k, until := range latest("data") {
		if packs1[k] && until.Before(later) {
			t.Errorf("pack %s retained until %v after lock --for 72h", k, until)
		}
	}
	for k, until := range latest("keys") {
		if !until.Before(later) {
			t.Fatalf("key %s already retained until %v: the test shows nothing", k, until)
		}
	}
	c.ok("vault", "extend-locks")
	for _, typ := range []string{"config", "keys"} {
		for k, until := range latest(typ) {
			if until.Before(later) {
				t.Errorf("%s retained until %v after extend-locks, want at least %v", k, until, later)
			}
		}
	}
	// A second run has next to nothing to do. (versitygw 1.8 leaves the
	// lock headers out of a HEAD of a version that is no longer the latest,
	// so the keys root wrote over above look unlocked to the backend and get
	// their date put again; on AWS none would.)
	var rep struct{ Checked, Extended int }
	c.json(&rep, "vault", "extend-locks")
	if rep.Checked == 0 || rep.Extended >= rep.Checked {
		t.Errorf("second extend-locks: %+v, want objects checked and fewer extended", rep)
	}
}

// TestS3Prune: prune on Object Lock storage deletes the packs that only an
// unlocked, forgotten snapshot used, every version of them, and keeps the
// packs of a locked snapshot.
func TestS3Prune(t *testing.T) {
	srv := s3test.Start(t)
	c, cfg := s3CLI(t, srv, s3test.BucketOptions{})
	c.ok("vault", "init", "--min-retention", "0s")
	kept := makeTree(t)
	var a, b struct {
		Snapshot string `json:"snapshot"`
	}
	c.json(&a, "backup", kept, "--lock-for", "1h")
	packsA := map[string]bool{}
	for _, o := range objects(t, srv, cfg, "data") {
		packsA[o.key] = true
	}

	gone := t.TempDir()
	if err := os.WriteFile(filepath.Join(gone, "random.bin"), repotest.Random(3<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	c.json(&b, "backup", gone)
	var onlyB []string
	for _, o := range objects(t, srv, cfg, "data") {
		if !packsA[o.key] {
			onlyB = append(onlyB, o.key)
		}
	}
	if len(onlyB) == 0 {
		t.Fatal("the second backup added no pack")
	}

	c.code(exitRefused, "forget", a.Snapshot)
	c.ok("forget", b.Snapshot)
	c.ok("prune", "--grace", "1ns")
	c.ok("prune", "--grace", "1ns")

	left := map[string]bool{}
	for _, o := range objects(t, srv, cfg, "data") {
		left[o.key] = true
	}
	for _, k := range onlyB {
		if left[k] {
			t.Errorf("pack %s of the forgotten snapshot is still in the bucket", k)
		}
	}
	for k := range packsA {
		if !left[k] {
			t.Errorf("pack %s of the locked snapshot was deleted", k)
		}
	}
	target := filepath.Join(t.TempDir(), "restore")
	c.ok("restore", a.Snapshot[:8], "--target", target)
	sameTree(t, kept, filepath.Join(target, "src"))
	c.ok("verify", "--read-data")
}

// TestS3RetainedExitCode: when the vault's own lock has expired but the
// storage still retains the object (retention dates are rounded up to whole
// days), the storage's refusal exits 13 like the vault's.
func TestS3RetainedExitCode(t *testing.T) {
	srv := s3test.Start(t)
	c, _ := s3CLI(t, srv, s3test.BucketOptions{})
	c.ok("vault", "init", "--min-retention", "1s")
	var snap struct {
		Snapshot string `json:"snapshot"`
	}
	c.json(&snap, "backup", makeTree(t))
	// Wait out the vault's one-second lock (not a timed assertion: any
	// time after it passes will do), then the storage's lock is left.
	var locks []struct {
		LockUntil time.Time `json:"lock_until"`
	}
	c.json(&locks, "snapshots")
	if len(locks) != 1 {
		t.Fatalf("%d snapshots, want 1", len(locks))
	}
	time.Sleep(time.Until(locks[0].LockUntil) + 100*time.Millisecond)
	errs := c.code(exitRefused, "forget", snap.Snapshot)
	if !strings.Contains(errs, "retained") {
		t.Errorf("forget under the storage's lock: %s", errs)
	}
}

// TestS3VaultServer: a vault server in front of an S3 bucket. A backup
// agent holding an append token backs up; every object it causes is
// locked in the bucket; neither it nor an admin token can forget the
// locked snapshot; the server extends object locks itself at start.
func TestS3VaultServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a vault server process")
	}
	srv := s3test.Start(t)
	admin, cfg := s3CLI(t, srv, s3test.BucketOptions{})
	admin.ok("vault", "init", "--min-retention", "1h")
	state := t.TempDir()
	admin.code(exitUsage, "vault", "serve", "--listen", freePort(t)) // no --state-dir

	addr := freePort(t)
	cmd := admin.proc("vault", "serve", "--listen", addr, "--state-dir", state)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuf
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	sc := bufio.NewScanner(out)
	fp := ""
	for fp == "" && sc.Scan() {
		fp, _ = strings.CutPrefix(sc.Text(), "tls fingerprint: ")
		if fp == sc.Text() {
			fp = ""
		}
	}
	if fp == "" {
		t.Fatal("server printed no fingerprint")
	}
	go func() {
		for sc.Scan() {
		}
	}()
	token := func(capName string) *cli {
		tok := strings.TrimSpace(admin.ok("vault", "token", "create", "--cap", capName, "--name", capName+"-s3", "--state-dir", state))
		f := filepath.Join(t.TempDir(), capName+".token")
		if err := os.WriteFile(f, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		c := newCLI(t, "https://"+addr).with("DUALKEY_TLS_FINGERPRINT", fp).with("DUALKEY_TOKEN_FILE", f)
		c.env["DUALKEY_PASSWORD_FILE"] = admin.env["DUALKEY_PASSWORD_FILE"]
		return c
	}
	agent, remoteAdmin := token("append"), token("admin")

	src := makeTree(t)
	var snap struct {
		Snapshot  string    `json:"snapshot"`
		LockUntil time.Time `json:"lock_until"`
	}
	agent.json(&snap, "backup", src)
	for _, typ := range []string{"data", "index", "snapshots", "locks"} {
		for _, o := range objects(t, srv, cfg, typ) {
			if o.mode != "COMPLIANCE" || o.until.Before(snap.LockUntil) {
				t.Errorf("%s: retention %q until %v, want COMPLIANCE until at least %v", o.key, o.mode, o.until, snap.LockUntil)
			}
		}
	}
	agent.code(exitRefused, "forget", snap.Snapshot)
	remoteAdmin.code(exitRefused, "forget", snap.Snapshot)
	target := filepath.Join(t.TempDir(), "restore")
	agent.ok("restore", "latest", "--target", target)
	sameTree(t, src, filepath.Join(target, "src"))
	if !strings.Contains(logs.String(), "object locks extended") {
		t.Errorf("the server did not extend object locks at start; log:\n%s", logs.String())
	}
}

// TestS3PostgresAgent: the PostgreSQL agent streams WAL into a vault on S3
// and a base backup is stored there; every WAL piece and the base backup
// are locked in COMPLIANCE mode; a point-in-time restore from the bucket
// brings back every row.
func TestS3PostgresAgent(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	srv := s3test.Start(t)
	c, cfg := s3CLI(t, srv, s3test.BucketOptions{})
	// The restored server (the OS user's) runs wal-fetch, which reads this.
	shared, err := os.MkdirTemp("", "dualkey-s3pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shared) })
	if err := os.Chmod(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	pwFile := filepath.Join(shared, "password")
	if err := os.WriteFile(pwFile, []byte("correct horse\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c = c.with("DUALKEY_PASSWORD_FILE", pwFile)
	c.ok("vault", "init", "--min-retention", "1h")

	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTableSQL)
	pg.Exec("postgres", "INSERT INTO known (v) SELECT md5(g::text) FROM generate_series(1, 1000) g")
	c.ok("pg", "basebackup", "--pg", pg.URL("postgres"))
	agent := startAgentProc(t, c, "--pg", pg.URL("postgres"), "--slot", "s3", "--flush-every", "50ms")
	pg.Exec("postgres", "INSERT INTO known (v) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 20000) g")
	pg.Exec("postgres", "SELECT pg_switch_wal()")
	want := serverLSN(t, pg)
	r := openRepoFor(t, c)
	waitVault(t, r, want, 60*time.Second)
	agent.interrupt(t)
	checkVault(t, r, want, pg)

	minUntil := time.Now().Add(time.Hour - time.Minute)
	for _, typ := range []string{"wal", "snapshots", "data", "locks"} {
		objs := objects(t, srv, cfg, typ)
		if len(objs) == 0 {
			t.Errorf("no %s objects in the bucket", typ)
		}
		for _, o := range objs {
			if o.mode != "COMPLIANCE" || o.until.Before(minUntil) {
				t.Errorf("%s: retention %q until %v, want COMPLIANCE until at least %v", o.key, o.mode, o.until, minUntil)
			}
		}
	}

	dir, err := os.MkdirTemp(shared, "restore-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "sock")
	if err := os.Mkdir(sock, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := pgtest.Own(sock); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "data")
	port := freeTCPPort(t)
	t.Cleanup(func() {
		cmd := exec.Command(filepath.Join(pgagent.PGBinDir, "pg_ctl"), "-D", target, "-m", "immediate", "stop")
		pgtest.RunAsOSUser(cmd)
		cmd.Run()
	})
	// restore_command reaches the bucket with the settings restore writes
	// into TARGET.dualkey-env (0600, the server's user's), never with the
	// secret in postgresql.auto.conf. The built binary runs the restore, so
	// that restore_command names a binary the server's user may run.
	if out, err := c.proc("pg", "restore", "--target", target, "--latest", "--start", "--port", strconv.Itoa(port),
		"--set", "unix_socket_directories="+sock, "--set", "listen_addresses=127.0.0.1").CombinedOutput(); err != nil {
		t.Fatalf("pg restore: %v\n%s", err, out)
	}
	if got := queryRestored(t, port, "postgres", "SELECT count(*)::text FROM known"); got != "21000" {
		t.Errorf("restored server has %s rows, want 21000", got)
	}
	auto, err := os.ReadFile(filepath.Join(target, "postgresql.auto.conf"))
	if err != nil {
		t.Fatal(err)
	}
	envFile := target + ".dualkey-env"
	if !strings.Contains(string(auto), "DUALKEY_ENV_FILE="+envFile) && !strings.Contains(string(auto), "DUALKEY_ENV_FILE='"+envFile+"'") {
		t.Errorf("restore_command does not name the env file %s:\n%s", envFile, auto)
	}
	if strings.Contains(string(auto), cfg.SecretKey) {
		t.Errorf("postgresql.auto.conf holds the S3 secret key:\n%s", auto)
	}
	fi, err := os.Stat(envFile)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("env file mode %v, want 0600", fi.Mode().Perm())
	}
	data, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range s3test.Env(cfg) {
		k, _, _ := strings.Cut(kv, "=")
		if k == "DUALKEY_S3_CACERT" {
			continue // written as an absolute path
		}
		if !strings.Contains(string(data), kv+"\n") {
			t.Errorf("env file lacks %s", k)
		}
	}
	checkOwnedByServer(t, envFile)
}

// TestS3LedgerMirror: the audit ledger mirrored into a vault on S3 is
// locked there; the bucket's root account can neither delete a mirror
// object nor, by writing over it or hiding it, make audit verify see less.
func TestS3LedgerMirror(t *testing.T) {
	srv := s3test.Start(t)
	v, cfg := s3CLI(t, srv, s3test.BucketOptions{})
	v.ok("vault", "init", "--min-retention", "1h")
	q, dir := quorumCLI(t)
	m := q
	for k, val := range v.env {
		m = m.with(k, val)
	}
	m.ok("users", "add", "alice")
	m.ok("users", "add", "bob")
	pub := strings.TrimSpace(m.as(dir, "bob").ok("keys", "generate", "bob"))
	m.ok("quorum", "init", "--approver", "bob="+pub, "--threshold", "1")
	var rep struct{ LastSeq, MirroredSeq uint64 }
	m.json(&rep, "audit", "verify")
	if rep.LastSeq == 0 || rep.MirroredSeq != rep.LastSeq {
		t.Fatalf("last seq %d, mirrored up to %d", rep.LastSeq, rep.MirroredSeq)
	}
	objs := objects(t, srv, cfg, "ledger")
	if len(objs) == 0 {
		t.Fatal("no ledger objects in the bucket")
	}
	minUntil := time.Now().Add(time.Hour - time.Minute)
	root, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, o := range objs {
		if o.mode != "COMPLIANCE" || o.until.Before(minUntil) {
			t.Errorf("%s: retention %q until %v, want COMPLIANCE until at least %v", o.key, o.mode, o.until, minUntil)
		}
		if err := root.RemoveObject(ctx, cfg.Bucket, o.key, minio.RemoveObjectOptions{VersionID: o.version, GovernanceBypass: true}); err == nil {
			t.Fatalf("root deleted ledger object %s", o.key)
		}
		if _, err := root.PutObject(ctx, cfg.Bucket, o.key, bytes.NewReader([]byte("DKL1junk")), 8, minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := root.RemoveObject(ctx, cfg.Bucket, o.key, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var after struct{ LastSeq, MirroredSeq uint64 }
	m.json(&after, "audit", "verify")
	if after.MirroredSeq != rep.MirroredSeq {
		t.Errorf("after root's attack the mirror reaches seq %d, before %d", after.MirroredSeq, rep.MirroredSeq)
	}
}

// checkOwnedByServer checks that name belongs to the OS user the restored
// server runs as: pgtest.OSUser when the tests run as root, else this user.
func checkOwnedByServer(t *testing.T, name string) {
	t.Helper()
	fi, err := os.Stat(name)
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return
	}
	want := os.Geteuid()
	if want == 0 {
		u, err := user.Lookup(pgtest.OSUser)
		if err != nil {
			t.Fatal(err)
		}
		want, _ = strconv.Atoi(u.Uid)
	}
	if int(st.Uid) != want {
		t.Errorf("%s is owned by uid %d, want %d (the server's user)", name, st.Uid, want)
	}
}
