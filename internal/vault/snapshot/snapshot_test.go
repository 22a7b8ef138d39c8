package snapshot

import (
	"testing"

	"github.com/dualkey/dualkey/internal/vault/format"
)

func TestDecodeTreeRejectsEscapes(t *testing.T) {
	id := format.ID{1}
	for _, name := range []string{"..", ".", "", "a/b", "/etc", "x\x00y"} {
		tr := Tree{Nodes: []*Node{{Name: name, Type: File}}}
		b, _ := tr.Encode()
		if b == nil {
			continue
		}
		if _, err := DecodeTree(b); err == nil {
			t.Errorf("tree with node name %q accepted", name)
		}
	}
	ok := &Tree{Nodes: []*Node{{Name: "b", Type: Dir, Subtree: &id}, {Name: "a", Type: File}}}
	ok.Sort()
	b, err := ok.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeTree(b)
	if err != nil || got.Find("a") == nil || got.Find("b").Subtree == nil || got.Find("c") != nil {
		t.Fatalf("round trip: %v", err)
	}
	unsorted := &Tree{Nodes: []*Node{{Name: "b"}, {Name: "a"}}}
	if _, err := unsorted.Encode(); err == nil {
		t.Error("unsorted tree encoded")
	}
	if _, err := DecodeTree([]byte(`{"nodes":[{"name":"d","type":"dir"}]}`)); err == nil {
		t.Error("directory without subtree accepted")
	}
}

func FuzzDecodeTree(f *testing.F) {
	f.Add([]byte(`{"nodes":[{"name":"a","type":"file","content":["` + format.ID{1}.String() + `"]}]}`))
	f.Add([]byte(`{"nodes":[null]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		tr, err := DecodeTree(data)
		if err != nil {
			return
		}
		for _, n := range tr.Nodes {
			if ValidName(n.Name) != nil {
				t.Fatalf("decoded an invalid name %q", n.Name)
			}
		}
	})
}

func FuzzDecodeSnapshot(f *testing.F) {
	f.Add([]byte(`{"time":"2026-01-01T00:00:00Z","tree":"` + format.ID{1}.String() + `","paths":["/x"]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Decode(data)
		if err == nil && s.Tree.IsZero() {
			t.Fatal("snapshot without tree decoded")
		}
	})
}
