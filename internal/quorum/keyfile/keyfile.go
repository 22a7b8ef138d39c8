// Package keyfile keeps an approver's Ed25519 private key encrypted under
// their passphrase, in their own config directory.
//
// A key file is one line of canonical JSON: a header in clear (the owner's
// name and public key, so a key can be shown and registered without the
// passphrase; the Argon2id parameters and salt; the nonce) and the 32-byte
// Ed25519 seed sealed with XChaCha20-Poly1305 under the Argon2id-derived key,
// with the header as associated data, so no header field can be changed
// without Open failing. See docs/quorum.md.
//
// It is a leaf (standard library and golang.org/x/crypto) so the CLI and any
// signer can use it without pulling in the rest of the quorum machinery.
package keyfile

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/chacha20poly1305"
)

// Errors returned by Open and Inspect.
var (
	// ErrMalformed: the bytes are not a key file this code can read
	// (truncated, corrupt, unknown version, unreasonable parameters).
	ErrMalformed = errors.New("keyfile: malformed key file")
	// ErrWrongPassphrase: the file is well-formed but does not open with
	// the passphrase. Authenticated encryption cannot tell a wrong
	// passphrase from a deliberately altered header or ciphertext.
	ErrWrongPassphrase = errors.New("keyfile: wrong passphrase")
)

const (
	formatName = "dualkey-approver-key"
	version    = 1
	kdfName    = "argon2id"
	cipherName = "xchacha20-poly1305"
	saltSize   = 16
	// MaxSize bounds what Load reads and Open parses; a key file is < 1 KiB.
	MaxSize = 64 << 10
	// maxMemory bounds the Argon2id memory a file may ask for (KiB): a
	// forged file must not make Open allocate more than 1 GiB.
	maxMemory = 1 << 20
	maxTime   = 64
)

// params are Argon2id's costs, recorded in each file.
type params struct {
	Time    uint32
	Memory  uint32 // KiB
	Threads uint8
}

// defaultParams: about 0.3 s and 64 MiB on the 2-core CI machine (the same
// costs as the vault's key objects, internal/vault/crypto): a key is opened
// once per approval, so guessing is made expensive at little cost to use.
var defaultParams = params{Time: 3, Memory: 64 << 10, Threads: 2}

// header is the clear part of a key file, in canonical field order; its
// canonical encoding is the associated data of the sealed seed.
type header struct {
	Format    string `json:"format"`
	Version   int    `json:"version"`
	Name      string `json:"name"`
	PublicKey string `json:"public_key"`
	KDF       string `json:"kdf"`
	Time      uint32 `json:"time"`
	Memory    uint32 `json:"memory"` // KiB
	Threads   uint8  `json:"threads"`
	Salt      []byte `json:"salt"`
	Cipher    string `json:"cipher"`
	Nonce     []byte `json:"nonce"`
}

type file struct {
	header
	Sealed []byte `json:"sealed"`
}

func marshal(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic("keyfile: encode: " + err.Error())
	}
	return buf.Bytes() // with its newline: a key file is one line
}

func (h *header) associatedData() []byte {
	return append([]byte("dualkey/keyfile/v1\n"), marshal(h)...)
}

func deriveKey(passphrase []byte, h *header) []byte {
	return argon2.IDKey(passphrase, h.Salt, h.Time, h.Memory, h.Threads, chacha20poly1305.KeySize)
}

// Generate makes a new Ed25519 key for the approver called name and returns
// its public key and the key file sealing it under passphrase.
func Generate(name string, passphrase []byte) (ed25519.PublicKey, []byte, error) {
	return generate(name, passphrase, defaultParams)
}

func generate(name string, passphrase []byte, p params) (ed25519.PublicKey, []byte, error) {
	if err := validName(name); err != nil {
		return nil, nil, err
	}
	if len(passphrase) == 0 {
		return nil, nil, errors.New("keyfile: empty passphrase")
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("keyfile: generate: %w", err)
	}
	h := header{Format: formatName, Version: version, Name: name, PublicKey: formatPublicKey(pub),
		KDF: kdfName, Time: p.Time, Memory: p.Memory, Threads: p.Threads,
		Salt: make([]byte, saltSize), Cipher: cipherName, Nonce: make([]byte, chacha20poly1305.NonceSizeX)}
	if _, err := rand.Read(h.Salt); err != nil {
		return nil, nil, fmt.Errorf("keyfile: salt: %w", err)
	}
	if _, err := rand.Read(h.Nonce); err != nil {
		return nil, nil, fmt.Errorf("keyfile: nonce: %w", err)
	}
	aead, err := chacha20poly1305.NewX(deriveKey(passphrase, &h))
	if err != nil {
		panic(err) // a KeySize key cannot fail
	}
	f := file{header: h, Sealed: aead.Seal(nil, h.Nonce, priv.Seed(), h.associatedData())}
	return pub, marshal(&f), nil
}

// parse decodes and checks a key file without the passphrase. Only the
// exact bytes that encoding the result gives back are accepted.
func parse(data []byte) (*file, ed25519.PublicKey, error) {
	if len(data) > MaxSize {
		return nil, nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(data), MaxSize)
	}
	var f file
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if f.Format != formatName || f.Version != version || f.KDF != kdfName || f.Cipher != cipherName {
		return nil, nil, fmt.Errorf("%w: format %.40q version %d kdf %.40q cipher %.40q, want %s %d %s %s",
			ErrMalformed, f.Format, f.Version, f.KDF, f.Cipher, formatName, version, kdfName, cipherName)
	}
	if err := validName(f.Name); err != nil {
		return nil, nil, err
	}
	pub, err := parsePublicKey(f.PublicKey)
	if err != nil {
		return nil, nil, err
	}
	if f.Time < 1 || f.Time > maxTime || f.Threads < 1 || f.Memory < 8*uint32(f.Threads) || f.Memory > maxMemory {
		return nil, nil, fmt.Errorf("%w: unreasonable argon2id parameters time=%d memory=%d KiB threads=%d", ErrMalformed, f.Time, f.Memory, f.Threads)
	}
	if len(f.Salt) != saltSize || len(f.Nonce) != chacha20poly1305.NonceSizeX || len(f.Sealed) != ed25519.SeedSize+chacha20poly1305.Overhead {
		return nil, nil, fmt.Errorf("%w: salt, nonce or sealed key of the wrong length (%d, %d, %d)", ErrMalformed, len(f.Salt), len(f.Nonce), len(f.Sealed))
	}
	if !bytes.Equal(marshal(&f), data) {
		return nil, nil, fmt.Errorf("%w: not in canonical form (edited by hand, or damaged)", ErrMalformed)
	}
	return &f, pub, nil
}

// Inspect returns the name and public key recorded in a key file, without
// the passphrase. They are not authenticated until Open succeeds: use them
// for display, and register a key only from what Open or Generate returned.
func Inspect(data []byte) (name string, pub ed25519.PublicKey, err error) {
	f, pub, err := parse(data)
	if err != nil {
		return "", nil, err
	}
	return f.Name, pub, nil
}

// Open decrypts a key file with passphrase and returns its owner's name and
// private key. A wrong passphrase (or an altered file) gives
// ErrWrongPassphrase; a damaged or truncated one an error wrapping
// ErrMalformed.
func Open(data, passphrase []byte) (name string, priv ed25519.PrivateKey, err error) {
	f, pub, err := parse(data)
	if err != nil {
		return "", nil, err
	}
	aead, err := chacha20poly1305.NewX(deriveKey(passphrase, &f.header))
	if err != nil {
		panic(err)
	}
	seed, err := aead.Open(nil, f.Nonce, f.Sealed, f.header.associatedData())
	if err != nil {
		return "", nil, fmt.Errorf("%w for the key of %s (or the file was altered)", ErrWrongPassphrase, f.Name)
	}
	priv = ed25519.NewKeyFromSeed(seed)
	if !pub.Equal(priv.Public()) {
		// Only someone who knew the passphrase could have sealed this.
		return "", nil, fmt.Errorf("%w: the sealed key does not match the public key", ErrMalformed)
	}
	return f.Name, priv, nil
}

const publicKeyPrefix = "ed25519:"

var b64 = base64.StdEncoding.Strict()

// formatPublicKey and parsePublicKey are the text form of cert.FormatPublicKey
// (checked by a test), repeated so this package stays a leaf.
func formatPublicKey(pub ed25519.PublicKey) string { return publicKeyPrefix + b64.EncodeToString(pub) }

func parsePublicKey(s string) (ed25519.PublicKey, error) {
	rest, ok := strings.CutPrefix(s, publicKeyPrefix)
	b, err := b64.DecodeString(rest)
	if !ok || err != nil || len(b) != ed25519.PublicKeySize || formatPublicKey(b) != s {
		return nil, fmt.Errorf("%w: public key %.80q", ErrMalformed, s)
	}
	return ed25519.PublicKey(b), nil
}

// validName is cert.ValidName's rule (checked by a test): 1 to 64 of
// a-z, 0-9 and "._@-", starting with a letter or digit. It also makes the
// name safe as a file name.
func validName(s string) error {
	ok := s != "" && len(s) <= 64
	for i := 0; ok && i < len(s); i++ {
		c := s[i]
		ok = 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || i > 0 && strings.IndexByte("._@-", c) >= 0
	}
	if !ok {
		return fmt.Errorf("%w: name %.80q: want 1 to 64 of a-z, 0-9 and ._@- (not first)", ErrMalformed, s)
	}
	return nil
}

// DefaultDir returns where key files live: $DUALKEY_CONFIG_DIR/keys if that
// variable is set, else dualkey/keys under os.UserConfigDir (on Linux
// $XDG_CONFIG_HOME/dualkey/keys or ~/.config/dualkey/keys).
func DefaultDir() (string, error) {
	if d := os.Getenv("DUALKEY_CONFIG_DIR"); d != "" {
		return filepath.Join(d, "keys"), nil
	}
	d, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("keyfile: %w", err)
	}
	return filepath.Join(d, "dualkey", "keys"), nil
}

// Path returns the file name of name's key in dir: dir/name.key.
func Path(dir, name string) string { return filepath.Join(dir, name+".key") }

// Save writes a key file for name into dir (created 0700 if missing) as
// dir/name.key, mode 0600, atomically: a temporary file is written and
// fsynced, then linked into place, which fails if a key file is already
// there (an error wrapping fs.ErrExist): a key is never overwritten, since
// losing it would lose the person's vote. data must be a key file for name.
func Save(dir, name string, data []byte) error {
	if err := validName(name); err != nil {
		return err
	}
	if owner, _, err := Inspect(data); err != nil {
		return err
	} else if owner != name {
		return fmt.Errorf("keyfile: save: the key file belongs to %q, not %q", owner, name)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("keyfile: save: %w", err)
	}
	dst := Path(dir, name)
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("keyfile: save %s: %w", dst, fs.ErrExist)
	}
	tmp, err := os.CreateTemp(dir, "."+name+".key.tmp-*") // mode 0600
	if err != nil {
		return fmt.Errorf("keyfile: save: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(0o600)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("keyfile: save %s: %w", dst, err)
	}
	// Link, unlike rename, never replaces an existing file: two racing
	// Saves cannot both succeed.
	if err := os.Link(tmp.Name(), dst); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("keyfile: save %s: %w", dst, fs.ErrExist)
		}
		return fmt.Errorf("keyfile: save %s: %w", dst, err)
	}
	if d, err := os.Open(dir); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("keyfile: save %s: sync directory: %w", dst, err)
		}
	}
	return nil
}

// Load reads name's key file from dir. A missing file gives an error
// wrapping fs.ErrNotExist. It does not decrypt: pass the bytes to Open.
func Load(dir, name string) ([]byte, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	f, err := os.Open(Path(dir, name))
	if err != nil {
		return nil, fmt.Errorf("keyfile: load: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("keyfile: load %s: %w", f.Name(), err)
	}
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", ErrMalformed, f.Name(), MaxSize)
	}
	return data, nil
}
