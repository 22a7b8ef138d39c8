package restorer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// Walk calls fn for every node below the tree root, depth first, each
// directory before its contents and names in tree (byte) order. path is the
// node's path inside the snapshot ("etc/passwd").
//
// As with fs.WalkDir, fn returning fs.SkipDir for a directory skips its
// contents, and for any other node skips the rest of its directory;
// fs.SkipAll ends the walk with a nil error. Any other error from fn, or a
// tree that cannot be read, ends the walk with that error.
func Walk(ctx context.Context, r *repo.Repository, root repo.ID, fn func(path string, n *snapshot.Node) error) error {
	err := walkTree(ctx, r, root, "", fn)
	if errors.Is(err, fs.SkipAll) || errors.Is(err, fs.SkipDir) {
		return nil
	}
	return err
}

func walkTree(ctx context.Context, r *repo.Repository, id repo.ID, dir string, fn func(string, *snapshot.Node) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	t, err := r.LoadTree(ctx, id)
	if err != nil {
		return fmt.Errorf("restorer: read directory %q: %w", dir, err)
	}
	for _, n := range t.Nodes {
		p := n.Name
		if dir != "" {
			p = dir + "/" + n.Name
		}
		err := fn(p, n)
		if err == nil && n.Type == snapshot.Dir {
			err = walkTree(ctx, r, *n.Subtree, p, fn)
			if errors.Is(err, fs.SkipDir) {
				continue
			}
		}
		if errors.Is(err, fs.SkipDir) {
			if n.Type == snapshot.Dir {
				continue
			}
			return nil // skip the rest of this directory
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Lookup returns the node at path p in the tree root. The root itself ("",
// "/") has no node in a snapshot; Lookup returns a directory node named ""
// whose Subtree is root. A missing path gives an error wrapping ErrNotFound.
func Lookup(ctx context.Context, r *repo.Repository, root repo.ID, p string) (*snapshot.Node, error) {
	elems := splitPath(p)
	if len(elems) == 0 {
		id := root
		return &snapshot.Node{Type: snapshot.Dir, Mode: os.ModeDir | 0o755, Subtree: &id}, nil
	}
	id := root
	for i, name := range elems {
		t, err := r.LoadTree(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("restorer: lookup %q: %w", p, err)
		}
		n := t.Find(name)
		if n == nil {
			return nil, fmt.Errorf("%w: %q", ErrNotFound, p)
		}
		if i == len(elems)-1 {
			return n, nil
		}
		if n.Type != snapshot.Dir {
			return nil, fmt.Errorf("%w: %q (%s is a %s)", ErrNotFound, p, name, n.Type)
		}
		id = *n.Subtree
	}
	panic("unreachable")
}
