// Package server serves a vault over HTTPS and provides the matching client.
//
// The server holds no decryption key. It authenticates each request by a
// bearer token, maps the token to a capability (read, append, admin) and
// hands the request to a [guard.Session], which enforces every vault rule.
// Tokens and the TLS certificate live in the server's own state folder, never
// among the objects, so no object write can touch them.
//
// # HTTP API
//
// HTTP/1.1 over TLS. Every request carries "Authorization: Bearer <token>".
// Object types are the folder names of [backend.Types] (config, keys, data,
// index, snapshots, locks, marks); names are 64 lowercase hex digits (the
// BLAKE3-256 of the bytes, format.Hash) or "config" for the config.
//
//	GET    /v1/whoami                    → {"capability":"append","token":"<id>","name":"<name>"}
//	GET    /v1/config                    → the config object's bytes (JSON)
//	PUT    /v1/objects/{type}/{name}     body = object bytes → 204
//	GET    /v1/objects/{type}/{name}     → bytes; "Range: bytes=a-b" or "bytes=a-" → 206
//	HEAD   /v1/objects/{type}/{name}     → 200 with Content-Length, no body
//	GET    /v1/objects/{type}/           → [{"name":"…","size":n}, …]
//	DELETE /v1/objects/{type}/{name}     → 204
//	POST   /v1/commit                    format.CommitRequest → {"id":"…","lock":LockRecord}
//	POST   /v1/locks/{snapshot}/extend   {"until":"RFC 3339"} → {"lock":LockRecord}
//	GET    /v1/locks                     → [LockRecord, …] sorted by time
//
// Errors are JSON {"error":"…"} with these codes: 400 malformed request,
// 401 missing, unknown or revoked token, 403 capability too weak or operation
// never allowed, 404 no such object, 405 wrong method, 409 object exists with
// other bytes, 413 body too large, 416 range outside the object, 423 a
// retention lock forbids it, 500 anything else (details only in the log).
// [Client] maps them back to guard.ErrForbidden, guard.ErrLocked,
// guard.ErrInvalid, backend.ErrNotExist and backend.ErrExists.
//
// Paths are matched literally: only lowercase letters, digits and "/" are
// accepted, no percent-encoding, no "." segments, so no request can name
// anything outside the object space.
package server
