package pgagent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dualkey/dualkey/internal/tripwire"
)

// NameCache is the tripwire's catalog cache: a [tripwire.Names] filled from
// the protected server's pg_database and, per database, pg_class. It never
// forgets: a refresh adds and renames but removes nothing, so a relation
// keeps its last known name after it is dropped, which is when the name is
// needed. It is safe for concurrent use.
type NameCache struct {
	url string
	// MaxDatabases bounds how many databases one Refresh reads pg_class
	// from (one connection each, one after the other); 0 means 200. The
	// others keep the names they had and are reported in Refresh's error.
	MaxDatabases int

	refreshMu sync.Mutex // one Refresh at a time

	mu   sync.RWMutex
	dbs  map[uint32]string
	rels map[tripwire.RelFileNode]relName
	oids map[[2]uint32]string
	last time.Time
}

// relName is what the cache knows of one relfilenode: the relation's own
// "schema.name" and, for an index or a TOAST table (or a TOAST table's
// index), the table it belongs to.
type relName struct {
	name, owner string
	// empty: the file had no pages when last read (pg_relation_size 0).
	empty bool
}

var _ tripwire.Names = (*NameCache)(nil)

// NewNameCache returns an empty cache that reads from the server at url
// (any database; the cache connects to each one by name).
func NewNameCache(url string) *NameCache {
	return &NameCache{url: url, dbs: map[uint32]string{}, rels: map[tripwire.RelFileNode]relName{}, oids: map[[2]uint32]string{}}
}

// Database implements [tripwire.Names].
func (c *NameCache) Database(oid uint32) (string, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	s, ok := c.dbs[oid]
	return s, ok
}

// Relation implements [tripwire.Names].
func (c *NameCache) Relation(n tripwire.RelFileNode) (string, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	r, ok := c.rels[n]
	return r.name, ok
}

// RelationOID implements [tripwire.Names].
func (c *NameCache) RelationOID(db, oid uint32) (string, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	s, ok := c.oids[[2]uint32{db, oid}]
	return s, ok
}

// Table returns the table relfilenode n belongs to: the relation itself
// for a table or materialized view, the indexed table for an index, the
// owning table for a TOAST table or its index.
func (c *NameCache) Table(n tripwire.RelFileNode) (string, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	r, ok := c.rels[n]
	if !ok {
		return "", false
	}
	if r.owner != "" {
		return r.owner, true
	}
	return r.name, true
}

// KnownEmpty reports whether relfilenode n had no pages when the cache
// last read it. With the WAL decoded since, it tells a TRUNCATE or DROP of
// a table that never held a row (pgbench's TRUNCATE pgbench_history on an
// empty table) from one that destroyed data.
func (c *NameCache) KnownEmpty(n tripwire.RelFileNode) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.rels[n].empty
}

// Refreshed returns when the last Refresh finished (zero before one did).
func (c *NameCache) Refreshed() time.Time {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.last
}

// classQuery lists every relation with files in the current database:
// pg_relation_filenode also covers mapped catalogs (relfilenode 0), and a
// tablespace of 0 means the database's default. The owner columns name the
// indexed table of an index and the table a TOAST table belongs to; the
// last column says a table's main fork has no pages (pg_relation_size is
// NULL for a relation dropped while the query runs: not known empty).
const classQuery = `SELECT c.oid, pg_relation_filenode(c.oid), c.reltablespace, n.nspname, c.relname,
	COALESCE(i.indrelid, 0), COALESCE(o.oid, 0),
	COALESCE(c.relkind IN ('r', 't', 'm') AND pg_relation_size(c.oid) = 0, false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
LEFT JOIN pg_class o ON o.reltoastrelid = c.oid AND c.relkind = 't'
WHERE pg_relation_filenode(c.oid) IS NOT NULL`

// Refresh reads pg_database, then pg_class of every database that accepts
// connections (up to MaxDatabases), and adds what it finds. A database it
// cannot read keeps its old names; its error is returned after the others
// are read.
func (c *NameCache) Refresh(ctx context.Context) error {
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	type db struct {
		oid, spc uint32
		name     string
		conn     bool
	}
	var dbs []db
	err := c.connect(ctx, "", func(conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, "SELECT oid, datname, dattablespace, datallowconn FROM pg_database ORDER BY oid")
		if err != nil {
			return err
		}
		for rows.Next() {
			var d db
			if err := rows.Scan(&d.oid, &d.name, &d.spc, &d.conn); err != nil {
				return err
			}
			dbs = append(dbs, d)
		}
		return rows.Err()
	})
	if err != nil {
		return fmt.Errorf("pgagent: names: read pg_database: %w", err)
	}
	c.mu.Lock()
	for _, d := range dbs {
		c.dbs[d.oid] = d.name
	}
	c.mu.Unlock()
	limit := c.MaxDatabases
	if limit <= 0 {
		limit = 200
	}
	var errs []error
	read := 0
	for _, d := range dbs {
		if !d.conn {
			continue // template0
		}
		if read == limit {
			errs = append(errs, fmt.Errorf("pgagent: names: more than %d databases; %s and later not read", limit, d.name))
			break
		}
		read++
		if err := c.connect(ctx, d.name, func(conn *pgx.Conn) error { return c.loadClass(ctx, conn, d.oid, d.spc) }); err != nil {
			errs = append(errs, fmt.Errorf("pgagent: names: database %s: %w", d.name, err))
		}
	}
	c.mu.Lock()
	c.last = time.Now()
	c.mu.Unlock()
	return errors.Join(errs...)
}

func (c *NameCache) loadClass(ctx context.Context, conn *pgx.Conn, dbOID, dbSpc uint32) error {
	type row struct {
		oid, node, spc, indrel, toastOwner uint32
		name                               string
		empty                              bool
	}
	rows, err := conn.Query(ctx, classQuery)
	if err != nil {
		return err
	}
	var all []row
	byOID := map[uint32]*row{}
	for rows.Next() {
		var r row
		var nsp, rel string
		if err := rows.Scan(&r.oid, &r.node, &r.spc, &nsp, &rel, &r.indrel, &r.toastOwner, &r.empty); err != nil {
			return err
		}
		r.name = nsp + "." + rel
		all = append(all, r)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	for i := range all {
		byOID[all[i].oid] = &all[i]
	}
	// owner follows index → table and TOAST → table, at most twice (a
	// TOAST table's index → the TOAST table → its table).
	owner := func(r *row) string {
		for range 2 {
			next := r.indrel
			if next == 0 {
				next = r.toastOwner
			}
			o, ok := byOID[next]
			if next == 0 || !ok {
				break
			}
			r = o
		}
		return r.name
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range all {
		r := &all[i]
		n := tripwire.RelFileNode{Spc: r.spc, DB: dbOID, Rel: r.node}
		switch n.Spc {
		case 0:
			n.Spc = dbSpc
		case 1664: // pg_global: shared catalogs, database 0 in the WAL
			n.DB = 0
		}
		rn := relName{name: r.name, empty: r.empty}
		if o := owner(r); o != r.name {
			rn.owner = o
		}
		c.rels[n] = rn
		c.oids[[2]uint32{dbOID, r.oid}] = r.name
	}
	return nil
}

// connect runs fn on a short-lived connection to database db (the URL's
// own database when db is "").
func (c *NameCache) connect(ctx context.Context, db string, fn func(*pgx.Conn) error) error {
	cfg, err := pgx.ParseConfig(c.url)
	if err != nil {
		return fmt.Errorf("connection URL: %w", err)
	}
	if db != "" {
		cfg.Database = db
	}
	cfg.RuntimeParams["application_name"] = "dualkey-tripwire"
	delete(cfg.RuntimeParams, "replication")
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return fn(conn)
}
