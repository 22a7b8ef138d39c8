package repo

import (
	"bytes"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/pack"
)

func FuzzDecodeIndexBody(f *testing.F) {
	body := encodeIndexBody([]IndexPack{{ID: ID{1}, Blobs: []pack.Blob{{Type: pack.Data, ID: [32]byte{2}, Offset: 0, Length: 40, RawLength: 12}}}})
	f.Add(body)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		packs, err := decodeIndexBody(data)
		if err != nil {
			return
		}
		if again := encodeIndexBody(packs); !bytes.Equal(again, data) {
			t.Fatal("index body does not round-trip")
		}
	})
}

func FuzzDecodeLedgerPayload(f *testing.F) {
	f.Add(encodeLedgerPayload("ledger/00000000000000000001-00000000000000000065", []byte("span")))
	f.Add(encodeLedgerPayload("x", nil))
	f.Add([]byte{0, 0, 0, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 'a'})
	f.Fuzz(func(t *testing.T, data []byte) {
		name, body, err := decodeLedgerPayload(data)
		if err != nil {
			return
		}
		if again := encodeLedgerPayload(name, body); !bytes.Equal(again, data) {
			t.Fatal("ledger payload does not round-trip")
		}
	})
}
