// Package state is the shared, durable state of Dualkey's gate and quorum:
// the people who may connect, the approver policy, requests and their
// approvals, break-glass sessions, and the audit ledger's records.
//
// Terms:
//
//   - A user is a person known to the gate: a unique name, display name,
//     groups, and the SCRAM-SHA-256 verifier the gate authenticates them
//     with (never the password). Users are disabled, not deleted, so the
//     ledger's names always resolve.
//   - The policy is the approver set and its rules, an opaque signed
//     document produced by internal/quorum/cert. Each version has a serial;
//     a new version is accepted only as current+1, so two admins racing to
//     change the rules cannot both win, and every version stays on record.
//   - A request is a canonical document (opaque bytes) naming exactly what
//     will run, identified by the hex hash of those bytes. Its status moves
//     open → approved → consumed, or ends denied, expired or cancelled.
//   - An approval is one approver's signed decision on one request; an
//     approver has at most one per request.
//   - Consuming an approved request is the single use: [DB.Consume] moves
//     it to consumed with one conditional UPDATE, so of any number of gates
//     racing on one database exactly one wins.
//   - A break-glass session lets one person act in a named role without a
//     quorum for a bounded time; it stays flagged until a review request
//     approved by others is attached to it.
//   - Ledger rows are the audit ledger's records by sequence number; the
//     hash chain itself lives in internal/ledger, which stores through
//     [DB.Ledger].
//
// Two engines sit behind the one concrete type [DB]: SQLite (an embedded
// file, the default) and PostgreSQL (when several gateways share state).
// Both run the same numbered migrations and pass the same conformance
// suite. docs/state.md describes the schema and when to choose which.
package state
