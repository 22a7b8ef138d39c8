package s3_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/dualkey/dualkey/internal/s3test"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/backendtest"
	"github.com/dualkey/dualkey/internal/vault/backend/s3"
	"github.com/dualkey/dualkey/internal/vault/format"
)

func TestConformance(t *testing.T) {
	srv := s3test.Start(t)
	for _, tt := range []struct {
		name string
		opts s3test.BucketOptions
	}{
		{"object-lock", s3test.BucketOptions{}},
		{"no-object-lock", s3test.BucketOptions{NoObjectLock: true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			backendtest.Run(t, func(t *testing.T) backend.Backend {
				cfg := srv.NewBucket(t, tt.opts)
				be, err := s3.Create(context.Background(), cfg, s3.Options{NoObjectLock: tt.opts.NoObjectLock})
				if err != nil {
					t.Fatal(err)
				}
				if got, want := be.ObjectLock(), !tt.opts.NoObjectLock; got != want {
					t.Fatalf("ObjectLock() = %v, want %v", got, want)
				}
				return be
			})
		})
	}
}

func TestParseLocation(t *testing.T) {
	tests := []struct {
		loc     string
		want    s3.Config
		wantErr bool
	}{
		{"s3:https://s3.example.com/bkt/a/b", s3.Config{Endpoint: "s3.example.com", Secure: true, Bucket: "bkt", Prefix: "a/b"}, false},
		{"s3:http://127.0.0.1:9000/bkt", s3.Config{Endpoint: "127.0.0.1:9000", Bucket: "bkt"}, false},
		{"s3:https://host:443/bkt/p/", s3.Config{Endpoint: "host:443", Secure: true, Bucket: "bkt", Prefix: "p"}, false},
		{"s3:https://host", s3.Config{}, true},
		{"s3:ftp://host/bkt", s3.Config{}, true},
		{"s3:https://key:secret@host/bkt", s3.Config{}, true},
		{"https://host/bkt", s3.Config{}, true},
		{"s3:https://host/bkt/a//b", s3.Config{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.loc, func(t *testing.T) {
			got, err := s3.ParseLocation(tt.loc)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseLocation(%q) error = %v, want error %v", tt.loc, err, tt.wantErr)
			}
			if err != nil {
				if !errors.Is(err, s3.ErrLocation) {
					t.Errorf("error %v does not wrap ErrLocation", err)
				}
				return
			}
			if got != tt.want {
				t.Errorf("ParseLocation(%q) = %+v, want %+v", tt.loc, got, tt.want)
			}
		})
	}
}

func TestFromEnv(t *testing.T) {
	env := map[string]string{"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk", "AWS_REGION": "eu-west-1"}
	var c s3.Config
	c.FromEnv(func(k string) string { return env[k] })
	if c.AccessKey != "ak" || c.SecretKey != "sk" || c.Region != "eu-west-1" {
		t.Errorf("FromEnv = %+v", c)
	}
}

// TestRefusals: each way of pointing the vault at the wrong place fails
// with an error that says what is wrong.
func TestRefusals(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	locked := srv.NewBucket(t, s3test.BucketOptions{})
	plain := srv.NewBucket(t, s3test.BucketOptions{NoObjectLock: true})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := ln.Addr().String()
	ln.Close()

	with := func(c s3.Config, f func(*s3.Config)) s3.Config { f(&c); return c }
	tests := []struct {
		name   string
		create bool
		cfg    s3.Config
		is     error  // the error must wrap this, if set
		substr string // and contain this
	}{
		{"bucket without object lock", true, plain, s3.ErrNoObjectLock, "--no-object-lock"},
		{"wrong secret", true, with(locked, func(c *s3.Config) { c.SecretKey = "wrong" }), nil, "credentials refused"},
		{"unknown access key", true, with(locked, func(c *s3.Config) { c.AccessKey = "nobody" }), nil, "credentials refused"},
		{"no credentials", true, with(locked, func(c *s3.Config) { c.AccessKey, c.SecretKey = "", "" }), nil, "AWS_ACCESS_KEY_ID"},
		{"unreachable endpoint", true, with(locked, func(c *s3.Config) { c.Endpoint = closedAddr }), nil, "connection refused"},
		{"missing bucket", true, with(locked, func(c *s3.Config) { c.Bucket = "no-such-bucket-here" }), nil, "does not exist"},
		{"open without a vault", false, locked, backend.ErrNotExist, "no vault config"},
		{"cacert file missing", true, with(locked, func(c *s3.Config) { c.CACert = "/nonexistent/ca.pem" }), nil, "cacert"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			var err error
			if tt.create {
				_, err = s3.Create(ctx, tt.cfg, s3.Options{})
			} else {
				_, err = s3.Open(ctx, tt.cfg)
			}
			if err == nil {
				t.Fatal("no error")
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("error %v does not wrap %v", err, tt.is)
			}
			if !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q does not contain %q", err, tt.substr)
			}
		})
	}

	// A server with a self-signed certificate: refused until its
	// certificate is trusted (CACert), or verification is skipped.
	tlsSrv := s3test.StartTLS(t)
	tlsCfg := tlsSrv.NewBucket(t, s3test.BucketOptions{})
	tlsCases := []struct {
		name    string
		f       func(*s3.Config)
		wantErr string
	}{
		{"untrusted certificate", func(*s3.Config) {}, "certificate"},
		{"cacert", func(c *s3.Config) { c.CACert = tlsSrv.CACert }, ""},
		{"insecure", func(c *s3.Config) { c.InsecureTLS = true }, ""},
		{"cacert not a certificate", func(c *s3.Config) { c.CACert = tlsSrv.Dir + "/versitygw.log" }, "no PEM certificate"},
	}
	for _, tt := range tlsCases {
		t.Run("tls/"+tt.name, func(t *testing.T) {
			c := tlsCfg
			tt.f(&c)
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			be, err := s3.Create(ctx, c, s3.Options{})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Create: %v", err)
			case tt.wantErr == "":
				be.Close()
			case err == nil || !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("Create error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}

	// The same plain bucket is accepted when the user says so.
	be, err := s3.Create(ctx, plain, s3.Options{NoObjectLock: true})
	if err != nil {
		t.Fatalf("Create with NoObjectLock: %v", err)
	}
	if be.ObjectLock() {
		t.Error("ObjectLock() = true on a bucket without Object Lock")
	}
	// And a location with a vault is not initialised twice.
	if err := be.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if _, err := s3.Create(ctx, plain, s3.Options{NoObjectLock: true}); !errors.Is(err, os.ErrExist) {
		t.Errorf("Create over an existing vault: %v, want os.ErrExist", err)
	}
}

// TestLockedObjectsSurviveRoot proves, with the server's root credentials,
// that an object saved with retention can be neither deleted nor
// overwritten before its date: not by deleting its version, not with the
// governance-bypass header, not by shortening or downgrading its
// retention, not by a bulk delete. A new version written over it or a
// delete marker is ignored by the backend, which still reads the
// original.
func TestLockedObjectsSurviveRoot(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	cfg := srv.NewBucket(t, s3test.BucketOptions{})
	be, err := s3.Create(ctx, cfg, s3.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	// Open needs a config object to call the location a vault.
	if err := be.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	root, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	until := time.Now().Add(time.Hour)

	// Nor can root turn the bucket's protection off.
	if err := root.SuspendVersioning(ctx, cfg.Bucket); err == nil {
		t.Error("root suspended versioning on an Object Lock bucket")
	}
	if enabled, _, _, _, err := root.GetObjectLockConfig(ctx, cfg.Bucket); err != nil || enabled != "Enabled" {
		t.Errorf("object lock configuration after the attempt: %q, %v", enabled, err)
	}

	for _, typ := range []backend.Type{backend.Pack, backend.Index, backend.Snapshot, backend.Ledger, backend.Lock, backend.Key, backend.WAL} {
		t.Run(string(typ), func(t *testing.T) {
			data := []byte("precious " + string(typ) + " " + time.Now().String())
			h := backend.Handle{Type: typ, Name: format.Hash(data).String()}
			if err := be.SaveLocked(ctx, h, data, until); err != nil {
				t.Fatal(err)
			}
			key := cfg.Prefix + "/" + string(typ) + "/" + h.Name
			info, err := root.StatObject(ctx, cfg.Bucket, key, minio.StatObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			vid := info.VersionID
			mode := info.Metadata.Get("X-Amz-Object-Lock-Mode")
			ret, err := time.Parse(time.RFC3339, info.Metadata.Get("X-Amz-Object-Lock-Retain-Until-Date"))
			if mode != "COMPLIANCE" || err != nil || ret.Before(until.Add(-time.Second)) {
				t.Fatalf("retention = %q %v (%v), want COMPLIANCE until %v", mode, ret, err, until)
			}

			attacks := []struct {
				name string
				run  func() error
			}{
				{"delete the version", func() error {
					return root.RemoveObject(ctx, cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: vid})
				}},
				{"delete the version bypassing governance", func() error {
					return root.RemoveObject(ctx, cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: vid, GovernanceBypass: true})
				}},
				{"bulk delete the version", func() error {
					ch := make(chan minio.ObjectInfo, 1)
					ch <- minio.ObjectInfo{Key: key, VersionID: vid}
					close(ch)
					for e := range root.RemoveObjects(ctx, cfg.Bucket, ch, minio.RemoveObjectsOptions{GovernanceBypass: true}) {
						return e.Err
					}
					return nil
				}},
				{"shorten the retention", func() error {
					m, d := minio.Compliance, time.Now().Add(time.Minute)
					return root.PutObjectRetention(ctx, cfg.Bucket, key, minio.PutObjectRetentionOptions{Mode: &m, RetainUntilDate: &d, VersionID: vid, GovernanceBypass: true})
				}},
				{"downgrade to governance", func() error {
					m, d := minio.Governance, until.Add(time.Hour)
					return root.PutObjectRetention(ctx, cfg.Bucket, key, minio.PutObjectRetentionOptions{Mode: &m, RetainUntilDate: &d, VersionID: vid, GovernanceBypass: true})
				}},
			}
			for _, a := range attacks {
				if err := a.run(); err == nil {
					t.Errorf("%s: the server allowed it", a.name)
				}
			}

			// Writing over the key and hiding it behind a delete marker
			// succeed at the S3 level, and change nothing the vault reads.
			if _, err := root.PutObject(ctx, cfg.Bucket, key, bytes.NewReader([]byte("junk")), 4, minio.PutObjectOptions{}); err != nil {
				t.Fatalf("put over: %v", err)
			}
			if err := root.RemoveObject(ctx, cfg.Bucket, key, minio.RemoveObjectOptions{}); err != nil {
				t.Fatalf("delete marker: %v", err)
			}
			// A new process reads the object afresh.
			be2, err := s3.Open(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer be2.Close()
			got, err := be2.Load(ctx, h, 0, 0)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("Load after attacks = %q, %v; want the original", got, err)
			}
			found := false
			if err := be2.List(ctx, typ, func(fi backend.Info) error {
				found = found || fi.Name == h.Name
				return nil
			}); err != nil || !found {
				t.Fatalf("List after attacks: found %v, err %v", found, err)
			}
			orig, err := root.GetObject(ctx, cfg.Bucket, key, minio.GetObjectOptions{VersionID: vid})
			if err != nil {
				t.Fatal(err)
			}
			b, err := readAll(orig)
			if err != nil || !bytes.Equal(b, data) {
				t.Fatalf("the original version = %q, %v", b, err)
			}
			// The vault's own Remove refuses, naming the retention.
			if err := be2.Remove(ctx, h); !errors.Is(err, backend.ErrRetained) {
				t.Fatalf("Remove of a retained object: %v, want ErrRetained", err)
			}
		})
	}
}

func readAll(o *minio.Object) ([]byte, error) {
	defer o.Close()
	var buf bytes.Buffer
	_, err := buf.ReadFrom(o)
	return buf.Bytes(), err
}

// TestRetention: retention only ever moves later, and an object whose
// date has passed can be removed.
func TestRetention(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	cfg := srv.NewBucket(t, s3test.BucketOptions{})
	be, err := s3.Create(ctx, cfg, s3.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	data := []byte("short-lived")
	h := backend.Handle{Type: backend.Pack, Name: format.Hash(data).String()}
	soon := time.Now().Add(3 * time.Second).Truncate(time.Second)
	if err := be.SaveLocked(ctx, h, data, soon); err != nil {
		t.Fatal(err)
	}
	if got, err := be.Retention(ctx, h); err != nil || !got.Equal(soon.UTC()) {
		t.Fatalf("Retention = %v, %v; want %v", got, err, soon)
	}
	// An earlier date is not applied.
	if got, changed, err := be.ExtendRetention(ctx, h, soon.Add(-time.Second)); err != nil || changed || !got.Equal(soon.UTC()) {
		t.Fatalf("ExtendRetention(earlier) = %v, %v, %v; want %v kept", got, changed, err, soon)
	}
	// A save of the same bytes with a later date extends.
	later := soon.Add(time.Second)
	if err := be.SaveLocked(ctx, h, data, later); err != nil {
		t.Fatal(err)
	}
	if got, err := be.Retention(ctx, h); err != nil || !got.Equal(later.UTC()) {
		t.Fatalf("Retention after resave = %v, %v; want %v", got, err, later)
	}
	if err := be.Remove(ctx, h); !errors.Is(err, backend.ErrRetained) {
		t.Fatalf("Remove before the date: %v, want ErrRetained", err)
	}
	// Wait for the date on the server's clock (the same host's), then the
	// object goes, every version.
	for {
		err := be.Remove(ctx, h)
		if err == nil {
			break
		}
		if !errors.Is(err, backend.ErrRetained) {
			t.Fatal(err)
		}
		if time.Now().After(later.Add(30 * time.Second)) {
			t.Fatalf("still retained 30 s after its date: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, err := be.Stat(ctx, h); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("Stat after Remove: %v, want ErrNotExist", err)
	}
}

// TestTwoProcesses: a backend caches which version is each object; another
// process removing the object, and writing the name again, is noticed by
// Stat and Load.
func TestTwoProcesses(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	cfg := srv.NewBucket(t, s3test.BucketOptions{})
	a, err := s3.Create(ctx, cfg, s3.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	b, err := s3.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	h := backend.Handle{Type: backend.Index, Name: strings.Repeat("ab", 32)}
	if err := a.Save(ctx, h, []byte("first")); err != nil {
		t.Fatal(err)
	}
	if got, err := b.Load(ctx, h, 0, 0); err != nil || string(got) != "first" {
		t.Fatalf("b.Load = %q, %v", got, err)
	}
	if err := a.Remove(ctx, h); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stat(ctx, h); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("b.Stat after a.Remove: %v, want ErrNotExist", err)
	}
	if _, err := b.Load(ctx, h, 0, 0); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("b.Load after a.Remove: %v, want ErrNotExist", err)
	}
	if err := a.Save(ctx, h, []byte("second")); err != nil {
		t.Fatal(err)
	}
	if got, err := b.Load(ctx, h, 0, 0); err != nil || string(got) != "second" {
		t.Fatalf("b.Load after the name was written again = %q, %v", got, err)
	}
	if fi, err := b.Stat(ctx, h); err != nil || fi.Size != int64(len("second")) {
		t.Fatalf("b.Stat after the name was written again = %+v, %v", fi, err)
	}
}
