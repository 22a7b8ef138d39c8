package classify

import (
	"container/list"
	"strings"
	"sync"
	"sync/atomic"
)

// DefaultCacheSize is the number of statement texts a [Cache] keeps when
// NewCache is given zero or less: a pgbench or ORM workload repeats a few
// dozen texts, an interactive one a few hundred.
const DefaultCacheSize = 4096

// maxCachedText bounds the length of a text the cache keeps, so that the
// cache's memory stays near size × a few KiB: long texts are rare and
// seldom repeated, and are classified every time.
const maxCachedText = 64 << 10

// Cache remembers Classify results (bounded, least recently used first
// out), because the gate sees the same statements again and again and a
// hit costs no parse at all. It keys on two things:
//
//   - the exact text;
//   - the text's shape (shapeOf: the text with its numeric and string
//     literals replaced by markers), for one INSERT, UPDATE, DELETE or
//     SELECT whose classification never looked at a constant's value, and
//     whose every literal is a constant in the parse tree (constsAt), so
//     that "SELECT abalance FROM pgbench_accounts WHERE aid = 48213" is
//     parsed once, not once per key. A classification that did look
//     ("WHERE 1=1" against "WHERE 1=2", query_to_xml('...'),
//     set_config('name', ...)) is kept by exact text only: pg_query's
//     fingerprint would have joined them, which is why it is not the key.
//
// A Cache assumes its Options answer the same way for every call: use
// one per upstream database, and Reset it when functions there change.
// Results are shared between callers: do not modify them. Their
// Fingerprint is empty. Safe for concurrent use.
type Cache struct {
	size int

	mu     sync.Mutex
	ll     *list.List // of *cacheEntry, most recent at the front
	items  map[string]*list.Element
	shapes map[string]*list.Element
	hits   uint64
	miss   uint64
	gen    atomic.Uint64 // bumped by Reset, so that each Recent forgets too
}

type cacheEntry struct {
	key   string
	shape bool // key is a shape
	res   Result
}

// NewCache returns a cache of at most size texts and shapes together
// (DefaultCacheSize when size <= 0).
func NewCache(size int) *Cache {
	if size <= 0 {
		size = DefaultCacheSize
	}
	return &Cache{size: size, ll: list.New(), items: make(map[string]*list.Element), shapes: make(map[string]*list.Element)}
}

// Classify returns Classify(sql, opts) but for its Fingerprint, from the
// cache when sql, or a statement of its shape, was seen.
func (c *Cache) Classify(sql string, opts Options) Result {
	var buf [256]byte
	res, shape, byShape, _, ok := c.cached(sql, buf[:0])
	if ok {
		return res
	}

	// Classify outside the lock: parsing is the slow part, and two
	// sessions classifying the same new text at once only waste a parse.
	res, constRead, tree := classifyString(sql, opts, false)
	if byShape && !constRead && shapeable(res) {
		var spans []int
		appendShape(nil, sql, &spans)
		byShape = constsAt(sql, tree, spans)
	} else {
		byShape = false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.miss++
	if len(sql) > maxCachedText {
		return res
	}
	if byShape {
		c.put(c.shapes, string(shape), true, res)
	} else {
		c.put(c.items, sql, false, res)
	}
	return res
}

// Cached returns what Classify would return for sql if it is in the cache,
// without classifying it: for callers that must not block (the gate's
// event loop hands misses to a goroutine, since classifying may look up
// functions in the database).
func (c *Cache) Cached(sql string) (Result, bool) {
	var buf [256]byte
	res, _, _, _, ok := c.cached(sql, buf[:0])
	return res, ok
}

// cached looks sql up by text, then by shape, which it appends to buf. It
// returns the shape and whether the cache may key on it (byShape), and
// whether the hit was by shape.
func (c *Cache) cached(sql string, buf []byte) (res Result, shape []byte, byShape, viaShape, ok bool) {
	if res, ok := c.hit(c.items, sql); ok {
		return res, nil, false, false, true
	}
	shape, byShape = shapeKey(buf, sql)
	if res, ok := c.hitShape(shape, byShape); ok {
		return withText(res, sql), shape, true, true, true
	}
	return Result{}, shape, byShape, false, false
}

// hitShape is hit in c.shapes, with the key as bytes: indexing the map
// with string(shape) right here does not copy it.
func (c *Cache) hitShape(shape []byte, byShape bool) (Result, bool) {
	if !byShape {
		return Result{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.shapes[string(shape)]
	if !ok {
		return Result{}, false
	}
	return c.touch(e), true
}

// shapeKey appends sql's shape to dst and reports whether the cache keys
// on it: a text it keeps, with at least one literal replaced.
func shapeKey(dst []byte, sql string) ([]byte, bool) {
	if len(sql) > maxCachedText {
		return dst, false
	}
	b, n, ok := appendShape(dst, sql, nil)
	return b, ok && n > 0
}

// hit returns m's entry for key, now the most recently used.
func (c *Cache) hit(m map[string]*list.Element, key string) (Result, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := m[key]
	if !ok {
		return Result{}, false
	}
	return c.touch(e), true
}

// touch counts a hit on e and makes it the most recently used. c.mu is held.
func (c *Cache) touch(e *list.Element) Result {
	c.ll.MoveToFront(e)
	c.hits++
	return e.Value.(*cacheEntry).res
}

// put stores res under key in m (items or shapes), evicting the least
// recently used entries beyond the bound. c.mu is held.
func (c *Cache) put(m map[string]*list.Element, key string, shape bool, res Result) {
	if e, ok := m[key]; ok {
		c.ll.MoveToFront(e)
		return
	}
	m[key] = c.ll.PushFront(&cacheEntry{key: key, shape: shape, res: res})
	for c.ll.Len() > c.size {
		last := c.ll.Back()
		c.ll.Remove(last)
		if ce := last.Value.(*cacheEntry); ce.shape {
			delete(c.shapes, ce.key)
		} else {
			delete(c.items, ce.key)
		}
	}
}

// shapeable reports whether a result that read no constant may be kept
// by shape: one plain INSERT, UPDATE, DELETE or SELECT that parsed. The
// classifier's constRead is what makes this sound; the list keeps the
// shapes to the statements a workload repeats with new constants, where
// every rule that reads a constant is known.
func shapeable(res Result) bool {
	if len(res.Statements) != 1 || res.Class == Unknown {
		return false
	}
	switch res.Statements[0].Kind {
	case "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt":
		return true
	}
	return false
}

// withText returns res, cached for another text of the same shape, as
// the result for sql: the statement's text is sql's own (what Classify
// would cut out of it: sql without blanks and its one final semicolon).
func withText(res Result, sql string) Result {
	st := res.Statements[0]
	st.Text = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(sql), ";"))
	res.Statements = []Statement{st}
	return res
}

// Reset forgets every result, for when the answers of Options.Lookup may
// have changed (a function created, altered or dropped).
func (c *Cache) Reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen.Add(1)
	c.ll.Init()
	clear(c.items)
	clear(c.shapes)
}

// Stats returns the number of hits and misses so far.
func (c *Cache) Stats() (hits, misses uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hits, c.miss
}

// Len returns the number of texts and shapes cached.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}
