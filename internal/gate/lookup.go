package gate

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// lookup answers the classifier's question "how volatile is this
// function?" from the upstream catalog, over one connection of its own
// (with the brokered credentials), cached for a minute.
//
// Without a schema it takes the most volatile of every function of that
// name in any schema: a session can change its search_path, so the one
// visible to this connection is not necessarily the one the statement
// will call.
type lookup struct {
	dsn string
	log *slog.Logger

	mu    sync.Mutex
	conn  *pgx.Conn
	cache map[[2]string]lookupEntry
}

type lookupEntry struct {
	vol   byte
	found bool
	at    time.Time
}

const lookupTTL = time.Minute

func newLookup(dsn string, log *slog.Logger) *lookup {
	return &lookup{dsn: dsn, log: log, cache: map[[2]string]lookupEntry{}}
}

const volatilityQuery = `SELECT max(CASE p.provolatile WHEN 'v' THEN 3 WHEN 's' THEN 2 ELSE 1 END)
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = $1 AND ($2 = '' OR n.nspname = $2)`

// volatility returns 'i', 's' or 'v' and whether the function exists.
// A failed lookup reports not found: the classifier then refuses to
// call the function harmless.
func (l *lookup) volatility(schema, name string) (byte, bool) {
	key := [2]string{schema, name}
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.cache[key]; ok && time.Since(e.at) < lookupTTL {
		return e.vol, e.found
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if l.conn == nil || l.conn.IsClosed() {
		c, err := pgx.Connect(ctx, l.dsn)
		if err != nil {
			l.log.Warn("gate: function lookup: connect upstream", "err", err)
			return 0, false
		}
		l.conn = c
	}
	var v *int
	if err := l.conn.QueryRow(ctx, volatilityQuery, name, schema).Scan(&v); err != nil {
		l.log.Warn("gate: function lookup", "function", name, "err", err)
		l.conn.Close(ctx)
		l.conn = nil
		return 0, false
	}
	e := lookupEntry{at: time.Now()}
	if v != nil {
		e.found = true
		e.vol = map[int]byte{1: 'i', 2: 's', 3: 'v'}[*v]
	}
	if len(l.cache) > 10000 {
		clear(l.cache)
	}
	l.cache[key] = e
	return e.vol, e.found
}

func (l *lookup) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		l.conn.Close(ctx)
		cancel()
		l.conn = nil
	}
}
