package main

import (
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// The vault's mirror fits the ledger's interface without either importing
// the other.
var _ ledger.Mirror = (*repo.LedgerMirror)(nil)
