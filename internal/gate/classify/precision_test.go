package classify

import "testing"

// analytical are ordinary queries analysts and dashboards run all day.
// A guard that flags them gets switched off, so each must be read, with
// no catalog lookup at all (the CLI has none).
var analytical = []string{
	"SELECT 1",
	"SELECT * FROM orders WHERE created_at > now() - interval '7 days' ORDER BY created_at DESC LIMIT 100",
	`SELECT c.name, count(o.id) AS orders, sum(o.total) AS revenue
	   FROM customers c LEFT JOIN orders o ON o.customer_id = c.id
	  WHERE o.status IN ('paid', 'shipped')
	  GROUP BY c.name HAVING count(o.id) > 3 ORDER BY revenue DESC NULLS LAST`,
	`SELECT day, revenue, avg(revenue) OVER (ORDER BY day ROWS BETWEEN 6 PRECEDING AND CURRENT ROW) AS weekly,
	        rank() OVER (PARTITION BY date_trunc('month', day) ORDER BY revenue DESC), lag(revenue) OVER w, ntile(4) OVER w
	   FROM daily WINDOW w AS (ORDER BY day)`,
	`WITH recent AS (SELECT * FROM events WHERE at > current_date - 30),
	      per_user AS (SELECT user_id, count(*) n FROM recent GROUP BY 1)
	 SELECT percentile_cont(0.9) WITHIN GROUP (ORDER BY n), max(n), min(n) FROM per_user`,
	`WITH RECURSIVE tree AS (SELECT id, parent_id, 1 AS depth FROM nodes WHERE parent_id IS NULL
	   UNION ALL SELECT n.id, n.parent_id, t.depth + 1 FROM nodes n JOIN tree t ON n.parent_id = t.id)
	 SELECT depth, count(*) FROM tree GROUP BY depth`,
	"SELECT jsonb_agg(jsonb_build_object('id', id, 'tags', tags)) FROM items WHERE tags ? 'sale' AND data->>'kind' = 'x'",
	"SELECT id, data #>> '{a,b}', jsonb_path_query_first(data, '$.items[0]') FROM docs",
	"SELECT extract(epoch FROM now() - started_at), to_char(started_at, 'YYYY-MM-DD'), age(now(), started_at) FROM jobs",
	"SELECT coalesce(nullif(trim(name), ''), 'anonymous'), upper(left(email, 3)) || '***', length(name) FROM users",
	"SELECT regexp_replace(phone, '[^0-9]', '', 'g'), split_part(email, '@', 2), md5(email) FROM users",
	"SELECT * FROM generate_series(1, 10) g(i) CROSS JOIN LATERAL (SELECT i * 2 AS d) x",
	"SELECT u.id FROM users u WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)",
	"SELECT id FROM a UNION SELECT id FROM b EXCEPT SELECT id FROM c INTERSECT SELECT id FROM d",
	"SELECT DISTINCT ON (user_id) user_id, at FROM logins ORDER BY user_id, at DESC",
	"SELECT count(*) FILTER (WHERE ok), bool_and(ok), string_agg(name, ', ' ORDER BY name) FROM checks",
	"SELECT date_bin('15 minutes', at, timestamp '2020-01-01'), count(*) FROM hits GROUP BY 1",
	"SELECT sum(amount) FROM payments GROUP BY ROLLUP (region, product)",
	"SELECT * FROM t TABLESAMPLE SYSTEM (1)",
	"SELECT array_agg(x ORDER BY x), unnest(array[1,2,3]), cardinality(tags) FROM t GROUP BY tags",
	"SELECT pg_size_pretty(pg_total_relation_size('orders')), pg_database_size(current_database())",
	"SELECT pid, state, query, now() - query_start FROM pg_stat_activity WHERE state <> 'idle'",
	"SELECT relname, n_live_tup, n_dead_tup FROM pg_stat_user_tables ORDER BY n_dead_tup DESC",
	"SELECT * FROM information_schema.columns WHERE table_name = 'orders'",
	"SELECT gen_random_uuid(), random(), clock_timestamp(), txid_current()",
	"SELECT to_tsvector('english', body) @@ websearch_to_tsquery('english', 'cat dog') FROM posts",
	"SELECT ts_rank(to_tsvector(body), plainto_tsquery('x')) FROM posts ORDER BY 1 DESC",
	"SELECT greatest(a, b), least(a, b), CASE WHEN a > b THEN 'a' ELSE 'b' END FROM pairs",
	"SELECT id::text, amount::numeric(10,2), CAST(at AS date) FROM t",
	"SELECT * FROM orders o JOIN LATERAL (SELECT * FROM items i WHERE i.order_id = o.id LIMIT 3) i ON true",
	"SELECT round(avg(x)::numeric, 2), stddev(x), corr(x, y) FROM m",
	"SELECT format('%s-%s', a, b), concat_ws('/', a, b), position('x' in a), substring(a from 2 for 3) FROM t",
	"SELECT now() AT TIME ZONE 'UTC', current_timestamp, current_user, session_user",
	"SELECT json_object_keys(j), j->'a' FROM js",
	"SELECT 1 FROM t WHERE x IS DISTINCT FROM y AND z BETWEEN 1 AND 10 AND name ILIKE 'a%'",
	"SELECT pg_sleep(0.1)",
	"SELECT currval('s'), lastval()",
	"EXPLAIN SELECT * FROM orders WHERE id = 1",
	"EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM orders WHERE id = 1",
	"EXPLAIN (FORMAT JSON) DELETE FROM orders",
	"SHOW work_mem",
	"SET statement_timeout = '30s'",
	"SET search_path TO reporting, public",
	"SET application_name = 'metabase'",
	"RESET ALL",
	"BEGIN READ ONLY; SELECT 1; COMMIT",
	"START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
	"SAVEPOINT a; ROLLBACK TO SAVEPOINT a; RELEASE a",
	"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
	"DECLARE c CURSOR WITH HOLD FOR SELECT * FROM big; FETCH 100 FROM c; CLOSE c",
	"COPY (SELECT * FROM orders WHERE day = current_date) TO STDOUT WITH (FORMAT csv, HEADER)",
	"COPY orders TO STDOUT",
	"VALUES (1, 'a'), (2, 'b')",
	"TABLE orders",
	"ANALYZE orders",
	"LISTEN events",
	"DISCARD ALL",
	"PREPARE q(int) AS SELECT * FROM orders WHERE id = $1",
	"DEALLOCATE ALL",
	"SELECT pg_advisory_lock(42), pg_try_advisory_lock(43)",
	"SELECT has_table_privilege('orders', 'SELECT'), pg_get_viewdef('v'::regclass)",
	"SELECT x FROM t WHERE x = $1 AND y = ANY($2)",
	"SELECT x.* FROM docs, xmltable('/a' PASSING docs.body COLUMNS b text) x",
	"SELECT json_value(j, '$.a'), json_query(j, '$.b'), j IS JSON FROM js",
	"DO $$ BEGIN RAISE NOTICE 'count %', (SELECT count(*) FROM orders); END $$",
	"DO $$ DECLARE n bigint; BEGIN SELECT count(*) INTO n FROM orders; RAISE NOTICE '%', n; END $$",
	"/* dashboard 7 */ SELECT 1; -- trailing comment",
	"",
	"   ",
	"-- nothing",
}

func TestPrecision(t *testing.T) {
	for _, q := range analytical {
		t.Run(short(q), func(t *testing.T) {
			if res := Classify(q, Options{}); res.Class != Read {
				t.Errorf("Classify(%q) = %s (%s), want read", q, res.Class, res.Reason)
			}
		})
	}
}
