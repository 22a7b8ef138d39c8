package archiver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// Entry is one entry of a tree that does not come from the local file
// system, such as a member of a tar stream: see BackupEntries.
type Entry struct {
	// Path is where the entry goes inside the snapshot, slash-separated
	// and relative ("base/1/1259"); "./" prefixes, a leading slash and a
	// trailing slash are ignored, ".." is refused.
	Path string
	// Node is the entry's metadata: Type, Mode, UID, GID, User, Group,
	// times, LinkTarget, Rdev. Name, Content, Subtree and Chunking are set
	// by the archiver; Size is the number of bytes Content yields.
	Node snapshot.Node
	// Content is a file's data, read to its end before the next entry is
	// asked for. Nil means an empty file.
	Content io.Reader
}

// BackupEntries stores the tree that next yields as a new snapshot, whose
// only path is source (a description such as "pg:7212…", recorded in
// Snapshot.Paths). next returns io.EOF after the last entry; any other
// error abandons the backup without a commit, as does a file whose content
// cannot be read: a tree that arrives as a stream cannot be read again, and
// a snapshot silently missing a file is worse than none.
//
// Entries may come in any order (tar order): a directory may come after
// its contents or not at all (then it is created with mode 0700 and the
// time of the backup). An entry for a path seen before replaces it, except
// that a directory keeps its contents. Content goes through the same
// chunking and blob workers as Backup's, so Options.PageSize decides per
// path whether a file is cut into pages; its os.FileInfo argument
// describes the entry's node. There is no parent snapshot: unchanged
// content deduplicates through the index, chunk by chunk.
//
// The tree is held in memory (names and content IDs, about 100 bytes per
// 8 KiB page) and saved bottom-up at the end.
func BackupEntries(ctx context.Context, r *repo.Repository, source string, next func() (*Entry, error), opts Options) (*Result, error) {
	if source == "" {
		return nil, errors.New("archiver: no source name given")
	}
	a := newArchiver(r, opts)
	a.scanDone.Store(true)
	return a.run(ctx, []string{source}, nil, func(ctx context.Context, root *snapshot.Tree, _ *snapshot.Tree) error {
		top := &memDir{node: &snapshot.Node{Type: snapshot.Dir}}
		for {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("archiver: %w", err)
			}
			e, err := next()
			if err == io.EOF {
				break
			}
			if err != nil {
				return fmt.Errorf("archiver: %s: %w", source, err)
			}
			if err := a.addEntry(ctx, top, e); err != nil {
				return err
			}
		}
		nodes, err := a.saveMemDir(ctx, top)
		if err != nil {
			return err
		}
		if len(nodes) == 0 {
			return fmt.Errorf("archiver: %s: no entries", source)
		}
		root.Nodes = nodes
		return nil
	})
}

// memDir is a directory of a tree being built from entries.
type memDir struct {
	node     *snapshot.Node
	children map[string]*memDir // subdirectories
	files    map[string]*snapshot.Node
	explicit bool // an entry named it (its metadata is not made up)
}

func (d *memDir) dir(name string, now time.Time) *memDir {
	if c, ok := d.children[name]; ok {
		return c
	}
	if d.children == nil {
		d.children = map[string]*memDir{}
	}
	delete(d.files, name)
	c := &memDir{node: &snapshot.Node{Name: name, Type: snapshot.Dir, Mode: os.ModeDir | 0o700,
		UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), ModTime: now, AccessTime: now, ChangeTime: now}}
	d.children[name] = c
	return c
}

// cleanEntryPath splits an entry's path into its elements.
func cleanEntryPath(p string) ([]string, error) {
	q := strings.TrimPrefix(p, "/")
	for strings.HasPrefix(q, "./") {
		q = strings.TrimPrefix(q, "./")
	}
	q = strings.TrimSuffix(q, "/")
	if q == "" || q == "." {
		return nil, fmt.Errorf("archiver: entry %q names the root", p)
	}
	elems := strings.Split(q, "/")
	for _, el := range elems {
		if el == ".." {
			return nil, fmt.Errorf("archiver: entry %q leaves the tree", p)
		}
		if err := snapshot.ValidName(el); err != nil {
			return nil, fmt.Errorf("archiver: entry %q: %w", p, err)
		}
	}
	if path.Clean(q) != q {
		return nil, fmt.Errorf("archiver: entry %q is not a clean path", p)
	}
	return elems, nil
}

func (a *archiver) addEntry(ctx context.Context, top *memDir, e *Entry) error {
	if e == nil {
		return errors.New("archiver: nil entry")
	}
	elems, err := cleanEntryPath(e.Path)
	if err != nil {
		return err
	}
	now := a.opts.now().UTC()
	d := top
	for _, el := range elems[:len(elems)-1] {
		d = d.dir(el, now)
	}
	name := elems[len(elems)-1]
	n := e.Node
	n.Name, n.Content, n.Subtree, n.Chunking = name, nil, nil, ""
	if n.Type == snapshot.Dir {
		c := d.dir(name, now)
		n.Mode |= os.ModeDir
		c.node, c.explicit = &n, true
		return nil
	}
	if _, ok := d.children[name]; ok {
		return fmt.Errorf("archiver: entry %q: a %s where a directory with contents is", e.Path, n.Type)
	}
	if n.Type == snapshot.File {
		if err := a.entryContent(ctx, strings.Join(elems, "/"), &n, e.Content); err != nil {
			return err
		}
	} else {
		n.Size = 0
	}
	if d.files == nil {
		d.files = map[string]*snapshot.Node{}
	}
	d.files[name] = &n
	return nil
}

func (a *archiver) entryContent(ctx context.Context, p string, n *snapshot.Node, rd io.Reader) error {
	a.mu.Lock()
	a.cur = p
	a.sum.FilesNew++
	a.mu.Unlock()
	a.files.Add(1)
	if rd == nil {
		rd = strings.NewReader("")
	}
	pageSize := 0
	if a.opts.PageSize != nil {
		pageSize = a.opts.PageSize(p, nodeInfo{n})
	}
	n.Chunking = "cdc"
	if pageSize > 0 {
		n.Chunking = "pages:" + strconv.Itoa(pageSize)
	}
	content, size, err := a.chunkStream(ctx, rd, pageSize)
	if err != nil {
		return fmt.Errorf("archiver: read %s: %w", p, err)
	}
	n.Content, n.Size = content, uint64(size)
	return nil
}

// saveMemDir saves d's subdirectories bottom-up and returns d's sorted nodes.
func (a *archiver) saveMemDir(ctx context.Context, d *memDir) ([]*snapshot.Node, error) {
	nodes := make([]*snapshot.Node, 0, len(d.children)+len(d.files))
	for _, c := range d.children {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("archiver: %w", err)
		}
		sub, err := a.saveMemDir(ctx, c)
		if err != nil {
			return nil, err
		}
		t := &snapshot.Tree{Nodes: sub}
		id, err := a.r.SaveTree(ctx, t)
		if err != nil {
			return nil, err
		}
		a.use(id)
		a.dirs.Add(1)
		c.node.Subtree = &id
		nodes = append(nodes, c.node)
	}
	for _, f := range d.files {
		nodes = append(nodes, f)
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
	return nodes, nil
}

// nodeInfo shows a node as an os.FileInfo, for Options.PageSize.
type nodeInfo struct{ n *snapshot.Node }

func (fi nodeInfo) Name() string       { return fi.n.Name }
func (fi nodeInfo) Size() int64        { return int64(fi.n.Size) }
func (fi nodeInfo) Mode() fs.FileMode  { return fi.n.Mode }
func (fi nodeInfo) ModTime() time.Time { return fi.n.ModTime }
func (fi nodeInfo) IsDir() bool        { return fi.n.Type == snapshot.Dir }
func (fi nodeInfo) Sys() any           { return fi.n }

var _ os.FileInfo = nodeInfo{}
