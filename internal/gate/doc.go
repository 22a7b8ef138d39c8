// Package gate is Dualkey's PostgreSQL access gateway: a wire-protocol
// proxy in front of a database, where every person logs in as themselves
// and nothing destructive runs on one person's word.
//
// Terms:
//
//   - A session is one client connection: a person authenticated with
//     SCRAM-SHA-256 against the users of internal/state, and one upstream
//     connection of its own made with the brokered credentials of the
//     config, which the person never sees. The client gets the gate's own
//     process ID and cancel key; the gate maps them to the upstream's.
//   - Every statement is judged before it is sent: a simple query as a
//     whole string (every statement in it, the strictest decision wins), an
//     extended-protocol statement at Parse. Named statements and portals
//     are tracked per session, so an Execute is judged by what its
//     statement was prepared as; a name the gate did not see parsed (SQL
//     PREPARE, DECLARE) cannot be bound or executed through the protocol.
//   - A refusal (deny or hold) is answered in order with everything in
//     flight: the gate sends the upstream a statement that cannot parse in
//     place of the refused one and puts its own error in place of the
//     upstream's. PostgreSQL thus fails the transaction (or the pipelined
//     batch up to Sync) exactly as if the refused statement had failed.
//   - A hold opens a quorum request binding the exact text, database, role
//     and person; once approved, the same statement from the same person
//     runs once (quorum.Service.Consume), at Execute for a prepared one.
//   - The blast-radius guard runs an UPDATE or DELETE that the policy
//     allows with a row limit inside a savepoint (or a transaction of its
//     own), reads the rows from the command tag, and rolls back and holds
//     it when there are too many.
//
// The relay (relay.go) copies upstream messages to the client as raw bytes
// and keeps a queue of the responses owed, which is how injected
// statements are hidden, refusals replaced, guarded results held back and
// statements recorded in the ledger with their rows. docs/gate.md has the
// whole picture.
package gate
