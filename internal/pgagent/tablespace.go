package pgagent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/restorer"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// ErrTablespaceInTarget means a tablespace would be restored inside the
// target data directory (or the target inside it). PostgreSQL wants a
// tablespace outside the data directory; a copy inside it would also be
// restored twice over by a later delta restore.
var ErrTablespaceInTarget = errors.New("pgagent: a tablespace location must be outside the target data directory")

// RestoredTablespace says where a tablespace's files were restored.
type RestoredTablespace struct {
	OID uint32 `json:"oid"`
	// Original is its location when the backup was taken.
	Original string `json:"original"`
	// Location is where its files are now; pg_tblspc/<oid> links to it.
	Location string `json:"location"`
}

// ParseTablespaceMapping parses a --tablespace-map value, OLD=NEW, where
// OLD is a tablespace's OID or original location. As in pg_basebackup's
// --tablespace-mapping, "\=" stands for an "=" inside either path.
func ParseTablespaceMapping(s string) (from, to string, err error) {
	var parts []string
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\' && i+1 < len(s) && s[i+1] == '=':
			b.WriteByte('=')
			i++
		case s[i] == '=':
			parts = append(parts, b.String())
			b.Reset()
		default:
			b.WriteByte(s[i])
		}
	}
	parts = append(parts, b.String())
	if len(parts) != 2 || parts[0] == "" || parts[1] == "" {
		return "", "", fmt.Errorf("pgagent: tablespace mapping %q: want OLD=NEW, OLD an OID or the original location (write \\= for = in a path)", s)
	}
	return parts[0], parts[1], nil
}

// placeTablespaces decides where each of the backup's tablespaces goes:
// its mapped location or else its original one, made absolute. It refuses
// a mapping that names no tablespace (a typo would otherwise restore over
// the original location), a location inside target or holding it, and two
// tablespaces sharing a location. Without delta every location must be
// missing or empty, as the target must.
func placeTablespaces(target string, tss []Tablespace, mapping map[string]string, delta bool) ([]RestoredTablespace, error) {
	used := map[string]bool{}
	var out []RestoredTablespace
	for _, ts := range tss {
		oid := strconv.FormatUint(uint64(ts.OID), 10)
		loc, by := ts.Location, ""
		for k, v := range mapping {
			if k != oid && filepath.Clean(k) != filepath.Clean(ts.Location) {
				continue
			}
			if by != "" && v != loc {
				return nil, fmt.Errorf("pgagent: tablespace %s is mapped twice, by %s and by %s", oid, by, k)
			}
			used[k], loc, by = true, v, k
		}
		abs, err := filepath.Abs(loc)
		if err != nil {
			return nil, fmt.Errorf("pgagent: tablespace %s location %s: %w", oid, loc, err)
		}
		out = append(out, RestoredTablespace{OID: ts.OID, Original: ts.Location, Location: abs})
	}
	var unknown []string
	for k := range mapping {
		if !used[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		var have []string
		for _, ts := range tss {
			have = append(have, fmt.Sprintf("%d (%s)", ts.OID, ts.Location))
		}
		if len(have) == 0 {
			have = []string{"none"}
		}
		return nil, fmt.Errorf("pgagent: tablespace mapping for %s: the base backup has no such tablespace; it has %s",
			strings.Join(unknown, ", "), strings.Join(have, ", "))
	}
	rtarget := resolvePath(target)
	for i, ts := range out {
		rloc := resolvePath(ts.Location)
		if within(target, ts.Location) || within(rtarget, rloc) || within(ts.Location, target) || within(rloc, rtarget) {
			return nil, fmt.Errorf("%w: tablespace %d at %s, target %s (map it elsewhere with --tablespace-map %d=DIR)",
				ErrTablespaceInTarget, ts.OID, ts.Location, target, ts.OID)
		}
		for _, o := range out[:i] {
			if within(o.Location, ts.Location) || within(ts.Location, o.Location) {
				return nil, fmt.Errorf("pgagent: tablespaces %d and %d would share %s", o.OID, ts.OID, ts.Location)
			}
		}
		if !delta {
			if err := checkEmpty(ts.Location); err != nil {
				return nil, fmt.Errorf("%w (tablespace %d; map it elsewhere with --tablespace-map %d=DIR)", err, ts.OID, ts.OID)
			}
		}
	}
	return out, nil
}

// within reports whether p is dir or below it.
func within(dir, p string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
}

// resolvePath resolves the symlinks in the part of p that exists, so that
// a location reached through a link into the target is still seen inside.
func resolvePath(p string) string {
	rest := ""
	for cur := p; ; cur = filepath.Dir(cur) {
		if r, err := filepath.EvalSymlinks(cur); err == nil {
			return filepath.Join(r, rest)
		}
		if cur == filepath.Dir(cur) {
			return p
		}
		rest = filepath.Join(filepath.Base(cur), rest)
	}
}

// restoreWithTablespaces restores the backup's data directory into target
// and each tablespace into its own location, and links pg_tblspc/<oid> to
// it. The restorer never follows a symlink below its target, so each
// tablespace is restored from its own subtree straight into its location
// (no copy, and a location on another file system costs nothing more),
// and the data directory without those subtrees. With delta each part is
// compared and rewritten in place, as the data directory alone is.
func restoreWithTablespaces(ctx context.Context, r *repo.Repository, root repo.ID, target string, tss []RestoredTablespace,
	delta bool, ropts restorer.Options, res *RestoreResult) error {
	include, subtrees, err := splitTablespaces(ctx, r, root, tss)
	if err != nil {
		return err
	}
	// Each part restores with its own counts; progress adds up the parts
	// done so far.
	var done restorer.Stats
	defer func() { res.Stats = done }()
	if p := ropts.Progress; p != nil {
		ropts.Progress = func(s restorer.Stats) { p(addStats(done, s)) }
	}
	skip := map[string]bool{}
	for _, ts := range tss {
		skip["pg_tblspc/"+strconv.FormatUint(uint64(ts.OID), 10)] = true
	}
	main := ropts
	main.Include = include
	part := &RestoreResult{}
	if delta {
		err = deltaRestore(ctx, r, root, target, skip, main, part)
	} else {
		part.Stats, err = restorer.Restore(ctx, r, root, target, main)
	}
	done = addStats(done, part.Stats)
	addDelta(res, part)
	if err != nil {
		return err
	}
	tblspc := filepath.Join(target, "pg_tblspc")
	if err := os.MkdirAll(tblspc, 0o700); err != nil {
		return fmt.Errorf("pgagent: %w", err)
	}
	for _, ts := range tss {
		if err := makeServerDir(ts.Location, "tablespace location"); err != nil {
			return err
		}
		part := &RestoreResult{}
		sub, ok := subtrees[ts.OID]
		switch {
		case !ok:
			// The backup holds nothing of it: an empty location will do.
		case delta:
			err = deltaRestore(ctx, r, sub, ts.Location, nil, ropts, part)
		default:
			part.Stats, err = restorer.Restore(ctx, r, sub, ts.Location, ropts)
		}
		done = addStats(done, part.Stats)
		addDelta(res, part)
		if err != nil {
			return fmt.Errorf("tablespace %d at %s: %w", ts.OID, ts.Location, err)
		}
		if err := linkTablespace(filepath.Join(tblspc, strconv.FormatUint(uint64(ts.OID), 10)), ts.Location, res); err != nil {
			return err
		}
		// The location's own mode and owner are not in its subtree: the
		// server wants it private and its own, as initdb makes a data
		// directory.
		if err := os.Chmod(ts.Location, 0o700); err != nil {
			return fmt.Errorf("pgagent: %w", err)
		}
		if err := ownToPG(ts.Location); err != nil {
			return err
		}
	}
	res.Tablespaces = tss
	return nil
}

// splitTablespaces returns the include patterns selecting everything of
// the snapshot but the tablespaces in tss, and the subtree of each.
func splitTablespaces(ctx context.Context, r *repo.Repository, root repo.ID, tss []RestoredTablespace) ([]string, map[uint32]repo.ID, error) {
	t, err := r.LoadTree(ctx, root)
	if err != nil {
		return nil, nil, fmt.Errorf("pgagent: read base backup: %w", err)
	}
	want := map[string]uint32{}
	for _, ts := range tss {
		want[strconv.FormatUint(uint64(ts.OID), 10)] = ts.OID
	}
	subtrees := map[uint32]repo.ID{}
	var include []string
	for _, n := range t.Nodes {
		if n.Name != "pg_tblspc" || n.Type != snapshot.Dir {
			include = append(include, globEscape(n.Name))
			continue
		}
		st, err := r.LoadTree(ctx, *n.Subtree)
		if err != nil {
			return nil, nil, fmt.Errorf("pgagent: read base backup's pg_tblspc: %w", err)
		}
		for _, c := range st.Nodes {
			oid, ok := want[c.Name]
			if ok && c.Type == snapshot.Dir {
				subtrees[oid] = *c.Subtree
				continue
			}
			// An in-place tablespace (allow_in_place_tablespaces) is a
			// directory here and stays one.
			include = append(include, "pg_tblspc/"+globEscape(c.Name))
		}
	}
	if len(include) == 0 {
		// An empty Include selects everything.
		return nil, nil, errors.New("pgagent: the base backup holds nothing but tablespaces")
	}
	return include, subtrees, nil
}

// makeServerDir creates a directory for the server's files (the data
// directory, a tablespace location) that does not exist yet, mode 0700; its
// missing parents are made searchable (0755), since the server's OS user
// must reach it (a restore as root for a server run as postgres). what
// names it in errors.
func makeServerDir(dir, what string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("pgagent: %s: %w", what, err)
	}
	err := os.Mkdir(dir, 0o700)
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("pgagent: %s: %w", what, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("pgagent: %s: %w", what, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("pgagent: %s %s is not a directory", what, dir)
	}
	return nil
}

// linkTablespace makes link a symlink to loc. What is there already (a
// delta target's old link, or a directory an earlier restore left) is
// replaced; an old link's destination is left alone.
func linkTablespace(link, loc string, res *RestoreResult) error {
	fi, err := os.Lstat(link)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("pgagent: %w", err)
	case fi.Mode()&fs.ModeSymlink != 0:
		if old, err := os.Readlink(link); err == nil && old == loc {
			return nil
		}
		fallthrough
	default:
		if err := os.RemoveAll(link); err != nil {
			return fmt.Errorf("pgagent: %w", err)
		}
		res.Removed++
	}
	if err := os.Symlink(loc, link); err != nil {
		return fmt.Errorf("pgagent: link tablespace: %w", err)
	}
	return nil
}

// addDelta adds a part's delta counts to res.
func addDelta(res, part *RestoreResult) {
	res.Rewritten += part.Rewritten
	res.Unchanged += part.Unchanged
	res.Removed += part.Removed
}

func addStats(a, b restorer.Stats) restorer.Stats {
	return restorer.Stats{
		Files: a.Files + b.Files, HardLinks: a.HardLinks + b.HardLinks, Dirs: a.Dirs + b.Dirs,
		Symlinks: a.Symlinks + b.Symlinks, Specials: a.Specials + b.Specials, Skipped: a.Skipped + b.Skipped,
		Bytes: a.Bytes + b.Bytes, BytesDone: a.BytesDone + b.BytesDone, Blobs: a.Blobs + b.Blobs,
		BlobsDone: a.BlobsDone + b.BlobsDone, Loaded: a.Loaded + b.Loaded,
		OwnerSkipped: a.OwnerSkipped + b.OwnerSkipped, Verified: a.Verified + b.Verified, Failed: a.Failed + b.Failed,
	}
}
