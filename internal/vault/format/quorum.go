package format

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"time"
)

// Limits on the records below, so a hostile object cannot make the vault
// allocate without bound: a certificate is at most 2 MiB (quorum/cert), a
// policy at most 1 MiB.
const (
	MaxCertificate = 3 << 20
	MaxPolicy      = 1 << 20
)

// PolicyRecord is stored by the vault (never by a client) as policies/<hash
// of its bytes> when the approver set is rotated. It replaces the policy
// whose hash is Prev (the config's QuorumPolicy, or an earlier record's
// Policy) and is valid only if Certificate verifies under that previous
// policy for action "vault:approvers.rotate" on this repository, naming
// exactly Policy. The vault re-verifies the whole chain from the config each
// time it loads it, so a planted record without such a certificate is
// ignored.
type PolicyRecord struct {
	Time        time.Time `json:"time"`        // vault clock when it took effect
	Prev        string    `json:"prev"`        // cert Policy.Hash() of the policy it replaces
	Policy      []byte    `json:"policy"`      // canonical cert.Policy encoding
	Certificate []byte    `json:"certificate"` // cert.Certificate encoding
}

// ChangeRecord is stored by the vault as changes/<hash of its bytes> when a
// repository setting is changed under a quorum certificate. Today the only
// setting is MinRetention, which may only be lowered this way: the effective
// minimum is the smallest of the config's and every valid change record's.
type ChangeRecord struct {
	Time         time.Time `json:"time"` // vault clock
	MinRetention Duration  `json:"min_retention"`
	Certificate  []byte    `json:"certificate"`
}

// ConsumedRecord is stored by the vault as consumed/<request id> before it
// performs a certified action, so a certificate runs at most once: the
// backend never replaces an object, and Nonce makes a second record differ
// from the first, so the second save fails with backend.ErrExists.
type ConsumedRecord struct {
	Time        time.Time `json:"time"` // vault clock
	Op          string    `json:"op"`
	Nonce       []byte    `json:"nonce"`
	Certificate []byte    `json:"certificate"`
}

// decodeStrict decodes exactly one JSON object into v, refusing unknown
// fields and trailing data.
func decodeStrict(what string, data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrFormat, what, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("%w: %s: trailing data", ErrFormat, what)
	}
	return nil
}

// ParsePolicyRecord decodes a policy record and checks its fields are
// present and within limits. It does not verify the certificate.
func ParsePolicyRecord(data []byte) (PolicyRecord, error) {
	var r PolicyRecord
	if err := decodeStrict("policy record", data, &r); err != nil {
		return PolicyRecord{}, err
	}
	switch {
	case r.Time.IsZero() || r.Prev == "" || len(r.Policy) == 0 || len(r.Certificate) == 0:
		return PolicyRecord{}, fmt.Errorf("%w: policy record: missing time, prev, policy or certificate", ErrFormat)
	case len(r.Policy) > MaxPolicy || len(r.Certificate) > MaxCertificate:
		return PolicyRecord{}, fmt.Errorf("%w: policy record: too large", ErrFormat)
	}
	return r, nil
}

// ParseChangeRecord decodes a change record. It does not verify the
// certificate.
func ParseChangeRecord(data []byte) (ChangeRecord, error) {
	var r ChangeRecord
	if err := decodeStrict("change record", data, &r); err != nil {
		return ChangeRecord{}, err
	}
	switch {
	case r.Time.IsZero() || len(r.Certificate) == 0:
		return ChangeRecord{}, fmt.Errorf("%w: change record: missing time or certificate", ErrFormat)
	case r.MinRetention < 0:
		return ChangeRecord{}, fmt.Errorf("%w: change record: negative min_retention", ErrFormat)
	case len(r.Certificate) > MaxCertificate:
		return ChangeRecord{}, fmt.Errorf("%w: change record: certificate too large", ErrFormat)
	}
	return r, nil
}

// ParseConsumedRecord decodes a consumed-certificate record.
func ParseConsumedRecord(data []byte) (ConsumedRecord, error) {
	var r ConsumedRecord
	if err := decodeStrict("consumed record", data, &r); err != nil {
		return ConsumedRecord{}, err
	}
	if r.Time.IsZero() || r.Op == "" || len(r.Certificate) == 0 {
		return ConsumedRecord{}, fmt.Errorf("%w: consumed record: missing time, op or certificate", ErrFormat)
	}
	return r, nil
}

// Ledger mirror objects are
//
//	"DKL1" | Seal(payload)
//
// named by a keyed hash of the logical ledger name (see repo.LedgerMirror).
// The vault cannot read the payload; it checks only this shape.
var ledgerMagic = []byte("DKL1")

// LedgerSealOverhead is the least a sealed payload can be: a 12-byte nonce
// and a 16-byte tag (as WALSealOverhead).
const LedgerSealOverhead = 12 + 16

// AppendLedgerHeader appends the plaintext header of a ledger object.
func AppendLedgerHeader(dst []byte) []byte { return append(dst, ledgerMagic...) }

// ParseLedgerObject checks the plaintext shape of a ledger object and
// returns its sealed payload.
func ParseLedgerObject(data []byte) ([]byte, error) {
	if len(data) < len(ledgerMagic) || !bytes.Equal(data[:len(ledgerMagic)], ledgerMagic) {
		return nil, fmt.Errorf("%w: ledger object: bad magic", ErrFormat)
	}
	body := data[len(ledgerMagic):]
	if len(body) < LedgerSealOverhead {
		return nil, fmt.Errorf("%w: ledger object: sealed payload of %d bytes is shorter than a seal", ErrFormat, len(body))
	}
	return body, nil
}
