package keyfile

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
	"time"
)

var fixedTime = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

func jsonUnmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

func FuzzOpen(f *testing.F) {
	_, data := testFile(f)
	f.Add(data)
	f.Add(data[:len(data)/2])
	f.Add([]byte(`{"format":"dualkey-approver-key","version":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		name, pub, err := Inspect(data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if validName(name) != nil || len(pub) != 32 {
			t.Fatalf("accepted %q %x", name, pub)
		}
		// Parse → encode round-trips: the file is canonical.
		fl, _, _ := parse(data)
		if !bytes.Equal(marshal(fl), data) {
			t.Fatal("round trip changed the file")
		}
		if fl.Memory > 1<<10 || fl.Time > 2 {
			return // too slow to open in a fuzz loop
		}
		if _, _, err := Open(data, []byte("correct horse")); err != nil && !errors.Is(err, ErrWrongPassphrase) && !errors.Is(err, ErrMalformed) {
			t.Fatalf("Open: %v wraps neither sentinel", err)
		}
	})
}
