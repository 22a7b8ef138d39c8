// Package ledger keeps Dualkey's audit trail: an append-only, hash-chained
// log of everything that happened, which nobody can quietly edit.
//
// Terms:
//   - record: one entry ([Record]) with a sequence number (1, 2, ...), a time,
//     a kind ("statement", "approval", ...), an actor and kind-specific JSON
//     data. Its Hash covers its canonical encoding, which includes Prev, the
//     hash of the record before it: changing, removing or moving one record
//     breaks every link after it.
//   - checkpoint: a record of kind "checkpoint" whose data is an Ed25519
//     signature by the ledger's key over the sequence number and hash of the
//     record before it. Anyone who can write the database but does not hold
//     the key can re-hash an edited chain, but cannot sign it.
//   - span: the records after one checkpoint up to and including the next.
//   - mirror: a write-once copy of every span, stored as one object per span
//     (named by its seq range, see [ObjectName]) in the backup vault, where
//     the database's owner cannot rewrite it. A truncated or re-hashed store
//     no longer matches its mirror.
//
// A [Ledger] appends to a [Store] (internal/state implements it in SQLite or
// PostgreSQL) and mirrors to a [Mirror] (the vault; cmd/dualkey wires both).
// Several Ledgers, in one process or in several gateways, may append to one
// Store: the Store decides who gets each seq and losers retry, so the chain
// stays a single line. [Verify] walks a Store and its Mirror and names every
// problem with its seq; [Read] decodes records for "dualkey audit tail".
//
// The format, and what Verify can and cannot detect, is in docs/ledger.md.
package ledger
