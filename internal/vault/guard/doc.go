// Package guard enforces the vault's rules on the server side, where no
// client can bypass them.
//
// Terms used throughout:
//
//   - capability: what a token may do. [Read] loads and lists; [Append] also
//     saves packs, indexes and WAL pieces and commits snapshots; [Admin] also
//     writes the config, keys and marks and may remove objects, within the
//     rules below.
//     Each capability includes the ones before it.
//   - commit: the only way a snapshot enters the vault. The vault checks the
//     declared packs exist, then writes a lock record on its own clock and
//     only then the snapshot, so no snapshot is ever stored unlocked.
//   - lock record: an immutable [format.LockRecord] naming a snapshot, the
//     packs it needs and an Until time on the vault's clock. A snapshot is
//     locked while any of its records is live; a pack while any live record
//     lists it. Extending writes a new record; nothing shortens a lock.
//   - storage lock: on a backend that can lock objects itself (a [Locker]:
//     S3 with COMPLIANCE-mode Object Lock), the date until which the
//     storage refuses to delete or overwrite an object, whoever asks. The
//     Store sets it on every object it writes and moves it later as lock
//     records demand (objectlock.go, docs/object-lock.md); it never moves it
//     earlier, so the vault's own rules and the storage's agree.
//   - vault clock: [Options.Now]. Clients never supply a time that decides
//     retention, so a client with a wrong (or lying) clock cannot backdate a
//     snapshot into early deletion (threat T3 in DESIGN.md).
//
// Why append includes read: every object but the config, the lock records
// and index headers is encrypted, so reading reveals nothing to a token that
// lacks the key, and an appending client needs the indexes and earlier trees
// to deduplicate. A read-only token exists for restore hosts and auditors.
//
// What an admin cannot do here: remove the config, a lock record that is
// still live, a snapshot or pack a live lock protects, the index that is the
// last to cover a protected pack, the last key, or a WAL piece the vault
// has held for less than MinRetention. Shortening retention
// (threat T4) is impossible: MinRetention lives in the write-once config and
// records are only ever added.
package guard
