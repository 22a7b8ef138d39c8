package server

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base32"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/dualkey/dualkey/internal/vault/guard"
)

// TokensFile is the name of the token log inside the state folder.
const TokensFile = "tokens.jsonl"

// Token describes one bearer token. The secret itself is never stored: only
// its SHA-256.
type Token struct {
	ID      string           `json:"id"` // 16 hex digits, random; safe to log
	Name    string           `json:"name"`
	Cap     guard.Capability `json:"cap"`
	SHA256  string           `json:"sha256"` // hex SHA-256 of the secret
	Created time.Time        `json:"created"`
	// Revoked is set once a revocation line for ID has been read; zero means
	// the token is valid.
	Revoked time.Time `json:"-"`
}

// tokenLine is one line of the token log: a token, or a revocation of one
// (only ID and Revoked set).
type tokenLine struct {
	ID      string           `json:"id"`
	Name    string           `json:"name,omitempty"`
	Cap     guard.Capability `json:"cap,omitempty"`
	SHA256  string           `json:"sha256,omitempty"`
	Created time.Time        `json:"created,omitzero"`
	Revoked time.Time        `json:"revoked,omitzero"`
}

// ErrUnauthorized is returned (wrapped) for a missing, unknown or revoked
// token; the server answers 401.
var ErrUnauthorized = errors.New("server: unauthorized")

// TokenStore keeps tokens in an append-only JSON-lines file. Creating and
// revoking append a line and fsync; nothing is rewritten. Authenticate
// notices lines appended by another process (a CLI creating or revoking a
// token while the server runs) by re-reading the file when its size or
// modification time changed. It is safe for concurrent use.
type TokenStore struct {
	path string
	now  func() time.Time

	mu     sync.Mutex
	tokens []*Token // in file order
	size   int64
	mtime  time.Time
}

// OpenTokenStore opens (creating if needed) the token log in stateDir, which
// is created with mode 0700 if missing.
func OpenTokenStore(stateDir string) (*TokenStore, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("server: tokens: %w", err)
	}
	ts := &TokenStore{path: filepath.Join(stateDir, TokensFile), now: time.Now}
	f, err := os.OpenFile(ts.path, os.O_CREATE|os.O_RDONLY, 0o600)
	if err != nil {
		return nil, fmt.Errorf("server: tokens: %w", err)
	}
	f.Close()
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if err := ts.reloadLocked(true); err != nil {
		return nil, err
	}
	return ts, nil
}

// reloadLocked re-reads the file if it changed (or always, if force).
func (ts *TokenStore) reloadLocked(force bool) error {
	fi, err := os.Stat(ts.path)
	if err != nil {
		return fmt.Errorf("server: tokens: %w", err)
	}
	if !force && fi.Size() == ts.size && fi.ModTime().Equal(ts.mtime) {
		return nil
	}
	data, err := os.ReadFile(ts.path)
	if err != nil {
		return fmt.Errorf("server: tokens: %w", err)
	}
	tokens, err := parseTokens(data)
	if err != nil {
		return fmt.Errorf("server: tokens: %s: %w", ts.path, err)
	}
	ts.tokens, ts.size, ts.mtime = tokens, fi.Size(), fi.ModTime()
	return nil
}

// parseTokens reads the log. A final line without a newline is an append cut
// short by a crash and is ignored; any other bad line is an error, because
// skipping it could drop a revocation.
func parseTokens(data []byte) ([]*Token, error) {
	var tokens []*Token
	byID := make(map[string]*Token)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var l tokenLine
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&l); err != nil {
			if !bytes.HasSuffix(data, []byte("\n")) && bytes.HasSuffix(data, line) {
				break // torn last line
			}
			return nil, fmt.Errorf("line %d: %v", n, err)
		}
		if !l.Revoked.IsZero() {
			if t, ok := byID[l.ID]; ok && t.Revoked.IsZero() {
				t.Revoked = l.Revoked
			}
			continue
		}
		if !l.Cap.Valid() || len(l.SHA256) != 64 || l.ID == "" {
			return nil, fmt.Errorf("line %d: incomplete token entry", n)
		}
		if _, dup := byID[l.ID]; dup {
			return nil, fmt.Errorf("line %d: duplicate token id %s", n, l.ID)
		}
		t := &Token{ID: l.ID, Name: l.Name, Cap: l.Cap, SHA256: l.SHA256, Created: l.Created}
		byID[l.ID] = t
		tokens = append(tokens, t)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return tokens, nil
}

func (ts *TokenStore) appendLocked(l tokenLine) error {
	b, err := json.Marshal(l)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(ts.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	// A crash mid-append can leave a torn last line, never acknowledged to
	// anyone; cut it off so the log stays one valid entry per line.
	data, err := os.ReadFile(ts.path)
	if err != nil {
		return err
	}
	if len(data) > 0 && data[len(data)-1] != '\n' {
		if err := f.Truncate(int64(bytes.LastIndexByte(data, '\n') + 1)); err != nil {
			return err
		}
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		return err
	}
	return f.Sync()
}

var secretEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// CreateToken creates a token with capability c and returns its secret,
// "dkv_<cap>_<52 base32 characters>" (256 random bits). The secret is shown
// only here; the store keeps its SHA-256.
func (ts *TokenStore) CreateToken(name string, c guard.Capability) (secret string, err error) {
	if !c.Valid() {
		return "", fmt.Errorf("server: create token: unknown capability %q", c)
	}
	if strings.ContainsAny(name, "\n\r") || len(name) > 200 {
		return "", errors.New("server: create token: name must be one line of at most 200 bytes")
	}
	var raw [32]byte
	rand.Read(raw[:])
	secret = "dkv_" + string(c) + "_" + strings.ToLower(secretEncoding.EncodeToString(raw[:]))
	var id [8]byte
	rand.Read(id[:])
	sum := sha256.Sum256([]byte(secret))
	l := tokenLine{ID: hex.EncodeToString(id[:]), Name: name, Cap: c, SHA256: hex.EncodeToString(sum[:]), Created: ts.now().UTC()}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if err := ts.appendLocked(l); err != nil {
		return "", fmt.Errorf("server: create token: %w", err)
	}
	if err := ts.reloadLocked(true); err != nil {
		return "", err
	}
	return secret, nil
}

// Revoke revokes the token with the given id, or the one token with that
// name. Revoking an already revoked token is not an error.
func (ts *TokenStore) Revoke(idOrName string) error {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if err := ts.reloadLocked(false); err != nil {
		return err
	}
	var match []*Token
	for _, t := range ts.tokens {
		if t.ID == idOrName {
			match = []*Token{t}
			break
		}
		if t.Name == idOrName && t.Revoked.IsZero() {
			match = append(match, t)
		}
	}
	switch len(match) {
	case 0:
		return fmt.Errorf("server: revoke %q: no such token", idOrName)
	case 1:
	default:
		return fmt.Errorf("server: revoke %q: %d tokens have that name; give the id", idOrName, len(match))
	}
	if !match[0].Revoked.IsZero() {
		return nil
	}
	if err := ts.appendLocked(tokenLine{ID: match[0].ID, Revoked: ts.now().UTC()}); err != nil {
		return fmt.Errorf("server: revoke %q: %w", idOrName, err)
	}
	return ts.reloadLocked(true)
}

// Tokens returns copies of all tokens, revoked ones included, oldest first.
func (ts *TokenStore) Tokens() ([]Token, error) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if err := ts.reloadLocked(false); err != nil {
		return nil, err
	}
	out := make([]Token, len(ts.tokens))
	for i, t := range ts.tokens {
		out[i] = *t
	}
	return out, nil
}

// Authenticate returns the valid token whose secret is given. The hash of
// the secret is compared with every stored hash in constant time.
func (ts *TokenStore) Authenticate(secret string) (Token, error) {
	if secret == "" {
		return Token{}, fmt.Errorf("%w: no token", ErrUnauthorized)
	}
	sum := sha256.Sum256([]byte(secret))
	want := hex.EncodeToString(sum[:])
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if err := ts.reloadLocked(false); err != nil {
		return Token{}, err
	}
	var found *Token
	for _, t := range ts.tokens {
		if subtle.ConstantTimeCompare([]byte(t.SHA256), []byte(want)) == 1 {
			found = t
		}
	}
	switch {
	case found == nil:
		return Token{}, fmt.Errorf("%w: unknown token", ErrUnauthorized)
	case !found.Revoked.IsZero():
		return Token{}, fmt.Errorf("%w: token %s revoked", ErrUnauthorized, found.ID)
	}
	return *found, nil
}
