// Package snapshot defines what a backup records: snapshot documents and the
// trees of nodes they point to. Both are JSON, sealed by the repository.
package snapshot

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/dualkey/dualkey/internal/vault/format"
)

// Snapshot is one backup's document.
type Snapshot struct {
	// Time is the client's clock when the backup started. Retention and
	// listings use the vault's time from the lock record instead, which a
	// client cannot set.
	Time     time.Time  `json:"time"`
	Tree     format.ID  `json:"tree"`
	Paths    []string   `json:"paths"`
	Hostname string     `json:"hostname,omitempty"`
	Username string     `json:"username,omitempty"`
	Tags     []string   `json:"tags,omitempty"`
	Parent   *format.ID `json:"parent,omitempty"`
	Program  string     `json:"program,omitempty"`
	Summary  *Summary   `json:"summary,omitempty"`
	// Kind says what the snapshot holds: empty for a file tree, KindPGBase
	// for a PostgreSQL base backup. Meta is kind-specific JSON.
	Kind string          `json:"kind,omitempty"`
	Meta json.RawMessage `json:"meta,omitempty"`
}

// KindPGBase marks a PostgreSQL base backup; its Meta is pgagent's.
const KindPGBase = "pg-base"

// Summary counts what a backup did.
type Summary struct {
	Files        int64     `json:"files"`
	Dirs         int64     `json:"dirs"`
	Bytes        int64     `json:"bytes"` // of file content processed
	FilesNew     int64     `json:"files_new"`
	FilesChanged int64     `json:"files_changed"`
	BlobsAdded   int64     `json:"blobs_added"`
	BytesAdded   int64     `json:"bytes_added"` // plaintext bytes of new blobs
	Start        time.Time `json:"start"`
	End          time.Time `json:"end"`
}

// NodeType is the kind of filesystem entry.
type NodeType string

const (
	File    NodeType = "file"
	Dir     NodeType = "dir"
	Symlink NodeType = "symlink"
	Dev     NodeType = "dev"
	CharDev NodeType = "chardev"
	FIFO    NodeType = "fifo"
	Socket  NodeType = "socket"
)

// Node is one entry of a tree.
type Node struct {
	Name       string      `json:"name"`
	Type       NodeType    `json:"type"`
	Mode       os.FileMode `json:"mode"`
	UID        uint32      `json:"uid"`
	GID        uint32      `json:"gid"`
	User       string      `json:"user,omitempty"`
	Group      string      `json:"group,omitempty"`
	ModTime    time.Time   `json:"mtime"`
	AccessTime time.Time   `json:"atime"`
	ChangeTime time.Time   `json:"ctime"`
	Size       uint64      `json:"size,omitempty"`
	// Inode, Device and Links let restore recreate hard links and let the
	// next backup recognise an unchanged file without reading it.
	Inode      uint64      `json:"inode,omitempty"`
	Device     uint64      `json:"device,omitempty"`
	Links      uint64      `json:"links,omitempty"`
	Rdev       uint64      `json:"rdev,omitempty"`
	LinkTarget string      `json:"target,omitempty"`
	Content    []format.ID `json:"content,omitempty"`
	Subtree    *format.ID  `json:"subtree,omitempty"`
	// Chunking records how content was cut ("cdc" or "pages:8192"), so a
	// later backup of the same path cuts the same way.
	Chunking string `json:"chunking,omitempty"`
}

// Tree is one directory's listing, sorted by name.
type Tree struct {
	Nodes []*Node `json:"nodes"`
}

// Sort orders the nodes by name, as Encode requires.
func (t *Tree) Sort() {
	sort.Slice(t.Nodes, func(i, j int) bool { return t.Nodes[i].Name < t.Nodes[j].Name })
}

// Find returns the node named name, or nil.
func (t *Tree) Find(name string) *Node {
	i := sort.Search(len(t.Nodes), func(i int) bool { return t.Nodes[i].Name >= name })
	if i < len(t.Nodes) && t.Nodes[i].Name == name {
		return t.Nodes[i]
	}
	return nil
}

// Encode returns the canonical bytes of a tree, so that the same directory
// always encodes, and so deduplicates, the same.
func (t *Tree) Encode() ([]byte, error) {
	for i := 1; i < len(t.Nodes); i++ {
		if t.Nodes[i-1].Name >= t.Nodes[i].Name {
			return nil, fmt.Errorf("snapshot: tree not sorted or has duplicate %q", t.Nodes[i].Name)
		}
	}
	return json.Marshal(t)
}

// DecodeTree parses a tree, rejecting names that could escape a restore
// target.
func DecodeTree(data []byte) (*Tree, error) {
	var t Tree
	if err := json.Unmarshal(data, &t); err != nil {
		return nil, fmt.Errorf("snapshot: tree: %w", err)
	}
	for _, n := range t.Nodes {
		if n == nil {
			return nil, fmt.Errorf("snapshot: tree: null node")
		}
		if err := ValidName(n.Name); err != nil {
			return nil, err
		}
		if n.Type == Dir && n.Subtree == nil {
			return nil, fmt.Errorf("snapshot: tree: directory %q has no subtree", n.Name)
		}
	}
	return &t, nil
}

// ValidName rejects node names that are not a single path element.
func ValidName(name string) error {
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("snapshot: invalid node name %q", name)
	}
	for i := 0; i < len(name); i++ {
		if name[i] == '/' || name[i] == 0 {
			return fmt.Errorf("snapshot: invalid node name %q", name)
		}
	}
	return nil
}

// Decode parses a snapshot document.
func Decode(data []byte) (*Snapshot, error) {
	var s Snapshot
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	if s.Tree.IsZero() {
		return nil, fmt.Errorf("snapshot: no tree")
	}
	return &s, nil
}
