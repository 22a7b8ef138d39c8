package tripwire

import (
	"fmt"
	"sync"
	"time"
)

// LSN is a position in PostgreSQL's WAL: a byte offset into the stream.
// The zero LSN is PostgreSQL's InvalidXLogRecPtr.
type LSN uint64

// String formats l as PostgreSQL does ("16/B374D848").
func (l LSN) String() string { return fmt.Sprintf("%X/%X", uint32(l>>32), uint32(l)) }

// IsZero reports whether l is the zero (invalid) LSN.
func (l LSN) IsZero() bool { return l == 0 }

// RelFileNode names the files of one relation: tablespace OID (1663 is
// pg_default, 1664 pg_global), database OID (0 for shared catalogs) and the
// file number, pg_class.relfilenode (or the mapped number for catalogs whose
// pg_class.relfilenode is 0).
type RelFileNode struct {
	Spc, DB, Rel uint32
}

func (n RelFileNode) String() string { return fmt.Sprintf("%d/%d/%d", n.Spc, n.DB, n.Rel) }

// Fork numbers of a relation's files.
const (
	ForkMain = 0
	ForkFSM  = 1
	ForkVM   = 2
	ForkInit = 3
)

// Kind is what an [Event] reports.
type Kind uint8

const (
	// DatabaseDrop: DROP DATABASE. Its files are removed when the drop
	// record is replayed, before the commit.
	DatabaseDrop Kind = iota + 1
	// RelationsDropped: a commit record drops relfilenodes that held data
	// (DROP TABLE, DROP INDEX, DROP SCHEMA ... CASCADE, and the old files
	// of VACUUM FULL, CLUSTER or a rewriting ALTER TABLE; see Created).
	RelationsDropped
	// Truncate: TRUNCATE, seen as a transaction that created an empty
	// replacement relfilenode and dropped the old one at commit, as a heap
	// TRUNCATE record (wal_level=logical) or as an smgr truncate of a file
	// the transaction did not create.
	Truncate
	// MassDelete: a committed transaction deleted at least the threshold
	// number of rows of one relation.
	MassDelete
	// MassUpdate: a committed transaction updated at least the threshold
	// number of rows of one relation.
	MassUpdate
)

var kindNames = [...]string{"unknown", "database-drop", "relations-dropped", "truncate", "mass-delete", "mass-update"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Event is one destructive action seen in the WAL. Only committed
// transactions raise events; an aborted one destroys nothing that existed
// before it.
type Event struct {
	Kind Kind
	// LSN is the start of the first record whose replay destroys data:
	// restoring with recovery_target_lsn = LSN and
	// recovery_target_inclusive = off stops just before the damage.
	// For a database drop that is the in-place update marking the
	// database invalid (PostgreSQL 15.4 and later; before, the drop
	// record), for everything else the commit record (or the smgr
	// truncate record).
	LSN LSN
	// CommitLSN is the start of the transaction's commit record.
	CommitLSN LSN
	// XID is the top-level transaction id (for a prepared transaction,
	// the prepared one's).
	XID uint32
	// Time is the commit time the server wrote into the commit record.
	Time time.Time
	// DB is the database OID; DBName its name when the cache knows it.
	DB     uint32
	DBName string
	// Tablespaces are the tablespaces a dropped database had files in.
	Tablespaces []uint32
	// Relations are the relations dropped, truncated or changed.
	Relations []Relation
	// Created are relfilenodes the transaction created and kept: after a
	// TRUNCATE, VACUUM FULL, CLUSTER or rewriting ALTER TABLE they are the
	// same tables' new files. With a fresh name cache, a Created
	// relfilenode named like a dropped one tells a rewrite from a drop.
	Created []Relation
	// RelationOIDs are pg_class OIDs from a heap TRUNCATE record (only
	// logged at wal_level=logical), with names in RelationOIDNames when
	// the cache knows them.
	RelationOIDs     []uint32
	RelationOIDNames []string
}

// Relation is one relation in an [Event].
type Relation struct {
	Node RelFileNode
	// Name is "schema.table" (or an index name) when the cache knows the
	// relfilenode, else empty.
	Name string
	// Deletes and Updates count rows (heap DELETE, UPDATE and HOT_UPDATE
	// records) of this relation in the transaction, subtransactions
	// included; set for every event kind.
	Deletes, Updates int64
	// Empty is true when dropping this relfilenode lost no committed
	// data: the decoder saw it created and never written, or it was
	// created by the very transaction that dropped it.
	Empty bool
}

// Names maps relfilenodes and OIDs to names. The caller fills it from
// pg_class and pg_database and keeps it fresh; entries for dropped objects
// must stay so that a drop can still be named. Implementations must be safe
// for concurrent use when the caller refreshes while a decoder reads.
type Names interface {
	// Database returns the name of database oid.
	Database(oid uint32) (string, bool)
	// Relation returns the name of the relation whose files are n.
	Relation(n RelFileNode) (string, bool)
	// RelationOID returns the name of relation oid in database db.
	RelationOID(db, oid uint32) (string, bool)
}

// MapNames is a [Names] held in maps. It never forgets a name, so a
// relation stays named after it is dropped. The zero value is ready.
type MapNames struct {
	mu   sync.RWMutex
	dbs  map[uint32]string
	rels map[RelFileNode]string
	oids map[[2]uint32]string
}

var _ Names = (*MapNames)(nil)

// SetDatabase records the name of database oid.
func (m *MapNames) SetDatabase(oid uint32, name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dbs == nil {
		m.dbs = map[uint32]string{}
	}
	m.dbs[oid] = name
}

// SetRelation records the name of the relation with files n and pg_class
// OID oid (0 to skip the OID).
func (m *MapNames) SetRelation(n RelFileNode, oid uint32, name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.rels == nil {
		m.rels = map[RelFileNode]string{}
		m.oids = map[[2]uint32]string{}
	}
	m.rels[n] = name
	if oid != 0 {
		m.oids[[2]uint32{n.DB, oid}] = name
	}
}

// Database implements [Names].
func (m *MapNames) Database(oid uint32) (string, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s, ok := m.dbs[oid]
	return s, ok
}

// Relation implements [Names].
func (m *MapNames) Relation(n RelFileNode) (string, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s, ok := m.rels[n]
	return s, ok
}

// RelationOID implements [Names].
func (m *MapNames) RelationOID(db, oid uint32) (string, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s, ok := m.oids[[2]uint32{db, oid}]
	return s, ok
}

// pgEpochUnix is PostgreSQL's timestamp epoch, 2000-01-01 UTC, in Unix
// seconds; TimestampTz counts microseconds from it.
const pgEpochUnix = 946684800

// pgTime converts a TimestampTz; split in seconds so that a corrupt value
// cannot overflow a Duration.
func pgTime(us int64) time.Time {
	return time.Unix(pgEpochUnix+us/1e6, (us%1e6)*1e3).UTC()
}
