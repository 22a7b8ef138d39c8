package main

import (
	"bytes"
	"crypto/ed25519"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/klauspost/compress/zstd"
)

// storedRec returns the record a ledger row holds: its bytes, or (codec 1,
// docs/state.md) one zstd frame of them.
func storedRec(t *testing.T, codec int, b []byte) []byte {
	t.Helper()
	if codec == 0 {
		return b
	}
	d, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	rec, err := d.DecodeAll(b, nil)
	if err != nil || codec != 1 {
		t.Fatalf("ledger row of codec %d: %v", codec, err)
	}
	return rec
}

// readLedger returns every ledger row of the SQLite state, in seq order.
func readLedger(t *testing.T, db *sql.DB) []ledger.Record {
	t.Helper()
	rows, err := db.Query("SELECT seq, codec, rec FROM ledger ORDER BY seq")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var recs []ledger.Record
	for rows.Next() {
		var seq uint64
		var codec int
		var b []byte
		if err := rows.Scan(&seq, &codec, &b); err != nil {
			t.Fatal(err)
		}
		r, err := ledger.ParseRecord(storedRec(t, codec, b))
		if err != nil || r.Seq != seq || r.Seq != uint64(len(recs)+1) {
			t.Fatalf("ledger row %d: %v (record %d)", seq, err, r.Seq)
		}
		recs = append(recs, r)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return recs
}

// writeLedger overwrites the rows of recs, each under its own seq, plain
// (codec 0) as someone editing the table would write them.
func writeLedger(t *testing.T, db *sql.DB, recs []ledger.Record) {
	t.Helper()
	for _, r := range recs {
		if _, err := db.Exec("UPDATE ledger SET codec = 0, rec = ? WHERE seq = ?", r.Encode(), r.Seq); err != nil {
			t.Fatal(err)
		}
	}
}

// rehashFrom makes recs a self-consistent chain again from seq on, the way
// someone holding the database file and the ledger key would: each record
// links to the one before, every checkpoint is signed again with key.
func rehashFrom(recs []ledger.Record, seq uint64, key ed25519.PrivateKey) {
	for i := int(seq) - 1; i < len(recs); i++ {
		r := &recs[i]
		if i > 0 {
			r.Prev = recs[i-1].Hash
		}
		if r.IsCheckpoint() {
			d, err := json.Marshal(ledger.Checkpoint{Seq: r.Seq - 1, Hash: r.Prev, Sig: ed25519.Sign(key, ledger.CheckpointMessage(r.Seq-1, r.Prev))})
			if err != nil {
				panic(err)
			}
			r.Data = d
		}
		r.Hash = r.ComputeHash()
	}
}

// TestAuditVerifyAgainstMirror: quorum commands run with --repo mirror the
// ledger into the vault (a directory, or a server with an append token);
// then the SQLite state file is edited behind the tool's back.
//
//   - A forged record, re-hashed and with every later checkpoint re-signed
//     with the ledger key that sits beside the state: the local chain is
//     perfect (verify without the mirror passes: the trade-off
//     docs/quorum.md states), and only the mirror names the seq.
//   - The last rows deleted back to a checkpoint: a valid shorter chain
//     locally; the mirror reports the truncation.
//   - Two rows swapped: caught without the mirror.
func TestAuditVerifyAgainstMirror(t *testing.T) {
	for _, via := range []string{"directory", "server"} {
		t.Run(via, func(t *testing.T) { testAuditMirror(t, via == "server") })
	}
}

func testAuditMirror(t *testing.T, server bool) {
	q, dir := quorumCLI(t)
	vaultDir := filepath.Join(t.TempDir(), "vault")
	v := newCLI(t, vaultDir)
	v.ok("vault", "init", "--min-retention", "1h")
	m := q.with("DUALKEY_REPO", vaultDir).with("DUALKEY_PASSWORD_FILE", v.env["DUALKEY_PASSWORD_FILE"])
	if server {
		url, fp := startServer(t, v)
		tok := strings.TrimSpace(v.ok("vault", "token", "create", "--cap", "append"))
		m = m.with("DUALKEY_REPO", url).with("DUALKEY_TLS_FINGERPRINT", fp).with("DUALKEY_TOKEN_FILE", writeTemp(t, tok+"\n"))
	}
	m.ok("users", "add", "alice")
	m.ok("users", "add", "bob")
	pub := strings.TrimSpace(m.as(dir, "bob").ok("keys", "generate", "bob"))
	m.ok("quorum", "init", "--approver", "bob="+pub, "--threshold", "1")
	alice := m.as(dir, "alice")
	for _, table := range []string{"audit_2019", "audit_2018"} {
		requestID(t, alice.ok("approvals", "request", "--database", "shop", "--role", "r", "--sql", "DROP TABLE "+table, "--reason", "archived"))
	}
	var rep struct{ LastSeq, MirroredSeq uint64 }
	m.json(&rep, "audit", "verify")
	if rep.LastSeq == 0 || rep.MirroredSeq != rep.LastSeq {
		t.Fatalf("after the commands: last seq %d, mirrored up to %d", rep.LastSeq, rep.MirroredSeq)
	}

	stateFile := q.env["DUALKEY_STATE"]
	db, err := sql.Open("sqlite", stateFile)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	orig := readLedger(t, db)
	seed, err := os.ReadFile(filepath.Join(filepath.Dir(stateFile), "ledger.key"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := hex.DecodeString(strings.TrimSpace(string(seed)))
	if err != nil {
		t.Fatal(err)
	}
	key := ed25519.NewKeyFromSeed(s)

	// verify runs audit verify with c and wants exit code want and every
	// string in wants on stdout.
	verify := func(what string, c *cli, want int, wants ...string) {
		t.Helper()
		out, errs, code := c.run("audit", "verify")
		if code != want {
			t.Fatalf("%s: audit verify: exit %d, want %d\n%s%s", what, code, want, out, errs)
		}
		for _, w := range wants {
			if !strings.Contains(out, w) {
				t.Errorf("%s: audit verify does not say %q:\n%s", what, w, out)
			}
		}
	}

	// 1. Rewrite a request's SQL, re-hash everything after it, re-sign.
	var k uint64
	for _, r := range orig {
		if r.Kind == ledger.KindRequest && bytes.Contains(r.Data, []byte("audit_2019")) {
			k = r.Seq
		}
	}
	if k == 0 || k == uint64(len(orig)) {
		t.Fatalf("no request record to forge in %d records", len(orig))
	}
	forged := append([]ledger.Record(nil), orig...)
	forged[k-1].Data = bytes.Replace(orig[k-1].Data, []byte("audit_2019"), []byte("customers"), 1)
	rehashFrom(forged, k, key)
	writeLedger(t, db, forged[k-1:])
	verify("forged and re-signed, no mirror", q, 0, "ledger OK")
	verify("forged and re-signed", m, exitDamaged, fmt.Sprintf("seq %d: mirror: record differs from the mirror's copy", k))
	writeLedger(t, db, orig[k-1:])
	verify("restored", m, 0, "ledger OK")

	// 2. Delete the last rows back to the previous checkpoint.
	last := uint64(len(orig))
	if !orig[last-1].IsCheckpoint() {
		t.Fatalf("the last record (%d) is a %s, not a checkpoint", last, orig[last-1].Kind)
	}
	var cp uint64
	for _, r := range orig[:last-1] {
		if r.IsCheckpoint() {
			cp = r.Seq
		}
	}
	if cp == 0 {
		t.Fatal("no earlier checkpoint")
	}
	if _, err := db.Exec("DELETE FROM ledger WHERE seq > ?", cp); err != nil {
		t.Fatal(err)
	}
	verify("truncated to a checkpoint, no mirror", q, 0, "ledger OK")
	verify("truncated", m, exitDamaged, fmt.Sprintf("seq %d: truncated", cp+1))
	for _, r := range orig[cp:] {
		if _, err := db.Exec("INSERT INTO ledger (seq, rec) VALUES (?, ?)", r.Seq, r.Encode()); err != nil {
			t.Fatal(err)
		}
	}
	verify("restored", m, 0, "ledger OK")

	// 3. Swap two rows: caught by the chain alone.
	swapped := []ledger.Record{orig[2], orig[1]}
	for i, r := range swapped {
		if _, err := db.Exec("UPDATE ledger SET codec = 0, rec = ? WHERE seq = ?", r.Encode(), i+2); err != nil {
			t.Fatal(err)
		}
	}
	verify("two rows swapped, no mirror", q, exitDamaged, "seq 2: reordered", "seq 3: reordered")
	verify("two rows swapped", m, exitDamaged, "seq 2: reordered", "seq 3: reordered")
}
