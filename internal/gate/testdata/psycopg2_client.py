"""Runs the real-client case through the dualkey gate with psycopg2.

Usage: psycopg2_client.py HOST PORT DB USER PASSWORD TABLE

Prints "key<TAB>value" lines for the Go test (clients_test.go). After a
"held" line it waits for a line on stdin: the test answers once it has had
the request approved (or not).
"""
import hashlib
import io
import sys

import psycopg2

host, port, db, user, password, table = sys.argv[1:7]


def out(key, value):
    print(f"{key}\t{value}", flush=True)


conn = psycopg2.connect(host=host, port=port, dbname=db, user=user, password=password,
                        sslmode="require", application_name="psycopg2")
conn.autocommit = True
out("tls", conn.info.ssl_in_use)
cur = conn.cursor()

cur.execute("SELECT current_user")
out("user", cur.fetchone()[0])
cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
# psycopg2 binds parameters on the client side, over the simple protocol.
cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"item {i}") for i in (1, 2, 3)])
cur.execute(f"SELECT name FROM {table} WHERE id = %s AND name LIKE %s", (2, "item%"))
out("param", cur.fetchone()[0])

csv = "".join(f"{i},row {i}\n" for i in range(100, 1100))
cur.copy_expert(f"COPY {table} FROM STDIN WITH (FORMAT csv)", io.StringIO(csv))
out("copyin", cur.rowcount)
buf = io.StringIO()
cur.copy_expert(f"COPY (SELECT id, name FROM {table} WHERE id >= 100 ORDER BY id) TO STDOUT WITH (FORMAT csv)", buf)
out("copyout", hashlib.sha256(buf.getvalue().encode()).hexdigest())

wipe = f"DELETE FROM {table}"
for attempt in ("first", "approved", "again"):
    try:
        cur.execute(wipe)
        out("ran", cur.rowcount)
    except psycopg2.Error as e:
        out("held", f"{e.pgcode} {e.diag.message_primary}")
        sys.stdin.readline()
    # the session must be usable after a hold
    cur.execute(f"SELECT count(*) FROM {table}")
    out("count", cur.fetchone()[0])
conn.close()
out("done", "psycopg2 " + psycopg2.__version__.split()[0])
