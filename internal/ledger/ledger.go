package ledger

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
	"unicode/utf8"
)

// Store keeps the records; internal/state implements it in SQLite and PostgreSQL.
//
// A Store holds opaque bytes per seq and must never replace a record: the
// race between two gateways is decided by Append alone.
type Store interface {
	// Append stores rec as record seq if no record seq exists yet; it returns false
	// (and no error) when seq already exists: another writer won the race.
	Append(ctx context.Context, seq uint64, rec []byte) (bool, error)
	// Read calls fn for every record from seq from on, in seq order.
	Read(ctx context.Context, from uint64, fn func(seq uint64, rec []byte) error) error
	// Last returns the highest seq and its record; 0 and nil when empty.
	Last(ctx context.Context) (uint64, []byte, error)
}

// Mirror is all the ledger needs from the vault: write-once named objects.
type Mirror interface {
	Put(ctx context.Context, name string, data []byte) error // fails if name exists with other bytes
	Get(ctx context.Context, name string) ([]byte, error)
	List(ctx context.Context, fn func(name string) error) error
}

// Options tune a Ledger. The zero value is usable.
type Options struct {
	// CheckpointEvery is how many records may follow a checkpoint before the
	// ledger writes the next one (and mirrors the span). Zero means 64: a
	// checkpoint costs one signature (~50µs) and one extra row, so 64 keeps
	// the overhead under 2% of rows while a forged or truncated tail is
	// exposed within 64 records. 1 signs every record.
	CheckpointEvery int
	// Logger receives mirror failures and checkpoint errors; nil means
	// slog.Default().
	Logger *slog.Logger
	// Now is the clock for record times; nil means time.Now. Tests inject one.
	Now func() time.Time
	// MirrorTimeout bounds one background mirror pass, so that a hung vault
	// cannot pile up work; zero means one minute.
	MirrorTimeout time.Duration
}

// ApplyDefaults fills in zero fields.
func (o *Options) ApplyDefaults() {
	if o.CheckpointEvery <= 0 {
		o.CheckpointEvery = 64
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MirrorTimeout <= 0 {
		o.MirrorTimeout = time.Minute
	}
}

var errNotNeeded = errors.New("ledger: checkpoint not needed")

// Entry is what a caller appends; the ledger adds seq, time and hashes.
type Entry struct {
	Kind  string // a Kind constant, not KindCheckpoint
	Actor string // who did it; empty for the system itself
	Data  any    // marshalled with encoding/json; a json.RawMessage is used as is (compacted)
}

// Ledger appends records to a Store, writes signed checkpoints and mirrors
// spans. It is safe for concurrent use, and several Ledgers (in several
// processes) may share one Store and key.
type Ledger struct {
	store  Store
	mirror Mirror // nil: no mirroring
	key    ed25519.PrivateKey
	opts   Options
	log    *slog.Logger

	// mu serializes appends in this process and guards the tip below.
	// Store I/O happens under mu: the chain is one line, so appends are
	// sequential anyway, and holding mu spares the Store lost races
	// against ourselves.
	mu           sync.Mutex
	seq          uint64 // the tip: highest seq known to be in the store
	hash         Hash   // the tip's hash
	lastCP       uint64 // seq of the newest checkpoint at or below the tip (a lower bound after Open)
	closed       bool
	mirrorMu     sync.Mutex // guards the mirror state below; taken before mu (Tip), never while holding mu
	mirrored     uint64     // highest seq known to be mirrored; valid when known
	mirroredHash Hash       // the hash of record mirrored
	known        bool       // mirrored was learned from Mirror.List

	kick   chan struct{}
	stop   context.CancelFunc
	worker sync.WaitGroup
}

// Open loads the tip of store, checks the last record's own hash and the
// links of the records up to one span back, and starts the background
// mirror. mirror may be nil (no mirroring; Verify then cannot catch a
// truncated tail).
func Open(ctx context.Context, store Store, mirror Mirror, key ed25519.PrivateKey, opts Options) (*Ledger, error) {
	if len(key) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("%w: ledger key is %d bytes, want %d", ErrInvalid, len(key), ed25519.PrivateKeySize)
	}
	opts.ApplyDefaults()
	l := &Ledger{store: store, mirror: mirror, key: key, opts: opts, log: opts.Logger, kick: make(chan struct{}, 1)}
	last, b, err := store.Last(ctx)
	if err != nil {
		return nil, fmt.Errorf("ledger: open: %w", err)
	}
	if last > 0 {
		r, err := ParseRecord(b)
		if err != nil {
			return nil, fmt.Errorf("ledger: open: last record %d: %w", last, err)
		}
		if r.Seq != last || r.ComputeHash() != r.Hash {
			return nil, fmt.Errorf("%w: last record %d does not match its hash or seq", ErrTampered, last)
		}
		// Find the newest checkpoint within one span of the tip; if there
		// is none, one is due now.
		start := uint64(1)
		if last > uint64(opts.CheckpointEvery) {
			start = last - uint64(opts.CheckpointEvery) + 1
		}
		l.seq = start - 1
		l.lastCP = start - 1
		if err := l.catchUp(ctx, start, true); err != nil {
			return nil, fmt.Errorf("ledger: open: %w", err)
		}
	}
	wctx, cancel := context.WithCancel(context.Background())
	l.stop = cancel
	if mirror != nil {
		l.worker.Add(1)
		go l.mirrorLoop(wctx)
		l.kickMirror() // catch up on spans an earlier run could not mirror
	}
	return l, nil
}

// Tip returns the seq and hash of the newest record this Ledger knows of.
func (l *Ledger) Tip() (uint64, Hash) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq, l.hash
}

// catchUp reads the records after the tip from the store and advances the
// tip over them, checking each link. With trustFirst the first record's
// Prev is taken as given (Open starts mid-chain). Called with mu held.
func (l *Ledger) catchUp(ctx context.Context, from uint64, trustFirst bool) error {
	first := trustFirst
	return l.store.Read(ctx, from, func(seq uint64, b []byte) error {
		r, err := ParseRecord(b)
		if err != nil {
			return fmt.Errorf("record %d: %w", seq, err)
		}
		if r.Seq != seq || seq != l.seq+1 || r.ComputeHash() != r.Hash || (!first && r.Prev != l.hash) {
			return fmt.Errorf("%w at seq %d: run dualkey audit verify", ErrTampered, seq)
		}
		first = false
		l.advance(&r)
		return nil
	})
}

func (l *Ledger) advance(r *Record) {
	l.seq, l.hash = r.Seq, r.Hash
	if r.IsCheckpoint() {
		l.lastCP = r.Seq
	}
}

// Append adds one record and returns it as stored. When it is the
// CheckpointEvery-th record since the last checkpoint, Append also writes a
// checkpoint and wakes the background mirror; a checkpoint failure is
// logged, not returned, because the caller's record is safely stored.
func (l *Ledger) Append(ctx context.Context, e Entry) (Record, error) {
	if e.Kind == KindCheckpoint {
		return Record{}, fmt.Errorf("%w: only the ledger writes checkpoints", ErrInvalid)
	}
	data, err := marshalData(e.Data)
	if err != nil {
		return Record{}, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return Record{}, ErrClosed
	}
	r, err := l.appendLocked(ctx, e.Kind, e.Actor, data, nil)
	if err != nil {
		return Record{}, err
	}
	if l.seq-l.lastCP >= uint64(l.opts.CheckpointEvery) {
		if err := l.checkpointLocked(ctx, false); err != nil {
			l.log.Error("ledger checkpoint failed", "seq", l.seq, "err", err)
		}
	}
	return r, nil
}

// BatchStore is a Store that can store consecutive records in one
// transaction: one commit (one fsync) for many records, which is what
// lets a gateway record every statement at full speed.
type BatchStore interface {
	Store
	// AppendBatch stores recs as records first, first+1, ... if none of
	// those seqs exists yet, all or none; it returns false (and no error)
	// when one exists: another writer won the race.
	AppendBatch(ctx context.Context, first uint64, recs [][]byte) (bool, error)
}

// AppendBatch appends es in order, in one store transaction when the store
// is a BatchStore, as consecutive records; otherwise one record at a time,
// and another writer's records may come between them. It checkpoints like
// Append once the records since the last checkpoint reach CheckpointEvery;
// with a BatchStore the checkpoint is stored in the batch's transaction,
// right after its records (never inside a batch).
func (l *Ledger) AppendBatch(ctx context.Context, es []Entry) ([]Record, error) {
	data := make([]json.RawMessage, len(es))
	for i, e := range es {
		if e.Kind == KindCheckpoint {
			return nil, fmt.Errorf("%w: only the ledger writes checkpoints", ErrInvalid)
		}
		if err := checkEntry(e.Kind, e.Actor); err != nil {
			return nil, err
		}
		d, err := marshalData(e.Data)
		if err != nil {
			return nil, err
		}
		data[i] = d
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, ErrClosed
	}
	bs, ok := l.store.(BatchStore)
	var recs []Record
	if !ok || len(es) < 2 {
		for i, e := range es {
			r, err := l.appendLocked(ctx, e.Kind, e.Actor, data[i], nil)
			if err != nil {
				return recs, err
			}
			recs = append(recs, r)
		}
	} else {
		for {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("ledger: append: %w", err)
			}
			recs = make([]Record, len(es), len(es)+1)
			encs := make([][]byte, len(es), len(es)+1)
			now, prev := l.opts.Now().UTC(), l.hash
			for i, e := range es {
				r := Record{Seq: l.seq + 1 + uint64(i), Time: now, Kind: e.Kind, Actor: e.Actor, Data: data[i], Prev: prev}
				encs[i] = r.seal()
				if len(encs[i]) > MaxRecordSize {
					return nil, fmt.Errorf("%w: record of %d bytes, limit %d", ErrInvalid, len(encs[i]), MaxRecordSize)
				}
				recs[i], prev = r, r.Hash
			}
			all := recs
			if last := l.seq + uint64(len(es)); last-l.lastCP >= uint64(l.opts.CheckpointEvery) {
				// The checkpoint the batch calls for goes into the same
				// transaction: on its own it cost a second commit (an
				// fsync) for every few batches of a busy gate.
				cp := Record{Seq: last + 1, Time: now, Kind: KindCheckpoint, Data: signCheckpoint(l.key, last, prev), Prev: prev}
				enc := cp.seal()
				all = append(recs, cp)
				encs = append(encs, enc)
			}
			ok, err := bs.AppendBatch(ctx, l.seq+1, encs)
			if err != nil {
				return nil, fmt.Errorf("ledger: append %d-%d: %w", l.seq+1, l.seq+uint64(len(encs)), err)
			}
			if ok {
				for i := range all {
					l.advance(&all[i])
				}
				if len(all) > len(recs) {
					l.kickMirror()
				}
				break
			}
			// Another writer took a seq of ours: move the tip past its records.
			before := l.seq
			if err := l.catchUp(ctx, l.seq+1, false); err != nil {
				return nil, fmt.Errorf("ledger: append: %w", err)
			}
			if l.seq == before {
				return nil, fmt.Errorf("ledger: append: store refused seqs from %d but holds no record %d", l.seq+1, l.seq+1)
			}
		}
	}
	if l.seq-l.lastCP >= uint64(l.opts.CheckpointEvery) {
		if err := l.checkpointLocked(ctx, false); err != nil {
			l.log.Error("ledger checkpoint failed", "seq", l.seq, "err", err)
		}
	}
	return recs, nil
}

func checkEntry(kind, actor string) error {
	if kind == "" || len(kind) > MaxKindLen || !utf8.ValidString(kind) || len(actor) > MaxActorLen || !utf8.ValidString(actor) {
		return fmt.Errorf("%w: kind %q actor %q: need 1 to %d and at most %d bytes of UTF-8", ErrInvalid, kind, actor, MaxKindLen, MaxActorLen)
	}
	return nil
}

func marshalData(v any) (json.RawMessage, error) {
	if v == nil {
		return nil, nil
	}
	b, err := json.Marshal(v) // compacts a json.RawMessage
	if err != nil {
		return nil, fmt.Errorf("%w: data: %v", ErrInvalid, err)
	}
	if string(b) == "null" {
		return nil, nil
	}
	return b, nil
}

// appendLocked stores one record after the tip, reloading the tip and
// retrying whenever another writer took the seq first.
// For a checkpoint, skip reports (after a lost race) that another writer's
// checkpoint made ours unnecessary, and appendLocked returns errNotNeeded.
func (l *Ledger) appendLocked(ctx context.Context, kind, actor string, data json.RawMessage, skip func() bool) (Record, error) {
	if err := checkEntry(kind, actor); err != nil {
		return Record{}, err
	}
	for {
		if err := ctx.Err(); err != nil {
			return Record{}, fmt.Errorf("ledger: append: %w", err)
		}
		if skip != nil && skip() {
			return Record{}, errNotNeeded
		}
		r := Record{Seq: l.seq + 1, Time: l.opts.Now().UTC(), Kind: kind, Actor: actor, Data: data, Prev: l.hash}
		if kind == KindCheckpoint {
			r.Data = signCheckpoint(l.key, l.seq, l.hash)
		}
		b := r.seal()
		if len(b) > MaxRecordSize {
			return Record{}, fmt.Errorf("%w: record of %d bytes, limit %d", ErrInvalid, len(b), MaxRecordSize)
		}
		ok, err := l.store.Append(ctx, r.Seq, b)
		if err != nil {
			return Record{}, fmt.Errorf("ledger: append %d: %w", r.Seq, err)
		}
		if ok {
			l.advance(&r)
			return r, nil
		}
		// Another writer took r.Seq: move the tip past its records.
		before := l.seq
		if err := l.catchUp(ctx, l.seq+1, false); err != nil {
			return Record{}, fmt.Errorf("ledger: append: %w", err)
		}
		if l.seq == before {
			return Record{}, fmt.Errorf("ledger: append: store refused seq %d but holds no record %d", r.Seq, r.Seq)
		}
	}
}

// checkpointLocked writes a checkpoint over the tip unless the tip is one
// (or, when !force, unless another writer has checkpointed recently enough).
// Called with mu held.
func (l *Ledger) checkpointLocked(ctx context.Context, force bool) error {
	notNeeded := func() bool {
		return l.seq == 0 || l.lastCP == l.seq || (!force && l.seq-l.lastCP < uint64(l.opts.CheckpointEvery))
	}
	if notNeeded() {
		return nil
	}
	_, err := l.appendLocked(ctx, KindCheckpoint, "", nil, notNeeded)
	if errors.Is(err, errNotNeeded) {
		return nil
	}
	if err != nil {
		return err
	}
	l.kickMirror()
	return nil
}

// Checkpoint writes a checkpoint over the tip (unless the tip already is
// one) and then mirrors every span not yet mirrored. A mirror error is
// returned, but the records are safe in the store and the next checkpoint
// (or Checkpoint call) retries.
func (l *Ledger) Checkpoint(ctx context.Context) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	err := l.checkpointLocked(ctx, true)
	l.mu.Unlock()
	if err != nil {
		return err
	}
	return l.mirrorNow(ctx)
}

// Close writes a final checkpoint, stops the background mirror and mirrors
// what is left. The Ledger refuses appends afterwards. Close returns the
// checkpoint's or the mirror's error, if any.
func (l *Ledger) Close(ctx context.Context) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	l.closed = true
	cpErr := l.checkpointLocked(ctx, true)
	l.mu.Unlock()
	l.stop()
	l.worker.Wait()
	return errors.Join(cpErr, l.mirrorNow(ctx))
}

// Read decodes the records of store from seq from on and calls fn for each,
// in order, for "dualkey audit tail". It checks each record's encoding but
// not the chain: run Verify for that. A record that does not parse ends Read
// with an error wrapping ErrFormat.
func Read(ctx context.Context, store Store, from uint64, fn func(Record) error) error {
	return store.Read(ctx, from, func(seq uint64, b []byte) error {
		r, err := ParseRecord(b)
		if err != nil {
			return fmt.Errorf("ledger: record %d: %w", seq, err)
		}
		return fn(r)
	})
}
