// Package s3 stores a vault in an S3-compatible bucket, locking each object
// with COMPLIANCE-mode Object Lock.
//
// Terms:
//
//   - version: a bucket with Object Lock is versioned, so a key holds a list
//     of versions. A PUT on an existing key adds a version; a DELETE without
//     a version ID adds a delete marker. Neither touches older versions.
//   - retention: a version's COMPLIANCE-mode retain-until date. Until then
//     no account, the bucket's root included, can delete that version or
//     shorten the date; it can only be extended.
//   - the object of a key: its oldest version that is not a delete marker.
//     The vault writes every key once, so the first version is the one the
//     vault wrote; later versions can only come from someone else (an
//     attacker holding the bucket's credentials) and are ignored. A delete
//     marker hides nothing from this package either.
//
// Layout under the prefix: "config", then "<type>/<name>" for every other
// object (packs too: S3 has no folders to fan out).
//
// Costs: Save is one conditional PUT; Load and Stat resolve a key's version once per
// process (cached: objects never change; the first lookup of a type lists
// the whole type, one LIST per 1000 versions) and then cost one GET or none;
// List is one LIST per 1000 versions.
package s3

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/dualkey/dualkey/internal/vault/backend"
)

var (
	// ErrNoObjectLock is returned (wrapped) by Create for a bucket without
	// versioning or without Object Lock, unless Options.NoObjectLock is set.
	ErrNoObjectLock = errors.New("s3: bucket has no Object Lock")
	// ErrRetained is returned (wrapped) by Remove when a version of the
	// object is under retention: no account can delete it before its date.
	ErrRetained = backend.ErrRetained
	// ErrLocation is returned (wrapped) for a repository location that is
	// not s3:http(s)://host[:port]/bucket[/prefix].
	ErrLocation = errors.New("s3: invalid location")
)

// Config says where the vault lives and how to reach it.
type Config struct {
	// Endpoint is host[:port]; Secure selects https.
	Endpoint string
	Secure   bool
	// Bucket and Prefix (no leading or trailing slash; empty for the
	// bucket's root) locate the vault.
	Bucket, Prefix string
	// AccessKey and SecretKey authenticate; SessionToken is optional.
	AccessKey, SecretKey, SessionToken string
	// Region is sent with every request; empty means us-east-1.
	Region string
	// CACert is a PEM file of certificates to trust in addition to the
	// system's, for a server with a self-signed certificate.
	CACert string
	// InsecureTLS skips certificate verification. For tests only.
	InsecureTLS bool
}

// ParseLocation parses "s3:https://host:port/bucket/prefix" (also
// "s3:http://..." for a server on loopback). Credentials are not part of a
// location: see FromEnv.
func ParseLocation(loc string) (Config, error) {
	rest, ok := strings.CutPrefix(loc, "s3:")
	if !ok {
		return Config{}, fmt.Errorf("%w: %q does not start with \"s3:\"", ErrLocation, loc)
	}
	u, err := url.Parse(rest)
	if err != nil {
		return Config{}, fmt.Errorf("%w: %q: %v", ErrLocation, loc, err)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return Config{}, fmt.Errorf("%w: %q: want s3:https://host[:port]/bucket[/prefix]", ErrLocation, loc)
	}
	if u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return Config{}, fmt.Errorf("%w: %q: want s3:https://host[:port]/bucket[/prefix] (credentials come from the environment)", ErrLocation, loc)
	}
	bucket, prefix, _ := strings.Cut(strings.Trim(u.Path, "/"), "/")
	if bucket == "" {
		return Config{}, fmt.Errorf("%w: %q names no bucket", ErrLocation, loc)
	}
	prefix = strings.Trim(prefix, "/")
	if strings.Contains(prefix, "//") {
		return Config{}, fmt.Errorf("%w: %q: empty path element in prefix", ErrLocation, loc)
	}
	return Config{Endpoint: u.Host, Secure: u.Scheme == "https", Bucket: bucket, Prefix: prefix}, nil
}

// FromEnv fills the credentials and region of c from the usual variables:
// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and
// AWS_DEFAULT_REGION (or AWS_REGION). getenv is os.Getenv in production.
func (c *Config) FromEnv(getenv func(string) string) {
	if getenv == nil {
		getenv = os.Getenv
	}
	c.AccessKey = getenv("AWS_ACCESS_KEY_ID")
	c.SecretKey = getenv("AWS_SECRET_ACCESS_KEY")
	c.SessionToken = getenv("AWS_SESSION_TOKEN")
	c.Region = getenv("AWS_DEFAULT_REGION")
	if c.Region == "" {
		c.Region = getenv("AWS_REGION")
	}
}

// Backend is a vault in a bucket. It is safe for concurrent use.
type Backend struct {
	cl     *minio.Client
	core   minio.Core
	bucket string
	prefix string // "" or ending in "/"
	locked bool   // the bucket has Object Lock enabled
	tr     *http.Transport
	now    func() time.Time

	mu       sync.Mutex
	versions map[string]version    // key → the object's version, once found
	listed   map[backend.Type]bool // types fully listed into versions

	listMu sync.Mutex // held while listOnce lists a type
}

// version is the version of a key that this package treats as the object.
type version struct {
	id      string // "" for an unversioned bucket
	size    int64
	modTime time.Time
}

var _ backend.Backend = (*Backend)(nil)

// Options tune Create.
type Options struct {
	// NoObjectLock allows a bucket without versioning and Object Lock. Its
	// objects are then protected only by the vault's rules, not by the
	// storage: whoever holds the bucket's credentials can delete them.
	NoObjectLock bool
}

// Open connects to an existing vault in the bucket. It fails if the bucket
// does not exist, the credentials are refused, or no config object is there
// (wrapping backend.ErrNotExist).
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	b, err := connect(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := b.Stat(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}); err != nil {
		return nil, fmt.Errorf("s3: open %s: no vault config: %w", b.where(), err)
	}
	return b, nil
}

// Create prepares the bucket for a new vault. It refuses a bucket that has
// no versioning or no Object Lock (ErrNoObjectLock) unless
// opts.NoObjectLock, and a location that already holds a vault config
// (wrapping os.ErrExist). The bucket must exist: creating it with Object
// Lock is a decision for whoever owns the account (docs/object-lock.md).
func Create(ctx context.Context, cfg Config, opts Options) (*Backend, error) {
	b, err := connect(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if !b.locked && !opts.NoObjectLock {
		return nil, fmt.Errorf("s3: create %s: %w: create the bucket with versioning and Object Lock (docs/object-lock.md), or pass --no-object-lock to store the vault unprotected by the storage", b.where(), ErrNoObjectLock)
	}
	switch _, err := b.Stat(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}); {
	case err == nil:
		return nil, fmt.Errorf("s3: create %s: already holds a vault config: %w", b.where(), os.ErrExist)
	case !errors.Is(err, backend.ErrNotExist):
		return nil, fmt.Errorf("s3: create %s: %w", b.where(), err)
	}
	return b, nil
}

// connect makes the client and reads the bucket's versioning and Object
// Lock settings, which also proves the endpoint and credentials work.
func connect(ctx context.Context, cfg Config) (*Backend, error) {
	if cfg.Endpoint == "" || cfg.Bucket == "" {
		return nil, fmt.Errorf("%w: endpoint and bucket are required", ErrLocation)
	}
	if cfg.AccessKey == "" || cfg.SecretKey == "" {
		return nil, fmt.Errorf("s3: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
	}
	tr, err := transport(cfg)
	if err != nil {
		return nil, err
	}
	region := cfg.Region
	if region == "" {
		region = "us-east-1"
	}
	cl, err := minio.New(cfg.Endpoint, &minio.Options{
		Creds:        credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, cfg.SessionToken),
		Secure:       cfg.Secure,
		Region:       region,
		Transport:    tr,
		BucketLookup: minio.BucketLookupPath,
		// The vault retries at its own level; a few retries here ride
		// out a dropped connection without hiding an outage for long.
		MaxRetries: 3,
	})
	if err != nil {
		return nil, fmt.Errorf("s3: %s: %w", cfg.Endpoint, err)
	}
	b := &Backend{
		cl:       cl,
		core:     minio.Core{Client: cl},
		bucket:   cfg.Bucket,
		prefix:   cfg.Prefix,
		tr:       tr,
		now:      time.Now,
		versions: make(map[string]version),
		listed:   make(map[backend.Type]bool),
	}
	if b.prefix != "" {
		b.prefix += "/"
	}
	vc, err := cl.GetBucketVersioning(ctx, cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("s3: %s: bucket versioning: %w", b.where(), mapErr(err))
	}
	enabled, _, _, _, err := cl.GetObjectLockConfig(ctx, cfg.Bucket)
	switch {
	case err == nil:
		b.locked = enabled == "Enabled" && vc.Enabled()
	case isCode(err, "ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound", "NoSuchObjectLockConfiguration"):
	default:
		return nil, fmt.Errorf("s3: %s: object lock configuration: %w", b.where(), mapErr(err))
	}
	return b, nil
}

func transport(cfg Config) (*http.Transport, error) {
	tr := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		// Restore reads many ranges in parallel from few packs.
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12},
	}
	if cfg.CACert != "" {
		pem, err := os.ReadFile(cfg.CACert)
		if err != nil {
			return nil, fmt.Errorf("s3: cacert: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("s3: cacert %s: no PEM certificate found", cfg.CACert)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	if cfg.InsecureTLS {
		tr.TLSClientConfig.InsecureSkipVerify = true
	}
	return tr, nil
}

// ObjectLock reports whether the bucket has versioning and Object Lock, so
// that SaveLocked and ExtendRetention set real retention.
func (b *Backend) ObjectLock() bool { return b.locked }

// where returns the s3:... location, for messages (it holds no credentials).
func (b *Backend) where() string {
	scheme := "http"
	if b.cl.EndpointURL().Scheme == "https" {
		scheme = "https"
	}
	return "s3:" + scheme + "://" + b.cl.EndpointURL().Host + "/" + b.bucket + "/" + strings.TrimSuffix(b.prefix, "/")
}

// key returns the object key of h. h must be valid.
func (b *Backend) key(h backend.Handle) string {
	if h.Type == backend.Config {
		return b.prefix + backend.ConfigName
	}
	return b.prefix + string(h.Type) + "/" + h.Name
}

// Save stores data under h; see [backend.Backend]. It is SaveLocked without
// a retention date.
func (b *Backend) Save(ctx context.Context, h backend.Handle, data []byte) error {
	return b.SaveLocked(ctx, h, data, time.Time{})
}

// SaveLocked stores data under h with COMPLIANCE retention until until (none
// if until is zero, not in the future, or the bucket has no Object Lock).
// An existing object with the same bytes makes it succeed, after extending
// that object's retention to until; other bytes fail with
// backend.ErrExists. The PUT carries If-None-Match: *, so it never adds a
// version to an existing key, and a new object costs one request; only
// when the server answers 412 is the existing object read and compared.
// The server must honour If-None-Match (AWS S3 since 2024, MinIO,
// versitygw); on one that ignores it, a second save of a key adds a second
// version, which readers ignore, and a save of other bytes is not refused.
func (b *Backend) SaveLocked(ctx context.Context, h backend.Handle, data []byte, until time.Time) error {
	if err := h.Validate(); err != nil {
		return fmt.Errorf("s3: save: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("s3: save %s: %w", h, err)
	}
	if err := b.save(ctx, h, data, until); err != nil {
		return fmt.Errorf("s3: save %s: %w", h, err)
	}
	return nil
}

func (b *Backend) save(ctx context.Context, h backend.Handle, data []byte, until time.Time) error {
	key := b.key(h)
	opts := minio.PutObjectOptions{
		ContentType: "application/octet-stream",
		// One PUT per object: packs are at most tens of MiB.
		DisableMultipart: true,
		// Object Lock PUTs need an integrity header; MD5 is the one every
		// S3 implementation accepts.
		SendContentMd5: true,
	}
	if b.locked && until.After(b.now()) {
		opts.Mode = minio.Compliance
		opts.RetainUntilDate = retainDate(until)
	}
	uncond := opts
	opts.SetMatchETagExcept("*")
	_, err := b.cl.PutObject(ctx, b.bucket, key, bytes.NewReader(data), int64(len(data)), opts)
	if err != nil {
		if !isCode(err, "PreconditionFailed") && statusCode(err) != http.StatusPreconditionFailed {
			return mapErr(err)
		}
		// The key exists: a retry, or a concurrent Save of h that won.
		switch err := b.sameContent(ctx, key, data); {
		case err == nil:
			_, err := b.extend(ctx, key, until)
			return err
		case !errors.Is(err, backend.ErrNotExist):
			return err
		}
		// No version exists, yet the server says the key does: versitygw
		// 1.8 answers so for a key whose versions were all removed (and
		// while a racing PUT is still being written). Write unconditionally,
		// then check which version is the oldest, the one readers take: if
		// a racer's is, with other bytes, this Save lost.
		if _, err := b.cl.PutObject(ctx, b.bucket, key, bytes.NewReader(data), int64(len(data)), uncond); err != nil {
			return mapErr(err)
		}
		b.mu.Lock()
		delete(b.versions, key)
		b.mu.Unlock()
		if err := b.sameContent(ctx, key, data); err != nil {
			return err
		}
	}
	// The new version is not cached: its modification time (which the
	// vault's WAL rule counts from) is the server's, read by the next Stat.
	return nil
}

// retainDate rounds t up to a whole second: S3 keeps retention dates to the
// second, and rounding down could end a lock before the vault's own.
func retainDate(t time.Time) time.Time {
	t = t.UTC()
	if r := t.Truncate(time.Second); !r.Equal(t) {
		return r.Add(time.Second)
	}
	return t
}

// sameContent returns nil if the object under key holds exactly data, an
// error wrapping backend.ErrExists if it holds something else, and one
// wrapping backend.ErrNotExist if there is none.
func (b *Backend) sameContent(ctx context.Context, key string, data []byte) error {
	v, err := b.resolve(ctx, key)
	if err != nil {
		return err
	}
	if v.size != int64(len(data)) {
		return backend.ErrExists
	}
	got, err := b.get(ctx, key, v, 0, 0)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, data) {
		return backend.ErrExists
	}
	return nil
}

// resolve returns the version of key that is the object: the oldest that
// is not a delete marker. Found versions are cached; a missing key is not.
func (b *Backend) resolve(ctx context.Context, key string) (version, error) {
	b.mu.Lock()
	v, ok := b.versions[key]
	b.mu.Unlock()
	if ok {
		return v, nil
	}
	found := false
	for obj := range b.cl.ListObjectsIter(ctx, b.bucket, minio.ListObjectsOptions{Prefix: key, WithVersions: b.locked, Recursive: true}) {
		if obj.Err != nil {
			return version{}, mapErr(obj.Err)
		}
		if obj.Key != key || obj.IsDeleteMarker {
			continue
		}
		// Versions of a key are listed newest first: the last one wins.
		v, found = version{id: obj.VersionID, size: obj.Size, modTime: obj.LastModified}, true
	}
	if err := ctx.Err(); err != nil {
		return version{}, err
	}
	if !found {
		return version{}, backend.ErrNotExist
	}
	b.mu.Lock()
	b.versions[key] = v
	b.mu.Unlock()
	return v, nil
}

// resolveHandle is resolve for h's key, after listing h's whole type once
// per process: a restore or a commit touching hundreds of packs then costs
// one LIST per 1000 objects instead of one per object. A key not in that
// listing (written since) is still looked up on its own.
func (b *Backend) resolveHandle(ctx context.Context, h backend.Handle) (string, version, error) {
	key := b.key(h)
	b.mu.Lock()
	v, ok := b.versions[key]
	b.mu.Unlock()
	if ok {
		return key, v, nil
	}
	if h.Type != backend.Config {
		if err := b.listOnce(ctx, h.Type); err != nil {
			return key, version{}, err
		}
	}
	v, err := b.resolve(ctx, key)
	return key, v, err
}

// listOnce lists type t into the version cache unless done before.
func (b *Backend) listOnce(ctx context.Context, t backend.Type) error {
	b.listMu.Lock()
	defer b.listMu.Unlock()
	b.mu.Lock()
	done := b.listed[t]
	b.mu.Unlock()
	if done {
		return nil
	}
	return b.List(ctx, t, func(backend.Info) error { return nil })
}

// get reads [offset, offset+length) of version v of key; length 0 means to
// the end.
func (b *Backend) get(ctx context.Context, key string, v version, offset, length int64) ([]byte, error) {
	if offset > v.size || length > v.size-offset {
		return nil, fmt.Errorf("range [%d, %d) beyond object size %d", offset, offset+length, v.size)
	}
	if length == 0 {
		length = v.size - offset
	}
	if length == 0 {
		return []byte{}, nil
	}
	opts := minio.GetObjectOptions{VersionID: v.id}
	if err := opts.SetRange(offset, offset+length-1); err != nil {
		return nil, err
	}
	rc, _, _, err := b.core.GetObject(ctx, b.bucket, key, opts)
	if err != nil {
		return nil, mapErr(err)
	}
	defer rc.Close()
	// length is at most the size of an object that exists, so the
	// allocation is bounded by what the vault wrote.
	buf := make([]byte, length)
	if _, err := io.ReadFull(rc, buf); err != nil {
		return nil, fmt.Errorf("read: %w", mapErr(err))
	}
	return buf, nil
}

// Load returns length bytes of h from offset; see [backend.Backend]. It
// reads the object's first version, whatever was written over it later.
func (b *Backend) Load(ctx context.Context, h backend.Handle, offset, length int64) ([]byte, error) {
	if err := h.Validate(); err != nil {
		return nil, fmt.Errorf("s3: load: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("s3: load %s: %w", h, err)
	}
	if offset < 0 || length < 0 {
		return nil, fmt.Errorf("s3: load %s: invalid range: offset %d, length %d", h, offset, length)
	}
	key, v, err := b.resolveHandle(ctx, h)
	if err != nil {
		return nil, fmt.Errorf("s3: load %s: %w", h, err)
	}
	data, err := b.get(ctx, key, v, offset, length)
	if errors.Is(err, backend.ErrNotExist) {
		// Removed by another process since this one cached it, and
		// perhaps written again: look again.
		b.mu.Lock()
		delete(b.versions, key)
		b.mu.Unlock()
		if v, err = b.resolve(ctx, key); err == nil {
			data, err = b.get(ctx, key, v, offset, length)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("s3: load %s: %w", h, err)
	}
	return data, nil
}

// Stat describes h; see [backend.Backend]. ModTime is when the server
// stored the object's first version, on the server's clock.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	if err := h.Validate(); err != nil {
		return backend.Info{}, fmt.Errorf("s3: stat: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return backend.Info{}, fmt.Errorf("s3: stat %s: %w", h, err)
	}
	v, err := b.stat(ctx, h)
	if err != nil {
		return backend.Info{}, fmt.Errorf("s3: stat %s: %w", h, err)
	}
	return backend.Info{Handle: h, Size: v.size, ModTime: v.modTime}, nil
}

// stat finds h's version and checks with a HEAD that it is still there:
// the vault relies on Stat to know an object exists now (a commit checks
// its packs), and another process may have removed it since this one
// cached it.
func (b *Backend) stat(ctx context.Context, h backend.Handle) (version, error) {
	key, v, err := b.resolveHandle(ctx, h)
	if err != nil {
		return version{}, err
	}
	_, err = b.cl.StatObject(ctx, b.bucket, key, minio.StatObjectOptions{VersionID: v.id})
	if err == nil {
		return v, nil
	}
	if !errors.Is(mapErr(err), backend.ErrNotExist) {
		return version{}, mapErr(err)
	}
	b.mu.Lock()
	delete(b.versions, key)
	b.mu.Unlock()
	return b.resolve(ctx, key) // removed, or removed and written again
}

// List calls fn for each object of type t; see [backend.Backend]. Keys whose
// names are not valid handles of t are skipped, and so are keys holding only
// delete markers. fn's error is returned unwrapped.
func (b *Backend) List(ctx context.Context, t backend.Type, fn func(backend.Info) error) error {
	if !t.Valid() {
		return fmt.Errorf("s3: list: invalid type %q", t)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("s3: list %s: %w", t, err)
	}
	prefix := b.prefix + string(t) + "/"
	if t == backend.Config {
		prefix = b.prefix + backend.ConfigName
	}
	// Versions of one key arrive together, newest first; an entry is
	// emitted once the listing moves past its key.
	var (
		curKey string
		cur    *version
	)
	flush := func() error {
		if cur == nil {
			return nil
		}
		v := *cur
		cur = nil
		name := strings.TrimPrefix(curKey, prefix)
		if t == backend.Config {
			name = backend.ConfigName
		}
		h := backend.Handle{Type: t, Name: name}
		if h.Validate() != nil {
			return nil
		}
		b.mu.Lock()
		if _, ok := b.versions[curKey]; !ok {
			b.versions[curKey] = v
		}
		b.mu.Unlock()
		return fn(backend.Info{Handle: h, Size: v.size, ModTime: v.modTime})
	}
	for obj := range b.cl.ListObjectsIter(ctx, b.bucket, minio.ListObjectsOptions{Prefix: prefix, WithVersions: b.locked, Recursive: true}) {
		if obj.Err != nil {
			return fmt.Errorf("s3: list %s: %w", t, mapErr(obj.Err))
		}
		if t == backend.Config && obj.Key != prefix {
			continue
		}
		if obj.Key != curKey {
			if err := flush(); err != nil {
				return err
			}
			curKey = obj.Key
		}
		if !obj.IsDeleteMarker {
			cur = &version{id: obj.VersionID, size: obj.Size, modTime: obj.LastModified}
		}
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("s3: list %s: %w", t, err)
	}
	if err := flush(); err != nil {
		return err
	}
	b.mu.Lock()
	b.listed[t] = true
	b.mu.Unlock()
	return nil
}

// Remove deletes every version of h, delete markers included; see
// [backend.Backend]. If any version is under retention it deletes nothing
// and returns an error wrapping ErrRetained.
func (b *Backend) Remove(ctx context.Context, h backend.Handle) error {
	if err := h.Validate(); err != nil {
		return fmt.Errorf("s3: remove: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("s3: remove %s: %w", h, err)
	}
	if err := b.remove(ctx, b.key(h)); err != nil {
		return fmt.Errorf("s3: remove %s: %w", h, err)
	}
	return nil
}

func (b *Backend) remove(ctx context.Context, key string) error {
	type ver struct {
		id     string
		marker bool
	}
	var vs []ver
	objects := 0
	for obj := range b.cl.ListObjectsIter(ctx, b.bucket, minio.ListObjectsOptions{Prefix: key, WithVersions: b.locked, Recursive: true}) {
		if obj.Err != nil {
			return mapErr(obj.Err)
		}
		if obj.Key != key {
			continue
		}
		vs = append(vs, ver{obj.VersionID, obj.IsDeleteMarker})
		if !obj.IsDeleteMarker {
			objects++
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if objects == 0 {
		return backend.ErrNotExist
	}
	if b.locked {
		now := b.now()
		for _, v := range vs {
			if v.marker {
				continue
			}
			until, err := b.retention(ctx, key, v.id)
			if err != nil {
				return err
			}
			if until.After(now) {
				return fmt.Errorf("%w until %s", ErrRetained, until.Format(time.RFC3339))
			}
		}
	}
	// Oldest last, so that an interruption leaves the vault's own version
	// (the oldest) for the next try rather than a newer one.
	for _, v := range vs {
		err := b.cl.RemoveObject(ctx, b.bucket, key, minio.RemoveObjectOptions{VersionID: v.id})
		if err != nil && !isCode(err, "NoSuchKey", "NoSuchVersion") {
			if isCode(err, "AccessDenied", "ObjectLocked") {
				return fmt.Errorf("%w: %w", ErrRetained, mapErr(err))
			}
			return mapErr(err)
		}
	}
	b.mu.Lock()
	delete(b.versions, key)
	b.mu.Unlock()
	return nil
}

// Retention returns the retain-until date of h's object (zero if it has
// none, or the bucket has no Object Lock).
func (b *Backend) Retention(ctx context.Context, h backend.Handle) (time.Time, error) {
	if err := h.Validate(); err != nil {
		return time.Time{}, fmt.Errorf("s3: retention: %w", err)
	}
	if !b.locked {
		return time.Time{}, nil
	}
	key := b.key(h)
	v, err := b.resolve(ctx, key)
	if err != nil {
		return time.Time{}, fmt.Errorf("s3: retention %s: %w", h, err)
	}
	t, err := b.retention(ctx, key, v.id)
	if err != nil {
		return time.Time{}, fmt.Errorf("s3: retention %s: %w", h, err)
	}
	return t, nil
}

// retention reads a version's retain-until date from the headers of a HEAD
// request (x-amz-object-lock-retain-until-date), which AWS and every
// compatible server send; versitygw 1.8 answers GetObjectRetention with an
// XML element name the AWS schema does not have.
func (b *Backend) retention(ctx context.Context, key, id string) (time.Time, error) {
	info, err := b.cl.StatObject(ctx, b.bucket, key, minio.StatObjectOptions{VersionID: id})
	if err != nil {
		return time.Time{}, mapErr(err)
	}
	v := info.Metadata.Get("X-Amz-Object-Lock-Retain-Until-Date")
	if v == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return time.Time{}, fmt.Errorf("retain-until date %q: %w", v, err)
	}
	return t.UTC(), nil
}

// ExtendRetention makes h's object retained in COMPLIANCE mode until at
// least until, and returns its retain-until date afterwards and whether it
// had to change it. A later date already set is kept: retention is never
// shortened (S3 would refuse anyway). Without Object Lock it does nothing
// and returns the zero time. Cost: one HEAD, and one PUT if extended.
func (b *Backend) ExtendRetention(ctx context.Context, h backend.Handle, until time.Time) (time.Time, bool, error) {
	if err := h.Validate(); err != nil {
		return time.Time{}, false, fmt.Errorf("s3: extend retention: %w", err)
	}
	t, err := b.extend(ctx, b.key(h), until)
	if err != nil {
		return time.Time{}, false, fmt.Errorf("s3: extend retention of %s: %w", h, err)
	}
	return t.until, t.changed, nil
}

type extended struct {
	until   time.Time
	changed bool
}

func (b *Backend) extend(ctx context.Context, key string, until time.Time) (extended, error) {
	if !b.locked || until.IsZero() {
		return extended{}, nil
	}
	v, err := b.resolve(ctx, key)
	if err != nil {
		return extended{}, err
	}
	cur, err := b.retention(ctx, key, v.id)
	if err != nil {
		return extended{}, err
	}
	want := retainDate(until)
	if !cur.Before(want) || !want.After(b.now()) {
		return extended{until: cur}, nil
	}
	mode := minio.Compliance
	err = b.cl.PutObjectRetention(ctx, b.bucket, key, minio.PutObjectRetentionOptions{
		Mode:            &mode,
		RetainUntilDate: &want,
		VersionID:       v.id,
	})
	if err != nil {
		return extended{until: cur}, mapErr(err)
	}
	return extended{until: want, changed: true}, nil
}

// Close releases idle connections.
func (b *Backend) Close() error {
	b.tr.CloseIdleConnections()
	return nil
}

// isCode reports whether err is an S3 error response with one of codes.
func isCode(err error, codes ...string) bool {
	var er minio.ErrorResponse
	if !errors.As(err, &er) {
		return false
	}
	for _, c := range codes {
		if er.Code == c {
			return true
		}
	}
	return false
}

func statusCode(err error) int {
	var er minio.ErrorResponse
	if errors.As(err, &er) {
		return er.StatusCode
	}
	return 0
}

// mapErr maps a missing key to backend.ErrNotExist and explains the errors
// a user can act on.
func mapErr(err error) error {
	var er minio.ErrorResponse
	if !errors.As(err, &er) {
		return err
	}
	switch er.Code {
	case "NoSuchKey", "NoSuchVersion":
		return fmt.Errorf("%w (%s)", backend.ErrNotExist, er.Code)
	case "NoSuchBucket":
		return fmt.Errorf("bucket %q does not exist: %w", er.BucketName, err)
	case "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidSecurity", "ExpiredToken", "XAdminUserNotFound":
		return fmt.Errorf("credentials refused (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): %w", err)
	}
	return err
}
