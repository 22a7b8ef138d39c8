// Package backendtest is the conformance suite every [backend.Backend] must
// pass. A backend's own tests call [Run] and add only what is specific to its
// storage (layout, full disk, credentials).
package backendtest

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
)

// Run tests the backend returned by newBackend against the contract of
// [backend.Backend]. newBackend must return a new, empty backend on each
// call; Run closes every backend it gets and fails if Close does. Run it
// with -race: part of the suite saves and loads concurrently.
func Run(t *testing.T, newBackend func(t *testing.T) backend.Backend) {
	open := func(t *testing.T) backend.Backend {
		t.Helper()
		be := newBackend(t)
		t.Cleanup(func() {
			if err := be.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
		return be
	}
	tests := []struct {
		name string
		fn   func(*testing.T, func(*testing.T) backend.Backend)
	}{
		{"SaveLoad", testSaveLoad},
		{"LoadRange", testLoadRange},
		{"Stat", testStat},
		{"ResaveIdentical", testResaveIdentical},
		{"ResaveDifferent", testResaveDifferent},
		{"NotExist", testNotExist},
		{"List", testList},
		{"ListStops", testListStops},
		{"InvalidHandle", testInvalidHandle},
		{"InvalidListType", testInvalidListType},
		{"ConcurrentSameObject", testConcurrentSameObject},
		{"ConcurrentSameNameDifferentBytes", testConcurrentSameNameDifferentBytes},
		{"ConcurrentDifferentObjects", testConcurrentDifferentObjects},
		{"LoadDuringSave", testLoadDuringSave},
		{"ContextDone", testContextDone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, open) })
	}
}

// newRand returns a generator seeded by the test's name, so that a failure
// reproduces with the same names and bytes.
func newRand(t *testing.T) *rand.Rand {
	h := fnv.New64a()
	h.Write([]byte(t.Name()))
	s := h.Sum64()
	var seed [32]byte
	for i := range seed {
		seed[i] = byte(s >> (8 * (i % 8)))
	}
	return rand.New(rand.NewChaCha8(seed))
}

func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func randomName(r *rand.Rand) string {
	return hex.EncodeToString(randomBytes(r, 32))
}

// randomHandle returns a fresh handle of type t; for Config, the only one.
func randomHandle(r *rand.Rand, t backend.Type) backend.Handle {
	if t == backend.Config {
		return backend.Handle{Type: t, Name: backend.ConfigName}
	}
	return backend.Handle{Type: t, Name: randomName(r)}
}

func save(t *testing.T, be backend.Backend, h backend.Handle, data []byte) {
	t.Helper()
	if err := be.Save(t.Context(), h, data); err != nil {
		t.Fatalf("Save(%v): %v", h, err)
	}
}

// checkContent fails unless h holds exactly want.
func checkContent(t *testing.T, be backend.Backend, h backend.Handle, want []byte) {
	t.Helper()
	got, err := be.Load(t.Context(), h, 0, 0)
	if err != nil {
		t.Fatalf("Load(%v): %v", h, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Load(%v) = %d bytes, want the %d saved", h, len(got), len(want))
	}
}

// listAll returns the objects of type typ by name.
func listAll(t *testing.T, be backend.Backend, typ backend.Type) map[string]backend.Info {
	t.Helper()
	m := make(map[string]backend.Info)
	err := be.List(t.Context(), typ, func(fi backend.Info) error {
		if _, dup := m[fi.Name]; dup {
			t.Errorf("List(%s) gave %s twice", typ, fi.Name)
		}
		m[fi.Name] = fi
		return nil
	})
	if err != nil {
		t.Fatalf("List(%s): %v", typ, err)
	}
	return m
}

func checkEmpty(t *testing.T, be backend.Backend) {
	t.Helper()
	for _, typ := range backend.Types {
		if m := listAll(t, be, typ); len(m) != 0 {
			t.Errorf("List(%s) = %d objects, want none", typ, len(m))
		}
	}
}

func testSaveLoad(t *testing.T, open func(*testing.T) backend.Backend) {
	// 1 MiB + 5 crosses any power-of-two buffer a backend may copy through.
	for _, size := range []int{0, 1, 1000, 1<<20 + 5} {
		t.Run(fmt.Sprintf("%dB", size), func(t *testing.T) {
			be := open(t)
			r := newRand(t)
			for _, typ := range backend.Types {
				h := randomHandle(r, typ)
				data := randomBytes(r, size)
				want := bytes.Clone(data)
				save(t, be, h, data)
				// The caller may reuse its buffer once Save returns.
				for i := range data {
					data[i] ^= 0xff
				}
				checkContent(t, be, h, want)
			}
		})
	}
}

func testLoadRange(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	const size = 3<<20 + 17
	data := randomBytes(r, size)
	h := randomHandle(r, backend.Pack)
	save(t, be, h, data)

	tests := []struct {
		name           string
		offset, length int64
		want           []byte // nil: an error is expected
	}{
		{"whole", 0, 0, data},
		{"whole explicit", 0, size, data},
		{"first byte", 0, 1, data[:1]},
		{"last byte", size - 1, 1, data[size-1:]},
		{"middle", 100, 200, data[100:300]},
		{"across MiB boundaries", 1<<20 - 3, 1<<20 + 10, data[1<<20-3 : 2<<20+7]},
		{"rest from offset", 2 << 20, 0, data[2<<20:]},
		{"last byte to end", size - 1, 0, data[size-1:]},
		{"empty at end", size, 0, []byte{}},
		{"length past end", 0, size + 1, nil},
		{"range past end", size - 1, 2, nil},
		{"offset past end", size + 1, 0, nil},
		{"offset past end with length", 2 * size, 1, nil},
		{"negative offset", -1, 0, nil},
		{"negative length", 0, -1, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := be.Load(t.Context(), h, tt.offset, tt.length)
			if tt.want == nil {
				if err == nil {
					t.Fatalf("Load(%d, %d) = %d bytes, nil error; want an error, not a short read", tt.offset, tt.length, len(got))
				}
				if errors.Is(err, backend.ErrNotExist) {
					t.Fatalf("Load(%d, %d) = %v; a bad range on an existing object is not ErrNotExist", tt.offset, tt.length, err)
				}
				if len(got) != 0 {
					t.Fatalf("Load(%d, %d) returned %d bytes along with error %v", tt.offset, tt.length, len(got), err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Load(%d, %d): %v", tt.offset, tt.length, err)
			}
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("Load(%d, %d) = %d bytes, differing from the %d wanted", tt.offset, tt.length, len(got), len(tt.want))
			}
		})
	}
}

func testStat(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	for i, typ := range backend.Types {
		h := randomHandle(r, typ)
		save(t, be, h, randomBytes(r, 100+i))
		fi, err := be.Stat(t.Context(), h)
		if err != nil {
			t.Fatalf("Stat(%v): %v", h, err)
		}
		if fi.Handle != h || fi.Size != int64(100+i) || fi.ModTime.IsZero() {
			t.Errorf("Stat(%v) = {%v %d %v}, want {%v %d <non-zero time>}", h, fi.Handle, fi.Size, fi.ModTime, h, 100+i)
		}
	}
}

func testResaveIdentical(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	for _, typ := range backend.Types {
		h := randomHandle(r, typ)
		data := randomBytes(r, 5000)
		save(t, be, h, data)
		// A retry after a crash passes a new buffer with the same bytes.
		if err := be.Save(t.Context(), h, bytes.Clone(data)); err != nil {
			t.Fatalf("second Save(%v) with identical bytes: %v, want nil", h, err)
		}
		checkContent(t, be, h, data)
		if m := listAll(t, be, typ); len(m) != 1 {
			t.Errorf("List(%s) = %d objects after saving one twice, want 1", typ, len(m))
		}
	}
}

func testResaveDifferent(t *testing.T, open func(*testing.T) backend.Backend) {
	r := newRand(t)
	orig := randomBytes(r, 5000)
	flipped := bytes.Clone(orig)
	flipped[len(flipped)-1] ^= 1
	tests := []struct {
		name          string
		first, second []byte
	}{
		{"last byte differs", orig, flipped},
		{"longer", orig, append(bytes.Clone(orig), 0)},
		{"shorter", orig, orig[:len(orig)-1]},
		{"empty", orig, []byte{}},
		{"was empty", []byte{}, orig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			be := open(t)
			for _, typ := range backend.Types {
				h := randomHandle(r, typ)
				save(t, be, h, tt.first)
				err := be.Save(t.Context(), h, tt.second)
				if !errors.Is(err, backend.ErrExists) {
					t.Fatalf("Save(%v) with different bytes = %v, want ErrExists", h, err)
				}
				checkContent(t, be, h, tt.first)
			}
		})
	}
}

func testNotExist(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	check := func(t *testing.T, h backend.Handle, when string) {
		t.Helper()
		if _, err := be.Load(t.Context(), h, 0, 0); !errors.Is(err, backend.ErrNotExist) {
			t.Errorf("Load(%v) %s = %v, want ErrNotExist", h, when, err)
		}
		if _, err := be.Load(t.Context(), h, 1, 1); !errors.Is(err, backend.ErrNotExist) {
			t.Errorf("Load(%v, 1, 1) %s = %v, want ErrNotExist", h, when, err)
		}
		if _, err := be.Stat(t.Context(), h); !errors.Is(err, backend.ErrNotExist) {
			t.Errorf("Stat(%v) %s = %v, want ErrNotExist", h, when, err)
		}
		if err := be.Remove(t.Context(), h); !errors.Is(err, backend.ErrNotExist) {
			t.Errorf("Remove(%v) %s = %v, want ErrNotExist", h, when, err)
		}
	}
	for _, typ := range backend.Types {
		t.Run(string(typ), func(t *testing.T) {
			h := randomHandle(r, typ)
			check(t, h, "before Save")
			data := randomBytes(r, 100)
			save(t, be, h, data)
			if err := be.Remove(t.Context(), h); err != nil {
				t.Fatalf("Remove(%v): %v", h, err)
			}
			check(t, h, "after Remove")
			if m := listAll(t, be, typ); len(m) != 0 {
				t.Errorf("List(%s) = %d objects after Remove, want none", typ, len(m))
			}
			// The name is free again: the vault may re-add a pruned pack.
			other := randomBytes(r, 50)
			save(t, be, h, other)
			checkContent(t, be, h, other)
		})
	}
}

func testList(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	checkEmpty(t, be)
	r := newRand(t)
	want := make(map[backend.Type]map[string]int64)
	for _, typ := range backend.Types {
		// Enough packs to land in several folders of a fanned-out layout.
		n := map[backend.Type]int{backend.Config: 1, backend.Pack: 40}[typ]
		if n == 0 {
			n = 5
		}
		want[typ] = make(map[string]int64)
		for range n {
			h := randomHandle(r, typ)
			size := r.IntN(300)
			save(t, be, h, randomBytes(r, size))
			want[typ][h.Name] = int64(size)
		}
	}
	for _, typ := range backend.Types {
		got := listAll(t, be, typ)
		for name, size := range want[typ] {
			fi, ok := got[name]
			switch {
			case !ok:
				t.Errorf("List(%s) misses %s", typ, name)
			case fi.Type != typ || fi.Size != size:
				t.Errorf("List(%s) gave %s as {%s, size %d}, want {%s, size %d}", typ, name, fi.Type, fi.Size, typ, size)
			}
		}
		for name := range got {
			if _, ok := want[typ][name]; !ok {
				t.Errorf("List(%s) gave %s, which was not saved as %s", typ, name, typ)
			}
		}
	}
}

func testListStops(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	for range 10 {
		save(t, be, randomHandle(r, backend.Index), randomBytes(r, 10))
	}
	stop := errors.New("stop here")
	calls := 0
	err := be.List(t.Context(), backend.Index, func(backend.Info) error {
		calls++
		return stop
	})
	if !errors.Is(err, stop) || calls != 1 {
		t.Errorf("List with fn failing at once = %v after %d calls, want fn's error after 1", err, calls)
	}
}

func testInvalidHandle(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	name := randomName(r)
	tests := []struct {
		name string
		h    backend.Handle
	}{
		{"traversal", backend.Handle{Type: backend.Key, Name: "../x"}},
		{"traversal to config", backend.Handle{Type: backend.Key, Name: "../config"}},
		{"deep traversal", backend.Handle{Type: backend.Snapshot, Name: "../../../../etc/passwd"}},
		{"traversal in type", backend.Handle{Type: "../keys", Name: name}},
		{"absolute", backend.Handle{Type: backend.Key, Name: "/" + name[1:]}},
		{"slash inside", backend.Handle{Type: backend.Pack, Name: name[:2] + "/" + name[3:]}},
		{"uppercase hex", backend.Handle{Type: backend.Key, Name: strings.ToUpper(name)}},
		{"one uppercase digit", backend.Handle{Type: backend.Index, Name: name[:63] + "A"}},
		{"non-hex", backend.Handle{Type: backend.Key, Name: strings.Repeat("g", 64)}},
		{"63 digits", backend.Handle{Type: backend.Index, Name: name[:63]}},
		{"65 digits", backend.Handle{Type: backend.Index, Name: name + "0"}},
		{"trailing newline", backend.Handle{Type: backend.Lock, Name: name[:63] + "\n"}},
		{"empty name", backend.Handle{Type: backend.Mark, Name: ""}},
		{"config name for key", backend.Handle{Type: backend.Key, Name: backend.ConfigName}},
		{"unknown type", backend.Handle{Type: "foo", Name: name}},
		{"empty type", backend.Handle{Type: "", Name: name}},
		{"temp folder as type", backend.Handle{Type: "tmp", Name: name}},
		{"config with hex name", backend.Handle{Type: backend.Config, Name: name}},
		{"config empty name", backend.Handle{Type: backend.Config, Name: ""}},
		{"config traversal", backend.Handle{Type: backend.Config, Name: "../config"}},
	}
	data := []byte("must not be stored")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.h.Validate() == nil {
				t.Fatalf("bad test: %q is valid", tt.h)
			}
			// An invalid handle must be refused, not looked up: ErrNotExist
			// would mean the backend went to storage with it.
			refused := func(op string, err error) {
				t.Helper()
				if err == nil || errors.Is(err, backend.ErrNotExist) {
					t.Errorf("%s(%q) = %v, want a validation error", op, tt.h, err)
				}
			}
			refused("Save", be.Save(t.Context(), tt.h, data))
			_, err := be.Load(t.Context(), tt.h, 0, 0)
			refused("Load", err)
			_, err = be.Stat(t.Context(), tt.h)
			refused("Stat", err)
			refused("Remove", be.Remove(t.Context(), tt.h))
		})
	}
	checkEmpty(t, be)
}

func testInvalidListType(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	for _, typ := range []backend.Type{"", "foo", "tmp", "../keys", "KEYS"} {
		err := be.List(t.Context(), typ, func(fi backend.Info) error {
			t.Errorf("List(%q) gave %v", typ, fi)
			return nil
		})
		if err == nil {
			t.Errorf("List(%q) = nil, want an error", typ)
		}
	}
}

// workers is how many goroutines the concurrency tests start; enough to
// overlap on any backend, few enough to stay quick under -race.
const workers = 16

func testConcurrentSameObject(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	h := randomHandle(r, backend.Pack)
	data := randomBytes(r, 256<<10)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for i := range workers {
		buf := bytes.Clone(data)
		wg.Go(func() { errs[i] = be.Save(t.Context(), h, buf) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Save %d of %d identical: %v", i, workers, err)
		}
	}
	checkContent(t, be, h, data)
	if m := listAll(t, be, backend.Pack); len(m) != 1 {
		t.Errorf("List = %d objects, want 1", len(m))
	}
}

func testConcurrentSameNameDifferentBytes(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	h := randomHandle(r, backend.Snapshot)
	datas := make([][]byte, workers)
	for i := range datas {
		datas[i] = randomBytes(r, 64<<10)
	}
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() { errs[i] = be.Save(t.Context(), h, datas[i]) })
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Fatalf("Saves %d and %d of different bytes under one name both succeeded", winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, backend.ErrExists):
			t.Errorf("Save %d = %v, want nil or ErrExists", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no Save succeeded")
	}
	checkContent(t, be, h, datas[winner])
}

func testConcurrentDifferentObjects(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	const n = 2 * workers
	hs := make([]backend.Handle, n)
	datas := make([][]byte, n)
	for i := range n {
		hs[i] = randomHandle(r, backend.Types[1+i%(len(backend.Types)-1)]) // all but Config
		datas[i] = randomBytes(r, 32<<10+i)
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = be.Save(t.Context(), hs[i], datas[i]) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Save(%v): %v", hs[i], err)
		}
	}
	for i, h := range hs {
		checkContent(t, be, h, datas[i])
	}
}

// testLoadDuringSave checks that an object is never visible in part: a Load
// racing a Save sees either nothing or all of it.
func testLoadDuringSave(t *testing.T, open func(*testing.T) backend.Backend) {
	be := open(t)
	r := newRand(t)
	for range 4 {
		h := randomHandle(r, backend.Pack)
		data := randomBytes(r, 4<<20)
		done := make(chan struct{})
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for {
					select {
					case <-done:
						return
					default:
					}
					got, err := be.Load(t.Context(), h, 0, 0)
					switch {
					case errors.Is(err, backend.ErrNotExist):
					case err != nil:
						t.Errorf("Load during Save: %v", err)
						return
					case !bytes.Equal(got, data):
						t.Errorf("Load during Save = %d bytes, not the %d being saved", len(got), len(data))
						return
					}
					if fi, err := be.Stat(t.Context(), h); err == nil && fi.Size != int64(len(data)) {
						t.Errorf("Stat during Save: size %d, want %d", fi.Size, len(data))
						return
					}
				}
			})
		}
		err := be.Save(t.Context(), h, data)
		close(done)
		wg.Wait()
		if err != nil {
			t.Fatalf("Save(%v): %v", h, err)
		}
	}
}

func testContextDone(t *testing.T, open func(*testing.T) backend.Backend) {
	canceled, cancel := context.WithCancel(t.Context())
	cancel()
	expired, cancel := context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
	defer cancel()
	tests := []struct {
		name string
		ctx  context.Context
		want error
	}{
		{"canceled", canceled, context.Canceled},
		{"deadline exceeded", expired, context.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			be := open(t)
			r := newRand(t)
			kept := randomHandle(r, backend.Pack)
			data := randomBytes(r, 1<<20)
			save(t, be, kept, data)

			fresh := randomHandle(r, backend.Pack)
			if err := be.Save(tt.ctx, fresh, data); !errors.Is(err, tt.want) {
				t.Errorf("Save = %v, want %v", err, tt.want)
			}
			if _, err := be.Stat(t.Context(), fresh); !errors.Is(err, backend.ErrNotExist) {
				t.Errorf("Stat after a Save with a done context = %v, want ErrNotExist", err)
			}
			if _, err := be.Load(tt.ctx, kept, 0, 0); !errors.Is(err, tt.want) {
				t.Errorf("Load = %v, want %v", err, tt.want)
			}
			if _, err := be.Stat(tt.ctx, kept); !errors.Is(err, tt.want) {
				t.Errorf("Stat = %v, want %v", err, tt.want)
			}
			err := be.List(tt.ctx, backend.Pack, func(backend.Info) error { return nil })
			if !errors.Is(err, tt.want) {
				t.Errorf("List = %v, want %v", err, tt.want)
			}
			if err := be.Remove(tt.ctx, kept); !errors.Is(err, tt.want) {
				t.Errorf("Remove = %v, want %v", err, tt.want)
			}
			checkContent(t, be, kept, data)
		})
	}
}
