package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/s3"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// openS3 connects to the vault in an S3 bucket at loc
// ("s3:https://host[:port]/bucket[/prefix]"). Credentials come from
// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), the
// region from AWS_DEFAULT_REGION or AWS_REGION; DUALKEY_S3_CACERT names a
// PEM file of extra certificates to trust (a self-signed test server), and
// DUALKEY_S3_INSECURE_TLS=1 skips verification altogether (tests only).
func (a *app) openS3(ctx context.Context, loc string, create bool, opts storeOptions) (*s3.Backend, error) {
	cfg, err := s3.ParseLocation(loc)
	if err != nil {
		return nil, usagef("--repo: %v", err)
	}
	cfg.FromEnv(a.getenv)
	cfg.CACert = a.getenv("DUALKEY_S3_CACERT")
	cfg.InsecureTLS = a.getenv("DUALKEY_S3_INSECURE_TLS") == "1"
	if create {
		be, err := s3.Create(ctx, cfg, s3.Options{NoObjectLock: opts.noObjectLock})
		if err != nil {
			if errors.Is(err, s3.ErrNoObjectLock) {
				return nil, usagef("%v", err)
			}
			return nil, fmt.Errorf("dualkey: %w", err)
		}
		if !be.ObjectLock() {
			fmt.Fprintln(a.stderr, "warning: this bucket has no Object Lock: whoever holds its credentials can delete the backups")
		}
		return be, nil
	}
	be, err := s3.Open(ctx, cfg)
	if errors.Is(err, backend.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s: %w", repo.ErrNoRepository, loc, err)
	}
	if err != nil {
		return nil, fmt.Errorf("dualkey: %w", err)
	}
	return be, nil
}
