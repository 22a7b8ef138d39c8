package state

import (
	"os"

	"golang.org/x/sys/unix"
)

// syncData is fdatasync(2): SQLite's own choice here (syncDataOnly).
func syncData(f *os.File) error { return unix.Fdatasync(int(f.Fd())) }
