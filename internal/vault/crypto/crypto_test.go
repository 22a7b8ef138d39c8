package crypto

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

func TestSealOpen(t *testing.T) {
	k := NewRandomKey()
	for _, n := range []int{0, 1, 100, 1 << 20} {
		msg := bytes.Repeat([]byte{7}, n)
		sealed := k.Seal(nil, msg)
		if len(sealed) != n+Overhead {
			t.Fatalf("sealed %d bytes to %d, want %d", n, len(sealed), n+Overhead)
		}
		got, err := k.Open(nil, sealed)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("round trip of %d bytes: %v", n, err)
		}
		if n > 0 {
			sealed[len(sealed)/2] ^= 1
			if _, err := k.Open(nil, sealed); !errors.Is(err, ErrUnauthenticated) {
				t.Errorf("bit flip in %d-byte message: err = %v, want ErrUnauthenticated", n, err)
			}
		}
	}
	if _, err := NewRandomKey().Open(nil, k.Seal(nil, []byte("x"))); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("other key opened the message: %v", err)
	}
	if _, err := k.Open(nil, []byte("short")); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("short input: %v", err)
	}
}

func TestIDIsKeyed(t *testing.T) {
	a, b := NewRandomKey(), NewRandomKey()
	data := []byte("same content")
	if a.ID(data) == b.ID(data) {
		t.Error("two repositories give the same ID to the same content")
	}
	if a.ID(data) != a.ID(append([]byte(nil), data...)) {
		t.Error("ID is not deterministic")
	}
}

func TestWrapUnwrap(t *testing.T) {
	k := NewRandomKey()
	obj, err := Wrap(k, "secret", TestKDF, "alice", "host", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	got, kf, err := Unwrap(obj, "secret")
	if err != nil || !got.Equal(k) || kf.Username != "alice" {
		t.Fatalf("unwrap: %v", err)
	}
	if _, _, err := Unwrap(obj, "wrong"); !errors.Is(err, ErrWrongPassword) {
		t.Errorf("wrong password: %v", err)
	}
	if _, err := Wrap(k, "", TestKDF, "", "", time.Now()); err == nil {
		t.Error("empty password accepted")
	}
	for _, bad := range []string{`{}`, `{"kdf":"argon2id","params":{"t":1,"m":999999999,"p":1},"salt":"AAAAAAAAAAAAAAAAAAAAAA=="}`, `not json`} {
		if _, _, err := Unwrap([]byte(bad), "x"); err == nil || errors.Is(err, ErrWrongPassword) {
			t.Errorf("malformed key object %q: err = %v, want a format error", bad, err)
		}
	}
}

func FuzzUnwrap(f *testing.F) {
	obj, _ := Wrap(NewRandomKey(), "pw", TestKDF, "u", "h", time.Unix(0, 0))
	f.Add(obj)
	f.Add([]byte(`{"kdf":"argon2id"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		kf, err := ParseKeyFile(data)
		if err != nil {
			return
		}
		if kf.Params.Memory > 1<<16 || kf.Params.Time > 3 {
			return // valid but slow: not what this fuzzer is for
		}
		_, _, _ = Unwrap(data, "pw")
	})
}

func BenchmarkSeal(b *testing.B) {
	k := NewRandomKey()
	msg := make([]byte, 1<<20)
	buf := make([]byte, 0, len(msg)+Overhead)
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		k.Seal(buf[:0], msg)
	}
}

func BenchmarkID(b *testing.B) {
	k := NewRandomKey()
	msg := make([]byte, 1<<20)
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		k.ID(msg)
	}
}
