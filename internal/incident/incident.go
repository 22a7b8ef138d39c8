// Package incident turns what the tripwire decodes from the WAL into
// incidents: durable records in the state store, one alert record each in
// the ledger, a webhook notification and a log line. An incident names
// its restore point, so `dualkey pg restore --before-incident ID` can
// bring the cluster back to the instant before the damage.
//
// Terms:
//   - event: one [tripwire.Event], raised at a commit record.
//   - detection: the events of one commit record ([pgagent.Detection]).
//   - incident: the events of one kind in one commit, merged: a commit
//     deleting many rows of two tables is one mass-delete incident naming
//     both. Its key is (timeline, commit LSN, kind), so an agent that
//     decodes the same WAL again after a restart records nothing twice.
package incident

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/state"
	"github.com/dualkey/dualkey/internal/tripwire"
)

// ErrNotFound: no incident has that ID.
var ErrNotFound = errors.New("incident: no such incident")

// Incident is one destructive act seen in the WAL.
type Incident struct {
	// ID is "<timeline>.<commit LSN in hex>.<kind>", e.g.
	// "1.3000A28.truncate": unique, stable across agent restarts, and in
	// WAL order when sorted by timeline and LSN.
	ID string `json:"id"`
	// Kind is the tripwire's: database-drop, relations-dropped, truncate,
	// mass-delete or mass-update.
	Kind     string `json:"kind"`
	Timeline uint32 `json:"timeline"`
	// XID is the top-level transaction id (32 bits, as in the WAL).
	XID uint32 `json:"xid"`
	// CommitLSN is where the commit record starts; CommitTime is the
	// commit time the server wrote into it.
	CommitLSN  string    `json:"commit_lsn"`
	CommitTime time.Time `json:"commit_time"`
	// Database is the database's name (its OID when the name is unknown).
	Database    string `json:"database"`
	DatabaseOID uint32 `json:"database_oid"`
	// Objects are the tables destroyed or changed (schema.name), or the
	// database for a database drop.
	Objects []string `json:"objects"`
	// Relations are the relfilenodes in the events, with their names and
	// row counts.
	Relations []Relation `json:"relations,omitempty"`
	// Rows is, for a mass delete (update), the rows deleted (updated).
	Rows int64 `json:"rows,omitempty"`
	// RestoreLSN is the restore point: replaying WAL up to, not including,
	// the record here (recovery_target_lsn, recovery_target_inclusive =
	// off) gives the state just before the damage. For a database drop it
	// is the drop record, which removes the files before the commit.
	RestoreLSN string `json:"restore_lsn"`
	// Received is when the agent received the WAL holding the commit,
	// Detected when it had decoded it; DelayMS is Detected - CommitTime in
	// milliseconds (across two clocks when the agent runs on another host).
	Received time.Time `json:"received"`
	Detected time.Time `json:"detected"`
	DelayMS  float64   `json:"delay_ms"`
}

// Relation is one relfilenode of an incident.
type Relation struct {
	Node    string `json:"node"` // tablespace/database/relfilenode
	Name    string `json:"name,omitempty"`
	Deletes int64  `json:"deletes,omitempty"`
	Updates int64  `json:"updates,omitempty"`
	Empty   bool   `json:"empty,omitempty"`
}

// RestorePoint returns RestoreLSN parsed.
func (in *Incident) RestorePoint() (pgwal.LSN, error) {
	l, err := pgwal.ParseLSN(in.RestoreLSN)
	if err != nil || l == 0 {
		return 0, fmt.Errorf("incident %s: restore point %q: %v", in.ID, in.RestoreLSN, err)
	}
	return l, nil
}

// Summary is one human line: what, where, when.
func (in *Incident) Summary() string {
	what := map[string]string{
		"database-drop":     "database dropped",
		"relations-dropped": "relations dropped",
		"truncate":          "table truncated",
		"mass-delete":       "mass delete",
		"mass-update":       "mass update",
	}[in.Kind]
	if what == "" {
		what = in.Kind
	}
	s := fmt.Sprintf("%s in %s: %s (xid %d, commit %s at %s)", what, in.Database, strings.Join(in.Objects, ", "),
		in.XID, in.CommitLSN, in.CommitTime.UTC().Format(time.RFC3339Nano))
	if in.Rows > 0 {
		s += fmt.Sprintf(", %d rows", in.Rows)
	}
	return s
}

// ID returns an incident's ID.
func ID(timeline uint32, commit tripwire.LSN, kind tripwire.Kind) string {
	return fmt.Sprintf("%d.%X.%s", timeline, uint64(commit), kind)
}

// ParseID checks the shape of an incident ID.
func ParseID(s string) error {
	parts := strings.SplitN(s, ".", 3)
	if len(parts) != 3 || parts[2] == "" {
		return fmt.Errorf("incident: ID %q: want TIMELINE.LSN.KIND, e.g. 1.3000A28.truncate (dualkey incidents list)", s)
	}
	if _, err := strconv.ParseUint(parts[0], 10, 32); err != nil {
		return fmt.Errorf("incident: ID %q: timeline %q is not a number", s, parts[0])
	}
	if _, err := strconv.ParseUint(parts[1], 16, 64); err != nil {
		return fmt.Errorf("incident: ID %q: LSN %q is not hexadecimal", s, parts[1])
	}
	return nil
}

// FromDetection merges a detection's events into incidents, one per kind.
func FromDetection(d pgagent.Detection) []Incident {
	var out []Incident
	for i, e := range d.Events {
		id := ID(d.Timeline, e.CommitLSN, e.Kind)
		k := slices.IndexFunc(out, func(in Incident) bool { return in.ID == id })
		if k < 0 {
			db := e.DBName
			if db == "" {
				db = strconv.FormatUint(uint64(e.DB), 10)
			}
			out = append(out, Incident{ID: id, Kind: e.Kind.String(), Timeline: d.Timeline, XID: e.XID,
				CommitLSN: pgwal.LSN(e.CommitLSN).String(), CommitTime: e.Time.UTC(), Database: db, DatabaseOID: e.DB,
				RestoreLSN: pgwal.LSN(e.LSN).String(), Received: d.Received.UTC(), Detected: d.Detected.UTC(),
				DelayMS: float64(d.Detected.Sub(e.Time).Microseconds()) / 1000, Objects: []string{}})
			k = len(out) - 1
		}
		in := &out[k]
		if e.LSN < tripwire.LSN(mustLSN(in.RestoreLSN)) {
			in.RestoreLSN = pgwal.LSN(e.LSN).String()
		}
		if i < len(d.Objects) {
			for _, o := range d.Objects[i] {
				if !slices.Contains(in.Objects, o) {
					in.Objects = append(in.Objects, o)
				}
			}
		}
		for _, r := range e.Relations {
			in.Relations = append(in.Relations, Relation{Node: r.Node.String(), Name: r.Name, Deletes: r.Deletes, Updates: r.Updates, Empty: r.Empty})
			switch e.Kind {
			case tripwire.MassDelete:
				in.Rows += r.Deletes
			case tripwire.MassUpdate:
				in.Rows += r.Updates
			}
		}
	}
	return out
}

func mustLSN(s string) pgwal.LSN {
	l, _ := pgwal.ParseLSN(s)
	return l
}

// Recorder records incidents: state first (which deduplicates), then the
// ledger, the webhook and the log. Its Detect method is what
// pgagent.AgentOptions.OnDetect wants.
type Recorder struct {
	DB *state.DB
	// Ledger, if set, gets one record of kind alert per new incident.
	Ledger *ledger.Ledger
	// Notifier, if set, is told of each new incident (a quorum.Webhook
	// delivers in the background).
	Notifier quorum.Notifier
	Log      *slog.Logger
	// OnRecord, if set, is called with each incident after it was stored
	// (new is false for one the store already had).
	OnRecord func(in Incident, new bool)
}

// Detect records the incidents of d. Failures are logged: the tripwire
// goes on, and an alert that could not be stored is still logged and sent.
func (r *Recorder) Detect(ctx context.Context, d pgagent.Detection) {
	for _, in := range FromDetection(d) {
		if _, err := r.Record(ctx, in); err != nil {
			r.log().Error("tripwire: incident not fully recorded", "incident", in.ID, "err", err)
		}
	}
}

func (r *Recorder) log() *slog.Logger {
	if r.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return r.Log
}

// Record stores in and, if it is new, appends it to the ledger, notifies
// and logs it. It reports whether it was new. When the store fails the
// incident is still logged and notified (twice is better than never).
func (r *Recorder) Record(ctx context.Context, in Incident) (bool, error) {
	doc, err := json.Marshal(in)
	if err != nil {
		return false, fmt.Errorf("incident: %w", err)
	}
	var errs []error
	isNew := true
	if r.DB != nil {
		lsn, _ := pgwal.ParseLSN(in.CommitLSN)
		isNew, err = r.DB.PutIncident(ctx, state.Incident{ID: in.ID, Kind: in.Kind, Timeline: in.Timeline, CommitLSN: uint64(lsn),
			XID: in.XID, Database: in.Database, Committed: in.CommitTime, Detected: in.Detected, Doc: doc})
		if err != nil {
			isNew = true
			errs = append(errs, err)
		}
	}
	if r.OnRecord != nil {
		r.OnRecord(in, isNew)
	}
	if !isNew {
		r.log().Info("tripwire: incident decoded again, already recorded", "incident", in.ID)
		return false, nil
	}
	r.log().Error("tripwire: "+in.Summary(), "incident", in.ID, "kind", in.Kind, "db", in.Database, "objects", in.Objects,
		"xid", in.XID, "commit_lsn", in.CommitLSN, "commit_time", in.CommitTime, "restore_lsn", in.RestoreLSN,
		"rows", in.Rows, "delay_ms", in.DelayMS,
		"restore", "dualkey pg restore --before-incident "+in.ID+" --target DIR")
	if r.Ledger != nil {
		if _, err := r.Ledger.Append(ctx, ledger.Entry{Kind: ledger.KindAlert, Data: json.RawMessage(doc)}); err != nil {
			errs = append(errs, fmt.Errorf("incident: ledger: %w", err))
		}
	}
	if r.Notifier != nil {
		r.Notifier.Notify(quorum.Event{Type: quorum.EventIncident, Time: in.Detected,
			Text:     "Dualkey tripwire: " + in.Summary() + ". Restore to just before it: dualkey pg restore --before-incident " + in.ID + " --target DIR",
			Incident: doc})
	}
	return true, errors.Join(errs...)
}

// Get returns incident id from db; an unknown id wraps ErrNotFound.
func Get(ctx context.Context, db *state.DB, id string) (Incident, error) {
	if err := ParseID(id); err != nil {
		return Incident{}, err
	}
	row, err := db.GetIncident(ctx, id)
	if errors.Is(err, state.ErrNotFound) {
		return Incident{}, fmt.Errorf("%w: %s (dualkey incidents list shows them)", ErrNotFound, id)
	}
	if err != nil {
		return Incident{}, err
	}
	return decode(row)
}

// List returns every incident, oldest detection first.
func List(ctx context.Context, db *state.DB) ([]Incident, error) {
	rows, err := db.ListIncidents(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Incident, 0, len(rows))
	for _, row := range rows {
		in, err := decode(row)
		if err != nil {
			return nil, err
		}
		out = append(out, in)
	}
	return out, nil
}

func decode(row state.Incident) (Incident, error) {
	var in Incident
	if err := json.Unmarshal(row.Doc, &in); err != nil {
		return Incident{}, fmt.Errorf("incident %s: stored document: %w", row.ID, err)
	}
	if in.ID != row.ID {
		return Incident{}, fmt.Errorf("incident %s: stored document names %s", row.ID, in.ID)
	}
	return in, nil
}
