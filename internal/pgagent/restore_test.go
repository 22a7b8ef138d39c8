package pgagent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// TestMain lets the test binary stand in for "dualkey pg wal-fetch": the
// restored servers' restore_command runs a copy of it (see walFetcher).
func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == "pg" && os.Args[2] == "wal-fetch" {
		os.Exit(walFetchMain(os.Args[3:]))
	}
	os.Exit(m.Run())
}

// walFetchMain is "wal-fetch --repo DIR NAME DEST" for a directory vault,
// the password in DUALKEY_PASSWORD_FILE.
func walFetchMain(args []string) int {
	if len(args) != 4 || args[0] != "--repo" {
		fmt.Fprintln(os.Stderr, "usage: pg wal-fetch --repo DIR NAME DEST")
		return 2
	}
	ctx := context.Background()
	open := func(ctx context.Context) (*repo.Repository, error) {
		be, err := local.Open(args[1])
		if err != nil {
			return nil, err
		}
		pw, err := os.ReadFile(os.Getenv("DUALKEY_PASSWORD_FILE"))
		if err != nil {
			return nil, err
		}
		return repo.Open(ctx, guard.New(be, guard.Options{}).Session(guard.Read), strings.TrimSpace(string(pw)), repotest.Options())
	}
	if p := os.Getenv("DUALKEY_TEST_FETCH_LOG"); p != "" {
		// Which files reached dualkey (the rest were served by the shell).
		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			fmt.Fprintln(f, args[2])
			f.Close()
		}
	}
	err := FetchWAL(ctx, args[2], args[3], open, FetchOptions{Spool: DefaultSpool(args[3])})
	if err != nil {
		fmt.Fprintln(os.Stderr, "wal-fetch:", err)
		return 1
	}
	return 0
}

func TestRecoverySettings(t *testing.T) {
	b := &BaseBackupInfo{}
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	target := time.Date(2025, 3, 1, 11, 59, 58, 123456789, time.FixedZone("x", 3600))
	tests := []struct {
		name string
		opts RestoreOptions
		want []string // lines after the comment
	}{
		{"time", RestoreOptions{Time: target, Repo: "/vault", PasswordFile: "/etc/dualkey/pw"}, []string{
			`restore_command = '` + fastPathConf + `DUALKEY_PASSWORD_FILE=/etc/dualkey/pw /usr/bin/dualkey pg wal-fetch --repo /vault %f %p'`,
			`recovery_target_time = '2025-03-01 10:59:58.123456+00'`,
			`recovery_target_timeline = 'latest'`,
			`recovery_target_action = 'promote'`}},
		{"before xid, quoting", RestoreOptions{BeforeXID: 4711, Repo: "/my vault/it's 100%", Env: []string{"DUALKEY_TOKEN_FILE=/t"}}, []string{
			`restore_command = '` + fastPathConf + `DUALKEY_TOKEN_FILE=/t /usr/bin/dualkey pg wal-fetch --repo ''/my vault/it''\''''s 100%%'' %f %p'`,
			`recovery_target_xid = '4711'`,
			`recovery_target_inclusive = false`,
			`recovery_target_timeline = 'latest'`,
			`recovery_target_action = 'promote'`}},
		{"lsn, own command", RestoreOptions{LSN: 0x16B374D848, WalFetchCommand: "/bin/fetch"}, []string{
			`restore_command = '/bin/fetch %f %p'`,
			`recovery_target_lsn = '16/B374D848'`,
			`recovery_target_timeline = 'latest'`,
			`recovery_target_action = 'promote'`}},
		{"latest", RestoreOptions{Latest: true, Repo: "https://vault:8443"}, []string{
			`restore_command = '` + fastPathConf + `/usr/bin/dualkey pg wal-fetch --repo https://vault:8443 %f %p'`,
			`recovery_target_timeline = 'latest'`,
			`recovery_target_action = 'promote'`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := recoverySettings(&tt.opts, b, now, "/usr/bin/dualkey")
			if !strings.HasPrefix(got[0], "# dualkey pg restore 2025-03-01T12:00:00Z") {
				t.Errorf("comment %q", got[0])
			}
			want := strings.Join(tt.want, "\n")
			if g := strings.Join(got[1:], "\n"); g != want {
				t.Errorf("settings:\n%s\nwant:\n%s", g, want)
			}
		})
	}
}

// fastPathConf is spoolFastPath as postgresql.auto.conf quotes it.
var fastPathConf = strings.ReplaceAll(spoolFastPath, "'", "''")

// pgSubstitute does what PostgreSQL does to restore_command before it runs
// it through /bin/sh.
func pgSubstitute(cmd, name, path string) string {
	var b strings.Builder
	for i := 0; i < len(cmd); i++ {
		if cmd[i] == '%' && i+1 < len(cmd) {
			switch cmd[i+1] {
			case 'f':
				b.WriteString(name)
				i++
				continue
			case 'p':
				b.WriteString(path)
				i++
				continue
			case '%':
				b.WriteByte('%')
				i++
				continue
			}
		}
		b.WriteByte(cmd[i])
	}
	return b.String()
}

// TestSpoolFastPath runs the default restore_command as PostgreSQL would
// (substituted, through /bin/sh, in the data directory) with a stand-in
// for dualkey that only records its calls: a spooled segment of this boot
// is served by the shell alone and the prefetcher learns it was served;
// everything else reaches dualkey with its arguments and exit status.
func TestSpoolFastPath(t *testing.T) {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Skip("no boot id:", err)
	}
	const seg = "000000010000000000000003"
	tests := []struct {
		name     string
		file     string // asked for
		spooled  string // in the spool
		boot     []byte
		wantFast bool
	}{
		{"spooled segment", seg, seg, boot, true},
		{"not spooled", seg, "", boot, false},
		{"spool of an earlier boot", seg, seg, []byte("another boot\n"), false},
		{"no boot file", seg, seg, nil, false},
		{"history file", "00000002.history", "00000002.history", boot, false},
		{"timeline 1's history", "00000001.history", "", boot, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := t.TempDir()
			spool := filepath.Join(data, "pg_wal", spoolDirName)
			if err := os.MkdirAll(spool, 0o700); err != nil {
				t.Fatal(err)
			}
			if tt.boot != nil {
				os.WriteFile(filepath.Join(spool, bootName), tt.boot, 0o600)
			}
			if tt.spooled != "" {
				os.WriteFile(filepath.Join(spool, tt.spooled), []byte("wal of "+tt.spooled), 0o600)
			}
			calls := filepath.Join(t.TempDir(), "calls")
			fake := filepath.Join(t.TempDir(), "dualkey")
			script := "#!/bin/sh\necho \"$DUALKEY_PASSWORD_FILE $*\" >>" + calls + "\nexit 7\n"
			if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			o := RestoreOptions{Latest: true, Repo: "/v 100%", PasswordFile: "/pw"}
			lines := recoverySettings(&o, &BaseBackupInfo{}, time.Now(), fake)
			conf, ok := strings.CutPrefix(lines[1], "restore_command = '")
			if !ok {
				t.Fatalf("no restore_command in %q", lines[1])
			}
			cmdText := strings.ReplaceAll(strings.TrimSuffix(conf, "'"), "''", "'")
			cmd := exec.Command("/bin/sh", "-c", pgSubstitute(cmdText, tt.file, "pg_wal/RECOVERYXLOG"))
			cmd.Dir = data
			out, runErr := cmd.CombinedOutput()
			called, _ := os.ReadFile(calls)
			got, _ := os.ReadFile(filepath.Join(data, "pg_wal", "RECOVERYXLOG"))
			if tt.wantFast {
				if runErr != nil || len(called) != 0 {
					t.Fatalf("fast path: err %v, output %q, dualkey called: %q", runErr, out, called)
				}
				if string(got) != "wal of "+seg {
					t.Errorf("RECOVERYXLOG = %q", got)
				}
				if _, err := os.Stat(filepath.Join(spool, seg)); !os.IsNotExist(err) {
					t.Errorf("segment still in the spool: %v", err)
				}
				w, ok := readWant(spool, pgwal.DefaultSegmentSize)
				if !ok || w != (want{tli: 1, segno: 3, served: true}) {
					t.Errorf("want = %+v, %v", w, ok)
				}
				return
			}
			var ee *exec.ExitError
			if tt.file == timeline1History {
				// Refused by the shell: PostgreSQL reads exit 1 as "no such file".
				if !errors.As(runErr, &ee) || ee.ExitCode() != 1 || len(called) != 0 {
					t.Errorf("exit %v, dualkey called %q: want exit 1 from the shell alone", runErr, called)
				}
				return
			}
			if !errors.As(runErr, &ee) || ee.ExitCode() != 7 {
				t.Errorf("exit %v (output %q), want dualkey's 7", runErr, out)
			}
			wantCall := "/pw pg wal-fetch --repo /v 100% " + tt.file + " pg_wal/RECOVERYXLOG\n"
			if string(called) != wantCall {
				t.Errorf("dualkey called with %q, want %q", called, wantCall)
			}
			if len(got) != 0 {
				t.Errorf("RECOVERYXLOG written without dualkey: %q", got)
			}
		})
	}
}

func TestRestoreOptionsCheck(t *testing.T) {
	ok := RestoreOptions{Target: "/x", Repo: "/v", Latest: true}
	if err := ok.check(); err != nil {
		t.Fatal(err)
	}
	bad := []RestoreOptions{
		{Target: "/x", Repo: "/v"},
		{Target: "/x", Repo: "/v", Latest: true, LSN: 5},
		{Target: "/x", Repo: "/v", Time: time.Now(), BeforeXID: 9},
		{Target: "", Repo: "/v", Latest: true},
		{Target: "/x", Repo: "/v", Latest: true, Start: true},
		{Target: "/x", Repo: "/v", Latest: true, Env: []string{"DUALKEY_PASSWORD=secret"}},
		{Target: "/x", Repo: "/v", Latest: true, Env: []string{"NO VALUE"}},
		{Target: "/x", Repo: "/v", BeforeXID: 2},
		{Target: "/x", Repo: "/v", Latest: true, TablespaceMap: map[string]string{"16384": ""}},
	}
	for i, o := range bad {
		if err := o.check(); err == nil {
			t.Errorf("case %d: %+v accepted", i, o)
		}
	}
}

func TestParseTargetTime(t *testing.T) {
	utc := time.Date(2025, 3, 1, 12, 0, 5, 250000000, time.UTC)
	tests := []struct {
		in   string
		want time.Time
	}{
		{"2025-03-01T12:00:05.25Z", utc},
		{"2025-03-01T13:00:05.25+01:00", utc},
		{"2025-03-01 12:00:05.25+00", utc},
		{"2025-03-01 12:00:05.25+00:00", utc},
		{"2025-03-01 12:00:05.25", time.Date(2025, 3, 1, 12, 0, 5, 250000000, time.Local)},
		{"2025-03-01", time.Date(2025, 3, 1, 0, 0, 0, 0, time.Local)},
	}
	for _, tt := range tests {
		got, err := ParseTargetTime(tt.in)
		if err != nil || !got.Equal(tt.want) {
			t.Errorf("ParseTargetTime(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
	for _, in := range []string{"", "yesterday", "12:00", "2025-13-01"} {
		if _, err := ParseTargetTime(in); err == nil {
			t.Errorf("ParseTargetTime(%q) accepted", in)
		}
	}
	if got := FormatTargetTime(time.Date(2025, 3, 1, 12, 0, 5, 999999999, time.UTC)); got != "2025-03-01 12:00:05.999999+00" {
		t.Errorf("FormatTargetTime = %q", got)
	}
}

// testWAL returns n bytes of WAL-like content for [start, start+n): each
// 8-byte word is its own LSN, so a misplaced byte shows.
func testWAL(start pgwal.LSN, n int) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := uint64(start) + uint64(i)
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
	return b
}

// storeTestWAL stores testWAL from start to end on timeline 1, in 3 MiB
// pieces, and returns the writer.
func storeTestWAL(t *testing.T, r *repo.Repository, start, end pgwal.LSN) *pgwal.Writer {
	t.Helper()
	w := pgwal.NewWriter(r, pgwal.WriterOptions{MaxPiece: 3 << 20})
	for pos := start; pos < end; {
		n := min(1<<20, int(end-pos))
		if err := w.Write(1, pos, testWAL(pos, n)); err != nil {
			t.Fatal(err)
		}
		pos += pgwal.LSN(n)
	}
	if _, err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	return w
}

func TestFetchWAL(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	const seg = pgwal.DefaultSegmentSize
	// Timeline 1 from segment 1 to the middle of segment 4.
	w := storeTestWAL(t, env.Repo, pgwal.LSN(seg), pgwal.LSN(4*seg+seg/2+100))

	dir := t.TempDir()
	spool := filepath.Join(dir, "pg_wal", "dualkey-prefetch")
	if DefaultSpool(filepath.Join(dir, "pg_wal", "RECOVERYXLOG")) != spool {
		t.Fatalf("DefaultSpool = %q", DefaultSpool(filepath.Join(dir, "pg_wal", "RECOVERYXLOG")))
	}
	os.MkdirAll(filepath.Join(dir, "pg_wal"), 0o700)
	dest := filepath.Join(dir, "pg_wal", "RECOVERYXLOG")
	opens := 0
	open := func(context.Context) (*repo.Repository, error) { opens++; return env.Repo, nil }
	fetch := func(name string) error {
		return FetchWAL(ctx, name, dest, open, FetchOptions{Spool: spool, Prefetch: 2})
	}
	check := func(segno uint64, n int) {
		t.Helper()
		got, err := os.ReadFile(dest)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, seg)
		copy(want, testWAL(pgwal.SegmentStart(segno, seg), n))
		if !bytes.Equal(got, want) {
			t.Fatalf("segment %d differs", segno)
		}
	}

	if err := fetch(pgwal.SegmentName(1, 1, seg)); err != nil {
		t.Fatal(err)
	}
	check(1, seg)
	if opens != 1 {
		t.Fatalf("opened the vault %d times", opens)
	}
	// Segments 2 and 3 were fetched ahead: no vault needed.
	for _, s := range []uint64{2, 3} {
		if err := fetch(pgwal.SegmentName(1, s, seg)); err != nil {
			t.Fatal(err)
		}
		check(s, seg)
	}
	if opens != 1 {
		t.Fatalf("prefetched segments opened the vault (%d opens)", opens)
	}
	// The last, partial segment: its head and zeros.
	if err := fetch(pgwal.SegmentName(1, 4, seg)); err != nil {
		t.Fatal(err)
	}
	check(4, seg/2+100)
	// What the vault does not hold: refused, from the spool's summary.
	before := opens
	for _, name := range []string{pgwal.SegmentName(1, 5, seg), pgwal.SegmentName(2, 4, seg), pgwal.HistoryName(2), "00000001000000000000000X", "backup_label"} {
		if err := fetch(name); !errors.Is(err, ErrWALNotFound) {
			t.Errorf("fetch %s: %v, want ErrWALNotFound", name, err)
		}
	}
	if opens != before {
		t.Errorf("refusals opened the vault %d times; the summary should answer", opens-before)
	}
	ents, _ := os.ReadDir(spool)
	for _, e := range ents {
		if _, _, err := pgwal.ParseSegmentName(e.Name(), seg); err == nil {
			t.Errorf("spool still holds %s after use", e.Name())
		}
	}
	// A history file the vault holds.
	if err := w.SaveHistory(ctx, 2, []byte("1\t0/4800000\tno recovery target specified\n")); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(spool)
	if err := fetch(pgwal.HistoryName(2)); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(dest); !bytes.HasPrefix(b, []byte("1\t0/4800000")) {
		t.Errorf("history = %q", b)
	}
}

// TestFetchWALBackground: the first request starts a prefetcher (here a
// goroutine; the CLI starts a process) that keeps the spool ahead of the
// requests, which then never open the vault, and waits for the segment a
// request is blocked on rather than only those after it.
func TestFetchWALBackground(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	const seg = pgwal.DefaultSegmentSize
	storeTestWAL(t, env.Repo, pgwal.LSN(seg), pgwal.LSN(6*seg+seg/2))
	dir := filepath.Join(t.TempDir(), "pg_wal")
	os.MkdirAll(dir, 0o700)
	dest := filepath.Join(dir, "RECOVERYXLOG")
	spool := DefaultSpool(dest)
	var opens atomic.Int32
	open := func(context.Context) (*repo.Repository, error) { opens.Add(1); return env.Repo, nil }
	var bg sync.WaitGroup
	started := 0
	opts := FetchOptions{Spool: spool, Prefetch: 2, Idle: 2 * time.Second}
	opts.Background = func() error {
		started++
		bg.Add(1)
		go func() {
			defer bg.Done()
			if err := RunPrefetcher(ctx, open, opts); err != nil {
				t.Errorf("prefetcher: %v", err)
			}
		}()
		return nil
	}
	for s := uint64(1); s <= 6; s++ {
		if err := FetchWAL(ctx, pgwal.SegmentName(1, s, seg), dest, open, opts); err != nil {
			t.Fatalf("segment %d: %v", s, err)
		}
		got, err := os.ReadFile(dest)
		if err != nil {
			t.Fatal(err)
		}
		n := seg
		if s == 6 {
			n = seg / 2
		}
		want := make([]byte, seg)
		copy(want, testWAL(pgwal.SegmentStart(s, seg), n))
		if !bytes.Equal(got, want) {
			t.Fatalf("segment %d differs", s)
		}
	}
	bg.Wait() // the prefetcher stops once idle
	// Segment 1 opened the vault in FetchWAL; the prefetcher opened it
	// once and brought the rest, the partial segment 6 too (a restore_command
	// running as another user than the prefetcher may not be able to open
	// the vault at all). Again only if it was restarted after an idle stop,
	// which this test's pace does not cause.
	if o := opens.Load(); o != 2 || started < 1 {
		t.Errorf("vault opened %d times, prefetcher started %d times; want 2 opens", o, started)
	}
	ents, _ := os.ReadDir(spool)
	for _, e := range ents {
		if _, _, err := pgwal.ParseSegmentName(e.Name(), seg); err == nil {
			t.Errorf("spool still holds %s", e.Name())
		}
	}
}

// TestPrefetcherKeepsServedSegment: the want file says a segment is served
// a moment before restore_command's shell moves it out of the spool; the
// prefetcher must leave that segment alone (removing it sent the request
// to dualkey, a third of a bench restore's segments), clear the ones
// before it and fetch the ones after, and say when the spool is ready.
func TestPrefetcherKeepsServedSegment(t *testing.T) {
	env := repotest.New(t, 0)
	const seg = pgwal.DefaultSegmentSize
	storeTestWAL(t, env.Repo, pgwal.LSN(seg), pgwal.LSN(6*seg))
	spool := DefaultSpool(filepath.Join(t.TempDir(), "pg_wal", "RECOVERYXLOG"))
	if err := os.MkdirAll(spool, 0o700); err != nil {
		t.Fatal(err)
	}
	checkBoot(spool)
	name := func(s uint64) string { return filepath.Join(spool, pgwal.SegmentName(1, s, seg)) }
	for _, s := range []uint64{2, 3} {
		if err := os.WriteFile(name(s), []byte("being served"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(spool, wantName), []byte(pgwal.SegmentName(1, 3, seg)+" true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan struct{})
	done := make(chan error, 1)
	opts := FetchOptions{Spool: spool, Prefetch: 2, ready: func() { close(ready) }}
	go func() {
		done <- RunPrefetcher(ctx, func(context.Context) (*repo.Repository, error) { return env.Repo, nil }, opts)
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("prefetcher ended before it was ready: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("prefetcher not ready")
	}
	if _, ok := readSummary(spool, time.Minute); !ok {
		t.Error("ready before the summary was written")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err4 := os.Stat(name(4))
		_, err5 := os.Stat(name(5))
		_, err2 := os.Stat(name(2))
		if err4 == nil && err5 == nil && os.IsNotExist(err2) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spool: segment 4 %v, 5 %v, 2 %v; want 4 and 5 fetched, 2 removed", err4, err5, err2)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // a few more rounds of the prefetcher
	if got, err := os.ReadFile(name(3)); err != nil || string(got) != "being served" {
		t.Errorf("the served segment 3: %q, %v; want it left for restore_command", got, err)
	}
	cancel()
	<-done
}

// TestFetchWALCost fetches a segment stored as a few thousand pieces, and
// logs what that costs (listing and reading their headers).
func TestFetchWALCost(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 3000 pieces")
	}
	ctx := context.Background()
	env := repotest.New(t, 0)
	w := pgwal.NewWriter(env.Repo, pgwal.WriterOptions{})
	pos := pgwal.LSN(pgwal.DefaultSegmentSize)
	const pieces, size = 3000, 8 << 10
	for range pieces {
		if err := w.Write(1, pos, testWAL(pos, size)); err != nil {
			t.Fatal(err)
		}
		pos += size
		if _, err := w.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	dest := filepath.Join(t.TempDir(), "seg")
	open := func(context.Context) (*repo.Repository, error) { return env.Repo, nil }
	t0 := time.Now()
	if err := FetchWAL(ctx, pgwal.SegmentName(1, 1, pgwal.DefaultSegmentSize), dest, open, FetchOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("wal-fetch of a segment from %d pieces (catalog load + assembly): %v", pieces, time.Since(t0))
	got, err := os.ReadFile(dest)
	if err != nil {
		t.Fatal(err)
	}
	if want := testWAL(pgwal.LSN(pgwal.DefaultSegmentSize), pgwal.DefaultSegmentSize); !bytes.Equal(got, want) {
		t.Error("the segment assembled from many pieces differs from what was written")
	}
}

func TestParseControlNextXID(t *testing.T) {
	if _, err := parseControlNextXID(make([]byte, 10)); err == nil {
		t.Error("short pg_control accepted")
	}
	b := make([]byte, 8192)
	b[64], b[65], b[68] = 0x39, 0x30, 1 // epoch 1, xid 12345
	if x, err := parseControlNextXID(b); err != nil || x != 12345 {
		t.Errorf("next xid = %d, %v", x, err)
	}
}

// --- With real servers ---

// pgVault is a vault the server's OS user can read (restore_command runs as
// that user), and the wal-fetch stand-in it runs.
type pgVault struct {
	dir, pwFile, fetcher string
	r                    *repo.Repository
}

func newPGVault(t *testing.T) *pgVault {
	t.Helper()
	ctx := context.Background()
	base, err := os.MkdirTemp("", "pgagent-restore-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	v := &pgVault{dir: filepath.Join(base, "vault"), pwFile: filepath.Join(base, "password"), fetcher: filepath.Join(base, "dualkey")}
	be, err := local.Create(ctx, v.dir)
	if err != nil {
		t.Fatal(err)
	}
	v.r, err = repo.Init(ctx, guard.New(be, guard.Options{}).Session(guard.Admin), repotest.Password, repo.InitOptions{}, repotest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.r.Close() })
	if err := os.WriteFile(v.pwFile, []byte(repotest.Password+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A copy of this test binary the server's user may run.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(v.fetcher, os.O_WRONLY|os.O_CREATE, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	out.Close()
	return v
}

// waitAgentHolds waits until agent has made durable everything pg has
// written so far, and returns that LSN.
func waitAgentHolds(t *testing.T, agent *Agent, pg *pgtest.Server, timeout time.Duration) pgwal.LSN {
	t.Helper()
	last, err := pgwal.ParseLSN(pg.Query("postgres", "SELECT pg_current_wal_lsn()::text"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(timeout)
	for agent.Status().Durable < last {
		if time.Now().After(deadline) {
			t.Fatalf("agent durable %v, server at %v", agent.Status().Durable, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return last
}

// checkFastPath checks that the server restored segments that never
// reached dualkey: the spool fast path of restore_command served them.
func checkFastPath(t *testing.T, serverLog, fetchLog string) {
	t.Helper()
	logText, err := os.ReadFile(serverLog)
	if err != nil {
		t.Fatal(err)
	}
	fetched, err := os.ReadFile(fetchLog)
	if err != nil {
		t.Fatal(err)
	}
	called := map[string]bool{}
	for _, f := range strings.Fields(string(fetched)) {
		called[f] = true
	}
	var restored, byShell []string
	for _, m := range restoredRE.FindAllStringSubmatch(string(logText), -1) {
		restored = append(restored, m[1])
		if !called[m[1]] {
			byShell = append(byShell, m[1])
		}
	}
	t.Logf("segments restored %v; by the shell alone %v", restored, byShell)
	if len(restored) < 3 || len(byShell) == 0 {
		t.Errorf("restored %d segments, %d without starting dualkey: want 3 or more, and some by the spool fast path (dualkey was called for %q)",
			len(restored), len(byShell), fetched)
	}
}

var restoredRE = regexp.MustCompile(`restored log file "([0-9A-F]{24})" from archive`)

// readable hands the vault to the server's OS user, so restore_command can
// read what the agent (running as this process) stored.
func (v *pgVault) readable(t *testing.T) {
	t.Helper()
	if err := pgtest.Own(v.dir); err != nil {
		t.Fatal(err)
	}
}

func (v *pgVault) opts(target string) RestoreOptions {
	return RestoreOptions{Target: target, Repo: v.dir, PasswordFile: v.pwFile, Executable: v.fetcher}
}

// newTarget returns a path, not yet existing, in a directory the server's
// user can enter.
func newTarget(t *testing.T) string {
	t.Helper()
	base, err := os.MkdirTemp("", "pgagent-target-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(base, 0o755)
	t.Cleanup(func() { os.RemoveAll(base) })
	return filepath.Join(base, "data")
}

// written is one row the writer committed: before it sent the INSERT and
// after the commit returned.
type written struct {
	id            int
	before, after time.Time
}

// writer inserts rows into app.known every few ms until stopped.
type writer struct {
	mu   sync.Mutex
	rows []written
	stop chan struct{}
	done chan error
}

func startWriter(t *testing.T, url string) *writer {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	w := &writer{stop: make(chan struct{}), done: make(chan error, 1)}
	go func() {
		defer conn.Close(context.Background())
		for id := 1; ; id++ {
			select {
			case <-w.stop:
				w.done <- nil
				return
			case <-time.After(3 * time.Millisecond):
			}
			before := time.Now()
			if _, err := conn.Exec(context.Background(), "INSERT INTO known (id) VALUES ($1)", id); err != nil {
				w.done <- err
				return
			}
			after := time.Now()
			w.mu.Lock()
			w.rows = append(w.rows, written{id, before, after})
			w.mu.Unlock()
		}
	}()
	return w
}

func (w *writer) finish(t *testing.T) []written {
	t.Helper()
	close(w.stop)
	if err := <-w.done; err != nil {
		t.Fatal(err)
	}
	return w.rows
}

func (w *writer) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.rows)
}

// checkKnown checks that known holds ids 1..n with every row surely
// committed by cut present and every row surely committed after it absent.
func checkKnown(t *testing.T, srv *pgtest.Server, rows []written, cut time.Time) {
	t.Helper()
	n, _ := strconv.Atoi(srv.Query("app", "SELECT count(*) FROM known"))
	maxID, _ := strconv.Atoi(srv.Query("app", "SELECT coalesce(max(id), 0) FROM known"))
	if n != maxID {
		t.Errorf("known holds %d rows but ids up to %d: not a prefix", n, maxID)
	}
	lo, hi := 0, 0 // rows surely in, rows possibly in
	for _, r := range rows {
		if !r.after.After(cut) {
			lo++
		}
		if !r.before.After(cut) {
			hi++
		}
	}
	if n < lo || n > hi {
		t.Errorf("known holds %d rows; %d were committed by %s and at most %d started by then", n, lo, cut.Format(time.RFC3339Nano), hi)
	}
	t.Logf("known: %d rows restored (committed surely by the target: %d, possibly: %d)", n, lo, hi)
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitPrimary waits until srv has finished recovery.
func waitPrimary(t *testing.T, srv *pgtest.Server) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < 2*time.Minute {
		if srv.Query("postgres", "SELECT pg_is_in_recovery()") == "false" {
			return time.Since(start)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("restored server still in recovery after 2 minutes")
	return 0
}

const accountsSum = "SELECT sum(hashtext(t::text)) FROM pgbench_accounts t"

// TestRestorePointInTime is the 2020 case: a primary with a standby, a
// pgbench database and a table of known rows under continuous writes, the
// agent streaming; then a table and the pgbench database are dropped, and
// both data directories deleted. The vault alone brings back the state at
// a time T, just before the dropping transaction, and the latest state.
func TestRestorePointInTime(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL servers and restores four times")
	}
	ctx := context.Background()
	v := newPGVault(t)
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", "CREATE DATABASE app")
	pg.Exec("postgres", "CREATE DATABASE bench")
	pg.Exec("app", `CREATE TABLE known (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
		CREATE TABLE important (id int PRIMARY KEY, v text);
		INSERT INTO important SELECT g, md5(g::text) FROM generate_series(1, 1000) g`)
	pg.Pgbench("-i", "-s", "5", "-q", "bench")
	standby := pg.StartStandby(t)

	actx, stopAgent := context.WithCancel(ctx)
	defer stopAgent()
	agent := NewAgent(v.r, AgentOptions{URL: pg.URL("postgres"), FlushEvery: 100 * time.Millisecond, Slot: "restore_test"})
	agentDone := make(chan error, 1)
	go func() { agentDone <- agent.Run(actx) }()

	wr := startWriter(t, pg.URL("app"))
	t0 := time.Now()
	bb, err := BaseBackup(ctx, v.r, pg.ReplicationURL(), BaseBackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("base backup %s: %d files, %d MiB, %s–%s in %v", bb.ID.String()[:10], bb.Meta.Files, bb.Meta.Size>>20,
		bb.Meta.StartLSN, bb.Meta.EndLSN, time.Since(t0).Round(time.Millisecond))
	pg.Pgbench("-T", "2", "-c", "2", "bench")
	wantSum := pg.Query("bench", accountsSum)
	for range 3 { // WAL over several segments: restore_command's spool fast path serves some
		pg.Exec("postgres", "SELECT pg_switch_wal()")
		time.Sleep(150 * time.Millisecond)
	}

	time.Sleep(700 * time.Millisecond)
	T := time.Now()
	time.Sleep(700 * time.Millisecond)

	conn := pg.Conn("app")
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var xid64 int64
	if err := tx.QueryRow(ctx, "SELECT txid_current()").Scan(&xid64); err != nil {
		t.Fatal(err)
	}
	beforeDrop := wr.count() // rows committed before the dropping transaction began
	if _, err := tx.Exec(ctx, "DROP TABLE important"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	pg.Exec("postgres", "DROP DATABASE bench")
	time.Sleep(300 * time.Millisecond)
	rows := wr.finish(t)
	last := waitAgentHolds(t, agent, pg, 30*time.Second)
	stopAgent()
	if err := <-agentDone; err != nil {
		t.Fatal(err)
	}
	// The disaster: both servers gone with their data directories.
	standby.Crash()
	pg.Crash()
	for _, d := range []string{pg.Dir, standby.Dir} {
		if err := os.RemoveAll(d); err != nil {
			t.Fatal(err)
		}
	}
	v.readable(t)

	bs, win, err := Backups(ctx, v.r)
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 1 || !bs[0].Usable || win.LatestLSN < last || win.Earliest.IsZero() || win.Latest.Before(T) {
		t.Fatalf("backups %+v, window %+v (server ended at %v)", bs, win, last)
	}
	t.Logf("window %s – %s, WAL to %v", win.Earliest.Format(time.RFC3339Nano), win.Latest.Format(time.RFC3339Nano), win.LatestLSN)

	t.Run("time", func(t *testing.T) {
		o := v.opts(newTarget(t))
		o.Time = T
		fetchLog := filepath.Join(filepath.Dir(o.Target), "fetched")
		if err := os.WriteFile(fetchLog, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := pgtest.Own(fetchLog); err != nil {
			t.Fatal(err)
		}
		o.Env = []string{"DUALKEY_TEST_FETCH_LOG=" + fetchLog}
		res, err := Restore(ctx, v.r, o)
		if err != nil {
			t.Fatal(err)
		}
		srv := pgtest.Attach(t, o.Target)
		t1 := time.Now()
		srv.Start()
		replay := time.Since(t1) + waitPrimary(t, srv)
		t.Logf("restore to T: files %v, replay %v", res.RestoreTook.Round(time.Millisecond), replay.Round(time.Millisecond))
		checkFastPath(t, srv.LogFile(), fetchLog)
		checkKnown(t, srv, rows, T)
		if got := srv.Query("app", "SELECT count(*) FROM important"); got != "1000" {
			t.Errorf("important holds %s rows", got)
		}
		if got := srv.Query("bench", accountsSum); got != wantSum {
			t.Errorf("pgbench_accounts checksum %s, want %s", got, wantSum)
		}
	})

	t.Run("before-xid", func(t *testing.T) {
		// A target whose parent does not exist yet: restore creates the
		// parent searchable, or a server run as another OS user than this
		// process could not reach its data directory.
		o := v.opts(filepath.Join(newTarget(t), "data"))
		o.BeforeXID = uint32(xid64)
		o.Start, o.Port = true, freePort(t)
		sock := filepath.Join(filepath.Dir(filepath.Dir(o.Target)), "sock")
		if err := os.Mkdir(sock, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := pgtest.Own(sock); err != nil {
			t.Fatal(err)
		}
		o.ServerSettings = []string{"unix_socket_directories=" + sock, "listen_addresses=127.0.0.1"}
		t.Cleanup(func() {
			c := exec.Command(filepath.Join(PGBinDir, "pg_ctl"), "-D", o.Target, "-m", "immediate", "stop")
			pgtest.RunAsOSUser(c)
			c.Run()
		})
		res, err := Restore(ctx, v.r, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("restore before xid %d: files %v, replay %v (started by Restore)", o.BeforeXID,
			res.RestoreTook.Round(time.Millisecond), res.ReplayTook.Round(time.Millisecond))
		c, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/app?sslmode=disable", o.Port))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		var n int
		if err := c.QueryRow(ctx, "SELECT count(*) FROM important").Scan(&n); err != nil || n != 1000 {
			t.Errorf("important: %d rows, %v", n, err)
		}
		if err := c.QueryRow(ctx, "SELECT count(*) FROM known").Scan(&n); err != nil || n < beforeDrop {
			t.Errorf("known: %d rows, %v; %d were committed before the drop began", n, err, beforeDrop)
		}
		cb, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/bench?sslmode=disable", o.Port))
		if err != nil {
			t.Fatalf("the pgbench database is not back: %v", err)
		}
		defer cb.Close(ctx)
		var sum int64
		if err := cb.QueryRow(ctx, accountsSum).Scan(&sum); err != nil || strconv.FormatInt(sum, 10) != wantSum {
			t.Errorf("pgbench_accounts checksum %d (%v), want %s", sum, err, wantSum)
		}
	})

	// A server that cannot start (here: a setting it does not know) is a
	// clear error with its log, whether it dies before or after writing
	// postmaster.pid.
	t.Run("start fails", func(t *testing.T) {
		o := v.opts(newTarget(t))
		o.Latest = true
		o.Start, o.Port = true, freePort(t)
		o.ServerSettings = []string{"listen_addresses=127.0.0.1", "dualkey_no_such_setting=1"}
		_, err := Restore(ctx, v.r, o)
		if !errors.Is(err, ErrRecovery) || !strings.Contains(err.Error(), "dualkey_no_such_setting") {
			t.Fatalf("restore with a bad setting: %v, want ErrRecovery naming the setting from the log", err)
		}
	})

	t.Run("latest and delta", func(t *testing.T) {
		o := v.opts(newTarget(t))
		o.Latest = true
		res, err := Restore(ctx, v.r, o)
		if err != nil {
			t.Fatal(err)
		}
		full := res.Stats.Files
		// A non-empty target is refused without Delta.
		if _, err := Restore(ctx, v.r, o); !errors.Is(err, ErrTargetNotEmpty) {
			t.Fatalf("restore into the restored directory: %v, want ErrTargetNotEmpty", err)
		}
		// Damage one relation file, add a stray one; delta fixes exactly that.
		var victim string
		filepath.WalkDir(filepath.Join(o.Target, "base"), func(p string, d os.DirEntry, err error) error {
			if victim == "" && err == nil && d.Type().IsRegular() && IsRelationFile(strings.TrimPrefix(p, o.Target+"/")) {
				if fi, _ := d.Info(); fi.Size() >= 16384 {
					victim = p
				}
			}
			return nil
		})
		f, err := os.OpenFile(victim, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte("not a page"), 8192+100)
		f.Close()
		stray := filepath.Join(o.Target, "base", "stray")
		os.WriteFile(stray, []byte("x"), 0o600)
		o.Delta = true
		t1 := time.Now()
		dres, err := Restore(ctx, v.r, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("delta after one damaged file: %d rewritten, %d unchanged, %d removed of %d in %v",
			dres.Rewritten, dres.Unchanged, dres.Removed, full, time.Since(t1).Round(time.Millisecond))
		// The damaged file and postgresql.auto.conf (it had the settings appended).
		if dres.Rewritten != 2 || dres.Stats.Files != 2 {
			t.Errorf("delta rewrote %d files (restorer wrote %d), want 2", dres.Rewritten, dres.Stats.Files)
		}
		if _, err := os.Stat(stray); !os.IsNotExist(err) {
			t.Errorf("stray file kept: %v", err)
		}
		auto, _ := os.ReadFile(filepath.Join(o.Target, "postgresql.auto.conf"))
		if strings.Count(string(auto), "restore_command") != 1 {
			t.Errorf("postgresql.auto.conf has %d restore_commands:\n%s", strings.Count(string(auto), "restore_command"), auto)
		}
		// The next-xid offset in pg_control, against pg_controldata.
		ctl, err := os.ReadFile(filepath.Join(o.Target, "global", "pg_control"))
		if err != nil {
			t.Fatal(err)
		}
		next, err := parseControlNextXID(ctl)
		if err != nil {
			t.Fatal(err)
		}
		cd := exec.Command(filepath.Join(PGBinDir, "pg_controldata"), "-D", o.Target)
		pgtest.RunAsOSUser(cd)
		out, err := cd.Output()
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("NextXID:          0:%d\n", next); !strings.Contains(string(out), want) {
			t.Errorf("pg_control next xid %d; pg_controldata says:\n%s", next, out)
		}
		srv := pgtest.Attach(t, o.Target)
		t2 := time.Now()
		srv.Start()
		replay := time.Since(t2) + waitPrimary(t, srv)
		t.Logf("restore to latest: files %v, replay %v", res.RestoreTook.Round(time.Millisecond), replay.Round(time.Millisecond))
		if got := srv.Query("app", "SELECT count(*) FROM known"); got != strconv.Itoa(len(rows)) {
			t.Errorf("known holds %s rows, the writer committed %d", got, len(rows))
		}
		if got := srv.Query("app", "SELECT count(*) FROM pg_class WHERE relname = 'important'"); got != "0" {
			t.Errorf("important exists after restoring the latest state")
		}
		if got := srv.Query("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'bench'"); got != "0" {
			t.Errorf("bench exists after restoring the latest state")
		}
	})
}
