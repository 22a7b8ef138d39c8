package restorer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// BenchmarkRestore restores 64 MiB in 16 files from a repository with the
// default 16 MiB packs (repotest's are 1 MiB), half the data random and half
// compressible, so that both the raw and the zstd path are measured.
func BenchmarkRestore(b *testing.B) {
	ctx := context.Background()
	be, err := local.Create(ctx, filepath.Join(b.TempDir(), "vault"))
	mustRun(b, err)
	r, err := repo.Init(ctx, guard.New(be, guard.Options{}).Session(guard.Admin), "pw", repo.InitOptions{}, repo.Options{KDF: crypto.TestKDF})
	mustRun(b, err)
	b.Cleanup(func() { r.Close() })

	src := b.TempDir()
	const files, size = 16, 4 << 20
	for i := range files {
		data := randBytes(uint64(i), size)
		if i%2 == 1 { // compressible: text-like, ~3x
			for j := range data {
				data[j] = 'a' + data[j]%8
			}
		}
		writeFile(b, filepath.Join(src, fmt.Sprintf("d%d", i%4), fmt.Sprintf("f%02d", i)), data, 0o644)
	}
	root := backup(b, r, src)
	out := b.TempDir()

	b.SetBytes(files * size)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		dst := filepath.Join(out, fmt.Sprint(i))
		if _, err := Restore(ctx, r, root, dst, Options{}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		mustRun(b, os.RemoveAll(dst))
		b.StartTimer()
	}
}
