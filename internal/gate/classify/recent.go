package classify

// recentSize is how many lookups a Recent keeps: pgbench's TPC-B is seven
// statements, an ORM's hot path about as many.
const recentSize = 8

// Recent is one session's memory of its last few lookups in a shared
// [Cache], with a value its caller derived from each result (the gate's
// policy decision). A client that repeats a few statements with new
// constants finds them here by comparing its text, or its shape, with at
// most recentSize keys: no lock, no map, no allocation but the result's
// copy with the new text, and no new decision. It keeps only what the
// Cache itself returned, under the key the Cache found it by, and forgets
// everything when the Cache is Reset. Not safe for concurrent use.
type Recent[V any] struct {
	c     *Cache
	value func(Result) V
	gen   uint64
	buf   []byte // the shape of the text being looked up
	ents  [recentSize]recentEntry[V]
	next  int // the entry to replace next
}

type recentEntry[V any] struct {
	set     bool
	key     string // the text, or its shape when byShape
	byShape bool
	res     Result
	v       V
}

// NewRecent returns an empty Recent in front of c, keeping value(result)
// with each result.
func NewRecent[V any](c *Cache, value func(Result) V) *Recent[V] {
	return &Recent[V]{c: c, value: value, gen: c.gen.Load()}
}

// Cached returns what c.Cached returns for sql, and the value of that
// result: computed now when the result is not among the recent ones, else
// the one computed then.
func (r *Recent[V]) Cached(sql string) (Result, V, bool) {
	if g := r.c.gen.Load(); g != r.gen {
		r.ents, r.gen = [recentSize]recentEntry[V]{}, g
	}
	for i := range r.ents {
		if e := &r.ents[i]; e.set && !e.byShape && e.key == sql {
			return e.res, e.v, true
		}
	}
	var byShape bool
	r.buf, byShape = shapeKey(r.buf[:0], sql)
	if byShape {
		for i := range r.ents {
			if e := &r.ents[i]; e.set && e.byShape && e.key == string(r.buf) {
				return withText(e.res, sql), e.v, true
			}
		}
	}
	res, shape, _, viaShape, ok := r.c.cached(sql, r.buf[:0])
	if !ok {
		var zero V
		return Result{}, zero, false
	}
	key := sql
	if viaShape {
		key = string(shape)
	}
	e := &r.ents[r.next]
	r.next = (r.next + 1) % recentSize
	*e = recentEntry[V]{set: true, key: key, byShape: viaShape, res: res, v: r.value(res)}
	return res, e.v, true
}
