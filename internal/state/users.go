package state

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// User is a person the gate knows.
type User struct {
	// Name is the unique login name; it never changes.
	Name        string
	DisplayName string
	Groups      []string
	// Secret is the stored SCRAM-SHA-256 verifier the gate checks logins
	// against ("SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>"). It is
	// opaque here; the password itself is never stored. Empty means the
	// user cannot log in with a password.
	Secret   string
	Disabled bool
	// Created is when the user was added; zero in AddUser means now.
	Created time.Time
}

// AddUser stores a new user. It fails with ErrExists when the name is taken.
func (db *DB) AddUser(ctx context.Context, u User) error {
	if u.Name == "" {
		return fmt.Errorf("%w: user name is empty", ErrInvalid)
	}
	groups := u.Groups
	if groups == nil {
		groups = []string{}
	}
	gj, err := json.Marshal(groups)
	if err != nil {
		return fmt.Errorf("state: add user %s: %w", u.Name, err)
	}
	n, err := db.exec(ctx, `INSERT INTO users (name, display_name, groups_json, secret, disabled, created)
		VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING`,
		u.Name, u.DisplayName, string(gj), u.Secret, u.Disabled, micros(db.stamp(u.Created)))
	if err != nil {
		return db.wrap(err, "add user %s", u.Name)
	}
	if n == 0 {
		return fmt.Errorf("state: add user %s: %w", u.Name, ErrExists)
	}
	return nil
}

const userColumns = "name, display_name, groups_json, secret, disabled, created"

func scanUser(sc scanner) (User, error) {
	var u User
	var gj string
	var created sql.NullInt64
	if err := sc.Scan(&u.Name, &u.DisplayName, &gj, &u.Secret, &u.Disabled, &created); err != nil {
		return User{}, err
	}
	if err := json.Unmarshal([]byte(gj), &u.Groups); err != nil {
		return User{}, fmt.Errorf("groups of %s: %w", u.Name, err)
	}
	u.Created = fromMicros(created)
	return u, nil
}

// GetUser returns the user by name, or ErrNotFound.
func (db *DB) GetUser(ctx context.Context, name string) (User, error) {
	u, err := queryOne(ctx, db, scanUser, "SELECT "+userColumns+" FROM users WHERE name = $1", name)
	if errors.Is(err, sql.ErrNoRows) {
		return User{}, fmt.Errorf("state: user %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return User{}, db.wrap(err, "get user %s", name)
	}
	return u, nil
}

// ListUsers returns every user, disabled ones included, by name.
func (db *DB) ListUsers(ctx context.Context) ([]User, error) {
	us, err := queryAll(ctx, db, scanUser, "SELECT "+userColumns+" FROM users ORDER BY name")
	if err != nil {
		return nil, db.wrap(err, "list users")
	}
	return us, nil
}

// DisableUser marks the user disabled (idempotent), or fails with
// ErrNotFound. Users are never deleted: the ledger names them.
func (db *DB) DisableUser(ctx context.Context, name string) error {
	n, err := db.exec(ctx, "UPDATE users SET disabled = TRUE WHERE name = $1", name)
	if err != nil {
		return db.wrap(err, "disable user %s", name)
	}
	if n == 0 {
		return fmt.Errorf("state: disable user %s: %w", name, ErrNotFound)
	}
	return nil
}

// SetUserSecret replaces the user's stored SCRAM verifier, or fails with
// ErrNotFound.
func (db *DB) SetUserSecret(ctx context.Context, name, secret string) error {
	n, err := db.exec(ctx, "UPDATE users SET secret = $1 WHERE name = $2", secret, name)
	if err != nil {
		return db.wrap(err, "set secret of %s", name)
	}
	if n == 0 {
		return fmt.Errorf("state: set secret of %s: %w", name, ErrNotFound)
	}
	return nil
}
