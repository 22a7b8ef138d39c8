package crypto

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"golang.org/x/crypto/argon2"
)

// ErrWrongPassword means no key object opened with the given password.
var ErrWrongPassword = errors.New("crypto: wrong password")

// KDFParams are Argon2id's cost parameters.
type KDFParams struct {
	Time    uint32 `json:"t"`
	Memory  uint32 `json:"m"` // KiB
	Threads uint8  `json:"p"`
}

// DefaultKDF costs about 0.3 s and 64 MiB on one core of the 2-core CI
// machine: slow enough to make guessing expensive, fast enough to open a
// repository on every command.
var DefaultKDF = KDFParams{Time: 3, Memory: 64 * 1024, Threads: 2}

// TestKDF is cheap, for tests only.
var TestKDF = KDFParams{Time: 1, Memory: 64, Threads: 1}

// KeyFile is one password's wrapping of the master key, stored as a key
// object. It is plaintext JSON except Data, which is the master key sealed
// under the password-derived key.
type KeyFile struct {
	Version  int       `json:"version"`
	Created  time.Time `json:"created"`
	Username string    `json:"username,omitempty"`
	Hostname string    `json:"hostname,omitempty"`
	KDF      string    `json:"kdf"`
	Params   KDFParams `json:"params"`
	Salt     []byte    `json:"salt"`
	Data     []byte    `json:"data"`
}

func derive(password string, salt []byte, p KDFParams) *Key {
	raw := argon2.IDKey([]byte(password), salt, p.Time, p.Memory, p.Threads, 32)
	k := &Key{}
	copy(k.Enc[:], raw)
	return k
}

// Wrap seals master under password, returning the encoded key object.
func Wrap(master *Key, password string, p KDFParams, username, hostname string, now time.Time) ([]byte, error) {
	if password == "" {
		return nil, errors.New("crypto: empty password")
	}
	salt := make([]byte, 32)
	if _, err := rand.Read(salt); err != nil {
		return nil, fmt.Errorf("crypto: salt: %w", err)
	}
	plain, err := json.Marshal(master)
	if err != nil {
		return nil, err
	}
	kf := KeyFile{Version: 1, Created: now.UTC(), Username: username, Hostname: hostname,
		KDF: "argon2id", Params: p, Salt: salt}
	kf.Data = derive(password, salt, p).Seal(nil, plain)
	return json.Marshal(kf)
}

// maxKDFMemory bounds what a key object may ask of us: a forged key object
// must not make Unwrap allocate gigabytes.
const maxKDFMemory = 4 << 20 // KiB = 4 GiB

// ParseKeyFile decodes a key object.
func ParseKeyFile(data []byte) (KeyFile, error) {
	var kf KeyFile
	if err := json.Unmarshal(data, &kf); err != nil {
		return kf, fmt.Errorf("crypto: key object: %w", err)
	}
	if kf.KDF != "argon2id" {
		return kf, fmt.Errorf("crypto: key object: unknown kdf %q", kf.KDF)
	}
	p := kf.Params
	if p.Time == 0 || p.Time > 100 || p.Memory == 0 || p.Memory > maxKDFMemory || p.Threads == 0 || len(kf.Salt) < 16 {
		return kf, fmt.Errorf("crypto: key object: unreasonable kdf parameters %+v", p)
	}
	return kf, nil
}

// Unwrap opens a key object with password.
func Unwrap(data []byte, password string) (*Key, KeyFile, error) {
	kf, err := ParseKeyFile(data)
	if err != nil {
		return nil, kf, err
	}
	plain, err := derive(password, kf.Salt, kf.Params).Open(nil, kf.Data)
	if err != nil {
		return nil, kf, ErrWrongPassword
	}
	k := &Key{}
	if err := json.Unmarshal(plain, k); err != nil {
		return nil, kf, fmt.Errorf("crypto: key object: master key: %w", err)
	}
	return k, kf, nil
}
