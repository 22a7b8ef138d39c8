// Package pgagent protects a PostgreSQL cluster through the replication
// protocol: base backups stored as vault snapshots and, next to them, the
// WAL streamed from a physical replication slot.
//
// Terms:
//   - A base backup is a copy of the data directory taken by the server's
//     BASE_BACKUP command while the cluster runs. It is consistent only
//     together with the WAL from its start LSN to its end LSN, which the
//     agent streams into the vault separately; restore fetches it from there.
//   - The backup manifest (backup_manifest) is the server's list of every
//     file in the backup with its size and checksum, itself protected by a
//     SHA-256. Every base backup is checked against it before it is
//     committed, and it is stored in the snapshot for restore to check again.
//   - A relation file is a table's or index's segment under base/, global/
//     or pg_tblspc/, made of 8 KiB pages that the server changes in place.
//     These are stored page by page, so a page unchanged since the last base
//     backup is not stored again.
//   - An LSN is a position in the WAL (LSN).
//
// A base backup is a snapshot of kind snapshot.KindPGBase whose Meta is a
// BaseMeta.
package pgagent
