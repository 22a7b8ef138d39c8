// Package restorer turns a snapshot's tree back into files: [Restore] writes
// a whole tree (or the parts an include filter selects) into a directory
// with its metadata, [Dump] streams one file or a tar of one directory, and
// [Walk] and [Lookup] read trees for listings and checks.
//
// Paths inside a snapshot are slash-separated and relative to its root
// tree: "etc/passwd", never "/etc/passwd"; the root itself is "". Functions
// taking a path accept a leading slash and ignore it.
//
// Restore reads packs, not blobs: it first walks the trees and plans which
// blob goes to which offsets of which files, then loads each pack's needed
// bytes in few large ranges, decodes each blob once and writes it wherever
// it is used. A restore of 1.5 GiB is thus a few hundred range loads, not a
// few hundred thousand blob loads.
package restorer
