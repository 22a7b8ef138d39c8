//go:build !linux

package state

import "os"

func syncData(f *os.File) error { return f.Sync() }
