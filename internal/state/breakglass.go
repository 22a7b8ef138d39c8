package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// BreakGlass is one time-boxed emergency session: Person acts in Role
// without a quorum from Started until Ends (or EndedEarly), and the
// session stays flagged until Reviewed.
type BreakGlass struct {
	ID, Person, Role, Reason string
	Started, Ends            time.Time
	// EndedEarly is when EndBreakGlass cut the session short; zero if it
	// has not been (it ran, or runs, until Ends).
	EndedEarly time.Time
	// ReviewRequestID is the approved request by which others signed off
	// the session; "" until MarkBreakGlassReviewed.
	ReviewRequestID string
	Reviewed        bool
}

// Active reports whether the session lets its person act at now.
func (b BreakGlass) Active(now time.Time) bool {
	end := b.Ends
	if !b.EndedEarly.IsZero() && b.EndedEarly.Before(end) {
		end = b.EndedEarly
	}
	return !now.Before(b.Started) && now.Before(end)
}

// StartBreakGlass records a new session. ID, Person, Role and Reason are
// required and Ends must be after Started; a session is never stored
// already ended or reviewed. A duplicate ID fails with ErrExists.
func (db *DB) StartBreakGlass(ctx context.Context, b BreakGlass) error {
	switch {
	case b.ID == "" || b.Person == "" || b.Role == "" || b.Reason == "":
		return fmt.Errorf("%w: break-glass %q: id, person, role and reason are required", ErrInvalid, b.ID)
	case b.Started.IsZero() || !b.Ends.After(b.Started):
		return fmt.Errorf("%w: break-glass %s: it must end after it starts", ErrInvalid, b.ID)
	case !b.EndedEarly.IsZero() || b.Reviewed || b.ReviewRequestID != "":
		return fmt.Errorf("%w: break-glass %s: a new session is neither ended nor reviewed", ErrInvalid, b.ID)
	}
	n, err := db.exec(ctx, `INSERT INTO breakglass (id, person, role, reason, started, ends)
		VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING`,
		b.ID, b.Person, b.Role, b.Reason, micros(b.Started), micros(b.Ends))
	if err != nil {
		return db.wrap(err, "start break-glass %s", b.ID)
	}
	if n == 0 {
		return fmt.Errorf("state: start break-glass %s: %w", b.ID, ErrExists)
	}
	return nil
}

const breakGlassColumns = "id, person, role, reason, started, ends, ended_early, review_request_id, reviewed"

func scanBreakGlass(sc scanner) (BreakGlass, error) {
	var b BreakGlass
	var started, ends, early sql.NullInt64
	if err := sc.Scan(&b.ID, &b.Person, &b.Role, &b.Reason, &started, &ends, &early, &b.ReviewRequestID, &b.Reviewed); err != nil {
		return BreakGlass{}, err
	}
	b.Started, b.Ends, b.EndedEarly = fromMicros(started), fromMicros(ends), fromMicros(early)
	return b, nil
}

// GetBreakGlass returns one session, or ErrNotFound.
func (db *DB) GetBreakGlass(ctx context.Context, id string) (BreakGlass, error) {
	b, err := queryOne(ctx, db, scanBreakGlass, "SELECT "+breakGlassColumns+" FROM breakglass WHERE id = $1", id)
	if errors.Is(err, sql.ErrNoRows) {
		return BreakGlass{}, fmt.Errorf("state: break-glass %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return BreakGlass{}, db.wrap(err, "get break-glass %s", id)
	}
	return b, nil
}

// ActiveBreakGlass returns the person's sessions active at now (started,
// not yet at Ends, not ended early), oldest first.
func (db *DB) ActiveBreakGlass(ctx context.Context, person string, now time.Time) ([]BreakGlass, error) {
	t := now.UnixMicro()
	bs, err := queryAll(ctx, db, scanBreakGlass, "SELECT "+breakGlassColumns+` FROM breakglass
		WHERE person = $1 AND started <= $2 AND ends > $2 AND (ended_early IS NULL OR ended_early > $2)
		ORDER BY started, id`, person, t)
	if err != nil {
		return nil, db.wrap(err, "active break-glass of %s", person)
	}
	return bs, nil
}

// ListBreakGlass returns every session, or only those not yet reviewed,
// oldest first.
func (db *DB) ListBreakGlass(ctx context.Context, unreviewedOnly bool) ([]BreakGlass, error) {
	q := "SELECT " + breakGlassColumns + " FROM breakglass"
	if unreviewedOnly {
		q += " WHERE NOT reviewed"
	}
	bs, err := queryAll(ctx, db, scanBreakGlass, q+" ORDER BY started, id")
	if err != nil {
		return nil, db.wrap(err, "list break-glass")
	}
	return bs, nil
}

// EndBreakGlass ends a running session at at. It fails with ErrConflict
// when the session already ended (early, or because at is not before
// Ends) and ErrNotFound for an unknown ID.
func (db *DB) EndBreakGlass(ctx context.Context, id string, at time.Time) error {
	if at.IsZero() {
		return fmt.Errorf("%w: end break-glass %s: no time", ErrInvalid, id)
	}
	n, err := db.exec(ctx, `UPDATE breakglass SET ended_early = $1
		WHERE id = $2 AND ended_early IS NULL AND ends > $1`, at.UnixMicro(), id)
	if err != nil {
		return db.wrap(err, "end break-glass %s", id)
	}
	if n == 1 {
		return nil
	}
	if _, err := db.GetBreakGlass(ctx, id); err != nil {
		return err
	}
	return fmt.Errorf("state: end break-glass %s: already over: %w", id, ErrConflict)
}

// MarkBreakGlassReviewed clears the session's flag, recording the review
// request by which others signed it off. The review request must exist
// and be approved or consumed (ErrConflict otherwise), and a session is
// reviewed once (ErrConflict the second time): a review is the others'
// consent, so the store will not take a bare "reviewed" flag.
func (db *DB) MarkBreakGlassReviewed(ctx context.Context, id, reviewRequestID string) error {
	var n int64
	var status string
	err := db.tx(ctx, func(tx *sql.Tx) error {
		n, status = 0, ""
		err := tx.QueryRowContext(ctx, "SELECT status FROM requests WHERE id = $1", reviewRequestID).Scan(&status)
		if errors.Is(err, sql.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		if Status(status) != StatusApproved && Status(status) != StatusConsumed {
			return nil
		}
		res, err := tx.ExecContext(ctx, `UPDATE breakglass SET reviewed = TRUE, review_request_id = $1
			WHERE id = $2 AND NOT reviewed`, reviewRequestID, id)
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	if err != nil {
		return db.wrap(err, "review break-glass %s", id)
	}
	if n == 1 {
		return nil
	}
	if status == "" {
		return fmt.Errorf("state: review break-glass %s: review request %s: %w", id, reviewRequestID, ErrNotFound)
	}
	if Status(status) != StatusApproved && Status(status) != StatusConsumed {
		return fmt.Errorf("state: review break-glass %s: review request %s is %s, not approved: %w", id, reviewRequestID, status, ErrConflict)
	}
	if _, err := db.GetBreakGlass(ctx, id); err != nil {
		return err
	}
	return fmt.Errorf("state: review break-glass %s: already reviewed: %w", id, ErrConflict)
}
