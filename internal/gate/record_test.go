package gate

import (
	"bytes"
	"encoding/json"
	"testing"
)

// A statement record's data encodes exactly as the map it replaced did, so
// the ledger's records (and their hashes) are what they were.
func TestStmtDataAsMap(t *testing.T) {
	rows, zero := int64(7), int64(0)
	for _, d := range []stmtData{
		{Class: "write", DB: "shop", Decision: "allow", Rule: "r", Session: "s1", SQL: "UPDATE t SET a = '<&>' WHERE id = 1", Rows: &rows},
		{Class: "read", DB: "shop", Decision: "approved", Rule: "", Session: "s2", SQL: "SELECT 1", Rows: &zero, Request: "abc"},
		{Class: "write", DB: "x", Decision: "allow", Rule: "r", Session: "s3", SQL: "INSERT", Error: "23505"},
	} {
		m := map[string]any{"session": d.Session, "db": d.DB, "class": d.Class, "decision": d.Decision, "rule": d.Rule, "sql": d.SQL}
		if d.Rows != nil {
			m["rows"] = *d.Rows
		}
		if d.Error != "" {
			m["error"] = d.Error
		}
		if d.Request != "" {
			m["request"] = d.Request
		}
		a, err1 := json.Marshal(&d)
		b, err2 := json.Marshal(m)
		if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
			t.Fatalf("struct %s\nmap    %s (%v %v)", a, b, err1, err2)
		}
	}
}
