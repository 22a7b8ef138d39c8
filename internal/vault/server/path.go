package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
)

// routeKind is what a request path names.
type routeKind int

const (
	routeWhoami routeKind = iota + 1
	routeConfig
	routeObject // /v1/objects/{type}/{name}
	routeList   // /v1/objects/{type}/
	routeCommit
	routeLocks
	routeExtend    // /v1/locks/{snapshot}/extend
	routeQuorum    // /v1/quorum: the verified approver policy
	routeCertified // /v1/certified: a guarded action under a quorum certificate
)

// route is a parsed request path.
type route struct {
	kind   routeKind
	handle backend.Handle // routeObject: Type and Name; routeList: Type
	snap   format.ID      // routeExtend
}

// errBadPath is wrapped by every parsePath error.
var errBadPath = errors.New("bad path")

// maxPathLen bounds the request path: the longest valid one is an object
// path, well under this.
const maxPathLen = 128

// parsePath parses an API path. It accepts only lowercase letters, digits and
// "/" so that no encoding, dot segment or separator trick reaches the
// backend; handles are then validated by backend.Handle.Validate.
func parsePath(p string) (route, error) {
	if len(p) > maxPathLen {
		return route{}, fmt.Errorf("%w: too long", errBadPath)
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '/') {
			return route{}, fmt.Errorf("%w: character %q not allowed", errBadPath, c)
		}
	}
	rest, ok := strings.CutPrefix(p, "/v1/")
	if !ok {
		return route{}, fmt.Errorf("%w: unknown path", errBadPath)
	}
	switch rest {
	case "whoami":
		return route{kind: routeWhoami}, nil
	case "config":
		return route{kind: routeConfig}, nil
	case "commit":
		return route{kind: routeCommit}, nil
	case "locks":
		return route{kind: routeLocks}, nil
	case "quorum":
		return route{kind: routeQuorum}, nil
	case "certified":
		return route{kind: routeCertified}, nil
	}
	parts := strings.Split(rest, "/")
	switch {
	case len(parts) == 3 && parts[0] == "objects":
		t := backend.Type(parts[1])
		if !t.Valid() {
			return route{}, fmt.Errorf("%w: unknown object type %q", errBadPath, parts[1])
		}
		if parts[2] == "" {
			return route{kind: routeList, handle: backend.Handle{Type: t}}, nil
		}
		h := backend.Handle{Type: t, Name: parts[2]}
		if err := h.Validate(); err != nil {
			return route{}, fmt.Errorf("%w: %v", errBadPath, err)
		}
		return route{kind: routeObject, handle: h}, nil
	case len(parts) == 3 && parts[0] == "locks" && parts[2] == "extend":
		id, err := format.ParseID(parts[1])
		if err != nil {
			return route{}, fmt.Errorf("%w: %v", errBadPath, err)
		}
		return route{kind: routeExtend, snap: id}, nil
	}
	return route{}, fmt.Errorf("%w: unknown path", errBadPath)
}

// errBadRange is wrapped by parseRange errors for malformed headers.
var errBadRange = errors.New("bad range")

// parseRange parses a Range header of the forms "bytes=a-b" and "bytes=a-"
// (one range; suffix and multiple ranges are not supported). It returns the
// offset and length (0: to the end) for Load; ok is false without a header.
func parseRange(s string) (offset, length int64, ok bool, err error) {
	if s == "" {
		return 0, 0, false, nil
	}
	spec, found := strings.CutPrefix(s, "bytes=")
	if !found {
		return 0, 0, false, fmt.Errorf("%w: %q: want bytes=a-b", errBadRange, s)
	}
	a, b, found := strings.Cut(spec, "-")
	if !found || a == "" {
		return 0, 0, false, fmt.Errorf("%w: %q: want bytes=a-b or bytes=a-", errBadRange, s)
	}
	offset, err = parseUint(a)
	if err != nil {
		return 0, 0, false, fmt.Errorf("%w: %q: %v", errBadRange, s, err)
	}
	if b == "" {
		return offset, 0, true, nil
	}
	last, err := parseUint(b)
	if err != nil {
		return 0, 0, false, fmt.Errorf("%w: %q: %v", errBadRange, s, err)
	}
	if last < offset || last == 1<<63-1 {
		return 0, 0, false, fmt.Errorf("%w: %q: end before start", errBadRange, s)
	}
	return offset, last - offset + 1, true, nil
}

// parseUint accepts decimal digits only (no sign, no spaces).
func parseUint(s string) (int64, error) {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("not a number: %q", s)
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

// decodeJSON decodes exactly one JSON value from r into v, refusing unknown
// fields and trailing data.
func decodeJSON(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

// certifiedRequest is the body of POST /v1/certified.
type certifiedRequest struct {
	Action      guard.Action `json:"action"`
	Certificate []byte       `json:"certificate"`
}

// decodeCertified decodes a certified-action request.
func decodeCertified(data []byte) (certifiedRequest, error) {
	var req certifiedRequest
	if err := decodeJSON(bytes.NewReader(data), &req); err != nil {
		return certifiedRequest{}, fmt.Errorf("certified request: %w", err)
	}
	if req.Action.Op == "" || len(req.Certificate) == 0 {
		return certifiedRequest{}, errors.New("certified request: no op or no certificate")
	}
	return req, nil
}

// decodeCommit decodes a commit request with at most maxPacks packs.
func decodeCommit(data []byte, maxPacks int) (format.CommitRequest, error) {
	var req format.CommitRequest
	if err := decodeJSON(bytes.NewReader(data), &req); err != nil {
		return format.CommitRequest{}, fmt.Errorf("commit request: %w", err)
	}
	if len(req.Snapshot) == 0 {
		return format.CommitRequest{}, errors.New("commit request: empty snapshot")
	}
	if len(req.Packs) > maxPacks {
		return format.CommitRequest{}, fmt.Errorf("commit request: %d packs exceeds limit %d", len(req.Packs), maxPacks)
	}
	if req.LockFor < 0 {
		return format.CommitRequest{}, errors.New("commit request: negative lock_for")
	}
	return req, nil
}
