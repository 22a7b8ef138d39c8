package guard

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
)

// The guarded operations: the <op> of a certificate's action "vault:<op>".
// Each needs an admin session and a quorum certificate that the vault
// verifies itself against the policy it holds (see [Session.Certified]).
const (
	OpShortenLock    = "lock.shorten"     // params: snapshot, until
	OpLowerRetention = "retention.lower"  // params: min_retention
	OpForget         = "snapshot.forget"  // params: snapshot
	OpRemoveKey      = "key.remove"       // params: key
	OpRotate         = "approvers.rotate" // params: policy
)

// ErrConsumed is returned (wrapped, with ErrForbidden) when a certificate
// was already used: each runs at most once.
var ErrConsumed = errors.New("guard: certificate already used")

// Action is a guarded operation and its parameters, exactly as the
// certificate's request must name them (its cert.VaultAction, whose Repo the
// vault fills with its own ID). Build one with the constructors below, so
// that the parameters take their one canonical spelling.
type Action struct {
	Op     string            `json:"op"`
	Params map[string]string `json:"params"`
}

// ShortenLockAction shortens snapshot's lock to until (whole seconds, UTC).
// An until in the past ends the lock at once.
func ShortenLockAction(snapshot format.ID, until time.Time) Action {
	return Action{OpShortenLock, map[string]string{"snapshot": snapshot.String(), "until": until.UTC().Format(cert.TimeFormat)}}
}

// LowerRetentionAction lowers the repository's minimum retention to d.
func LowerRetentionAction(d time.Duration) Action {
	return Action{OpLowerRetention, map[string]string{"min_retention": d.String()}}
}

// ForgetAction removes snapshot even while its lock is in force.
func ForgetAction(snapshot format.ID) Action {
	return Action{OpForget, map[string]string{"snapshot": snapshot.String()}}
}

// RemoveKeyAction removes key object key (its 64-digit name).
func RemoveKeyAction(key string) Action {
	return Action{OpRemoveKey, map[string]string{"key": key}}
}

// RotateAction replaces the approver policy with p, whose serial must be the
// current one plus one.
func RotateAction(p *cert.Policy) Action {
	return Action{OpRotate, map[string]string{"policy": string(p.Encode())}}
}

// Outcome is what a certified action did.
type Outcome struct {
	Op      string `json:"op"`
	Request string `json:"request"` // the certificate's request ID, now consumed
	// Lock is the new record of a shortening.
	Lock *format.LockRecord `json:"lock,omitempty"`
	// MinRetention is the new minimum after retention.lower.
	MinRetention format.Duration `json:"min_retention,omitempty"`
	// PolicySerial is the new policy's serial after approvers.rotate.
	PolicySerial uint64 `json:"policy_serial,omitempty"`
}

// QuorumState describes the vault's approver policy as the vault verified it.
type QuorumState struct {
	Repo string `json:"repo"` // the repository ID requests must name
	// Policy is the canonical encoding of the policy in force; nil when the
	// vault has none (then every guarded action is refused).
	Policy     []byte `json:"policy,omitempty"`
	Serial     uint64 `json:"serial,omitempty"`
	PolicyHash string `json:"policy_hash,omitempty"`
	// MinRetention is the effective minimum retention: the config's, or
	// lower after certified changes.
	MinRetention format.Duration `json:"min_retention"`
	// Rejected names stored records the vault ignores because they do not
	// verify (a forged or damaged policy, change or lock record).
	Rejected []string `json:"rejected,omitempty"`
}

// chainLink is one policy of the verified chain and when it was in force
// (until is zero for the current one).
type chainLink struct {
	policy      *cert.Policy
	from, until time.Time
}

// quorumState is the verified policy chain and effective settings.
type quorumState struct {
	cfg      format.Config
	chain    []chainLink // empty: no policy
	minRet   time.Duration
	rejected []string
}

func (q *quorumState) current() *cert.Policy {
	if len(q.chain) == 0 {
		return nil
	}
	return q.chain[len(q.chain)-1].policy
}

// policyAt returns the policy with serial that was in force at t.
func (q *quorumState) policyAt(serial uint64, t time.Time) (*cert.Policy, error) {
	for _, l := range q.chain {
		if l.policy.Serial != serial {
			continue
		}
		if t.Before(l.from) || !l.until.IsZero() && !t.Before(l.until) {
			return nil, fmt.Errorf("policy serial %d was not in force at %s", serial, t.Format(time.RFC3339))
		}
		return l.policy, nil
	}
	return nil, fmt.Errorf("no policy with serial %d in the vault's chain", serial)
}

// verifyAt checks that certificate authorized want on this repository under
// the policy of its serial at time t, and returns the request ID.
func (q *quorumState) verifyAt(certificate []byte, want Action, t time.Time) (cert.ID, error) {
	c, err := cert.ParseCertificate(certificate)
	if err != nil {
		return "", err
	}
	req, err := cert.ParseRequest(c.Request)
	if err != nil {
		return "", err
	}
	p, err := q.policyAt(req.PolicySerial, t)
	if err != nil {
		return "", err
	}
	if _, err := cert.Verify(c, p, t); err != nil {
		return "", err
	}
	if err := matches(req, q.cfg.ID, want); err != nil {
		return "", err
	}
	return req.ID(), nil
}

// matches checks that req names exactly want on repository repo.
func matches(req *cert.Request, repo string, want Action) error {
	v := req.Vault
	if v == nil || req.Action != "vault:"+want.Op || v.Op != want.Op {
		return fmt.Errorf("certificate is for %q, not vault:%s", req.Action, want.Op)
	}
	if v.Repo != repo {
		return fmt.Errorf("certificate is for repository %.80q, not %s", v.Repo, repo)
	}
	if !maps.Equal(v.Params, want.Params) && !(len(v.Params) == 0 && len(want.Params) == 0) {
		return fmt.Errorf("certificate names parameters %s, not %s", showParams(v.Params), showParams(want.Params))
	}
	return nil
}

func showParams(m map[string]string) string {
	keys := slices.Sorted(maps.Keys(m))
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteString(" ")
		}
		v := m[k]
		if len(v) > 80 {
			v = v[:80] + "…"
		}
		fmt.Fprintf(&b, "%s=%q", k, v)
	}
	return "{" + b.String() + "}"
}

// loadQuorum reads the config, verifies the policy chain from the config's
// genesis policy through every valid policy record, and computes the
// effective minimum retention. Records are listed afresh each time, so a
// record planted by another process is judged (and ignored) at once. Two
// valid successors of one policy fail the call: the vault then refuses every
// guarded action rather than pick one.
func (s *Store) loadQuorum(ctx context.Context) (*quorumState, error) {
	cfg, err := s.config(ctx)
	if err != nil {
		return nil, err
	}
	q := &quorumState{cfg: cfg, minRet: time.Duration(cfg.MinRetention)}
	if len(cfg.QuorumPolicy) == 0 {
		return q, nil
	}
	genesis, err := cert.ParsePolicy(cfg.QuorumPolicy)
	if err != nil {
		return nil, fmt.Errorf("guard: config quorum policy: %w", err)
	}
	q.chain = []chainLink{{policy: genesis}}

	recs, bad, err := loadRecords(ctx, s, backend.Policy, format.ParsePolicyRecord)
	if err != nil {
		return nil, err
	}
	q.rejected = append(q.rejected, bad...)
	used := map[string]bool{}
	for {
		cur := q.chain[len(q.chain)-1]
		prev := cur.policy.Hash()
		var next []string
		var nextPolicy *cert.Policy
		for _, n := range slices.Sorted(maps.Keys(recs)) {
			r := recs[n]
			if r.Prev != prev {
				continue
			}
			p, err := s.verifyRotation(q, cur, r)
			if err != nil {
				continue
			}
			next = append(next, n)
			nextPolicy = p
		}
		if len(next) == 0 {
			break
		}
		if len(next) > 1 {
			return nil, fmt.Errorf("guard: policy chain forks after serial %d (records %v): refusing guarded actions: %w",
				cur.policy.Serial, next, ErrForbidden)
		}
		used[next[0]] = true
		t := recs[next[0]].Time
		q.chain[len(q.chain)-1].until = t
		q.chain = append(q.chain, chainLink{policy: nextPolicy, from: t})
	}
	for n := range recs {
		if !used[n] {
			q.rejected = append(q.rejected, string(backend.Policy)+"/"+n)
		}
	}

	changes, bad, err := loadRecords(ctx, s, backend.Change, format.ParseChangeRecord)
	if err != nil {
		return nil, err
	}
	q.rejected = append(q.rejected, bad...)
	for n, r := range changes {
		d := time.Duration(r.MinRetention)
		if _, err := s.verifiedAt(q, backend.Change, n, r.Certificate, LowerRetentionAction(d), r.Time); err != nil {
			q.rejected = append(q.rejected, string(backend.Change)+"/"+n)
			continue
		}
		q.minRet = min(q.minRet, d)
	}
	slices.Sort(q.rejected)
	return q, nil
}

// verifyRotation checks that r replaces cur.policy under a certificate
// valid under cur.policy at r.Time, and returns the new policy.
func (s *Store) verifyRotation(q *quorumState, cur chainLink, r format.PolicyRecord) (*cert.Policy, error) {
	p, err := cert.ParsePolicy(r.Policy)
	if err != nil {
		return nil, err
	}
	if p.Serial != cur.policy.Serial+1 {
		return nil, fmt.Errorf("serial %d does not follow %d", p.Serial, cur.policy.Serial)
	}
	if r.Time.Before(cur.from) {
		return nil, errors.New("takes effect before the policy it replaces")
	}
	c, err := cert.ParseCertificate(r.Certificate)
	if err != nil {
		return nil, err
	}
	req, err := cert.Verify(c, cur.policy, r.Time)
	if err != nil {
		return nil, err
	}
	if err := matches(req, q.cfg.ID, RotateAction(p)); err != nil {
		return nil, err
	}
	return p, nil
}

// verifiedAt is q.verifyAt, remembered per stored record: a record is
// immutable and the chain it is judged against only grows, so its verdict
// holds while the store lives.
func (s *Store) verifiedAt(q *quorumState, t backend.Type, name string, certificate []byte, want Action, at time.Time) (cert.ID, error) {
	key := string(t) + "/" + name
	s.mu.Lock()
	id, ok := s.verified[key]
	s.mu.Unlock()
	if ok {
		return id, nil
	}
	id, err := q.verifyAt(certificate, want, at)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	s.verified[key] = id
	s.mu.Unlock()
	return id, nil
}

// loadRecords loads and parses every object of type t whose name is the
// hash of its bytes; the others are returned as rejected. Load errors fail
// the call (so decisions fail closed).
func loadRecords[R any](ctx context.Context, s *Store, t backend.Type, parse func([]byte) (R, error)) (map[string]R, []string, error) {
	var names []string
	if err := s.be.List(ctx, t, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return ctx.Err()
	}); err != nil {
		return nil, nil, fmt.Errorf("guard: list %s: %w", t, err)
	}
	out := map[string]R{}
	var bad []string
	for _, n := range names {
		data, err := s.be.Load(ctx, backend.Handle{Type: t, Name: n}, 0, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("guard: load %s/%s: %w", t, n, err)
		}
		r, err := parse(data)
		if err != nil || format.Hash(data).String() != n {
			bad = append(bad, string(t)+"/"+n)
			continue
		}
		out[n] = r
	}
	return out, bad, nil
}

// minRetention is the effective repository minimum retention.
func (s *Store) minRetention(ctx context.Context) (time.Duration, error) {
	cfg, err := s.config(ctx)
	if err != nil {
		return 0, err
	}
	if len(cfg.QuorumPolicy) == 0 {
		return time.Duration(cfg.MinRetention), nil // no policy, so no change can be valid
	}
	q, err := s.loadQuorum(ctx)
	if err != nil {
		return 0, err
	}
	return q.minRet, nil
}

// effectiveLocks drops from all the records that a valid shortening
// supersedes. A shorten record whose certificate does not verify supersedes
// nothing (it then only adds a lock, which is harmless).
func (s *Store) effectiveLocks(ctx context.Context, all map[string]format.LockRecord) (map[string]format.LockRecord, error) {
	var shorts []string
	for n, r := range all {
		if r.Reason == format.ReasonShorten {
			shorts = append(shorts, n)
		}
	}
	if len(shorts) == 0 {
		return all, nil
	}
	q, err := s.loadQuorum(ctx)
	if err != nil {
		return nil, err
	}
	out := maps.Clone(all)
	for _, n := range shorts {
		r := all[n]
		if !s.validShortening(q, n, r) {
			continue
		}
		for _, sup := range r.Supersedes {
			if o, ok := all[sup.String()]; ok && o.Snapshot == r.Snapshot && sup.String() != n {
				delete(out, sup.String())
			}
		}
	}
	return out, nil
}

func (s *Store) validShortening(q *quorumState, name string, r format.LockRecord) bool {
	if len(q.chain) == 0 || len(r.Certificate) == 0 {
		return false
	}
	_, err := s.verifiedAt(q, backend.Lock, name, r.Certificate, ShortenLockAction(r.Snapshot, r.Until), r.Time)
	return err == nil
}

// Quorum returns the vault's verified approver policy and effective
// settings. Read capability suffices: the policy holds public keys only.
func (s *Session) Quorum(ctx context.Context) (QuorumState, error) {
	if err := s.need(Read, "read", "quorum policy"); err != nil {
		return QuorumState{}, err
	}
	q, err := s.st.loadQuorum(ctx)
	if err != nil {
		return QuorumState{}, err
	}
	st := QuorumState{Repo: q.cfg.ID, MinRetention: format.Duration(q.minRet), Rejected: q.rejected}
	if p := q.current(); p != nil {
		st.Policy, st.Serial, st.PolicyHash = p.Encode(), p.Serial, p.Hash()
	}
	return st, nil
}

// Certified performs act under a quorum certificate, which the vault checks
// itself: an admin session; a policy in the vault (none: refused); the
// certificate verifies under the policy in force, on the vault's clock
// (approvals, threshold, no self-approval, expiry); its request names
// exactly act on this repository; and it was never used before. The
// request ID is recorded as consumed (a write-once object) before the act,
// so a replay fails with ErrConsumed even across restarts.
//
// Refusals of the certificate unwrap to ErrForbidden (and the cert
// sentinel); bad parameters to ErrInvalid; a missing snapshot or key to
// backend.ErrNotExist.
func (s *Session) Certified(ctx context.Context, act Action, certificate []byte) (Outcome, error) {
	fail := func(err error) (Outcome, error) {
		return Outcome{}, fmt.Errorf("guard: %s: %w", act.Op, err)
	}
	if err := s.need(Admin, "certified", act.Op); err != nil {
		return Outcome{}, err
	}
	if len(certificate) > format.MaxCertificate {
		return fail(fmt.Errorf("certificate too large: %w", ErrInvalid))
	}
	if err := s.st.acquire(ctx); err != nil {
		return fail(err)
	}
	defer s.st.release()

	q, err := s.st.loadQuorum(ctx)
	if err != nil {
		return fail(err)
	}
	pol := q.current()
	if pol == nil {
		return fail(fmt.Errorf("this vault holds no approver policy (set at init), so guarded actions are never allowed: %w", ErrForbidden))
	}
	c, err := cert.ParseCertificate(certificate)
	if err != nil {
		return fail(fmt.Errorf("%w: %w", ErrForbidden, err))
	}
	now := s.st.now()
	req, err := cert.Verify(c, pol, now)
	if err != nil {
		return fail(fmt.Errorf("%w: %w", ErrForbidden, err))
	}
	if err := matches(req, q.cfg.ID, act); err != nil {
		return fail(fmt.Errorf("%w: %w", ErrForbidden, err))
	}
	id := req.ID()
	out := Outcome{Op: act.Op, Request: id.String()}

	if err := s.st.unused(ctx, id); err != nil {
		return fail(err)
	}
	// Check the act can run before consuming the certificate, so a typo
	// does not burn it; the semaphore keeps the check true until the act.
	var run func() error
	switch act.Op {
	case OpShortenLock:
		run, err = s.st.prepareShorten(ctx, q, act, certificate, now, &out)
	case OpLowerRetention:
		run, err = s.st.prepareLower(ctx, q, act, certificate, now, &out)
	case OpForget:
		run, err = s.st.prepareForget(ctx, act)
	case OpRemoveKey:
		run, err = s.st.prepareRemoveKey(ctx, act)
	case OpRotate:
		run, err = s.st.prepareRotate(ctx, pol, act, certificate, now, &out)
	default:
		err = fmt.Errorf("unknown guarded operation %q: %w", act.Op, ErrInvalid)
	}
	if err != nil {
		return fail(err)
	}
	if err := s.st.consume(ctx, id, act.Op, certificate, now); err != nil {
		return fail(err)
	}
	if err := run(); err != nil {
		return fail(err)
	}
	return out, nil
}

// consume records request id as used. The record carries a random nonce,
// so a second save under the same name never has identical bytes and the
// write-once backend refuses it.
func (s *Store) consume(ctx context.Context, id cert.ID, op string, certificate []byte, now time.Time) error {
	h := backend.Handle{Type: backend.Consumed, Name: id.String()}
	nonce := make([]byte, 16)
	rand.Read(nonce)
	data, err := json.Marshal(format.ConsumedRecord{Time: now, Op: op, Nonce: nonce, Certificate: certificate})
	if err != nil {
		panic(fmt.Sprintf("guard: marshal consumed record: %v", err))
	}
	if err := s.savePermanent(ctx, h, data); err != nil {
		if errors.Is(err, backend.ErrExists) {
			return fmt.Errorf("request %s: %w: %w", id, ErrConsumed, ErrForbidden)
		}
		return fmt.Errorf("save %v: %w", h, err)
	}
	return nil
}

// unused fails with ErrConsumed if request id was used before.
func (s *Store) unused(ctx context.Context, id cert.ID) error {
	h := backend.Handle{Type: backend.Consumed, Name: id.String()}
	if _, err := s.be.Stat(ctx, h); err == nil {
		return fmt.Errorf("request %s: %w: %w", id, ErrConsumed, ErrForbidden)
	} else if !errors.Is(err, backend.ErrNotExist) {
		return fmt.Errorf("stat %v: %w", h, err)
	}
	return nil
}

func param(act Action, key string) (string, error) {
	v, ok := act.Params[key]
	if !ok || len(act.Params) == 0 {
		return "", fmt.Errorf("missing parameter %q: %w", key, ErrInvalid)
	}
	return v, nil
}

// onlyParams checks act has exactly the given parameter keys.
func onlyParams(act Action, keys ...string) error {
	if len(act.Params) != len(keys) {
		return fmt.Errorf("want parameters %v, have %s: %w", keys, showParams(act.Params), ErrInvalid)
	}
	for _, k := range keys {
		if _, err := param(act, k); err != nil {
			return err
		}
	}
	return nil
}

func snapshotParam(act Action) (format.ID, error) {
	v, err := param(act, "snapshot")
	if err != nil {
		return format.ID{}, err
	}
	id, err := format.ParseID(v)
	if err != nil {
		return format.ID{}, fmt.Errorf("snapshot: %w: %w", ErrInvalid, err)
	}
	return id, nil
}

func (s *Store) prepareShorten(ctx context.Context, q *quorumState, act Action, certificate []byte, now time.Time, out *Outcome) (func() error, error) {
	if err := onlyParams(act, "snapshot", "until"); err != nil {
		return nil, err
	}
	snap, err := snapshotParam(act)
	if err != nil {
		return nil, err
	}
	until, err := time.Parse(cert.TimeFormat, act.Params["until"])
	if err != nil || ShortenLockAction(snap, until).Params["until"] != act.Params["until"] {
		return nil, fmt.Errorf("until %q: want %s: %w", act.Params["until"], cert.TimeFormat, ErrInvalid)
	}
	all, err := s.allLocks(ctx)
	if err != nil {
		return nil, err
	}
	eff, err := s.effectiveLocks(ctx, all)
	if err != nil {
		return nil, err
	}
	var mine []string
	var mineRecs []format.LockRecord
	var latest format.LockRecord
	var cur time.Time
	for n, r := range eff {
		if r.Snapshot != snap {
			continue
		}
		mine = append(mine, n)
		mineRecs = append(mineRecs, r)
		if r.Until.After(cur) {
			cur = r.Until
		}
		if r.Time.After(latest.Time) || latest.Time.IsZero() {
			latest = r
		}
	}
	if len(mine) == 0 {
		return nil, fmt.Errorf("snapshot %s has no lock records: %w", snap, backend.ErrNotExist)
	}
	if !until.Before(cur) {
		return nil, fmt.Errorf("until %s does not shorten the lock (until %s); extending needs no certificate: %w",
			until.Format(time.RFC3339), cur.Format(time.RFC3339), ErrInvalid)
	}
	slices.Sort(mine)
	sup := make([]format.ID, len(mine))
	for i, n := range mine {
		sup[i], _ = format.ParseID(n)
	}
	rec := format.LockRecord{Snapshot: snap, Time: now, Until: until, Reason: format.ReasonShorten,
		Packs: latest.Packs, Supersedes: sup, Certificate: certificate, WAL: walOf(mineRecs)}
	return func() error {
		if err := s.writeLock(ctx, rec); err != nil {
			return err
		}
		out.Lock = &rec
		return nil
	}, nil
}

func (s *Store) prepareLower(ctx context.Context, q *quorumState, act Action, certificate []byte, now time.Time, out *Outcome) (func() error, error) {
	if err := onlyParams(act, "min_retention"); err != nil {
		return nil, err
	}
	d, err := time.ParseDuration(act.Params["min_retention"])
	if err != nil || d < 0 || LowerRetentionAction(d).Params["min_retention"] != act.Params["min_retention"] {
		return nil, fmt.Errorf("min_retention %q: want a Go duration as time.Duration writes it: %w", act.Params["min_retention"], ErrInvalid)
	}
	if d >= q.minRet {
		return nil, fmt.Errorf("min_retention %v is not lower than the current %v (it can only be lowered this way): %w", d, q.minRet, ErrInvalid)
	}
	data, err := json.Marshal(format.ChangeRecord{Time: now, MinRetention: format.Duration(d), Certificate: certificate})
	if err != nil {
		panic(fmt.Sprintf("guard: marshal change record: %v", err))
	}
	return func() error {
		h := backend.Handle{Type: backend.Change, Name: format.Hash(data).String()}
		if err := s.savePermanent(ctx, h, data); err != nil {
			return fmt.Errorf("save %v: %w", h, err)
		}
		out.MinRetention = format.Duration(d)
		return nil
	}, nil
}

func (s *Store) prepareForget(ctx context.Context, act Action) (func() error, error) {
	if err := onlyParams(act, "snapshot"); err != nil {
		return nil, err
	}
	snap, err := snapshotParam(act)
	if err != nil {
		return nil, err
	}
	h := backend.Handle{Type: backend.Snapshot, Name: snap.String()}
	if _, err := s.be.Stat(ctx, h); err != nil {
		return nil, fmt.Errorf("stat %v: %w", h, err)
	}
	// The snapshot's lock records stay: its packs remain protected until
	// they expire, and prune collects them after that.
	return func() error { return s.be.Remove(ctx, h) }, nil
}

func (s *Store) prepareRemoveKey(ctx context.Context, act Action) (func() error, error) {
	if err := onlyParams(act, "key"); err != nil {
		return nil, err
	}
	h := backend.Handle{Type: backend.Key, Name: act.Params["key"]}
	if err := h.Validate(); err != nil {
		return nil, fmt.Errorf("key: %w: %w", ErrInvalid, err)
	}
	if err := s.mayRemoveKey(ctx, h); err != nil {
		return nil, err
	}
	return func() error { return s.be.Remove(ctx, h) }, nil
}

func (s *Store) prepareRotate(ctx context.Context, cur *cert.Policy, act Action, certificate []byte, now time.Time, out *Outcome) (func() error, error) {
	if err := onlyParams(act, "policy"); err != nil {
		return nil, err
	}
	p, err := cert.ParsePolicy([]byte(act.Params["policy"]))
	if err != nil {
		return nil, fmt.Errorf("new policy: %w: %w", ErrInvalid, err)
	}
	if p.Serial != cur.Serial+1 {
		return nil, fmt.Errorf("new policy has serial %d, want %d: %w", p.Serial, cur.Serial+1, ErrInvalid)
	}
	data, err := json.Marshal(format.PolicyRecord{Time: now, Prev: cur.Hash(), Policy: p.Encode(), Certificate: certificate})
	if err != nil {
		panic(fmt.Sprintf("guard: marshal policy record: %v", err))
	}
	return func() error {
		h := backend.Handle{Type: backend.Policy, Name: format.Hash(data).String()}
		if err := s.savePermanent(ctx, h, data); err != nil {
			return fmt.Errorf("save %v: %w", h, err)
		}
		out.PolicySerial = p.Serial
		return nil
	}, nil
}
