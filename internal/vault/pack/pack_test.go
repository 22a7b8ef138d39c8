package pack

import (
	"bytes"
	"errors"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/crypto"
)

func build(t testing.TB, key *crypto.Key, n int) ([]byte, []Blob, [][]byte) {
	w := NewWriter(key, 0)
	var plains [][]byte
	for i := 0; i < n; i++ {
		p := bytes.Repeat([]byte{byte(i)}, 100+i)
		plains = append(plains, p)
		w.Add(Data, key.ID(p), 0, len(p), key.Seal(nil, p))
	}
	data, blobs := w.Finish()
	return data, blobs, plains
}

func TestRoundTrip(t *testing.T) {
	key := crypto.NewRandomKey()
	data, blobs, plains := build(t, key, 5)
	got, err := Parse(key, data)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(blobs) {
		t.Fatalf("parsed %d blobs, wrote %d", len(got), len(blobs))
	}
	for i, b := range got {
		if b != blobs[i] {
			t.Errorf("blob %d: parsed %+v, wrote %+v", i, b, blobs[i])
		}
		plain, err := key.Open(nil, data[b.Offset:b.Offset+b.Length])
		if err != nil || !bytes.Equal(plain, plains[i]) {
			t.Errorf("blob %d does not open: %v", i, err)
		}
	}
}

func TestDamage(t *testing.T) {
	key := crypto.NewRandomKey()
	data, _, _ := build(t, key, 3)
	tests := []struct {
		name string
		mod  func([]byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)-10] }},
		{"empty", func(b []byte) []byte { return nil }},
		{"header flipped", func(b []byte) []byte { b[len(b)-20] ^= 1; return b }},
		{"length huge", func(b []byte) []byte { b[len(b)-1] = 0xff; return b }},
		{"extra bytes in front", func(b []byte) []byte { return append([]byte{1, 2, 3}, b...) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Parse(key, tt.mod(append([]byte(nil), data...))); err == nil {
				t.Fatal("damaged pack parsed")
			}
		})
	}
	if _, err := Parse(crypto.NewRandomKey(), data); !errors.Is(err, crypto.ErrUnauthenticated) {
		t.Errorf("wrong key: %v", err)
	}
}

func FuzzDecodeEntries(f *testing.F) {
	key := crypto.NewRandomKey()
	w := NewWriter(key, 0)
	w.Add(Tree, [32]byte{1}, FlagZstd, 10, make([]byte, 40))
	w.Add(Data, [32]byte{2}, 0, 10, make([]byte, 30))
	w.Add(Data, [32]byte{3}, FlagS2, 10, make([]byte, 30))
	var hdr []byte
	for _, b := range w.blobs {
		hdr = appendEntry(hdr, b)
	}
	f.Add(hdr, int64(100))
	f.Add([]byte{}, int64(0))
	f.Fuzz(func(t *testing.T, hdr []byte, dataEnd int64) {
		blobs, err := decodeEntries(hdr, dataEnd)
		if err != nil {
			return
		}
		// Whatever decodes must re-encode to the same bytes and lie inside the data.
		var again []byte
		for _, b := range blobs {
			if int64(b.Offset)+int64(b.Length) > dataEnd {
				t.Fatalf("blob %+v past data end %d", b, dataEnd)
			}
			again = appendEntry(again, b)
		}
		if !bytes.Equal(again, hdr) {
			t.Fatal("entries do not round-trip")
		}
	})
}

func FuzzParse(f *testing.F) {
	key := crypto.NewRandomKey()
	data, _, _ := build(f, key, 2)
	f.Add(data)
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		blobs, err := Parse(key, data)
		if err == nil && len(blobs) > len(data)/crypto.Overhead {
			t.Fatalf("%d blobs in %d bytes", len(blobs), len(data))
		}
	})
}

func TestEntryFlags(t *testing.T) {
	for _, tt := range []struct {
		flags uint8
		ok    bool
	}{{0, true}, {FlagZstd, true}, {FlagS2, true}, {FlagZstd | FlagS2, false}, {4, false}, {0x80, false}} {
		hdr := appendEntry(nil, Blob{Type: Data, Flags: tt.flags, Length: 40, RawLength: 10})
		_, err := decodeEntries(hdr, 40)
		if (err == nil) != tt.ok {
			t.Errorf("flags %#x: err %v, want ok %v", tt.flags, err, tt.ok)
		}
	}
}
