// Runs the real-client case through the dualkey gate with node-postgres.
//
// Usage: node client.js HOST PORT DB USER PASSWORD TABLE
//
// Prints "key<TAB>value" lines for the Go test (clients_test.go). After a
// "held" line it waits for a line on stdin: the test answers once it has had
// the request approved (or not).
'use strict';
const crypto = require('crypto');
const readline = require('readline');
const { Readable, Writable } = require('stream');
const { pipeline } = require('stream/promises');
const { Client } = require('pg');
const { from: copyFrom, to: copyTo } = require('pg-copy-streams');

const [host, port, database, user, password, table] = process.argv.slice(2);
const out = (key, value) => process.stdout.write(`${key}\t${value}\n`);

const stdinLines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function main() {
  // The gate's certificate is self-signed; sslmode=require does not check it either.
  const c = new Client({ host, port: Number(port), database, user, password,
    ssl: { rejectUnauthorized: false }, application_name: 'node-postgres' });
  await c.connect();
  out('tls', c.connection.stream.encrypted === true);

  out('user', (await c.query('SELECT current_user AS u')).rows[0].u);
  await c.query(`CREATE TABLE ${table} (id int PRIMARY KEY, name text)`);
  // values: the extended protocol (unnamed statement); name: a named one.
  for (const i of [1, 2, 3]) {
    await c.query(`INSERT INTO ${table} VALUES ($1, $2)`, [i, `item ${i}`]);
  }
  const byId = { name: 'by_id', text: `SELECT name FROM ${table} WHERE id = $1 AND name LIKE $2` };
  await c.query({ ...byId, values: [1, 'item%'] });
  out('param', (await c.query({ ...byId, values: [2, 'item%'] })).rows[0].name);

  let csv = '';
  for (let i = 100; i < 1100; i++) csv += `${i},row ${i}\n`;
  const inStream = c.query(copyFrom(`COPY ${table} FROM STDIN WITH (FORMAT csv)`));
  await pipeline(Readable.from([csv]), inStream);
  out('copyin', inStream.rowCount);
  const h = crypto.createHash('sha256');
  await pipeline(c.query(copyTo(`COPY (SELECT id, name FROM ${table} WHERE id >= 100 ORDER BY id) TO STDOUT WITH (FORMAT csv)`)),
    new Writable({ write(chunk, _enc, cb) { h.update(chunk); cb(); } }));
  out('copyout', h.digest('hex'));

  // A named prepared statement: held at Parse, so pg never marks it parsed
  // and parses it again on the next try.
  const wipe = { name: 'wipe', text: `DELETE FROM ${table}` };
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      out('ran', (await c.query(wipe)).rowCount);
    } catch (e) {
      if (!e.code) throw e;
      out('held', `${e.code} ${e.message}`);
      await stdinLines.next();
    }
    out('count', (await c.query(`SELECT count(*)::int AS n FROM ${table}`)).rows[0].n);
  }
  await c.end();
  out('done', 'pg ' + require('pg/package.json').version);
  process.exit(0);
}

main().catch((e) => {
  process.stderr.write(`${e.stack}\n${e.code || ''}\n`);
  process.exit(1);
});
