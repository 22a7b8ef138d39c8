package archiver

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// A backup abandoned on an error must not fail the next one on the same
// Repository, as the PostgreSQL agent's scheduled base backups share one.
func TestBackupAfterAbandoned(t *testing.T) {
	boom := errors.New("boom")
	big := repotest.Random(4 << 20) // a few 1 MiB test packs, uploaded during the backup
	tests := []struct {
		name string
		// first runs the backup that fails, with fs set to pass saves on.
		first func(ctx context.Context, fs *repotest.FaultyStore, backup func(context.Context, func() (*Entry, error)) error) error
		want  error // what the first backup fails with
	}{
		{"store fails once", func(ctx context.Context, fs *repotest.FaultyStore, backup func(context.Context, func() (*Entry, error)) error) error {
			fs.FailSaves(backend.Pack, boom)
			return backup(ctx, entries(fileEntry("big", big)))
		}, boom},
		{"source error", func(ctx context.Context, fs *repotest.FaultyStore, backup func(context.Context, func() (*Entry, error)) error) error {
			n := entries(fileEntry("big", big))
			return backup(ctx, func() (*Entry, error) {
				if e, err := n(); err == nil {
					return e, nil
				}
				return nil, boom
			})
		}, boom},
		{"cancelled with uploads in flight", func(ctx context.Context, fs *repotest.FaultyStore, backup func(context.Context, func() (*Entry, error)) error) error {
			held := fs.HoldSaves(backend.Pack)
			defer fs.ReleaseSaves(backend.Pack)
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			go func() {
				select {
				case <-held:
				case <-time.After(10 * time.Second):
					t.Error("no pack upload started")
				}
				cancel()
			}()
			return backup(ctx, entries(fileEntry("big", big)))
		}, context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			env := repotest.New(t, time.Hour)
			r, fs := env.OpenFaulty(t)
			backup := func(ctx context.Context, next func() (*Entry, error)) error {
				_, err := BackupEntries(ctx, r, "src", next, Options{})
				return err
			}
			if err := tt.first(ctx, fs, backup); !errors.Is(err, tt.want) {
				t.Fatalf("first backup: err = %v, want %v", err, tt.want)
			}

			small := []byte("a small file")
			res, err := BackupEntries(ctx, r, "src", entries(fileEntry("big", big), fileEntry("small", small)), Options{})
			if err != nil {
				t.Fatalf("backup after an abandoned one: %v", err)
			}
			r2 := env.Reopen(t)
			sn := mustSnap(t, r2, res.ID)
			for name, want := range map[string][]byte{"big": big, "small": small} {
				if got := readAll(t, r2, lookup(t, r2, sn.Tree, name)); !bytes.Equal(got, want) {
					t.Errorf("%s: restored %d bytes, not the %d backed up", name, len(got), len(want))
				}
			}
		})
	}
}
