package tripwire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// Record types, from the headers named.
const (
	// access/xact.h
	xactOpMask         = 0x70
	xactHasInfo        = 0x80
	xactCommit         = 0x00
	xactAbort          = 0x20
	xactCommitPrepared = 0x30
	xactAbortPrepared  = 0x40

	xinfoHasDBInfo       = 1 << 0
	xinfoHasSubxacts     = 1 << 1
	xinfoHasRelfilenodes = 1 << 2
	xinfoHasInvals       = 1 << 3
	xinfoHasTwophase     = 1 << 4
	xinfoHasDroppedStats = 1 << 8

	// commands/dbcommands_xlog.h
	dbaseDrop = 0x20
	// catalog/storage_xlog.h
	smgrCreate    = 0x10
	smgrTruncate  = 0x20
	smgrTruncHeap = 0x0001
	// access/heapam_xlog.h
	heapOpMask    = 0x70
	heapDelete    = 0x10
	heapUpdate    = 0x20
	heapTruncate  = 0x30
	heapHotUpdate = 0x40
	heapInplace   = 0x70 // XLOG_HEAP_INPLACE
	deleteIsSuper = 1 << 3
	// storage/standbydefs.h
	runningXacts = 0x10
)

// txState is what the WAL has shown of one (sub)transaction so far.
type txState struct {
	rows      map[RelFileNode]*[2]int64 // deletes, updates
	created   []RelFileNode             // main forks created
	truncs    []smgrTrunc
	heapTrunc []heapTrunc
	dbDrops   []dbDrop
	// sharedDels are the first blocks of shared catalogs (database 0)
	// this transaction deleted a row from: DROP DATABASE deletes its
	// pg_database row right after marking it invalid in place.
	sharedDels []blockAt
}

// blockAt is one block a record at lsn referenced first.
type blockAt struct {
	lsn  LSN
	xid  uint32
	node RelFileNode
	blk  uint32
}

// maxSharedDels bounds sharedDels; DROP DATABASE deletes from a handful
// of shared catalogs.
const maxSharedDels = 16

type smgrTrunc struct {
	lsn  LSN
	node RelFileNode
}

type heapTrunc struct {
	db   uint32
	oids []uint32
}

type dbDrop struct {
	lsn  LSN
	db   uint32
	spcs []uint32
}

// fileState is a relfilenode the decoder saw created.
type fileState struct {
	xid     uint32 // creating transaction until it commits, then 0
	written bool   // some record has referenced one of its blocks
}

// maxFiles caps the relfilenodes remembered as created; past it the
// decoder forgets, and a forgotten file counts as holding data (alerting
// more, never less).
const maxFiles = 1 << 16

// tracker follows transactions from their records to their commit or abort.
type tracker struct {
	opts   *Options
	txs    map[uint32]*txState
	files  map[RelFileNode]*fileState
	err    error
	capHit bool
	// inplace are the last in-place updates of shared catalog rows
	// (pg_database: DROP DATABASE marking the database invalid, VACUUM
	// setting datfrozenxid), a ring of len(inplace).
	inplace  [8]blockAt
	inplaceN int
	// orphans are files created before their transaction had an xid
	// (xl_xid 0): TRUNCATE logs the new file before it first writes a
	// catalog row. The backend's next record is its first with an xid.
	orphans []RelFileNode
}

// maxOrphans bounds the files waiting for their transaction's first xid.
const maxOrphans = 256

func newTracker(opts *Options) *tracker {
	return &tracker{opts: opts, txs: map[uint32]*txState{}, files: map[RelFileNode]*fileState{}}
}

func (t *tracker) takeErr() error { err := t.err; t.err = nil; return err }

func (t *tracker) tx(xid uint32) *txState {
	if xid == 0 {
		return nil
	}
	if s := t.txs[xid]; s != nil {
		return s
	}
	if len(t.txs) >= t.opts.MaxTransactions {
		if !t.capHit {
			t.capHit = true
			t.err = fmt.Errorf("more than %d open transactions: xid %d not tracked", t.opts.MaxTransactions, xid)
		}
		return nil
	}
	s := &txState{}
	t.txs[xid] = s
	return s
}

// record updates the state with rec and appends the events it completes.
func (t *tracker) record(rec *Record, events []Event) []Event {
	for i := range rec.Blocks {
		if f := t.files[rec.Blocks[i].Node]; f != nil {
			f.written = true
		}
	}
	if rec.XID != 0 && len(t.orphans) > 0 && t.txs[rec.XID] == nil && len(rec.Blocks) > 0 {
		t.claimOrphans(rec.XID, rec.Blocks[0].Node.DB)
	}
	r := reader{b: rec.MainData}
	switch rec.RmID {
	case RmHeap:
		switch rec.Info & heapOpMask {
		case heapDelete:
			if len(rec.MainData) >= 8 && rec.MainData[7]&deleteIsSuper != 0 {
				break // INSERT ... ON CONFLICT taking back its own tuple
			}
			t.count(rec, 0)
			if len(rec.Blocks) > 0 && rec.Blocks[0].Node.DB == 0 {
				if s := t.tx(rec.XID); s != nil && len(s.sharedDels) < maxSharedDels {
					b := &rec.Blocks[0]
					s.sharedDels = append(s.sharedDels, blockAt{lsn: rec.LSN, xid: rec.XID, node: b.Node, blk: b.Block})
				}
			}
		case heapInplace:
			if len(rec.Blocks) > 0 && rec.Blocks[0].Node.DB == 0 {
				b := &rec.Blocks[0]
				t.inplace[t.inplaceN%len(t.inplace)] = blockAt{lsn: rec.LSN, xid: rec.XID, node: b.Node, blk: b.Block}
				t.inplaceN++
			}
		case heapUpdate, heapHotUpdate:
			t.count(rec, 1)
		case heapTruncate:
			db, n := r.u32(), r.u32()
			r.take(4) // flags and padding
			if r.err != nil || uint64(n)*4 > uint64(len(rec.MainData)) {
				t.err = errors.New("heap truncate record too short")
				break
			}
			oids := make([]uint32, n)
			for i := range oids {
				oids[i] = r.u32()
			}
			if s := t.tx(rec.XID); s != nil {
				s.heapTrunc = append(s.heapTrunc, heapTrunc{db: db, oids: oids})
			}
		}
	case RmSmgr:
		switch rec.Info & 0xF0 {
		case smgrCreate:
			n, fork := r.node(), r.u32()
			if r.err != nil {
				t.err = errors.New("smgr create record too short")
				break
			}
			if fork != ForkMain {
				break
			}
			if len(t.files) < maxFiles {
				t.files[n] = &fileState{xid: rec.XID}
			}
			if s := t.tx(rec.XID); s != nil {
				s.created = append(s.created, n)
			} else if rec.XID == 0 {
				if len(t.orphans) == maxOrphans {
					t.orphans = t.orphans[1:]
				}
				t.orphans = append(t.orphans, n)
			}
		case smgrTruncate:
			blk, n, flags := r.u32(), r.node(), r.u32()
			if r.err != nil {
				t.err = errors.New("smgr truncate record too short")
				break
			}
			// VACUUM (xid 0) only cuts off pages it has emptied; cutting
			// to a nonzero length keeps rows. Neither loses live data.
			if blk != 0 || flags&smgrTruncHeap == 0 {
				break
			}
			if s := t.tx(rec.XID); s != nil {
				s.truncs = append(s.truncs, smgrTrunc{lsn: rec.LSN, node: n})
			}
		}
	case RmDbase:
		if rec.Info&0xF0 != dbaseDrop {
			break
		}
		db, n := r.u32(), r.u32()
		if r.err != nil || uint64(n)*4 > uint64(len(rec.MainData)) {
			t.err = errors.New("database drop record too short")
			break
		}
		spcs := make([]uint32, n)
		for i := range spcs {
			spcs[i] = r.u32()
		}
		if s := t.tx(rec.XID); s != nil {
			s.dbDrops = append(s.dbDrops, dbDrop{lsn: t.invalidatedAt(s, rec), db: db, spcs: spcs})
		} else {
			// No transaction to wait for: the files are gone already.
			events = append(events, t.name(Event{Kind: DatabaseDrop, LSN: rec.LSN, XID: rec.XID, DB: db, Tablespaces: spcs}))
		}
	case RmXact:
		op := rec.Info & xactOpMask
		switch op {
		case xactCommit, xactCommitPrepared, xactAbort, xactAbortPrepared:
			commit := op == xactCommit || op == xactCommitPrepared
			x, err := parseXact(rec, commit)
			if err != nil {
				t.err = err
				break
			}
			if commit {
				events = t.commit(rec, x, events)
			} else {
				t.abort(x)
			}
		}
	case RmStandby:
		if rec.Info&0xF0 == runningXacts && len(rec.MainData) >= 20 {
			t.prune(binary.LittleEndian.Uint32(rec.MainData[16:]))
		}
	}
	return events
}

// invalidatedAt is the restore point of the database drop rec in
// transaction s. Since PostgreSQL 15.4, DROP DATABASE first marks the
// database invalid with an in-place update of its pg_database row (WAL
// flushed at once, not undone by recovery stopping before the commit),
// then deletes the row, then removes the files: a restore stopping at the
// drop record brings the database back unusable ("cannot connect to
// invalid database"). The in-place update is the last one of a shared
// catalog page, by this transaction or before it had an xid, before the
// transaction's row delete on that page. Without one (older minor
// releases) the drop record itself is the restore point.
func (t *tracker) invalidatedAt(s *txState, rec *Record) LSN {
	at := rec.LSN
	for _, del := range s.sharedDels {
		best := LSN(0)
		for i := range min(t.inplaceN, len(t.inplace)) {
			in := t.inplace[i]
			if in.node == del.node && in.blk == del.blk && in.lsn < del.lsn && (in.xid == 0 || in.xid == rec.XID) && in.lsn > best {
				best = in.lsn
			}
		}
		if best != 0 && best < at {
			at = best
		}
	}
	return at
}

// claimOrphans gives the files created without an xid in database db to
// xid, a transaction seen for the first time. With several sessions
// creating files at once in one database, a file can go to the wrong
// transaction; that changes only whether a drop is labelled Truncate.
func (t *tracker) claimOrphans(xid, db uint32) {
	var s *txState
	kept := t.orphans[:0]
	for _, n := range t.orphans {
		if n.DB != db {
			kept = append(kept, n)
			continue
		}
		if s == nil {
			if s = t.tx(xid); s == nil {
				return
			}
		}
		s.created = append(s.created, n)
	}
	t.orphans = kept
}

// count adds one deleted (which 0) or updated (1) row of block 0's
// relation to the record's transaction.
func (t *tracker) count(rec *Record, which int) {
	if len(rec.Blocks) == 0 {
		t.err = errors.New("heap record without a block reference")
		return
	}
	s := t.tx(rec.XID)
	if s == nil {
		return
	}
	n := rec.Blocks[0].Node
	c := s.rows[n]
	if c == nil {
		if s.rows == nil {
			s.rows = map[RelFileNode]*[2]int64{}
		}
		c = new([2]int64)
		s.rows[n] = c
	}
	c[which]++
}

// xact is the part of a commit or abort record the tracker uses.
type xact struct {
	time    int64
	xid     uint32 // the transaction ended
	subxids []uint32
	rels    []RelFileNode
	db      uint32
}

// parseXact reads a commit or abort record's main data (xl_xact_commit or
// xl_xact_abort, then the pieces its xinfo flags announce, in that order).
func parseXact(rec *Record, commit bool) (xact, error) {
	x := xact{xid: rec.XID}
	r := reader{b: rec.MainData}
	x.time = int64(r.u64())
	var xinfo uint32
	if rec.Info&xactHasInfo != 0 {
		xinfo = r.u32()
	}
	if xinfo&xinfoHasDBInfo != 0 {
		x.db = r.u32()
		r.u32() // tablespace
	}
	count := func(size int) int {
		n := int(int32(r.u32()))
		if n < 0 || n > (len(r.b)-r.off)/size {
			r.err = errShort
			return 0
		}
		return n
	}
	if xinfo&xinfoHasSubxacts != 0 {
		x.subxids = make([]uint32, count(4))
		for i := range x.subxids {
			x.subxids[i] = r.u32()
		}
	}
	if xinfo&xinfoHasRelfilenodes != 0 {
		x.rels = make([]RelFileNode, count(12))
		for i := range x.rels {
			x.rels[i] = r.node()
		}
	}
	if xinfo&xinfoHasDroppedStats != 0 {
		r.take(count(12) * 12) // xl_xact_stats_item: kind, dboid, objoid
	}
	if commit && xinfo&xinfoHasInvals != 0 {
		r.take(count(16) * 16) // SharedInvalidationMessage
	}
	if xinfo&xinfoHasTwophase != 0 {
		x.xid = r.u32()
	}
	if r.err != nil {
		return x, fmt.Errorf("transaction record: %w", r.err)
	}
	return x, nil
}

// end removes and returns the states of xid and its subtransactions.
func (t *tracker) end(x xact) []*txState {
	var out []*txState
	for i := -1; i < len(x.subxids); i++ {
		id := x.xid
		if i >= 0 {
			id = x.subxids[i]
		}
		if s := t.txs[id]; s != nil {
			out = append(out, s)
			delete(t.txs, id)
		}
	}
	return out
}

func (t *tracker) abort(x xact) {
	for _, s := range t.end(x) {
		for _, n := range s.created {
			delete(t.files, n) // removed at abort
		}
	}
	for _, n := range x.rels {
		delete(t.files, n)
	}
}

// prune forgets transactions older than the oldest one running: they
// ended without a record we saw (a crash ends transactions silently).
func (t *tracker) prune(oldest uint32) {
	for id, s := range t.txs {
		if int32(id-oldest) < 0 {
			for _, n := range s.created {
				delete(t.files, n)
			}
			delete(t.txs, id)
		}
	}
}

func (t *tracker) commit(rec *Record, x xact, events []Event) []Event {
	states := t.end(x)
	base := Event{LSN: rec.LSN, CommitLSN: rec.LSN, XID: x.xid, Time: pgTime(x.time), DB: x.db}

	created := map[RelFileNode]bool{}
	for _, s := range states {
		for _, n := range s.created {
			created[n] = true
		}
	}
	rows := t.sumRows(states)
	rel := func(n RelFileNode) Relation {
		r := Relation{Node: n}
		if c := rows[n]; c != nil {
			r.Deletes, r.Updates = c[0], c[1]
		}
		return r
	}

	for _, s := range states {
		for _, dd := range s.dbDrops {
			e := base
			e.Kind, e.LSN, e.DB, e.Tablespaces = DatabaseDrop, dd.lsn, dd.db, dd.spcs
			events = append(events, t.name(e))
		}
	}

	// Relations dropped at commit, and whether this looks like TRUNCATE.
	dropped := map[RelFileNode]bool{}
	var drop Event
	holding := false
	for _, n := range x.rels {
		dropped[n] = true
		r := rel(n)
		if f := t.files[n]; created[n] || f != nil && !f.written {
			r.Empty = true
		} else {
			holding = true
		}
		drop.Relations = append(drop.Relations, r)
		delete(t.files, n)
	}
	emptyReplacement := false
	for _, s := range states {
		for _, n := range s.created {
			if dropped[n] {
				continue
			}
			f := t.files[n]
			if f != nil && !f.written {
				emptyReplacement = true
				f.xid = 0
			} else {
				delete(t.files, n) // written: no longer known empty
			}
			drop.Created = append(drop.Created, Relation{Node: n})
		}
	}
	var oids []uint32
	oidDB := uint32(0)
	for _, s := range states {
		for _, h := range s.heapTrunc {
			oids = append(oids, h.oids...)
			oidDB = h.db
		}
	}
	if holding || len(oids) > 0 {
		e := base
		e.Kind = RelationsDropped
		if emptyReplacement || len(oids) > 0 {
			e.Kind = Truncate
		}
		e.Relations, e.Created, e.RelationOIDs = drop.Relations, drop.Created, oids
		if e.DB == 0 {
			e.DB = oidDB
		}
		events = append(events, t.name(e))
	}

	// smgr truncations of files this transaction did not create.
	for _, s := range states {
		for _, tr := range s.truncs {
			if created[tr.node] || dropped[tr.node] {
				continue // its rows were never committed, or reported above
			}
			e := base
			e.Kind, e.LSN, e.Relations = Truncate, tr.lsn, []Relation{rel(tr.node)}
			events = append(events, t.name(e))
		}
	}

	// Mass deletes and updates, per relation.
	for which, kind := range [2]Kind{MassDelete, MassUpdate} {
		var rs []Relation
		for n, c := range rows {
			if c[which] >= t.opts.MassRows {
				rs = append(rs, rel(n))
			}
		}
		if len(rs) > 0 {
			slices.SortFunc(rs, func(a, b Relation) int {
				return int(int64(b.Deletes+b.Updates) - int64(a.Deletes+a.Updates))
			})
			e := base
			e.Kind, e.Relations = kind, rs
			events = append(events, t.name(e))
		}
	}
	return events
}

func (t *tracker) sumRows(states []*txState) map[RelFileNode]*[2]int64 {
	if len(states) == 1 {
		return states[0].rows
	}
	sum := map[RelFileNode]*[2]int64{}
	for _, s := range states {
		for n, c := range s.rows {
			a := sum[n]
			if a == nil {
				a = new([2]int64)
				sum[n] = a
			}
			a[0] += c[0]
			a[1] += c[1]
		}
	}
	return sum
}

// name fills in names from the cache and the database from the relations.
func (t *tracker) name(e Event) Event {
	if e.DB == 0 {
		for _, r := range e.Relations {
			if r.Node.DB != 0 {
				e.DB = r.Node.DB
				break
			}
		}
	}
	nm := t.opts.Names
	if nm == nil {
		return e
	}
	if e.DB != 0 {
		e.DBName, _ = nm.Database(e.DB)
	}
	for _, rs := range [][]Relation{e.Relations, e.Created} {
		for i := range rs {
			rs[i].Name, _ = nm.Relation(rs[i].Node)
		}
	}
	for _, oid := range e.RelationOIDs {
		s, _ := nm.RelationOID(e.DB, oid)
		e.RelationOIDNames = append(e.RelationOIDNames, s)
	}
	return e
}
