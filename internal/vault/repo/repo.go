package repo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"runtime"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
)

// ID names blobs and objects alike.
type ID = format.ID

// Store is what a Repository needs from a vault. guard.Session (a directory
// vault in-process) and server.Client (a vault server) both provide it.
type Store interface {
	Save(ctx context.Context, h backend.Handle, data []byte) error
	Load(ctx context.Context, h backend.Handle, offset, length int64) ([]byte, error)
	Stat(ctx context.Context, h backend.Handle) (backend.Info, error)
	List(ctx context.Context, t backend.Type, fn func(backend.Info) error) error
	Remove(ctx context.Context, h backend.Handle) error
	Commit(ctx context.Context, req format.CommitRequest) (format.LockRecord, format.ID, error)
	ExtendLock(ctx context.Context, snapshot format.ID, until time.Time) (format.LockRecord, error)
	Locks(ctx context.Context) ([]format.LockRecord, error)
	Config(ctx context.Context) (format.Config, error)
}

var (
	// ErrDamaged means stored bytes failed a check: authentication, a hash
	// or structure. The message names the object.
	ErrDamaged = errors.New("repo: damaged data")
	// ErrNoRepository means the store holds no vault config.
	ErrNoRepository = errors.New("repo: no repository here (run 'dualkey vault init')")
)

// Options tune a Repository. The zero value is completed by ApplyDefaults.
type Options struct {
	// PackSize is the size at which a pack is closed and uploaded. 16 MiB
	// keeps object counts low (a 1.5 GiB backup is ~100 packs) while two
	// uploads in flight stay within a few tens of MiB of memory.
	PackSize int
	// Uploads is how many packs upload at once. Two overlap the network or
	// fsync of one with the filling of the next.
	Uploads int
	// Level is the zstd level. SpeedDefault (zstd level 3) compresses
	// pgbench's data directory ~10x at ~400 MB/s per core here; better
	// levels cost 2-3x the CPU for a few percent.
	Level zstd.EncoderLevel
	// IndexEvery writes an index object once this many packs are stored
	// without one, so a killed backup leaves its work findable: 8 packs
	// (128 MiB) bound what a kill loses to one pipeline's worth.
	IndexEvery int
	// KDF is the Argon2id cost for new keys.
	KDF crypto.KDFParams
	// Log receives progress notes; nil discards.
	Log *slog.Logger
}

// ApplyDefaults fills zero fields.
func (o *Options) ApplyDefaults() {
	if o.PackSize == 0 {
		o.PackSize = 16 << 20
	}
	if o.Uploads == 0 {
		o.Uploads = 2
	}
	if o.IndexEvery == 0 {
		o.IndexEvery = 8
	}
	if o.Level == 0 {
		o.Level = zstd.SpeedDefault
	}
	if o.KDF == (crypto.KDFParams{}) {
		o.KDF = crypto.DefaultKDF
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Repository is an open vault. It is safe for concurrent use.
type Repository struct {
	store    Store
	key      *crypto.Key
	cfg      format.Config
	opts     Options
	idx      *Index
	enc      *zstd.Encoder
	packBufs chan []byte // memory of uploaded packs, for the next ones (a sync.Pool is emptied by every GC)
	dec      *zstd.Decoder
	trees    treePacks // tree packs read whole (treecache.go)

	// IndexErrors lists index objects that could not be read at Open.
	// Their packs are found again by verify and rebuild-index.
	IndexErrors []error

	mu       sync.Mutex
	packers  map[pack.BlobType]*pack.Writer
	pending  map[ID]bool // blobs in open or uploading packs
	newPacks []IndexPack // uploaded since the last index was written
	uploads  *errgroup.Group
	upErr    error // first upload failure not yet reported by Flush; saves fail with it
}

// InitOptions are the parameters fixed at init.
type InitOptions struct {
	MinRetention time.Duration
	// QuorumPolicy, if set, is the canonical approver policy (quorum/cert)
	// stored write-once in the config: guarded actions then need a quorum
	// certificate under it, and without it they are never allowed.
	QuorumPolicy []byte
}

func whoami() (string, string) {
	host, _ := os.Hostname()
	name := ""
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	return name, host
}

// Init creates a repository in an empty store: a new master key, its first
// key object under password, and the config.
func Init(ctx context.Context, store Store, password string, io InitOptions, opts Options) (*Repository, error) {
	opts.ApplyDefaults()
	if _, err := store.Config(ctx); err == nil {
		return nil, errors.New("repo: init: a repository already exists here")
	}
	key := crypto.NewRandomKey()
	var rid [32]byte
	if _, err := rand.Read(rid[:]); err != nil {
		return nil, err
	}
	cfg := format.Config{Version: format.Version, ID: hex.EncodeToString(rid[:]),
		Created: time.Now().UTC().Truncate(time.Second), MinRetention: format.Duration(io.MinRetention), QuorumPolicy: io.QuorumPolicy}
	cfg.MAC = hex.EncodeToString(key.MACBytes(cfg.CanonicalBytes()))
	if err := addKey(ctx, store, key, password, opts.KDF); err != nil {
		return nil, err
	}
	cb, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := store.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, cb); err != nil {
		return nil, fmt.Errorf("repo: init: save config: %w", err)
	}
	return newRepository(store, key, cfg, opts)
}

func addKey(ctx context.Context, store Store, key *crypto.Key, password string, kdf crypto.KDFParams) error {
	u, h := whoami()
	kb, err := crypto.Wrap(key, password, kdf, u, h, time.Now())
	if err != nil {
		return err
	}
	if err := store.Save(ctx, backend.Handle{Type: backend.Key, Name: format.Hash(kb).String()}, kb); err != nil {
		return fmt.Errorf("repo: save key: %w", err)
	}
	return nil
}

// Open unlocks the repository in store with password and loads its index.
func Open(ctx context.Context, store Store, password string, opts Options) (*Repository, error) {
	opts.ApplyDefaults()
	cfg, err := store.Config(ctx)
	if err != nil {
		if errors.Is(err, backend.ErrNotExist) {
			return nil, ErrNoRepository
		}
		return nil, fmt.Errorf("repo: open: config: %w", err)
	}
	key, err := unlock(ctx, store, password)
	if err != nil {
		return nil, err
	}
	want := hex.EncodeToString(key.MACBytes(cfg.CanonicalBytes()))
	if cfg.MAC != want {
		return nil, fmt.Errorf("%w: config was not written with this repository's key", ErrDamaged)
	}
	r, err := newRepository(store, key, cfg, opts)
	if err != nil {
		return nil, err
	}
	if err := r.loadIndex(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

func unlock(ctx context.Context, store Store, password string) (*crypto.Key, error) {
	var names []string
	if err := store.List(ctx, backend.Key, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("repo: list keys: %w", err)
	}
	for _, n := range names {
		data, err := store.Load(ctx, backend.Handle{Type: backend.Key, Name: n}, 0, 0)
		if err != nil {
			return nil, fmt.Errorf("repo: load key %s: %w", n, err)
		}
		k, _, err := crypto.Unwrap(data, password)
		if err == nil {
			return k, nil
		}
		if !errors.Is(err, crypto.ErrWrongPassword) {
			continue // a damaged key object must not stop other keys from working
		}
	}
	return nil, crypto.ErrWrongPassword
}

func newRepository(store Store, key *crypto.Key, cfg format.Config, opts Options) (*Repository, error) {
	// EncodeAll takes one of `concurrency` encoders and waits when none is
	// free: with 1, every blob worker compressed in turn (a base backup of
	// 8 KiB pages ran at 104% CPU on 2 cores).
	// No frame checksum: every blob is authenticated by AES-GCM and its
	// keyed ID is checked after decompression; xxhash only costs time.
	encOpts := []zstd.EOption{zstd.WithEncoderLevel(opts.Level), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)),
		zstd.WithLowerEncoderMem(true), zstd.WithEncoderCRC(false)}
	enc, err := zstd.NewWriter(nil, encOpts...)
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(1<<30))
	if err != nil {
		return nil, err
	}
	r := &Repository{store: store, key: key, cfg: cfg, opts: opts, idx: newIndex(), enc: enc, dec: dec, packBufs: make(chan []byte, opts.Uploads+1),
		packers: map[pack.BlobType]*pack.Writer{}, pending: map[ID]bool{}}
	r.resetUploads()
	return r, nil
}

func (r *Repository) resetUploads() {
	r.uploads = &errgroup.Group{}
	r.uploads.SetLimit(r.opts.Uploads)
}

// Config returns the repository config.
func (r *Repository) Config() format.Config { return r.cfg }

// Key returns the master key (for the chunker's gear).
func (r *Repository) Key() *crypto.Key { return r.key }

// Index returns the in-memory index.
func (r *Repository) Index() *Index { return r.idx }

// Store returns the underlying store.
func (r *Repository) Store() Store { return r.store }

// AddKey stores a new key object wrapping the master key under password.
func (r *Repository) AddKey(ctx context.Context, password string) error {
	return addKey(ctx, r.store, r.key, password, r.opts.KDF)
}

// Close releases the compressor's memory.
func (r *Repository) Close() error {
	r.enc.Close()
	r.dec.Close()
	return nil
}
