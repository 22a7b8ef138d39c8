package s3test

import (
	"context"
	"strings"
	"testing"
)

func TestBinNamedButMissing(t *testing.T) {
	t.Setenv("DUALKEY_VERSITYGW", "/nonexistent/versitygw")
	_, err := Bin()
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/versitygw") {
		t.Fatalf("Bin() error = %v, want one naming the missing binary", err)
	}
}

// TestServer: the shared server answers with root credentials, makes
// buckets with and without Object Lock, and is the same for every caller.
func TestServer(t *testing.T) {
	s := Start(t)
	if s2 := Start(t); s2 != s {
		t.Error("Start returned a second server in one test binary")
	}
	cl, err := s.Client()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, opts := range []BucketOptions{{}, {NoObjectLock: true}} {
		cfg := s.NewBucket(t, opts)
		enabled, _, _, _, err := cl.GetObjectLockConfig(ctx, cfg.Bucket)
		if locked := err == nil && enabled == "Enabled"; locked == opts.NoObjectLock {
			t.Errorf("bucket %s (%+v): object lock %q, %v", cfg.Bucket, opts, enabled, err)
		}
		if loc := Location(cfg); !strings.HasPrefix(loc, "s3:http://"+s.Endpoint+"/"+cfg.Bucket) {
			t.Errorf("Location = %q", loc)
		}
	}
}
