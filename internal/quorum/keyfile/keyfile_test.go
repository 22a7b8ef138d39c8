package keyfile

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/dualkey/dualkey/internal/quorum/cert"
)

// testParams make Argon2id cheap; the format records them, so Open follows.
var testParams = params{Time: 1, Memory: 64, Threads: 1}

var (
	fixtureOnce sync.Once
	fixturePub  ed25519.PublicKey
	fixture     []byte
)

func testFile(t testing.TB) (ed25519.PublicKey, []byte) {
	fixtureOnce.Do(func() {
		var err error
		fixturePub, fixture, err = generate("alice", []byte("correct horse"), testParams)
		if err != nil {
			t.Fatal(err)
		}
	})
	return fixturePub, bytes.Clone(fixture)
}

func TestRoundTrip(t *testing.T) {
	pub, data := testFile(t)
	name, priv, err := Open(data, []byte("correct horse"))
	if err != nil {
		t.Fatal(err)
	}
	if name != "alice" || !pub.Equal(priv.Public()) {
		t.Fatalf("Open = %q, key %x; want alice, %x", name, priv.Public(), pub)
	}
	n, p, err := Inspect(data)
	if err != nil || n != "alice" || !p.Equal(pub) {
		t.Fatalf("Inspect = %q, %x, %v", n, p, err)
	}
	// The key signs approvals that cert verifies under the public key as
	// the file shows it.
	var h struct {
		PublicKey string `json:"public_key"`
	}
	if err := jsonUnmarshal(data, &h); err != nil {
		t.Fatal(err)
	}
	certPub, err := cert.ParsePublicKey(h.PublicKey)
	if err != nil || !certPub.Equal(pub) {
		t.Fatalf("cert.ParsePublicKey(%q) = %x, %v", h.PublicKey, certPub, err)
	}
	id := (&cert.Request{}).ID()
	a := cert.Sign(priv, "alice", id, cert.Approve, fixedTime)
	if err := a.VerifySignature(certPub); err != nil {
		t.Error(err)
	}
}

func TestDefaultParams(t *testing.T) {
	// The file records what Generate used; check the default, not its cost.
	if defaultParams.Time < 3 || defaultParams.Memory < 64<<10 || defaultParams.Threads < 1 {
		t.Errorf("default argon2id parameters %+v weaker than time=3 memory=64 MiB", defaultParams)
	}
}

func TestWrongPassphrase(t *testing.T) {
	_, data := testFile(t)
	for _, pass := range []string{"", "correct horsf", "correct horse "} {
		if _, _, err := Open(data, []byte(pass)); !errors.Is(err, ErrWrongPassphrase) {
			t.Errorf("Open with %q = %v, want ErrWrongPassphrase", pass, err)
		}
	}
	if _, _, err := generate("alice", nil, testParams); err == nil {
		t.Error("generate accepted an empty passphrase")
	}
}

func TestEveryByteFlipped(t *testing.T) {
	_, data := testFile(t)
	for i := range data {
		for _, bit := range []byte{0x01, 0x20, 0x80} {
			bad := bytes.Clone(data)
			bad[i] ^= bit
			if _, _, err := Open(bad, []byte("correct horse")); err == nil {
				t.Fatalf("flipping %#x at byte %d (%q) still opens", bit, i, data[i])
			} else if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("flip at %d: %v wraps neither sentinel", i, err)
			}
		}
	}
}

func TestTruncated(t *testing.T) {
	_, data := testFile(t)
	for n := 0; n < len(data); n++ {
		if _, _, err := Open(data[:n], []byte("correct horse")); !errors.Is(err, ErrMalformed) {
			t.Fatalf("truncated to %d of %d bytes: %v, want ErrMalformed", n, len(data), err)
		}
	}
	if _, _, err := Open(append(data, data...), []byte("correct horse")); !errors.Is(err, ErrMalformed) {
		t.Errorf("doubled file: %v, want ErrMalformed", err)
	}
}

func TestUnreasonableParams(t *testing.T) {
	for _, p := range []params{{Time: 1, Memory: maxMemory + 1, Threads: 1}, {Time: maxTime + 1, Memory: 64, Threads: 1}, {Time: 1, Memory: 7, Threads: 1}} {
		_, data, err := generate("bob", []byte("x"), params{Time: 1, Memory: 64, Threads: 1})
		if err != nil {
			t.Fatal(err)
		}
		var f file
		if err := jsonUnmarshal(data, &f); err != nil {
			t.Fatal(err)
		}
		f.Time, f.Memory, f.Threads = p.Time, p.Memory, p.Threads
		if _, _, err := Inspect(marshal(&f)); !errors.Is(err, ErrMalformed) {
			t.Errorf("params %+v: %v, want ErrMalformed", p, err)
		}
	}
}

func TestSaveLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	_, data := testFile(t)
	if err := Save(dir, "alice", data); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(Path(dir, "alice"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", di.Mode().Perm())
	}
	got, err := Load(dir, "alice")
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Load = %v", err)
	}
	// Never overwrite a key: that would lose a vote.
	_, other, err := generate("alice", []byte("other"), testParams)
	if err != nil {
		t.Fatal(err)
	}
	if err := Save(dir, "alice", other); !errors.Is(err, fs.ErrExist) {
		t.Errorf("second Save = %v, want fs.ErrExist", err)
	}
	if got, _ := Load(dir, "alice"); !bytes.Equal(got, data) {
		t.Error("second Save changed the key file")
	}
	if err := Save(dir, "bob", data); err == nil {
		t.Error("Save accepted alice's file under bob's name")
	}
	if err := Save(dir, "../x", data); !errors.Is(err, ErrMalformed) {
		t.Errorf("Save under ../x = %v, want ErrMalformed", err)
	}
	if _, err := Load(dir, "bob"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load missing = %v, want fs.ErrNotExist", err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("dir holds %d entries, want only alice.key (no temporary files)", len(ents))
	}
}

func TestSaveRace(t *testing.T) {
	dir := t.TempDir()
	_, data := testFile(t)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = Save(dir, "alice", data) }()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
		} else if !errors.Is(err, fs.ErrExist) {
			t.Error(err)
		}
	}
	if ok != 1 {
		t.Errorf("%d racing Saves succeeded, want 1", ok)
	}
}

func TestDefaultDir(t *testing.T) {
	t.Setenv("DUALKEY_CONFIG_DIR", "/etc/dk")
	if d, err := DefaultDir(); err != nil || d != "/etc/dk/keys" {
		t.Errorf("DefaultDir = %q, %v", d, err)
	}
	t.Setenv("DUALKEY_CONFIG_DIR", "")
	t.Setenv("XDG_CONFIG_HOME", "/home/x/.config")
	if d, err := DefaultDir(); err != nil || d != "/home/x/.config/dualkey/keys" {
		t.Errorf("DefaultDir = %q, %v", d, err)
	}
}

// The name rule matches cert's, so every approver can have a key file.
func TestNameRuleMatchesCert(t *testing.T) {
	for _, n := range []string{"alice", "a", "bob.smith@example.com", "x-1_2", "Alice", "", ".a", "-a", "a b", "a/b", "..", string(make([]byte, 65)), "é"} {
		if (validName(n) == nil) != (cert.ValidName(n) == nil) {
			t.Errorf("name %q: keyfile says %v, cert says %v", n, validName(n), cert.ValidName(n))
		}
	}
}
