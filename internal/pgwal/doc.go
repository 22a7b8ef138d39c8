// Package pgwal stores PostgreSQL's write-ahead log in a vault and reads it
// back, byte for byte.
//
// Terms:
//   - LSN: a position in the WAL stream, a byte offset printed as "16/B374D848".
//   - timeline: PostgreSQL starts a new timeline at every promotion or
//     point-in-time restore; the same LSN can hold different WAL on two
//     timelines. A timeline history file ("00000002.history") says where each
//     timeline branched from its parent.
//   - segment: the unit PostgreSQL archives and restores, a file of 16 MiB
//     by default named by timeline and segment number
//     ("00000001000000000000000A").
//   - piece: one vault object of type wal holding a contiguous run of WAL
//     bytes of one timeline, [Start, End), or one history file. Pieces do not
//     follow segment boundaries: the agent stores what arrived since its
//     last flush, so a piece may span two segments and a segment is
//     assembled from several pieces.
//
// A [Writer] buffers streamed WAL and stores it as pieces on [Writer.Flush];
// only the LSN Flush returns may be reported to PostgreSQL as flushed. A
// [Catalog] lists the pieces a vault holds from their plaintext headers
// (no key needed) and [Segment] assembles one segment file from them,
// decrypting and checking every piece.
//
// The object layout is in docs/vault-format.md ("WAL").
package pgwal
