package pgagent

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"sort"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/pgwal"
)

// BaseMeta is the Meta of a snapshot of kind snapshot.KindPGBase: what
// restore needs to know about a base backup without reading its files.
type BaseMeta struct {
	// SystemID is the cluster's system identifier (IDENTIFY_SYSTEM). It is
	// a string in JSON: it does not fit JSON's exact integers.
	SystemID uint64 `json:"system_id,string"`
	// Timeline is the timeline the backup started on.
	Timeline uint32 `json:"timeline"`
	// StartLSN and EndLSN bound the WAL needed to make the backup
	// consistent: replay must reach EndLSN before the server may open.
	StartLSN pgwal.LSN `json:"-"`
	EndLSN   pgwal.LSN `json:"-"`
	// CheckpointLSN is the checkpoint replay starts from (backup_label).
	CheckpointLSN pgwal.LSN `json:"-"`
	// EndTimeline is the timeline at EndLSN; differs from Timeline only
	// for a backup of a standby that was promoted meanwhile.
	EndTimeline uint32 `json:"end_timeline"`
	// BackupFrom is "primary" or "standby" (backup_label).
	BackupFrom string `json:"backup_from,omitempty"`
	// StartTime and EndTime are the agent's clock around BASE_BACKUP.
	StartTime time.Time `json:"start_time"`
	EndTime   time.Time `json:"end_time"`
	// ServerVersion is the server's server_version ("15.14 (Debian …)").
	ServerVersion string `json:"server_version"`
	Label         string `json:"label"`
	// Size is the bytes of all files of the backup, Files their number,
	// both as the manifest lists them (backup_manifest itself excluded).
	Size  int64 `json:"size"`
	Files int   `json:"files"`
	// ManifestChecksum is the manifest's own SHA-256 (hex); FileChecksums
	// is the algorithm of its per-file checksums ("CRC32C").
	ManifestChecksum string `json:"manifest_checksum"`
	FileChecksums    string `json:"file_checksums"`
	// Tablespaces are the cluster's tablespaces outside the data
	// directory. Their files are stored under pg_tblspc/<oid>/ (the paths
	// the manifest uses) and not as the symlink the data directory has;
	// restore recreates the link to Location or a new place.
	Tablespaces []Tablespace `json:"tablespaces,omitempty"`
}

// Tablespace is a tablespace outside the data directory.
type Tablespace struct {
	OID      uint32 `json:"oid"`
	Location string `json:"location"`
}

// baseMetaJSON is BaseMeta with LSNs in PostgreSQL's text form, so the
// metadata reads like the server's own output.
type baseMetaJSON struct {
	baseMetaFields
	StartLSN      string `json:"start_lsn"`
	EndLSN        string `json:"end_lsn"`
	CheckpointLSN string `json:"checkpoint_lsn"`
}

// baseMetaFields has BaseMeta's fields without its methods.
type baseMetaFields BaseMeta

// MarshalJSON writes LSNs as text ("0/2000028").
func (m BaseMeta) MarshalJSON() ([]byte, error) {
	return json.Marshal(baseMetaJSON{baseMetaFields: baseMetaFields(m), StartLSN: m.StartLSN.String(),
		EndLSN: m.EndLSN.String(), CheckpointLSN: m.CheckpointLSN.String()})
}

// UnmarshalJSON reads what MarshalJSON writes.
func (m *BaseMeta) UnmarshalJSON(data []byte) error {
	var j baseMetaJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return err
	}
	*m = BaseMeta(j.baseMetaFields)
	for _, f := range []struct {
		s   string
		lsn *pgwal.LSN
	}{{j.StartLSN, &m.StartLSN}, {j.EndLSN, &m.EndLSN}, {j.CheckpointLSN, &m.CheckpointLSN}} {
		if f.s == "" {
			*f.lsn = 0
			continue
		}
		v, err := pgwal.ParseLSN(f.s)
		if err != nil {
			return err
		}
		*f.lsn = v
	}
	return nil
}

// DecodeBaseMeta parses a base backup snapshot's Meta.
func DecodeBaseMeta(raw json.RawMessage) (*BaseMeta, error) {
	var m BaseMeta
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("pgagent: base backup meta: %w", err)
	}
	if m.StartLSN.IsZero() || m.EndLSN < m.StartLSN {
		return nil, fmt.Errorf("pgagent: base backup meta: bad LSN range %s–%s", m.StartLSN, m.EndLSN)
	}
	return &m, nil
}

// ManifestName is the manifest's file name, in a data directory and in a
// base backup snapshot.
const ManifestName = "backup_manifest"

// maxManifest bounds the manifest held in memory: about 150 bytes per file,
// so ten million files.
const maxManifest = 1 << 30

// ErrManifest is wrapped by every error that says a backup does not match
// its manifest, or that the manifest is damaged.
var ErrManifest = errors.New("pgagent: backup does not match its manifest")

// Manifest is a parsed backup_manifest (version 1, PostgreSQL 13–16; and 2,
// PostgreSQL 17, which adds the system identifier).
type Manifest struct {
	Version  int
	SystemID uint64 // version 2 only
	Files    []ManifestFile
	WAL      []WALRange
	// Checksum is the SHA-256 of the manifest up to its last line, which
	// ParseManifest has verified.
	Checksum []byte
}

// ManifestFile is one file the manifest lists.
type ManifestFile struct {
	Path         string // slash-separated, relative to the data directory
	Size         int64
	LastModified string
	// Algorithm is "NONE", "CRC32C", "SHA224", "SHA256", "SHA384" or
	// "SHA512"; Checksum is empty for NONE.
	Algorithm string
	Checksum  []byte
}

// WALRange is the WAL a backup needs on one timeline.
type WALRange struct {
	Timeline uint32
	Start    pgwal.LSN
	End      pgwal.LSN
}

type jsonManifest struct {
	Version  *int       `json:"PostgreSQL-Backup-Manifest-Version"`
	SystemID *uint64    `json:"System-Identifier"`
	Files    []jsonFile `json:"Files"`
	WAL      []jsonWAL  `json:"WAL-Ranges"`
	Checksum string     `json:"Manifest-Checksum"`
}

type jsonFile struct {
	Path         *string `json:"Path"`
	EncodedPath  *string `json:"Encoded-Path"`
	Size         *int64  `json:"Size"`
	LastModified string  `json:"Last-Modified"`
	Algorithm    string  `json:"Checksum-Algorithm"`
	Checksum     string  `json:"Checksum"`
}

type jsonWAL struct {
	Timeline uint32 `json:"Timeline"`
	Start    string `json:"Start-LSN"`
	End      string `json:"End-LSN"`
}

// ParseManifest parses a backup manifest and verifies its own checksum:
// the SHA-256, in its last line, of everything up to and including the
// newline before that line (as pg_verifybackup computes it).
func ParseManifest(data []byte) (*Manifest, error) {
	if len(data) > maxManifest {
		return nil, fmt.Errorf("%w: manifest of %d bytes is too large", ErrManifest, len(data))
	}
	// The checksum covers up to the second-to-last newline.
	last := bytes.LastIndexByte(data, '\n')
	if last < 0 {
		return nil, fmt.Errorf("%w: manifest has no lines", ErrManifest)
	}
	penult := bytes.LastIndexByte(data[:last], '\n')
	if penult < 0 {
		return nil, fmt.Errorf("%w: manifest has fewer than two lines", ErrManifest)
	}
	if !bytes.HasPrefix(data[penult+1:], []byte(`"Manifest-Checksum"`)) {
		return nil, fmt.Errorf("%w: manifest's last line is not its checksum", ErrManifest)
	}
	var jm jsonManifest
	// Unknown fields are ignored: a newer server may add some, and the
	// checksum already proves the manifest is the one the server wrote.
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&jm); err != nil {
		return nil, fmt.Errorf("%w: manifest: %w", ErrManifest, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: manifest: data after the JSON object", ErrManifest)
	}
	if jm.Version == nil || (*jm.Version != 1 && *jm.Version != 2) {
		return nil, fmt.Errorf("%w: manifest version missing or unknown", ErrManifest)
	}
	want, err := hex.DecodeString(jm.Checksum)
	if err != nil || len(want) != sha256.Size {
		return nil, fmt.Errorf("%w: manifest checksum %q is not a SHA-256", ErrManifest, jm.Checksum)
	}
	got := sha256.Sum256(data[:penult+1])
	if !bytes.Equal(got[:], want) {
		return nil, fmt.Errorf("%w: manifest checksum is %x, the manifest says %x", ErrManifest, got, want)
	}
	m := &Manifest{Version: *jm.Version, Checksum: want}
	if jm.SystemID != nil {
		m.SystemID = *jm.SystemID
	}
	seen := make(map[string]bool, len(jm.Files))
	for i, f := range jm.Files {
		var mf ManifestFile
		switch {
		case f.Path != nil && f.EncodedPath == nil:
			mf.Path = *f.Path
		case f.EncodedPath != nil && f.Path == nil:
			b, err := hex.DecodeString(*f.EncodedPath)
			if err != nil {
				return nil, fmt.Errorf("%w: manifest file %d: bad Encoded-Path: %w", ErrManifest, i, err)
			}
			mf.Path = string(b)
		default:
			return nil, fmt.Errorf("%w: manifest file %d needs exactly one of Path and Encoded-Path", ErrManifest, i)
		}
		if mf.Path == "" || seen[mf.Path] {
			return nil, fmt.Errorf("%w: manifest file %d: empty or duplicate path %q", ErrManifest, i, mf.Path)
		}
		seen[mf.Path] = true
		if f.Size == nil || *f.Size < 0 {
			return nil, fmt.Errorf("%w: manifest file %q: size missing or negative", ErrManifest, mf.Path)
		}
		mf.Size, mf.LastModified = *f.Size, f.LastModified
		mf.Algorithm = f.Algorithm
		if mf.Algorithm == "" {
			mf.Algorithm = "NONE"
		}
		size, ok := checksumSize[mf.Algorithm]
		if !ok {
			return nil, fmt.Errorf("%w: manifest file %q: unknown checksum algorithm %q", ErrManifest, mf.Path, f.Algorithm)
		}
		if size > 0 {
			sum, err := hex.DecodeString(f.Checksum)
			if err != nil || len(sum) != size {
				return nil, fmt.Errorf("%w: manifest file %q: bad %s checksum %q", ErrManifest, mf.Path, mf.Algorithm, f.Checksum)
			}
			mf.Checksum = sum
		} else if f.Checksum != "" {
			return nil, fmt.Errorf("%w: manifest file %q: a checksum without an algorithm", ErrManifest, mf.Path)
		}
		m.Files = append(m.Files, mf)
	}
	for _, w := range jm.WAL {
		start, err1 := pgwal.ParseLSN(w.Start)
		end, err2 := pgwal.ParseLSN(w.End)
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("%w: manifest WAL range: %w", ErrManifest, err)
		}
		if end < start {
			return nil, fmt.Errorf("%w: manifest WAL range %s–%s ends before it starts", ErrManifest, start, end)
		}
		m.WAL = append(m.WAL, WALRange{Timeline: w.Timeline, Start: start, End: end})
	}
	return m, nil
}

// checksumSize is the digest size of each manifest checksum algorithm.
var checksumSize = map[string]int{"NONE": 0, "CRC32C": 4, "SHA224": sha256.Size224, "SHA256": sha256.Size,
	"SHA384": sha512.Size384, "SHA512": sha512.Size}

// NewFileHash returns the hash a manifest's algorithm applies to a file's
// content, with PostgreSQL's output encoding, or nil for NONE.
func NewFileHash(algorithm string) (hash.Hash, error) {
	switch algorithm {
	case "NONE":
		return nil, nil
	case "CRC32C":
		return &crc32c{h: crc32.New(crc32.MakeTable(crc32.Castagnoli))}, nil
	case "SHA224":
		return sha256.New224(), nil
	case "SHA256":
		return sha256.New(), nil
	case "SHA384":
		return sha512.New384(), nil
	case "SHA512":
		return sha512.New(), nil
	}
	return nil, fmt.Errorf("pgagent: unknown checksum algorithm %q", algorithm)
}

// crc32c is CRC-32C as the manifest writes it: PostgreSQL copies the
// 32-bit value's bytes in memory order, which is little-endian on every
// platform it is built for here; hash/crc32's Sum is big-endian.
type crc32c struct{ h hash.Hash32 }

func (c *crc32c) Write(p []byte) (int, error) { return c.h.Write(p) }
func (c *crc32c) Sum(b []byte) []byte         { return binary.LittleEndian.AppendUint32(b, c.h.Sum32()) }
func (c *crc32c) Reset()                      { c.h.Reset() }
func (c *crc32c) Size() int                   { return 4 }
func (c *crc32c) BlockSize() int              { return 1 }

// FileSum is what was received for one file: its size and its checksum
// under the manifest's algorithm.
type FileSum struct {
	Size      int64
	Algorithm string
	Sum       []byte
}

// maxListedMismatches is how many mismatching files an error names.
const maxListedMismatches = 10

// Check compares the files received (path → FileSum) with the manifest:
// every listed file must have arrived with the listed size and checksum,
// and no file may have arrived that the manifest does not list. The error
// wraps ErrManifest and names the files.
func (m *Manifest) Check(got map[string]FileSum) error {
	var bad []string
	listed := make(map[string]bool, len(m.Files))
	for _, f := range m.Files {
		listed[f.Path] = true
		g, ok := got[f.Path]
		switch {
		case !ok:
			bad = append(bad, fmt.Sprintf("%s: listed but not received", f.Path))
		case g.Size != f.Size:
			bad = append(bad, fmt.Sprintf("%s: %d bytes received, the manifest says %d", f.Path, g.Size, f.Size))
		case f.Algorithm == "NONE":
		case g.Algorithm != f.Algorithm:
			bad = append(bad, fmt.Sprintf("%s: checksummed with %s, the manifest uses %s", f.Path, g.Algorithm, f.Algorithm))
		case !bytes.Equal(g.Sum, f.Checksum):
			bad = append(bad, fmt.Sprintf("%s: %s checksum %x, the manifest says %x", f.Path, f.Algorithm, g.Sum, f.Checksum))
		}
	}
	for p := range got {
		if !listed[p] {
			bad = append(bad, fmt.Sprintf("%s: received but not in the manifest", p))
		}
	}
	if len(bad) == 0 {
		return nil
	}
	sort.Strings(bad)
	n := len(bad)
	if n > maxListedMismatches {
		bad = append(bad[:maxListedMismatches], fmt.Sprintf("and %d more", n-maxListedMismatches))
	}
	return fmt.Errorf("%w: %d files differ: %s", ErrManifest, n, strings.Join(bad, "; "))
}

// Size returns the total size and number of files the manifest lists.
func (m *Manifest) Size() (bytes int64, files int) {
	for _, f := range m.Files {
		bytes += f.Size
	}
	return bytes, len(m.Files)
}
