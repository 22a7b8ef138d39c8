// Package chunker splits a byte stream into the chunks a vault stores as blobs.
//
// Terms used throughout:
//
//   - A chunk is a contiguous run of the input. Chunks concatenate back to the
//     input exactly; each becomes one blob, named by its hash, compressed and
//     encrypted on its own, so identical chunks are stored once.
//   - A boundary (cut point) is where one chunk ends and the next begins.
//   - A [Splitter] produces chunks one at a time. Two exist:
//     [Chunker] places boundaries by content (FastCDC), so an insertion moves
//     only the boundaries near it; [Pages] cuts every page, so a changed
//     database page changes exactly one chunk.
//   - The gear table ([Gear]) is the 256-entry table of the rolling hash. It is
//     derived from a per-repository secret, so two repositories cut the same
//     file at different places.
//
// Boundaries are part of the vault format: changing the gear derivation, the
// hash, the masks or the cut rule changes every chunk a repository would
// produce and forfeits deduplication against what it already holds. The
// golden test (testdata/golden.txt) pins them.
package chunker
