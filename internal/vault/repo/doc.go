// Package repo is the client side of a vault: it turns plaintext into the
// encrypted, deduplicated objects a vault stores, and back.
//
// Terms:
//   - blob: one chunk of file content (data) or one directory listing (tree),
//     named by its keyed ID, compressed and sealed on its own;
//   - pack: an object holding many blobs and a sealed header listing them;
//   - index: an object saying which blob is in which pack, so a client need
//     not read every pack header;
//   - snapshot: a sealed document naming the root tree of one backup;
//   - lock record: written by the vault, never by a client, when a snapshot
//     is committed: the vault's own time and how long the snapshot and the
//     packs it needs cannot be removed.
//
// A Repository talks to a Store: in-process (guard.Session over a directory)
// or over HTTPS (server.Client). Which operations a Store allows is decided
// by the vault, not here.
package repo
