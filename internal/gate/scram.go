package gate

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the server
// keeps only a verifier, never the password, and the client proves it knows
// the password without sending it. Channel binding (SCRAM-SHA-256-PLUS) is
// not offered; TLS already protects the exchange from a passive observer.

// DefaultSCRAMIterations is PostgreSQL's default (scram_iterations = 4096):
// about 2 ms of PBKDF2 per login here, which keeps offline guessing of a
// stolen verifier slow without making logins noticeably slower.
const DefaultSCRAMIterations = 4096

// ErrBadVerifier: a stored secret that is not a SCRAM-SHA-256 verifier.
var ErrBadVerifier = errors.New("gate: not a SCRAM-SHA-256 verifier")

// Verifier is a parsed SCRAM-SHA-256 secret.
type Verifier struct {
	Iterations int
	Salt       []byte
	StoredKey  []byte
	ServerKey  []byte
}

// String formats v as PostgreSQL does:
// SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>, base64.
func (v Verifier) String() string {
	b := base64.StdEncoding.EncodeToString
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", v.Iterations, b(v.Salt), b(v.StoredKey), b(v.ServerKey))
}

// ParseVerifier parses a verifier in PostgreSQL's format.
func ParseVerifier(s string) (Verifier, error) {
	rest, ok := strings.CutPrefix(s, "SCRAM-SHA-256$")
	if !ok {
		return Verifier{}, ErrBadVerifier
	}
	params, keys, ok := strings.Cut(rest, "$")
	if !ok {
		return Verifier{}, ErrBadVerifier
	}
	iter, salt, ok1 := strings.Cut(params, ":")
	stored, server, ok2 := strings.Cut(keys, ":")
	if !ok1 || !ok2 {
		return Verifier{}, ErrBadVerifier
	}
	var v Verifier
	var err error
	if v.Iterations, err = strconv.Atoi(iter); err != nil || v.Iterations < 1 || v.Iterations > 1<<24 {
		return Verifier{}, ErrBadVerifier
	}
	d := base64.StdEncoding.DecodeString
	if v.Salt, err = d(salt); err != nil || len(v.Salt) == 0 {
		return Verifier{}, ErrBadVerifier
	}
	if v.StoredKey, err = d(stored); err != nil || len(v.StoredKey) != sha256.Size {
		return Verifier{}, ErrBadVerifier
	}
	if v.ServerKey, err = d(server); err != nil || len(v.ServerKey) != sha256.Size {
		return Verifier{}, ErrBadVerifier
	}
	return v, nil
}

// NewVerifier derives a verifier for password with a fresh random salt.
// iterations <= 0 means DefaultSCRAMIterations. The password is used as its
// UTF-8 bytes; for ASCII passwords that is exactly what libpq's SASLprep
// yields (other passwords may need the same normalisation on both sides).
func NewVerifier(password string, iterations int) (Verifier, error) {
	if iterations <= 0 {
		iterations = DefaultSCRAMIterations
	}
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return Verifier{}, fmt.Errorf("gate: salt: %w", err)
	}
	salted, err := pbkdf2.Key(sha256.New, password, salt, iterations, sha256.Size)
	if err != nil {
		return Verifier{}, fmt.Errorf("gate: pbkdf2: %w", err)
	}
	clientKey := hmacSum(salted, "Client Key")
	stored := sha256.Sum256(clientKey)
	return Verifier{Iterations: iterations, Salt: salt, StoredKey: stored[:], ServerKey: hmacSum(salted, "Server Key")}, nil
}

func hmacSum(key []byte, msg string) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(msg))
	return h.Sum(nil)
}

// scramServer runs one server side of an exchange.
type scramServer struct {
	v           Verifier
	mock        bool // an unknown user or no verifier: the exchange runs, then fails
	clientFirst string
	serverFirst string
	gs2         string
	nonce       string
}

var errSCRAM = errors.New("gate: SCRAM exchange failed")

// first takes client-first-message and returns server-first-message.
func (s *scramServer) first(msg []byte) (string, error) {
	m := string(msg)
	// gs2-header: "n,," (no binding) or "y,," (client could bind, thinks
	// we cannot). "p=" asks for binding we did not offer.
	var rest string
	switch {
	case strings.HasPrefix(m, "n,"), strings.HasPrefix(m, "y,"):
		i := strings.IndexByte(m[2:], ',')
		if i < 0 {
			return "", fmt.Errorf("%w: malformed gs2 header", errSCRAM)
		}
		if m[2:2+i] != "" && !strings.HasPrefix(m[2:2+i], "a=") {
			return "", fmt.Errorf("%w: malformed authzid", errSCRAM)
		}
		s.gs2 = m[:2+i+1]
		rest = m[2+i+1:]
	default:
		return "", fmt.Errorf("%w: channel binding not supported", errSCRAM)
	}
	attrs := strings.Split(rest, ",")
	if len(attrs) < 2 || !strings.HasPrefix(attrs[0], "n=") || !strings.HasPrefix(attrs[1], "r=") || len(attrs[1]) < 3 {
		return "", fmt.Errorf("%w: malformed client-first-message", errSCRAM)
	}
	cnonce := attrs[1][2:]
	for _, c := range []byte(cnonce) {
		if c < 0x21 || c > 0x7e || c == ',' {
			return "", fmt.Errorf("%w: bad nonce", errSCRAM)
		}
	}
	b := make([]byte, 18)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	s.clientFirst = rest
	s.nonce = cnonce + base64.StdEncoding.EncodeToString(b)
	s.serverFirst = fmt.Sprintf("r=%s,s=%s,i=%d", s.nonce, base64.StdEncoding.EncodeToString(s.v.Salt), s.v.Iterations)
	return s.serverFirst, nil
}

// final takes client-final-message and returns server-final-message, or
// an error when the proof is wrong.
func (s *scramServer) final(msg []byte) (string, error) {
	m := string(msg)
	i := strings.LastIndex(m, ",p=")
	if i < 0 {
		return "", fmt.Errorf("%w: no proof", errSCRAM)
	}
	withoutProof, proofB64 := m[:i], m[i+3:]
	attrs := strings.Split(withoutProof, ",")
	if len(attrs) < 2 || attrs[0] != "c="+base64.StdEncoding.EncodeToString([]byte(s.gs2)) || attrs[1] != "r="+s.nonce {
		return "", fmt.Errorf("%w: channel binding or nonce mismatch", errSCRAM)
	}
	proof, err := base64.StdEncoding.DecodeString(proofB64)
	if err != nil || len(proof) != sha256.Size {
		return "", fmt.Errorf("%w: malformed proof", errSCRAM)
	}
	authMsg := s.clientFirst + "," + s.serverFirst + "," + withoutProof
	sig := hmacSum(s.v.StoredKey, authMsg)
	clientKey := make([]byte, sha256.Size)
	for j := range clientKey {
		clientKey[j] = proof[j] ^ sig[j]
	}
	got := sha256.Sum256(clientKey)
	if subtle.ConstantTimeCompare(got[:], s.v.StoredKey) != 1 || s.mock {
		return "", fmt.Errorf("%w: wrong password", errSCRAM)
	}
	return "v=" + base64.StdEncoding.EncodeToString(hmacSum(s.v.ServerKey, authMsg)), nil
}

// mockVerifier is what an unknown user is challenged with: a salt derived
// from the name and a per-gate secret, so that probing names learns
// nothing from the salt (it is stable per name, as a real one is).
func mockVerifier(secret []byte, user string) Verifier {
	salt := hmacSum(secret, "salt\x00"+user)[:16]
	junk := hmacSum(secret, "key\x00"+user)
	return Verifier{Iterations: DefaultSCRAMIterations, Salt: salt, StoredKey: junk, ServerKey: junk}
}
