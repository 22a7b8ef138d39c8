package pgagent

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// writeManifest encodes m as PostgreSQL 15 writes a manifest: one file per
// line, paths that are not valid UTF-8 hex-encoded, and the SHA-256 of
// everything before the last line in that line.
func writeManifest(m *Manifest) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "{ \"PostgreSQL-Backup-Manifest-Version\": %d,\n", m.Version)
	if m.Version >= 2 {
		fmt.Fprintf(&b, "\"System-Identifier\": %d,\n", m.SystemID)
	}
	b.WriteString("\"Files\": [")
	for i, f := range m.Files {
		if i > 0 {
			b.WriteString(",")
		}
		p, _ := json.Marshal(f.Path)
		key := "Path"
		if !utf8.ValidString(f.Path) {
			key, p = "Encoded-Path", []byte(`"`+hex.EncodeToString([]byte(f.Path))+`"`)
		}
		lm, _ := json.Marshal(f.LastModified)
		fmt.Fprintf(&b, "\n{ \"%s\": %s, \"Size\": %d, \"Last-Modified\": %s", key, p, f.Size, lm)
		if f.Algorithm != "NONE" {
			fmt.Fprintf(&b, ", \"Checksum-Algorithm\": %q, \"Checksum\": \"%x\"", f.Algorithm, f.Checksum)
		}
		b.WriteString(" }")
	}
	b.WriteString("\n],\n\"WAL-Ranges\": [")
	for i, w := range m.WAL {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, "\n{ \"Timeline\": %d, \"Start-LSN\": \"%s\", \"End-LSN\": \"%s\" }", w.Timeline, w.Start, w.End)
	}
	b.WriteString("\n],\n")
	sum := sha256.Sum256(b.Bytes())
	fmt.Fprintf(&b, "\"Manifest-Checksum\": \"%x\"}\n", sum)
	return b.Bytes()
}

func crc(data string) []byte {
	h, _ := NewFileHash("CRC32C")
	h.Write([]byte(data))
	return h.Sum(nil)
}

// sample is a small manifest and the files it describes.
func sample() (*Manifest, map[string]string) {
	files := map[string]string{"backup_label": "START WAL LOCATION: 0/2000028\n", "PG_VERSION": "15\n", "base/1/1259": strings.Repeat("p", 8192)}
	m := &Manifest{Version: 1, WAL: []WALRange{{Timeline: 1, Start: 0x2000028, End: 0x2000100}}}
	for _, p := range []string{"backup_label", "PG_VERSION", "base/1/1259"} {
		m.Files = append(m.Files, ManifestFile{Path: p, Size: int64(len(files[p])), LastModified: "2026-01-01 00:00:00 GMT",
			Algorithm: "CRC32C", Checksum: crc(files[p])})
	}
	return m, files
}

func sums(files map[string]string) map[string]FileSum {
	out := map[string]FileSum{}
	for p, d := range files {
		out[p] = FileSum{Size: int64(len(d)), Algorithm: "CRC32C", Sum: crc(d)}
	}
	return out
}

func TestCRC32CAsPostgreSQLWritesIt(t *testing.T) {
	// CRC-32C("123456789") is 0xE3069283; PostgreSQL writes its bytes in
	// memory order. (The real-server tests check every file of a backup.)
	if got := hex.EncodeToString(crc("123456789")); got != "839206e3" {
		t.Errorf("crc32c = %s, want 839206e3", got)
	}
}

func TestParseRealManifest(t *testing.T) {
	data, err := os.ReadFile("testdata/backup_manifest") // PostgreSQL 15.18, regenerate with -update
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseManifest(data)
	if err != nil {
		t.Fatal(err)
	}
	if m.Version != 1 || len(m.Files) < 900 || len(m.WAL) != 1 || m.WAL[0].Timeline != 1 || m.WAL[0].Start == 0 {
		t.Errorf("manifest: version %d, %d files, WAL %+v", m.Version, len(m.Files), m.WAL)
	}
	// Our encoder writes the same bytes, so the fuzz round trip tests the
	// real format.
	if again := writeManifest(m); !bytes.Equal(again, data) {
		t.Errorf("re-encoded manifest differs from the server's")
	}
	// One flipped byte anywhere before the checksum line is caught.
	bad := bytes.Clone(data)
	bad[len(bad)/2] ^= 1
	if _, err := ParseManifest(bad); !errors.Is(err, ErrManifest) {
		t.Errorf("damaged manifest: err = %v", err)
	}
}

func TestManifestCheck(t *testing.T) {
	m, files := sample()
	if err := m.Check(sums(files)); err != nil {
		t.Fatalf("matching files: %v", err)
	}
	tests := []struct {
		name string
		edit func(map[string]FileSum)
		want string
	}{
		{"size", func(s map[string]FileSum) { f := s["PG_VERSION"]; f.Size++; s["PG_VERSION"] = f }, "PG_VERSION: 4 bytes received, the manifest says 3"},
		{"checksum", func(s map[string]FileSum) {
			s["base/1/1259"] = FileSum{Size: 8192, Algorithm: "CRC32C", Sum: crc(strings.Repeat("q", 8192))}
		}, "base/1/1259: CRC32C checksum"},
		{"missing", func(s map[string]FileSum) { delete(s, "backup_label") }, "backup_label: listed but not received"},
		{"extra", func(s map[string]FileSum) { s["base/1/9999"] = FileSum{} }, "base/1/9999: received but not in the manifest"},
		{"algorithm", func(s map[string]FileSum) { f := s["PG_VERSION"]; f.Algorithm = "SHA256"; s["PG_VERSION"] = f }, "PG_VERSION: checksummed with SHA256"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := sums(files)
			tt.edit(s)
			err := m.Check(s)
			if !errors.Is(err, ErrManifest) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestParseManifestRejects(t *testing.T) {
	m, _ := sample()
	good := writeManifest(m)
	reseal := func(body string) []byte {
		i := strings.LastIndex(body, "\"Manifest-Checksum\"")
		sum := sha256.Sum256([]byte(body[:i]))
		return []byte(body[:i] + fmt.Sprintf("\"Manifest-Checksum\": \"%x\"}\n", sum))
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"one line", []byte(`{"PostgreSQL-Backup-Manifest-Version": 1, "Manifest-Checksum": ""}`)},
		{"wrong checksum", bytes.Replace(good, []byte(`"Size": 3`), []byte(`"Size": 4`), 1)},
		{"checksum not last", append(bytes.Clone(good), "\n"...)},
		{"no version", reseal(strings.Replace(string(good), `"PostgreSQL-Backup-Manifest-Version": 1`, `"X": 1`, 1))},
		{"version 3", reseal(strings.Replace(string(good), `"PostgreSQL-Backup-Manifest-Version": 1`, `"PostgreSQL-Backup-Manifest-Version": 3`, 1))},
		{"negative size", reseal(strings.Replace(string(good), `"Size": 3`, `"Size": -3`, 1))},
		{"duplicate path", reseal(strings.Replace(string(good), `"Path": "PG_VERSION"`, `"Path": "backup_label"`, 1))},
		{"unknown algorithm", reseal(strings.Replace(string(good), `"CRC32C"`, `"MD5"`, 1))},
		{"short checksum", reseal(strings.Replace(string(good), fmt.Sprintf(`"%x"`, crc("15\n")), `"abcd"`, 1))},
		{"bad LSN", reseal(strings.Replace(string(good), `"0/2000100"`, `"0x2000100"`, 1))},
		{"WAL backwards", reseal(strings.Replace(string(good), `"0/2000100"`, `"0/1000000"`, 1))},
		{"two paths", reseal(strings.Replace(string(good), `"Path": "PG_VERSION"`, `"Path": "PG_VERSION", "Encoded-Path": "00"`, 1))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ParseManifest(tt.data); !errors.Is(err, ErrManifest) {
				t.Errorf("err = %v, want ErrManifest", err)
			}
		})
	}
	// Encoded-Path and version 2 parse.
	m.Files[0].Path = "base/\xff\xfe"
	m.Version, m.SystemID = 2, 7711971384150337183
	got, err := ParseManifest(writeManifest(m))
	if err != nil || got.Files[0].Path != "base/\xff\xfe" || got.SystemID != m.SystemID {
		t.Errorf("encoded path / v2: %+v, %v", got, err)
	}
}

func TestBaseMetaJSON(t *testing.T) {
	m := BaseMeta{SystemID: 1<<63 + 5, Timeline: 2, StartLSN: 0x16B374D848, EndLSN: 0x16B374D900, CheckpointLSN: 0x16B374D880,
		StartTime: time.Unix(1, 0).UTC(), Label: "l", Tablespaces: []Tablespace{{OID: 16384, Location: "/ts"}}}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"system_id":"9223372036854775813"`, `"start_lsn":"16/B374D848"`, `"end_lsn":"16/B374D900"`, `"checkpoint_lsn":"16/B374D880"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %s", b, want)
		}
	}
	got, err := DecodeBaseMeta(b)
	if err != nil || !reflect.DeepEqual(*got, m) {
		t.Errorf("round trip: %+v, %v", got, err)
	}
	if _, err := DecodeBaseMeta([]byte(`{"start_lsn":"0/10","end_lsn":"0/5"}`)); err == nil {
		t.Error("backwards LSN range accepted")
	}
}

func FuzzParseManifest(f *testing.F) {
	m, _ := sample()
	f.Add(writeManifest(m))
	m.Files[1].Path = "\xff"
	m.Files[2].Algorithm, m.Files[2].Checksum = "NONE", nil
	m.WAL = append(m.WAL, WALRange{Timeline: 2, Start: 0x2000100, End: 0x3000000})
	f.Add(writeManifest(m))
	if data, err := os.ReadFile("testdata/backup_manifest"); err == nil {
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseManifest(data)
		if err != nil {
			if !errors.Is(err, ErrManifest) {
				t.Fatalf("error %v does not wrap ErrManifest", err)
			}
			return
		}
		// What parses re-encodes to a manifest that parses the same.
		again, err := ParseManifest(writeManifest(m))
		if err != nil {
			t.Fatalf("re-encoded manifest: %v", err)
		}
		m.Checksum, again.Checksum = nil, nil
		if !reflect.DeepEqual(m, again) {
			t.Fatalf("round trip:\n%+v\n%+v", m, again)
		}
		_ = m.Check(map[string]FileSum{})
	})
}

// FuzzParseManifestBody fuzzes what lies behind the checksum: each input
// is a manifest body that is sealed with a valid checksum line first.
func FuzzParseManifestBody(f *testing.F) {
	m, _ := sample()
	good := writeManifest(m)
	f.Add(good[:bytes.LastIndex(good, []byte(`"Manifest-Checksum"`))])
	f.Add([]byte("{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 1,\n\"Files\": [\n{ \"Encoded-Path\": \"ff\", \"Size\": 0 }\n],\n"))
	f.Fuzz(func(t *testing.T, body []byte) {
		sum := sha256.Sum256(body)
		data := append(bytes.Clone(body), fmt.Sprintf("\"Manifest-Checksum\": \"%x\"}\n", sum)...)
		m, err := ParseManifest(data)
		if err != nil {
			if !errors.Is(err, ErrManifest) {
				t.Fatalf("error %v does not wrap ErrManifest", err)
			}
			return
		}
		again, err := ParseManifest(writeManifest(m))
		if err != nil {
			t.Fatalf("re-encoded manifest: %v", err)
		}
		m.Checksum, again.Checksum = nil, nil
		if !reflect.DeepEqual(m, again) {
			t.Fatalf("round trip:\n%+v\n%+v", m, again)
		}
	})
}
