package pgagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// BaseBackupInfo is one base backup in the vault.
type BaseBackupInfo struct {
	ID repo.ID `json:"id"`
	// VaultTime is when the vault committed the snapshot, on its own clock.
	VaultTime time.Time `json:"vault_time"`
	Tree      repo.ID   `json:"tree"`
	Meta      BaseMeta  `json:"meta"`
	// WALReach is how far the WAL in the vault reaches, without a gap, from
	// the backup's start LSN along the timelines to the newest one (see
	// Window.Timeline); Usable says it reaches at least the backup's end
	// LSN, without which the backup is not consistent.
	WALReach pgwal.LSN `json:"-"` // as text in JSON
	Usable   bool      `json:"usable"`
}

// Window is the span of time a restore can reach.
type Window struct {
	// Earliest is the end time of the oldest usable base backup: the first
	// moment at which a restored cluster is consistent. Zero when no base
	// backup is usable.
	Earliest time.Time `json:"earliest,omitzero"`
	// Latest is the vault's receive time of the last WAL piece that
	// continues, without a gap, from the newest usable base backup. It is
	// an upper bound of the last commit the vault holds (the agent stores
	// WAL within its flush interval of the commit): reading commit times out
	// of the WAL would make it exact. A restore with Latest is exact
	// regardless: it replays every byte there is.
	Latest time.Time `json:"latest,omitzero"`
	// LatestLSN is where that WAL ends, on Timeline.
	LatestLSN pgwal.LSN `json:"-"` // as text in JSON
	// Timeline is the newest timeline descending from the backups'; a
	// restore follows it ('latest').
	Timeline uint32 `json:"timeline,omitzero"`
}

// MarshalJSON writes the LSN in PostgreSQL's text form.
func (b BaseBackupInfo) MarshalJSON() ([]byte, error) {
	type plain BaseBackupInfo
	return json.Marshal(struct {
		plain
		WALReach string `json:"wal_reach"`
	}{plain(b), b.WALReach.String()})
}

// MarshalJSON writes the LSN in PostgreSQL's text form.
func (w Window) MarshalJSON() ([]byte, error) {
	type plain Window
	j := struct {
		plain
		LatestLSN string `json:"latest_lsn,omitempty"`
	}{plain: plain(w)}
	if w.LatestLSN != 0 {
		j.LatestLSN = w.LatestLSN.String()
	}
	return json.Marshal(j)
}

// IsZero reports whether nothing is restorable.
func (w Window) IsZero() bool { return w.Earliest.IsZero() }

// ErrNoBackup means no base backup can reach the requested target.
var ErrNoBackup = errors.New("pgagent: no base backup can reach the target")

// Backups lists the base backups in the vault, oldest first by vault time,
// and the recoverable window.
func Backups(ctx context.Context, r *repo.Repository) ([]BaseBackupInfo, Window, error) {
	bs, _, w, err := load(ctx, r)
	return bs, w, err
}

// walState is the vault's WAL as a restore sees it: the catalog and the
// timeline path to the newest timeline.
type walState struct {
	cat  *pgwal.Catalog
	path timelinePath
}

// load reads the base backups and the WAL catalog and works out what each
// backup reaches.
func load(ctx context.Context, r *repo.Repository) ([]BaseBackupInfo, *walState, Window, error) {
	snaps, _, err := r.Snapshots(ctx)
	if err != nil {
		return nil, nil, Window{}, fmt.Errorf("pgagent: list snapshots: %w", err)
	}
	var bs []BaseBackupInfo
	for _, s := range snaps {
		if s.Kind != snapshot.KindPGBase {
			continue
		}
		var m BaseMeta
		if err := json.Unmarshal(s.Meta, &m); err != nil {
			return nil, nil, Window{}, fmt.Errorf("pgagent: base backup %s: metadata: %w", s.ID, err)
		}
		bs = append(bs, BaseBackupInfo{ID: s.ID, VaultTime: s.When(), Tree: s.Tree, Meta: m})
	}
	cat, err := pgwal.Load(ctx, r)
	if err != nil {
		return nil, nil, Window{}, fmt.Errorf("pgagent: WAL catalog: %w", err)
	}
	path, err := newestPath(ctx, cat)
	if err != nil {
		return nil, nil, Window{}, err
	}
	ws := &walState{cat: cat, path: path}
	for i := range bs {
		bs[i].WALReach = path.reach(cat.Contiguous, bs[i].Meta.Timeline, bs[i].Meta.StartLSN)
		bs[i].Usable = bs[i].WALReach >= bs[i].Meta.EndLSN && bs[i].Meta.EndLSN > 0
	}
	w := window(bs, ws)
	if !w.IsZero() {
		if w.Latest, err = ws.lastPieceTime(ctx, r, w.LatestLSN); err != nil {
			return nil, nil, Window{}, err
		}
	}
	return bs, ws, w, nil
}

func window(bs []BaseBackupInfo, ws *walState) Window {
	w := Window{Timeline: ws.path.target()}
	var newest *BaseBackupInfo
	for i := range bs {
		if !bs[i].Usable {
			continue
		}
		if w.Earliest.IsZero() || bs[i].Meta.EndTime.Before(w.Earliest) {
			w.Earliest = bs[i].Meta.EndTime
		}
		if newest == nil || bs[i].WALReach > newest.WALReach {
			newest = &bs[i]
		}
	}
	if newest == nil {
		return Window{}
	}
	w.LatestLSN = newest.WALReach
	return w
}

// lastPieceTime is the vault's receive time of the WAL piece on the
// timeline path that holds the last byte before end: the modification time
// the vault gave the object, which no client sets.
func (ws *walState) lastPieceTime(ctx context.Context, r *repo.Repository, end pgwal.LSN) (time.Time, error) {
	var last *pgwal.Piece
	for _, p := range ws.cat.Pieces() {
		if p.History || p.Timeline != ws.path.target() && !ws.path.contains(p.Timeline) || p.End > end {
			continue
		}
		if last == nil || p.End > last.End || p.End == last.End && p.Timeline > last.Timeline {
			last = &p
		}
	}
	if last == nil {
		return time.Time{}, nil
	}
	fi, err := r.Store().Stat(ctx, backend.Handle{Type: backend.WAL, Name: last.Name.String()})
	if err != nil {
		return time.Time{}, fmt.Errorf("pgagent: WAL piece %s: %w", last.Name, err)
	}
	return fi.ModTime, nil
}

// timelinePath lists the timelines that recovery to the target timeline
// passes through, oldest first; each but the last ends at its switch point
// (where the next one branched off).
type timelinePath []tlSpan

type tlSpan struct {
	TLI uint32
	End pgwal.LSN // the switch point to the next timeline; 0 for the last
}

func (p timelinePath) target() uint32 {
	if len(p) == 0 {
		return 0
	}
	return p[len(p)-1].TLI
}

func (p timelinePath) contains(tli uint32) bool {
	for _, s := range p {
		if s.TLI == tli {
			return true
		}
	}
	return false
}

// reach follows contiguous WAL from start on timeline tli along the path
// and returns where it ends; 0 when tli is not on the path.
func (p timelinePath) reach(contiguous func(uint32, pgwal.LSN) pgwal.LSN, tli uint32, start pgwal.LSN) pgwal.LSN {
	i := 0
	for i < len(p) && p[i].TLI != tli {
		i++
	}
	if i == len(p) {
		return 0
	}
	pos := start
	for ; i < len(p); i++ {
		if p[i].End != 0 && pos >= p[i].End {
			continue // this timeline ended before start: already on the next
		}
		end := contiguous(p[i].TLI, pos)
		if end < pos {
			end = pos
		}
		if p[i].End == 0 || end < p[i].End {
			return end
		}
		pos = p[i].End
	}
	return pos
}

// newestPath builds the path to the newest timeline in the catalog from its
// history file. Without any timeline it is empty.
func newestPath(ctx context.Context, cat *pgwal.Catalog) (timelinePath, error) {
	tlis := cat.Timelines()
	if len(tlis) == 0 {
		return nil, nil
	}
	sort.Slice(tlis, func(i, j int) bool { return tlis[i] < tlis[j] })
	newest := tlis[len(tlis)-1]
	if newest == 1 {
		return timelinePath{{TLI: 1}}, nil
	}
	h, err := cat.History(ctx, newest)
	if err != nil {
		return nil, fmt.Errorf("pgagent: history of timeline %d: %w", newest, err)
	}
	sw, err := pgwal.ParseHistory(h)
	if err != nil {
		return nil, fmt.Errorf("pgagent: history of timeline %d: %w", newest, err)
	}
	var p timelinePath
	for _, s := range sw {
		p = append(p, tlSpan{TLI: s.Timeline, End: s.End})
	}
	return append(p, tlSpan{TLI: newest}), nil
}
