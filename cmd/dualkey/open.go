package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// vaultStore is what commands need from a vault beyond repo.Store.
type vaultStore interface {
	repo.Store
}

// storeOptions are what only 'vault init' sets.
type storeOptions struct {
	// noObjectLock accepts an S3 bucket without versioning and Object Lock.
	noObjectLock bool
}

// openStore connects to the vault at the repository location: a directory
// is opened in-process behind the same guard the server uses, with admin
// rights (whoever can write the directory could delete it anyway); so is an
// S3 bucket ("s3:https://host/bucket/prefix", see s3store.go), whose Object
// Lock no credential can lift; a URL reaches a vault server, whose token
// decides what is allowed.
func (a *app) openStore(ctx context.Context, create bool) (vaultStore, error) {
	return a.openStoreWith(ctx, create, storeOptions{})
}

func (a *app) openStoreWith(ctx context.Context, create bool, opts storeOptions) (vaultStore, error) {
	loc, err := a.repoLocation()
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(loc, "https://") || strings.HasPrefix(loc, "http://") {
		return a.openRemote(ctx, loc)
	}
	if strings.HasPrefix(loc, "s3:") {
		be, err := a.openS3(ctx, loc, create, opts)
		if err != nil {
			return nil, err
		}
		return guard.New(be, guard.Options{}).Session(guard.Admin), nil
	}
	dir := strings.TrimPrefix(loc, "local:")
	var be *local.Backend
	if create {
		if err := os.MkdirAll(filepath.Dir(filepath.Clean(dir)), 0o700); err != nil {
			return nil, fmt.Errorf("dualkey: %w", err)
		}
		be, err = local.Create(ctx, dir)
	} else {
		if _, serr := os.Stat(filepath.Join(dir, "config")); errors.Is(serr, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", repo.ErrNoRepository, dir)
		}
		be, err = local.Open(dir)
	}
	if err != nil {
		return nil, fmt.Errorf("dualkey: %w", err)
	}
	return guard.New(be, guard.Options{}).Session(guard.Admin), nil
}

// openRepo opens the repository with the password.
func (a *app) openRepo(ctx context.Context) (*repo.Repository, error) {
	st, err := a.openStore(ctx, false)
	if err != nil {
		return nil, err
	}
	pw, err := a.password("enter the repository password: ", false)
	if err != nil {
		return nil, err
	}
	r, err := repo.Open(ctx, st, pw, repo.Options{Log: a.log})
	if err != nil {
		return nil, err
	}
	return r, nil
}

// withRepo makes a cobra RunE that opens the repository, runs fn with it,
// and closes it.
func (a *app) withRepo(fn func(ctx context.Context, r *repo.Repository, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		ctx := cmd.Context()
		r, err := a.openRepo(ctx)
		if err != nil {
			return err
		}
		defer r.Close()
		return fn(ctx, r, args)
	}
}
