package state

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Status is where a request stands.
type Status string

const (
	StatusOpen      Status = "open"      // waiting for approvals
	StatusApproved  Status = "approved"  // quorum reached; may run once
	StatusDenied    Status = "denied"    // refused; final
	StatusConsumed  Status = "consumed"  // ran (see DB.Consume); final
	StatusExpired   Status = "expired"   // expiry passed before it ran; final
	StatusCancelled Status = "cancelled" // withdrawn; final
)

// Valid reports whether s is one of the six statuses.
func (s Status) Valid() bool {
	switch s {
	case StatusOpen, StatusApproved, StatusDenied, StatusConsumed, StatusExpired, StatusCancelled:
		return true
	}
	return false
}

// transitions lists what SetRequestStatus may do. Consumed is reached
// only through Consume (which records when and by whom), and the final
// statuses never change: a consumed request that could go back to
// approved would run twice.
var transitions = map[Status][]Status{
	StatusOpen:     {StatusApproved, StatusDenied, StatusExpired, StatusCancelled},
	StatusApproved: {StatusExpired, StatusCancelled},
}

func allowed(from, to Status) bool {
	for _, s := range transitions[from] {
		if s == to {
			return true
		}
	}
	return false
}

// Request is a request for consent to one exact action.
type Request struct {
	// ID is the lowercase hex hash of Doc (computed by the caller).
	ID string
	// Doc is the canonical request document, opaque here.
	Doc       []byte
	Requester string
	// Action is a short kind for listing ("sql", "vault.forget", ...).
	Action string
	// Status is StatusOpen for a new request (zero means open in PutRequest).
	Status  Status
	Created time.Time
	// Expires is when the request stops being usable; zero means no expiry
	// is stored (the signed document may still carry one).
	Expires time.Time
	// ConsumedAt and ConsumedBy are set by Consume; zero and "" before.
	ConsumedAt time.Time
	ConsumedBy string
}

// validID accepts a non-empty lowercase hex string of even length up to
// 128 characters: one hash has one spelling, so a request cannot be
// approved under two names.
func validID(id string) bool {
	if id == "" || len(id)%2 != 0 || len(id) > 128 {
		return false
	}
	for _, c := range []byte(id) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// PutRequest stores a new open request. Storing the same ID with the same
// Doc again is a no-op (a retried submit); the same ID with other bytes
// fails with ErrConflict.
func (db *DB) PutRequest(ctx context.Context, r Request) error {
	switch {
	case !validID(r.ID):
		return fmt.Errorf("%w: request ID %q is not lowercase hex", ErrInvalid, r.ID)
	case len(r.Doc) == 0:
		return fmt.Errorf("%w: request %s: empty document", ErrInvalid, r.ID)
	case r.Requester == "":
		return fmt.Errorf("%w: request %s: no requester", ErrInvalid, r.ID)
	case r.Status != "" && r.Status != StatusOpen:
		return fmt.Errorf("%w: request %s: a new request is open, not %s", ErrInvalid, r.ID, r.Status)
	}
	var existing []byte
	err := db.tx(ctx, func(tx *sql.Tx) error {
		existing = nil
		res, err := tx.ExecContext(ctx, `INSERT INTO requests (id, doc, requester, action, status, created, expires)
			VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING`,
			r.ID, r.Doc, r.Requester, r.Action, string(StatusOpen), micros(db.stamp(r.Created)), micros(r.Expires))
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil || n == 1 {
			return err
		}
		return tx.QueryRowContext(ctx, "SELECT doc FROM requests WHERE id = $1", r.ID).Scan(&existing)
	})
	if err != nil {
		return db.wrap(err, "put request %s", r.ID)
	}
	if existing != nil && !bytes.Equal(existing, r.Doc) {
		return fmt.Errorf("state: put request %s: stored with other bytes: %w", r.ID, ErrConflict)
	}
	return nil
}

const requestColumns = "id, doc, requester, action, status, created, expires, consumed_at, consumed_by"

func scanRequest(sc scanner) (Request, error) {
	var r Request
	var status string
	var created, expires, consumed sql.NullInt64
	if err := sc.Scan(&r.ID, &r.Doc, &r.Requester, &r.Action, &status, &created, &expires, &consumed, &r.ConsumedBy); err != nil {
		return Request{}, err
	}
	r.Status = Status(status)
	r.Created, r.Expires, r.ConsumedAt = fromMicros(created), fromMicros(expires), fromMicros(consumed)
	return r, nil
}

// GetRequest returns the request, or ErrNotFound.
func (db *DB) GetRequest(ctx context.Context, id string) (Request, error) {
	r, err := queryOne(ctx, db, scanRequest, "SELECT "+requestColumns+" FROM requests WHERE id = $1", id)
	if errors.Is(err, sql.ErrNoRows) {
		return Request{}, fmt.Errorf("state: request %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Request{}, db.wrap(err, "get request %s", id)
	}
	return r, nil
}

// RequestFilter selects requests; zero fields match everything.
type RequestFilter struct {
	Status    Status
	Requester string
	// Limit caps the number returned; 0 means no limit.
	Limit int
}

// ListRequests returns the requests matching f, newest first.
func (db *DB) ListRequests(ctx context.Context, f RequestFilter) ([]Request, error) {
	var where []string
	var args []any
	if f.Status != "" {
		args = append(args, string(f.Status))
		where = append(where, "status = $"+strconv.Itoa(len(args)))
	}
	if f.Requester != "" {
		args = append(args, f.Requester)
		where = append(where, "requester = $"+strconv.Itoa(len(args)))
	}
	q := "SELECT " + requestColumns + " FROM requests"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY created DESC, id"
	if f.Limit > 0 {
		args = append(args, f.Limit)
		q += " LIMIT $" + strconv.Itoa(len(args))
	}
	rs, err := queryAll(ctx, db, scanRequest, q, args...)
	if err != nil {
		return nil, db.wrap(err, "list requests")
	}
	return rs, nil
}

// SetRequestStatus moves request id from status from to status to, only
// if it is in status from (compare-and-set): ErrConflict when it is not,
// ErrNotFound when there is no such request. Allowed moves: open →
// approved, denied, expired, cancelled; approved → expired, cancelled.
// Anything else is ErrInvalid; in particular consumed is reached only
// through Consume.
func (db *DB) SetRequestStatus(ctx context.Context, id string, from, to Status) error {
	if !allowed(from, to) {
		return fmt.Errorf("%w: request %s: %s → %s is not a permitted change", ErrInvalid, id, from, to)
	}
	n, err := db.exec(ctx, "UPDATE requests SET status = $1 WHERE id = $2 AND status = $3", string(to), id, string(from))
	if err != nil {
		return db.wrap(err, "set request %s %s → %s", id, from, to)
	}
	if n == 1 {
		return nil
	}
	cur, err := db.GetRequest(ctx, id)
	if err != nil {
		return err
	}
	return fmt.Errorf("state: set request %s %s → %s: it is %s: %w", id, from, to, cur.Status, ErrConflict)
}

// Consume is the single use of an approved request: it moves request id
// from approved to consumed, recording at and by, and returns nil to
// exactly one caller. Every other caller, in this process or another, on
// this DB or another on the same database, gets ErrConsumed. A request
// that is not approved gets ErrConflict, one whose Expires is not after at
// gets ErrExpired, and an unknown one ErrNotFound. Run the statement only
// after Consume returns nil.
func (db *DB) Consume(ctx context.Context, id, by string, at time.Time) error {
	if by == "" || at.IsZero() {
		return fmt.Errorf("%w: consume %s: who and when are required", ErrInvalid, id)
	}
	// One conditional UPDATE: the engine's row lock (PostgreSQL) or write
	// lock (SQLite) makes the check and the change one step, so the row
	// count is 1 for the winner and 0 for everyone else.
	n, err := db.exec(ctx, `UPDATE requests SET status = $1, consumed_at = $2, consumed_by = $3
		WHERE id = $4 AND status = $5 AND (expires IS NULL OR expires > $2)`,
		string(StatusConsumed), at.UnixMicro(), by, id, string(StatusApproved))
	if err != nil {
		return db.wrap(err, "consume %s", id)
	}
	if n == 1 {
		return nil
	}
	r, err := db.GetRequest(ctx, id)
	if err != nil {
		return err
	}
	switch {
	case r.Status == StatusConsumed:
		return fmt.Errorf("state: consume %s: by %s at %s: %w", id, r.ConsumedBy, r.ConsumedAt.Format(time.RFC3339Nano), ErrConsumed)
	case r.Status == StatusApproved:
		return fmt.Errorf("state: consume %s: expired at %s: %w", id, r.Expires.Format(time.RFC3339Nano), ErrExpired)
	default:
		return fmt.Errorf("state: consume %s: it is %s, not approved: %w", id, r.Status, ErrConflict)
	}
}

// Approval is one approver's decision on one request.
type Approval struct {
	RequestID string
	Approver  string
	// Decision is the approver's verdict ("approve", "deny"), opaque here.
	Decision string
	// Doc is the signed approval, opaque here; verified by internal/quorum.
	Doc     []byte
	Created time.Time
}

// AddApproval stores an approval. An approver has at most one per request:
// a second fails with ErrExists (a changed mind is a new request, not an
// overwrite). It fails with ErrNotFound for an unknown request and with
// ErrSelfApproval when the approver is the requester: the verifier in
// internal/quorum refuses those too; this is the second line.
func (db *DB) AddApproval(ctx context.Context, a Approval) error {
	if a.Approver == "" || a.Decision == "" || len(a.Doc) == 0 {
		return fmt.Errorf("%w: approval of %s: approver, decision and document are required", ErrInvalid, a.RequestID)
	}
	var requester string
	var n int64
	err := db.tx(ctx, func(tx *sql.Tx) error {
		n = 0
		if err := tx.QueryRowContext(ctx, "SELECT requester FROM requests WHERE id = $1", a.RequestID).Scan(&requester); err != nil {
			return err
		}
		if requester == a.Approver {
			return nil
		}
		res, err := tx.ExecContext(ctx, `INSERT INTO approvals (request_id, approver, decision, doc, created)
			VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING`,
			a.RequestID, a.Approver, a.Decision, a.Doc, micros(db.stamp(a.Created)))
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("state: approval of %s by %s: request %w", a.RequestID, a.Approver, ErrNotFound)
	case err != nil:
		return db.wrap(err, "approval of %s by %s", a.RequestID, a.Approver)
	case requester == a.Approver:
		return fmt.Errorf("state: approval of %s by %s: %w", a.RequestID, a.Approver, ErrSelfApproval)
	case n == 0:
		return fmt.Errorf("state: approval of %s by %s: %w", a.RequestID, a.Approver, ErrExists)
	}
	return nil
}

func scanApproval(sc scanner) (Approval, error) {
	var a Approval
	var created sql.NullInt64
	if err := sc.Scan(&a.RequestID, &a.Approver, &a.Decision, &a.Doc, &created); err != nil {
		return Approval{}, err
	}
	a.Created = fromMicros(created)
	return a, nil
}

// ListApprovals returns the approvals of a request, oldest first; none
// (and no error) for an unknown request.
func (db *DB) ListApprovals(ctx context.Context, requestID string) ([]Approval, error) {
	as, err := queryAll(ctx, db, scanApproval, `SELECT request_id, approver, decision, doc, created
		FROM approvals WHERE request_id = $1 ORDER BY created, approver`, requestID)
	if err != nil {
		return nil, db.wrap(err, "list approvals of %s", requestID)
	}
	return as, nil
}
