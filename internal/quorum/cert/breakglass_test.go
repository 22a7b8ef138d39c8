package cert

import (
	"bytes"
	"errors"
	"testing"
)

func TestPolicyBreakGlass(t *testing.T) {
	plain := testPolicy().Encode()
	if bytes.Contains(plain, []byte("breakglass")) {
		t.Fatalf("a policy without grants must keep its old encoding: %s", plain)
	}
	p := testPolicy()
	p.BreakGlass = []Grant{{"zed", []string{"dba", "admin"}}, {"bob", []string{"dba"}}}
	b := p.Encode()
	want := `"breakglass":[{"person":"bob","roles":["dba"]},{"person":"zed","roles":["admin","dba"]}]}`
	if !bytes.HasSuffix(b, []byte(want)) {
		t.Fatalf("encoding %s, want it to end %s", b, want)
	}
	q, err := ParsePolicy(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(q.Encode(), b) || q.Hash() == testPolicy().Hash() {
		t.Fatal("round trip changed the policy, or grants do not change its hash")
	}
	for _, c := range []struct {
		person, role string
		want         bool
	}{{"bob", "dba", true}, {"zed", "admin", true}, {"bob", "admin", false}, {"alice", "dba", false}} {
		if got := q.AllowsBreakGlass(c.person, c.role); got != c.want {
			t.Errorf("AllowsBreakGlass(%s, %s) = %v", c.person, c.role, got)
		}
	}
	for name, bad := range map[string][]Grant{
		"duplicate person": {{"bob", []string{"dba"}}, {"bob", []string{"admin"}}},
		"no roles":         {{"bob", nil}},
		"duplicate role":   {{"bob", []string{"dba", "dba"}}},
		"uppercase role":   {{"bob", []string{"DBA"}}},
		"bad person":       {{"", []string{"dba"}}},
	} {
		p := testPolicy()
		p.BreakGlass = bad
		if err := p.Validate(); !errors.Is(err, ErrPolicy) {
			t.Errorf("%s: Validate = %v, want ErrPolicy", name, err)
		}
	}
	empty := append(plain[:len(plain)-1:len(plain)-1], []byte(`,"breakglass":[]}`)...)
	if _, err := ParsePolicy(empty); !errors.Is(err, ErrMalformed) {
		t.Errorf("ParsePolicy(empty grant list) = %v, want ErrMalformed (one policy, one encoding)", err)
	}
}
