package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"time"
)

// Incident is one tripwire alert as the store keeps it: the columns it is
// found and deduplicated by, and the full record as an opaque document
// (internal/incident defines it). The key (Timeline, CommitLSN, Kind) is
// unique, so an agent that decodes the same WAL again after a restart
// stores nothing twice.
type Incident struct {
	ID        string
	Kind      string
	Timeline  uint32
	CommitLSN uint64
	XID       uint32
	Database  string
	// Committed is the commit time the server wrote into the WAL;
	// Detected is when the agent decoded the commit.
	Committed, Detected time.Time
	Doc                 []byte
}

// PutIncident stores in unless an incident with its ID or with its
// (Timeline, CommitLSN, Kind) exists; it reports whether it stored it.
// ID, Kind, Timeline, CommitLSN, Detected and Doc are required.
func (db *DB) PutIncident(ctx context.Context, in Incident) (bool, error) {
	switch {
	case in.ID == "" || in.Kind == "" || len(in.Doc) == 0:
		return false, fmt.Errorf("%w: incident %q: id, kind and document are required", ErrInvalid, in.ID)
	case in.Timeline == 0 || in.CommitLSN == 0 || in.CommitLSN > math.MaxInt64:
		return false, fmt.Errorf("%w: incident %s: timeline %d, commit LSN %d", ErrInvalid, in.ID, in.Timeline, in.CommitLSN)
	case in.Detected.IsZero():
		return false, fmt.Errorf("%w: incident %s: no detection time", ErrInvalid, in.ID)
	}
	n, err := db.exec(ctx, `INSERT INTO incidents (id, kind, timeline, commit_lsn, xid, dbname, committed, detected, doc)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING`,
		in.ID, in.Kind, int64(in.Timeline), int64(in.CommitLSN), int64(in.XID), in.Database,
		micros(in.Committed), micros(in.Detected), in.Doc)
	if err != nil {
		return false, db.wrap(err, "put incident %s", in.ID)
	}
	return n == 1, nil
}

const incidentColumns = "id, kind, timeline, commit_lsn, xid, dbname, committed, detected, doc"

func scanIncident(sc scanner) (Incident, error) {
	var in Incident
	var tli, lsn, xid int64
	var committed, detected sql.NullInt64
	if err := sc.Scan(&in.ID, &in.Kind, &tli, &lsn, &xid, &in.Database, &committed, &detected, &in.Doc); err != nil {
		return Incident{}, err
	}
	in.Timeline, in.CommitLSN, in.XID = uint32(tli), uint64(lsn), uint32(xid)
	in.Committed, in.Detected = fromMicros(committed), fromMicros(detected)
	return in, nil
}

// GetIncident returns one incident, or ErrNotFound.
func (db *DB) GetIncident(ctx context.Context, id string) (Incident, error) {
	in, err := queryOne(ctx, db, scanIncident, "SELECT "+incidentColumns+" FROM incidents WHERE id = $1", id)
	if errors.Is(err, sql.ErrNoRows) {
		return Incident{}, fmt.Errorf("state: incident %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Incident{}, db.wrap(err, "get incident %s", id)
	}
	return in, nil
}

// ListIncidents returns every incident, oldest detection first.
func (db *DB) ListIncidents(ctx context.Context) ([]Incident, error) {
	ins, err := queryAll(ctx, db, scanIncident, "SELECT "+incidentColumns+" FROM incidents ORDER BY detected, id")
	if err != nil {
		return nil, db.wrap(err, "list incidents")
	}
	return ins, nil
}
