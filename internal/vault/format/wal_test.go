package format

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestWALHeader(t *testing.T) {
	tests := []struct {
		name    string
		h       WALHeader
		wantErr string // "" means valid
	}{
		{"wal", WALHeader{Timeline: 1, Start: 0x16B374D848, End: 0x16B374D848 + 4096}, ""},
		{"one byte", WALHeader{Timeline: 7, Start: 0, End: 1}, ""},
		{"largest piece", WALHeader{Timeline: 1, Start: 1 << 40, End: 1<<40 + MaxWALPiece}, ""},
		{"history", WALHeader{Timeline: 2, End: 40, History: true}, ""},
		{"timeline zero", WALHeader{Timeline: 0, Start: 0, End: 1}, "timeline 0"},
		{"empty", WALHeader{Timeline: 1, Start: 5, End: 5}, "not after start"},
		{"backwards", WALHeader{Timeline: 1, Start: 6, End: 5}, "not after start"},
		{"too large", WALHeader{Timeline: 1, Start: 0, End: MaxWALPiece + 1}, "exceeds limit"},
		{"history of timeline 1", WALHeader{Timeline: 1, End: 40, History: true}, "first timeline"},
		{"history with start", WALHeader{Timeline: 3, Start: 1, End: 40, History: true}, "want 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enc := AppendWALHeader([]byte("prefix"), tt.h)[len("prefix"):]
			if len(enc) != WALHeaderSize {
				t.Fatalf("encoded %d bytes, want %d", len(enc), WALHeaderSize)
			}
			got, body, err := ParseWALHeader(append(enc, "sealed"...))
			if tt.wantErr != "" {
				if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseWALHeader = %v, want error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.h || string(body) != "sealed" {
				t.Fatalf("ParseWALHeader = %+v, %q, %v; want %+v", got, body, err, tt.h)
			}
		})
	}
}

func TestParseWALHeaderRefuses(t *testing.T) {
	good := AppendWALHeader(nil, WALHeader{Timeline: 1, Start: 0, End: 100})
	tests := []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{"truncated", good[:WALHeaderSize-1], "truncated"},
		{"nothing", nil, "truncated"},
		{"index magic", append([]byte("DKI1"), good[4:]...), "bad magic"},
		{"unknown flag", append(bytes.Clone(good[:24]), 0x02), "unknown flags"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := ParseWALHeader(tt.data); !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ParseWALHeader = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func FuzzWALHeader(f *testing.F) {
	f.Add(append(AppendWALHeader(nil, WALHeader{Timeline: 1, Start: 0x1000000, End: 0x1400000}), "body"...))
	f.Add(AppendWALHeader(nil, WALHeader{Timeline: 2, End: 41, History: true}))
	f.Add(AppendWALHeader(nil, WALHeader{Timeline: 1, Start: 5, End: 5}))
	f.Add([]byte("DKW1\x00\x00\x00\x01"))
	f.Add([]byte("DKI1\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, body, err := ParseWALHeader(data)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v does not wrap ErrFormat", err)
			}
			return
		}
		if h.Validate() != nil || h.Len() <= 0 || h.Len() > MaxWALPiece {
			t.Fatalf("accepted invalid %+v", h)
		}
		// Parse → write round-trips to the input.
		if got := append(AppendWALHeader(nil, h), body...); !bytes.Equal(got, data) {
			t.Fatalf("round trip changed %x → %x", data, got)
		}
	})
}
