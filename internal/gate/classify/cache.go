package classify

import (
	"container/list"
	"sync"
)

// DefaultCacheSize is the number of statement texts a [Cache] keeps when
// NewCache is given zero or less: a pgbench or ORM workload repeats a few
// dozen texts, an interactive one a few hundred.
const DefaultCacheSize = 4096

// maxCachedText bounds the length of a text the cache keeps, so that the
// cache's memory stays near size × a few KiB: long texts are rare and
// seldom repeated, and are classified every time.
const maxCachedText = 64 << 10

// Cache remembers Classify results by exact statement text (bounded,
// least recently used first out), because the gate sees the same
// statements again and again and a hit costs no parse at all. It keys on
// the text, not on the fingerprint: "WHERE 1=1" and "WHERE id=1" share a
// fingerprint but not a class.
//
// A Cache assumes its Options answer the same way for every call: use
// one per upstream database, and Reset it when functions there change.
// Results are shared between callers: do not modify them. Safe for
// concurrent use.
type Cache struct {
	size int

	mu    sync.Mutex
	ll    *list.List // of *cacheEntry, most recent at the front
	items map[string]*list.Element
	hits  uint64
	miss  uint64
}

type cacheEntry struct {
	sql string
	res Result
}

// NewCache returns a cache of at most size texts (DefaultCacheSize when
// size <= 0).
func NewCache(size int) *Cache {
	if size <= 0 {
		size = DefaultCacheSize
	}
	return &Cache{size: size, ll: list.New(), items: make(map[string]*list.Element)}
}

// Classify returns Classify(sql, opts), from the cache when sql was seen.
func (c *Cache) Classify(sql string, opts Options) Result {
	c.mu.Lock()
	if e, ok := c.items[sql]; ok {
		c.ll.MoveToFront(e)
		c.hits++
		res := e.Value.(*cacheEntry).res
		c.mu.Unlock()
		return res
	}
	c.miss++
	c.mu.Unlock()

	// Classify outside the lock: parsing is the slow part, and two
	// sessions classifying the same new text at once only waste a parse.
	res := Classify(sql, opts)
	if len(sql) > maxCachedText {
		return res
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[sql]; ok {
		c.ll.MoveToFront(e)
		return res
	}
	c.items[sql] = c.ll.PushFront(&cacheEntry{sql: sql, res: res})
	for c.ll.Len() > c.size {
		last := c.ll.Back()
		c.ll.Remove(last)
		delete(c.items, last.Value.(*cacheEntry).sql)
	}
	return res
}

// Reset forgets every result, for when the answers of Options.Lookup may
// have changed (a function created, altered or dropped).
func (c *Cache) Reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ll.Init()
	clear(c.items)
}

// Stats returns the number of hits and misses so far.
func (c *Cache) Stats() (hits, misses uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hits, c.miss
}

// Len returns the number of texts cached.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}
