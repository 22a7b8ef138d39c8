package classify

import (
	"fmt"
	"sync"
	"testing"
)

func TestCache(t *testing.T) {
	c := NewCache(2)
	calls := 0
	opts := Options{Lookup: func(s, n string) (byte, bool) { calls++; return 'v', true }}
	r1 := c.Classify("SELECT f()", opts)
	r2 := c.Classify("SELECT f()", opts)
	if r1.Class != Write || r2.Class != Write || calls != 1 {
		t.Fatalf("second call not cached: %s %s, %d lookups", r1.Class, r2.Class, calls)
	}
	// Same fingerprint, different class: the cache must key on the text.
	if c.Classify("DELETE FROM t WHERE 1 = 2", opts).Class != Write || c.Classify("DELETE FROM t WHERE 1 = 1", opts).Class != Destructive {
		t.Fatal("texts with one fingerprint share a cached class")
	}
	if c.Len() != 2 {
		t.Fatalf("Len = %d, want the bound 2", c.Len())
	}
	c.Classify("SELECT f()", opts) // evicted: classified again
	if calls != 2 {
		t.Fatalf("least recently used entry not evicted: %d lookups", calls)
	}
	if h, m := c.Stats(); h != 1 || m != 4 {
		t.Fatalf("stats = %d hits, %d misses", h, m)
	}
	c.Reset()
	if c.Len() != 0 {
		t.Fatal("Reset kept entries")
	}
}

func TestCacheConcurrent(t *testing.T) {
	c := NewCache(8)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				q := fmt.Sprintf("SELECT %d", (g+i)%16)
				if r := c.Classify(q, Options{}); r.Class != Read {
					t.Errorf("%s: %s", q, r.Class)
					return
				}
			}
		}()
	}
	wg.Wait()
	if c.Len() > 8 {
		t.Fatalf("Len = %d over the bound", c.Len())
	}
}

func BenchmarkClassify(b *testing.B) {
	q := "SELECT abalance FROM pgbench_accounts WHERE aid = 48213"
	b.ReportAllocs()
	for b.Loop() {
		Classify(q, Options{})
	}
}

func BenchmarkCacheHit(b *testing.B) {
	q := "SELECT abalance FROM pgbench_accounts WHERE aid = 48213"
	c := NewCache(0)
	c.Classify(q, Options{})
	b.ReportAllocs()
	for b.Loop() {
		c.Classify(q, Options{})
	}
}
