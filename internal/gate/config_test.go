package gate

import (
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/gate/policy"
)

// TestConfigFrom: what gate.yaml sets reaches the gate's Config the same
// way for `dualkey gate` and `dualkey run` (both start from ConfigFrom).
func TestConfigFrom(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		check      func(Config) bool
	}{
		{"defaults", "", func(c Config) bool {
			return c.RequireTLS && c.RequestLifetime == time.Hour && c.MaxMessageSize == 64<<20 &&
				c.MaxConnections == 0 && c.DryRunTimeout == 0 && !c.NoEventLoop
		}},
		{"set", "request_expiry: 10m\nevent_loop: false\nlimits: {max_message_bytes: 1048576, max_connections: 7, max_connections_per_user: 2, dry_run_timeout: 3s}\n",
			func(c Config) bool {
				return c.RequestLifetime == 10*time.Minute && c.MaxMessageSize == 1<<20 && c.MaxConnections == 7 &&
					c.MaxConnectionsPerUser == 2 && c.DryRunTimeout == 3*time.Second && c.NoEventLoop
			}},
		{"no dry runs", "limits: {dry_run: false}\n", func(c Config) bool { return c.DryRunTimeout < 0 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := policy.Parse([]byte("tls: {generate: true}\n"+tc.yaml+
				"upstreams: {db: {host: h, user: u}}\nrules: [{users: [a], databases: [db], classes: [read], action: allow}]\n"), "g.yaml")
			if err != nil {
				t.Fatal(err)
			}
			c := ConfigFrom(p)
			if c.Policy != p || !tc.check(c) {
				t.Errorf("ConfigFrom(%q) = %+v", tc.yaml, c)
			}
		})
	}
}
