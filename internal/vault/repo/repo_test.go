package repo_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

func TestWrongPassword(t *testing.T) {
	env := repotest.New(t, 0)
	_, err := repo.Open(context.Background(), env.Store.Session(guard.Admin), "not it", repotest.Options())
	if !errors.Is(err, crypto.ErrWrongPassword) {
		t.Fatalf("err = %v, want ErrWrongPassword", err)
	}
}

func TestSecondKey(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	if err := env.Repo.AddKey(ctx, "second"); err != nil {
		t.Fatal(err)
	}
	for _, pw := range []string{repotest.Password, "second"} {
		r, err := repo.Open(ctx, env.Store.Session(guard.Admin), pw, repotest.Options())
		if err != nil {
			t.Fatalf("open with %q: %v", pw, err)
		}
		if !r.Key().Equal(env.Repo.Key()) {
			t.Errorf("password %q opened another master key", pw)
		}
		r.Close()
	}
}

func TestBlobsConcurrentAndReopen(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	r := env.Repo
	var wg sync.WaitGroup
	ids := make([]repo.ID, 200)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Every content appears twice: dedup must store it once.
			data := bytes.Repeat([]byte(fmt.Sprintf("blob %d ", i%100)), 2000+i%100)
			id, _, err := r.SaveBlob(ctx, pack.Data, data)
			if err != nil {
				t.Error(err)
			}
			ids[i] = id
		}()
	}
	wg.Wait()
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if n := r.Index().Len(); n != 100 {
		t.Errorf("index holds %d blobs, want 100 distinct", n)
	}
	r2 := env.Reopen(t)
	for i, id := range ids {
		want := bytes.Repeat([]byte(fmt.Sprintf("blob %d ", i%100)), 2000+i%100)
		got, err := r2.LoadBlob(ctx, pack.Data, id)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("blob %d after reopen: %v", i, err)
		}
	}
	if _, err := r2.LoadBlob(ctx, pack.Tree, ids[0]); err == nil {
		t.Error("a data blob loaded as a tree")
	}
}

func TestDamagedIndexIsSkipped(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	var ids []repo.ID
	for _, s := range []string{"one", "two"} {
		id, _, err := env.Repo.SaveBlob(ctx, pack.Data, []byte(s))
		if err != nil {
			t.Fatal(err)
		}
		if err := env.Repo.Flush(ctx); err != nil { // one index object each
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	names, _ := filepath.Glob(filepath.Join(env.Dir, "index", "*"))
	if len(names) != 2 {
		t.Fatalf("%d index files, want 2", len(names))
	}
	data, err := os.ReadFile(names[0])
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)-5] ^= 0x40
	os.Chmod(names[0], 0o600)
	if err := os.WriteFile(names[0], data, 0o400); err != nil {
		t.Fatal(err)
	}
	r := env.Reopen(t)
	if len(r.IndexErrors) != 1 || !errors.Is(r.IndexErrors[0], repo.ErrDamaged) {
		t.Fatalf("IndexErrors = %v, want one ErrDamaged", r.IndexErrors)
	}
	if r.Index().Len() != 1 {
		t.Fatalf("index holds %d blobs after losing one index object, want 1", r.Index().Len())
	}
	found := 0
	for _, id := range ids {
		if _, err := r.LoadBlob(ctx, pack.Data, id); err == nil {
			found++
		}
	}
	if found != 1 {
		t.Errorf("%d blobs load, want the 1 whose index is intact", found)
	}
}

func TestCommitRefusesUnknownBlob(t *testing.T) {
	env := repotest.New(t, 0)
	_, _, err := env.Repo.Commit(context.Background(), nil, []repo.ID{{1}}, 0)
	if err == nil {
		t.Fatal("commit naming an unstored blob succeeded")
	}
}

// BenchmarkEncodeBlob measures compress+seal of 1 MiB chunks taken from the
// file in DUALKEY_BENCH_FILE (for the limits in docs/benchmarks.md), or of
// random data.
func BenchmarkEncodeBlob(b *testing.B) {
	data := make([]byte, 64<<20)
	if f := os.Getenv("DUALKEY_BENCH_FILE"); f != "" {
		fh, err := os.Open(f)
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.ReadFull(fh, data)
		data = data[:n]
		fh.Close()
	} else {
		data = repotest.Random(len(data))
	}
	env := repotest.New(b, 0)
	chunk := make([]byte, 1<<20)
	b.SetBytes(1 << 20)
	i := 0
	for b.Loop() {
		off := (i % (len(data) >> 20)) << 20
		copy(chunk, data[off:])
		binary.LittleEndian.PutUint64(chunk, uint64(i)) // every blob new: no dedup hits
		i++
		if _, isNew, err := env.Repo.SaveBlob(context.Background(), pack.Data, chunk); err != nil || !isNew {
			b.Fatal(err, isNew)
		}
	}
	if err := env.Repo.Flush(context.Background()); err != nil {
		b.Fatal(err)
	}
}

// saveAll saves blobs from 8 goroutines and returns their IDs, whether each
// was new, and the first error.
func saveAll(ctx context.Context, r *repo.Repository, blobs [][]byte) ([]repo.ID, []bool, error) {
	ids, isNew := make([]repo.ID, len(blobs)), make([]bool, len(blobs))
	errs := make([]error, len(blobs))
	var wg sync.WaitGroup
	next := make(chan int)
	for range 8 {
		wg.Go(func() {
			for i := range next {
				ids[i], isNew[i], errs[i] = r.SaveBlob(ctx, pack.Data, blobs[i])
			}
		})
	}
	for i := range blobs {
		next <- i
	}
	close(next)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return ids, isNew, err
		}
	}
	return ids, isNew, nil
}

// A failed upload fails the work that was running, and only that: the next
// backup on the same Repository stores the failed pack's blobs again.
func TestSaveAfterFailedUpload(t *testing.T) {
	boom := errors.New("store down")
	tests := []struct {
		name    string
		fail    backend.Type
		n, size int  // blobs saved before the failure is reported, and their size
		allNew  bool // the failure lost every one of them, so all are new again
	}{
		{"pack saved by Flush", backend.Pack, 3, 64 << 10, true},
		{"pack filled by saves", backend.Pack, 40, 100 << 10, false},
		{"index", backend.Index, 3, 64 << 10, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			env := repotest.New(t, 0)
			r, fs := env.OpenFaulty(t)
			fs.FailSaves(tt.fail, boom)
			first := make([][]byte, tt.n)
			for i := range first {
				first[i] = repotest.Random(tt.size)
			}
			_, _, err := saveAll(ctx, r, first)
			if ferr := r.Flush(ctx); !errors.Is(ferr, boom) {
				t.Fatalf("Flush after the failure = %v, want %v (saves: %v)", ferr, boom, err)
			}
			if err != nil && !errors.Is(err, boom) {
				t.Fatalf("saves failed with %v, want %v or nothing", err, boom)
			}

			all := append(first, repotest.Random(tt.size), repotest.Random(tt.size))
			ids, isNew, err := saveAll(ctx, r, all)
			if err != nil {
				t.Fatalf("saves after the failure was reported: %v", err)
			}
			if err := r.Flush(ctx); err != nil {
				t.Fatalf("Flush after the failure was reported: %v", err)
			}
			for i := range first {
				if tt.allNew && !isNew[i] {
					t.Errorf("blob %d of the failed pack was not stored again", i)
				}
			}
			for _, rr := range []*repo.Repository{r, env.Reopen(t)} {
				for i, id := range ids {
					got, err := rr.LoadBlob(ctx, pack.Data, id)
					if err != nil || !bytes.Equal(got, all[i]) {
						t.Fatalf("blob %d: %v", i, err)
					}
				}
			}
		})
	}
}

// TestSavePageCompression: pages are stored as S2 blocks when that pays,
// raw when not, other blobs as zstd; every one loads back after a reopen;
// an S2 block that decodes to another length than its index entry says is
// damage, not data.
func TestSavePageCompression(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	r := env.Repo
	page := bytes.Repeat([]byte("row 0042 of a heap page, "), 8192/25+1)[:8192]
	rand := make([]byte, 8192)
	binary.LittleEndian.PutUint64(rand, 1)
	for i := 8; i < len(rand); i += 8 { // xorshift: incompressible
		x := binary.LittleEndian.Uint64(rand[i-8:])
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(rand[i:], x)
	}
	other := bytes.Repeat([]byte("not a page "), 1000)
	tests := []struct {
		name string
		data []byte
		save func(context.Context, []byte) (repo.ID, bool, error)
		want uint8
	}{
		{"page", page, r.SavePage, pack.FlagS2},
		{"incompressible page", rand, r.SavePage, 0},
		{"other blob", other, func(ctx context.Context, d []byte) (repo.ID, bool, error) { return r.SaveBlob(ctx, pack.Data, d) }, pack.FlagZstd},
	}
	ids := make([]repo.ID, len(tests))
	for i, tt := range tests {
		id, _, err := tt.save(ctx, tt.data)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		ids[i] = id
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	r2 := env.Reopen(t)
	for i, tt := range tests {
		loc, ok := r2.Index().Lookup(ids[i])
		if !ok {
			t.Fatalf("%s: not in the index", tt.name)
		}
		if loc.Flags != tt.want {
			t.Errorf("%s: flags %#x, want %#x", tt.name, loc.Flags, tt.want)
		}
		got, err := r2.LoadBlob(ctx, pack.Data, ids[i])
		if err != nil || !bytes.Equal(got, tt.data) {
			t.Errorf("%s: loaded %d bytes, %v", tt.name, len(got), err)
		}
	}
	// The page's sealed S2 block read back, with its index entry claiming
	// another length.
	loc, _ := r2.Index().Lookup(ids[0])
	sealed, err := r2.Store().Load(ctx, backend.Handle{Type: backend.Pack, Name: loc.Pack.String()}, int64(loc.Offset), int64(loc.Length))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r2.DecodeBlob(loc, sealed); err != nil {
		t.Fatalf("the page as stored: %v", err)
	}
	for _, raw := range []uint32{loc.RawLength - 1, loc.RawLength + 1} {
		bad := loc
		bad.RawLength = raw
		if _, err := r2.DecodeBlob(bad, sealed); !errors.Is(err, repo.ErrDamaged) {
			t.Errorf("raw length %d: err %v, want ErrDamaged", raw, err)
		}
	}
	bad := loc
	bad.Flags = pack.FlagS2 | pack.FlagZstd
	if _, err := r2.DecodeBlob(bad, sealed); !errors.Is(err, repo.ErrDamaged) {
		t.Errorf("flags %#x: err %v, want ErrDamaged", bad.Flags, err)
	}
}
