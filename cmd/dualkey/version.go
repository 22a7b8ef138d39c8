package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/format"
)

// version is set at build time with -ldflags "-X main.version=..."; else
// the module version or VCS revision from the build info.
var version = ""

func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok && v == "" {
		v = bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " (" + s.Value[:12] + ")"
			}
		}
	}
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	return v
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			if a.jsonOut {
				return a.printJSON(map[string]any{"version": versionString(), "go": runtime.Version(), "vault_format": format.Version})
			}
			fmt.Fprintf(a.stdout, "dualkey %s (%s, vault format %d)\n", versionString(), runtime.Version(), format.Version)
			return nil
		},
	}
}
