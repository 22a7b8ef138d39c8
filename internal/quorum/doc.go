// Package quorum runs the two-person rule on the shared state: it opens
// requests, takes signed votes, decides them, hands out certificates, and
// lets an approved request run exactly once.
//
// Terms:
//
//   - A request is a canonical [cert.Request]: exactly what will run (SQL
//     with its database and role, a vault action with its parameters, a new
//     policy, or a review), who asks, why, and until when. Its ID is the
//     hash of its bytes, so a changed request is a different request.
//   - A vote is a [cert.Approval]: an Ed25519 signature by a registered
//     approver over the ID, the decision (approve or deny) and an expiry.
//   - The policy ([cert.Policy], stored by serial in internal/state) names
//     the approvers, their keys, the M-of-N rule for each action, and who
//     may break glass in which role. It changes only through an approved
//     "policy:change" request, verified under the policy it replaces.
//   - A request is open, then approved (its valid approvals meet the rule's
//     threshold), denied (a valid deny by a registered approver), expired
//     or cancelled; an approved request becomes consumed when it runs, at
//     most once, decided by one conditional UPDATE in the store.
//   - Break-glass is the one path around a quorum: named people in named
//     roles, loud (ledger record and webhook before it starts), time-boxed
//     (it ends by itself), and flagged until others approve a
//     "breakglass:review" request about it.
//
// Every step is a ledger record. A [Service] never approves on a timeout and
// has no bypass: what it does not verify against the current policy, it
// refuses.
//
// The vault does not use this package: it checks certificates itself with
// internal/quorum/cert, against its own copy of the policy.
package quorum
