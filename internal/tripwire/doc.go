// Package tripwire decodes PostgreSQL 15's write-ahead log as it streams in
// and raises an [Event] when the WAL shows data being destroyed: a database
// dropped, relations dropped at commit, a table truncated, or a transaction
// deleting or updating more rows of one table than a threshold.
//
// Terms:
//   - LSN: a byte position in the WAL stream.
//   - page: WAL is written in 8 KiB pages, each starting with a page header;
//     the first page of every segment (16 MiB by default) has a long header.
//   - record: one logged action, an XLogRecord header followed by block
//     references and main data. A record can span pages and segments.
//   - relfilenode: the file a relation's data lives in, named by tablespace,
//     database and file number ([RelFileNode]). TRUNCATE, VACUUM FULL and
//     CLUSTER give a table a new relfilenode; the table's OID stays.
//   - xid: a transaction id; subtransactions (savepoints) have their own,
//     listed in the top-level transaction's commit record.
//
// A [Decoder] is fed WAL in LSN order, in pieces of any size, starting at a
// page boundary; it checks every page header and every record's CRC-32C
// and keeps per-transaction state until the transaction commits or aborts.
// It needs no connection to the server: relation names come from a [Names]
// cache the caller keeps fresh from pg_class ([MapNames] is a simple one),
// so a table is still named after it has been dropped.
//
// The package is a leaf (standard library only). The record format, each
// event and what the decoder cannot see are in docs/wal-decoding.md.
package tripwire
