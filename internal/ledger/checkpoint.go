package ledger

import (
	"crypto/ed25519"
	"encoding/binary"
	"encoding/json"
	"fmt"
)

// Checkpoint is the Data of a checkpoint record: the ledger key's signature
// over the record before it. A checkpoint record at seq S carries Seq S-1
// and Hash equal to its own Prev; the record itself is chained like any
// other, so the next checkpoint covers it too.
type Checkpoint struct {
	Seq  uint64 `json:"seq"`  // the record covered: the checkpoint's seq minus one
	Hash Hash   `json:"hash"` // that record's hash
	Sig  []byte `json:"sig"`  // Ed25519 over CheckpointMessage(Seq, Hash), base64
}

const checkpointDomain = "dualkey ledger checkpoint v1\x00"

// CheckpointMessage returns the bytes a checkpoint signs:
// "dualkey ledger checkpoint v1\x00" | seq u64be | hash. The domain prefix
// keeps a ledger signature from ever being valid as anything else (an
// approval, a certificate) even when the same key were misused for both.
func CheckpointMessage(seq uint64, h Hash) []byte {
	b := make([]byte, 0, len(checkpointDomain)+8+len(h))
	b = append(b, checkpointDomain...)
	b = binary.BigEndian.AppendUint64(b, seq)
	return append(b, h[:]...)
}

func signCheckpoint(key ed25519.PrivateKey, seq uint64, h Hash) json.RawMessage {
	c := Checkpoint{Seq: seq, Hash: h, Sig: ed25519.Sign(key, CheckpointMessage(seq, h))}
	b, err := json.Marshal(c)
	if err != nil {
		panic(err) // fixed types always marshal
	}
	return b
}

// ParseCheckpoint decodes and checks the checkpoint record r against pub:
// its data must cover exactly the record before it, with a valid signature.
func ParseCheckpoint(r *Record, pub ed25519.PublicKey) (Checkpoint, error) {
	var c Checkpoint
	if r.Kind != KindCheckpoint {
		return c, fmt.Errorf("%w: seq %d is a %q record, not a checkpoint", ErrFormat, r.Seq, r.Kind)
	}
	if err := json.Unmarshal(r.Data, &c); err != nil {
		return c, fmt.Errorf("%w: checkpoint %d: %v", ErrFormat, r.Seq, err)
	}
	if c.Seq+1 != r.Seq || c.Hash != r.Prev {
		return c, fmt.Errorf("%w: checkpoint %d covers seq %d hash %s, not the record before it", ErrTampered, r.Seq, c.Seq, c.Hash)
	}
	if len(pub) != ed25519.PublicKeySize || len(c.Sig) != ed25519.SignatureSize || !ed25519.Verify(pub, CheckpointMessage(c.Seq, c.Hash), c.Sig) {
		return c, fmt.Errorf("%w: checkpoint %d: bad signature", ErrTampered, r.Seq)
	}
	return c, nil
}
