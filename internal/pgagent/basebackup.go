package pgagent

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/archiver"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// PageSize is PostgreSQL's block size (the default BLCKSZ): relation files
// are stored in pages of this size.
const PageSize = 8192

// BaseTag is the tag every base backup snapshot carries.
const BaseTag = "pg-base"

// BaseBackupOptions tune a base backup.
type BaseBackupOptions struct {
	// Label names the backup in backup_label. Default "dualkey <UTC time>".
	Label string
	// Tags are added to BaseTag.
	Tags []string
	// Hostname is recorded in the snapshot. Default "pg-<system id>": the
	// cluster's identity, which stays the same when its host name does
	// not, and changes when the cluster is replaced by another one.
	Hostname string
	// LockFor asks for a retention lock longer than the repository minimum.
	LockFor time.Duration
	// ManifestChecksums is the manifest's per-file checksum algorithm:
	// "CRC32C" (default: cheap, and a damaged transfer is all it has to
	// catch; the vault authenticates what it stores), "SHA256" and so on.
	ManifestChecksums string
	// MaxRate throttles the server's sending, in KiB/s (32 to 1048576);
	// 0 is unlimited. BASE_BACKUP only: a local base backup is not
	// throttled.
	MaxRate int
	// DataDir, when set, is the server's data directory as this process
	// sees it, and the backup is a local one (see localBaseBackup): the
	// files are read here, between pg_backup_start and pg_backup_stop on
	// an ordinary connection, instead of streamed by a walsender. Set it
	// only where this process runs on the database host and may read the
	// directory (root or the server's OS user).
	DataDir string
	// Open, when BaseBackup is given no repository, opens it while the
	// server checkpoints and starts sending: opening costs a key
	// derivation and loading the index, which need not wait for each
	// other. BaseBackup returns only after Open has.
	Open func(context.Context) (*repo.Repository, error)
	// Workers hash, compress and encrypt chunks (archiver.Options.Workers).
	Workers  int
	Progress func(archiver.Progress)
	Log      *slog.Logger
	// now is the clock (tests).
	now func() time.Time
	// corrupt, if set, wraps each file's content as it arrives, before
	// it is checksummed (tests: damage in transit).
	corrupt func(path string, r io.Reader) io.Reader
	// beforeFile, if set, runs before a local base backup opens each
	// regular file (its snapshot path); an error abandons the backup
	// (tests: files dropped or unreadable mid-walk).
	beforeFile func(path string) error
}

// BaseBackupResult describes a committed base backup.
type BaseBackupResult struct {
	ID      repo.ID
	Lock    format.LockRecord
	Summary snapshot.Summary
	Meta    BaseMeta
}

// relFile matches the names of relation files: a relfilenode, a fork
// suffix ("_fsm", "_vm", "_init") and a segment number ("16384.1").
var relFile = regexp.MustCompile(`^\d+(_\w+)?(\.\d+)?$`)

// IsRelationFile reports whether p (a path in the data directory) is a
// relation file, made of pages the server changes in place.
func IsRelationFile(p string) bool {
	if !strings.HasPrefix(p, "base/") && !strings.HasPrefix(p, "global/") && !strings.HasPrefix(p, "pg_tblspc/") {
		return false
	}
	return relFile.MatchString(p[strings.LastIndexByte(p, '/')+1:])
}

// BaseBackup takes a base backup of the server at connURL (a replication
// connection; replication=true is added when missing) with BASE_BACKUP and
// stores it as a snapshot of kind snapshot.KindPGBase, tagged BaseTag,
// whose Meta is a BaseMeta. The archives stream straight into the vault:
// nothing is written to local disk. Relation files are cut into 8 KiB
// pages, so pages unchanged since an earlier base backup are not stored
// again; everything else is chunked as usual.
//
// WAL is not included: the agent streams it into the vault separately, and
// the backup is usable once the vault holds WAL up to Meta.EndLSN. Every
// file is checked against the backup manifest (size and checksum), and the
// manifest against its own checksum, before the snapshot is committed; any
// mismatch fails the backup with an error wrapping ErrManifest that names
// the files, and nothing is committed. The manifest is stored in the
// snapshot as backup_manifest.
//
// The server must be PostgreSQL 15 or later (BASE_BACKUP's option syntax
// and its archive framing). Tablespaces outside the data directory are
// stored under pg_tblspc/<oid>/ (see BaseMeta.Tablespaces).
func BaseBackup(ctx context.Context, r *repo.Repository, connURL string, opts BaseBackupOptions) (*BaseBackupResult, error) {
	type opened struct {
		r   *repo.Repository
		err error
	}
	var openc chan opened
	if r == nil {
		if opts.Open == nil {
			return nil, errors.New("pgagent: base backup without a repository")
		}
		openc = make(chan opened, 1)
		go func() {
			r, err := opts.Open(ctx)
			openc <- opened{r, err}
		}()
		defer func() {
			if openc != nil {
				<-openc // never return while Open runs: the caller closes what it opened
			}
		}()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.now == nil {
		opts.now = time.Now
	}
	if opts.ManifestChecksums == "" {
		opts.ManifestChecksums = "CRC32C"
	}
	opts.ManifestChecksums = strings.ToUpper(opts.ManifestChecksums)
	if _, ok := checksumSize[opts.ManifestChecksums]; !ok {
		return nil, fmt.Errorf("pgagent: unknown manifest checksum algorithm %q", opts.ManifestChecksums)
	}
	if opts.MaxRate != 0 && (opts.MaxRate < 32 || opts.MaxRate > 1048576) {
		return nil, fmt.Errorf("pgagent: max rate %d KiB/s outside 32–1048576", opts.MaxRate)
	}
	start := opts.now().UTC()
	if opts.Label == "" {
		opts.Label = "dualkey " + start.Format(time.RFC3339)
	}
	// awaitRepo returns the repository, waiting for Open if it runs.
	awaitRepo := func() (*repo.Repository, error) {
		if openc == nil {
			return r, nil
		}
		o := <-openc
		openc = nil
		return o.r, o.err
	}
	if opts.DataDir != "" {
		if opts.MaxRate != 0 {
			return nil, errors.New("pgagent: a local base backup (DataDir) cannot be throttled: MaxRate applies to BASE_BACKUP only")
		}
		return localBaseBackup(ctx, connURL, opts, start, awaitRepo)
	}

	cfg, err := pgconn.ParseConfig(connURL)
	if err != nil {
		return nil, fmt.Errorf("pgagent: connection URL: %w", err)
	}
	if v, ok := cfg.RuntimeParams["replication"]; !ok {
		cfg.RuntimeParams["replication"] = "true"
	} else if v != "true" && v != "on" && v != "yes" && v != "1" {
		return nil, fmt.Errorf("pgagent: a base backup needs a physical replication connection (replication=true), not replication=%s", v)
	}
	// The archives arrive in the server's 8 KiB sends, and pgproto3 reads
	// about that much per syscall, on the one goroutine that parses the
	// stream (a second backup, mostly unchanged pages, waits on nothing
	// else): read the socket in 1 MiB gulps, in a goroutine of its own.
	var ra *readAhead
	cfg.BuildFrontend = func(r io.Reader, w io.Writer) *pgproto3.Frontend {
		ra = newReadAhead(r, 1<<20, 8)
		return pgproto3.NewFrontend(ra, w)
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgagent: connect: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn.Close(cctx)
		ra.Close()
	}()

	version := conn.ParameterStatus("server_version")
	if major, _, _ := strings.Cut(version, "."); atoiOr(major, 0) < 15 {
		return nil, fmt.Errorf("pgagent: PostgreSQL %q: base backups need version 15 or later", version)
	}
	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("pgagent: IDENTIFY_SYSTEM: %w", err)
	}
	sysID, err := strconv.ParseUint(sys.SystemID, 10, 64)
	if err != nil {
		return nil, fmt.Errorf("pgagent: system identifier %q: %w", sys.SystemID, err)
	}

	bb := &baseStream{conn: conn, ctx: ctx, log: opts.Log, algorithm: opts.ManifestChecksums, corrupt: opts.corrupt,
		sums: map[string]FileSum{}, tablespaces: map[uint32]string{}}
	bb.meta = BaseMeta{SystemID: sysID, StartTime: start, ServerVersion: version, Label: opts.Label,
		FileChecksums: opts.ManifestChecksums}
	if err := bb.start(opts); err != nil {
		return nil, err
	}
	opts.Log.Info("base backup started", "system_id", sysID, "timeline", bb.meta.Timeline, "start_lsn", bb.meta.StartLSN, "label", opts.Label)
	if r, err = awaitRepo(); err != nil {
		return nil, err
	}
	return storeBase(ctx, r, opts, &bb.meta, func() bool { return bb.verified }, bb.next)
}

// storeBase runs the archiver over next, the entries of a base backup
// whose metadata is *meta, and commits the snapshot once verified reports
// that next has checked everything (next ends only after that; verified is
// the guard against a bug).
func storeBase(ctx context.Context, r *repo.Repository, opts BaseBackupOptions, meta *BaseMeta, verified func() bool,
	next func() (*archiver.Entry, error)) (*BaseBackupResult, error) {
	sysID := strconv.FormatUint(meta.SystemID, 10)
	host := opts.Hostname
	if host == "" {
		host = "pg-" + sysID
	}
	var wal format.WALRange // filled in before the commit, once EndLSN is known
	aopts := archiver.Options{WAL: &wal,
		Tags: append([]string{BaseTag}, opts.Tags...), Hostname: host, LockFor: opts.LockFor,
		Workers: opts.Workers, Progress: opts.Progress, Log: opts.Log, Kind: snapshot.KindPGBase,
		PageSize: func(p string, fi os.FileInfo) int {
			if fi.Mode().IsRegular() && IsRelationFile(p) {
				return PageSize
			}
			return 0
		},
		BeforeCommit: func(sn *snapshot.Snapshot) error {
			if !verified() {
				return errors.New("pgagent: the backup stream did not end") // a bug: next ends only after verifying
			}
			meta.EndTime = opts.now().UTC()
			raw, err := json.Marshal(*meta)
			if err != nil {
				return err
			}
			sn.Meta = raw
			wal = meta.walRange()
			return nil
		},
	}
	res, err := archiver.BackupEntries(ctx, r, "pg:"+sysID, next, aopts)
	if err != nil {
		return nil, fmt.Errorf("pgagent: base backup: %w", err)
	}
	opts.Log.Info("base backup stored", "snapshot", res.ID, "start_lsn", meta.StartLSN, "end_lsn", meta.EndLSN,
		"size", meta.Size, "added", res.Summary.BytesAdded)
	return &BaseBackupResult{ID: res.ID, Lock: res.Lock, Summary: res.Summary, Meta: *meta}, nil
}

// manifestEntry is the snapshot's backup_manifest.
func manifestEntry(manifest []byte, now time.Time) *archiver.Entry {
	now = now.UTC()
	return &archiver.Entry{Path: ManifestName, Node: snapshot.Node{Type: snapshot.File, Mode: 0o600,
		UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), ModTime: now, AccessTime: now, ChangeTime: now,
		Size: uint64(len(manifest))}, Content: bytes.NewReader(manifest)}
}

// walRange is the WAL the backup needs, widened to whole segments (restore
// fetches whole segments): from the start of StartLSN's segment to the end
// of EndLSN's, on the later of its start and end timelines (the vault keeps
// the pieces of earlier timelines in the range too).
func (m BaseMeta) walRange() format.WALRange {
	seg := pgwal.DefaultSegmentSize
	return format.WALRange{
		Timeline: max(m.Timeline, m.EndTimeline),
		Start:    uint64(pgwal.SegmentStart(pgwal.SegmentOf(m.StartLSN, seg), seg)),
		End:      uint64(pgwal.SegmentStart(pgwal.SegmentOf(m.EndLSN, seg)+1, seg)),
	}
}

func atoiOr(s string, def int) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return def
	}
	return n
}

// quote makes s a single-quoted SQL literal.
func quote(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// baseStream reads one BASE_BACKUP response and yields its archives'
// members as archiver entries.
//
// What PostgreSQL 15 sends (protocol.sgml, "BASE_BACKUP"): a result set
// (recptr, tli) with the start position; a result set (spcoid, spclocation,
// size) with one row per tablespace, the data directory's row with null
// spcoid; one CopyOutResponse whose CopyData messages each start with a
// type byte: 'n' (new archive: file name, tablespace location, both
// C strings; the data directory's location is empty), 'd' (data of the
// current archive or of the manifest), 'p' (progress), 'm' (the manifest
// follows); then CopyDone, a result set (recptr, tli) with the end
// position, CommandComplete and ReadyForQuery. Each archive is a tar
// stream; backup_label and tablespace_map are members of the data
// directory's archive.
type baseStream struct {
	conn      *pgconn.PgConn
	ctx       context.Context
	log       *slog.Logger
	algorithm string
	corrupt   func(string, io.Reader) io.Reader

	meta        BaseMeta
	tablespaces map[uint32]string // oid → location

	// the copy stream
	buf     []byte // unread data of the current part
	pending byte   // the message that ended the current part: 'n', 'm', or 'c' (CopyDone)
	next1   []byte // payload of a pending 'n'
	ended   bool   // CopyDone seen

	// the current archive
	tr     *tar.Reader
	prefix string // where the archive's members go: "" or "pg_tblspc/<oid>/"

	// the previous file, whose content the archiver has read by now
	cur      string
	curHash  hash.Hash
	curCount *countingReader
	label    *bytes.Buffer // backup_label's content, when cur is it

	sums     map[string]FileSum
	manifest []byte
	verified bool
	done     bool
}

func (b *baseStream) start(opts BaseBackupOptions) error {
	parts := []string{"LABEL " + quote(opts.Label), "CHECKPOINT 'fast'", "WAIT false",
		"MANIFEST 'yes'", "MANIFEST_CHECKSUMS " + quote(opts.ManifestChecksums)}
	if opts.MaxRate > 0 {
		parts = append(parts, "MAX_RATE "+strconv.Itoa(opts.MaxRate))
	}
	// WAL is left out (WAL false is the default): the agent streams it.
	// WAIT false: the server would otherwise wait for WAL archiving, which
	// the agent's slot replaces.
	b.conn.Frontend().SendQuery(&pgproto3.Query{String: "BASE_BACKUP (" + strings.Join(parts, ", ") + ")"})
	if err := b.conn.Frontend().Flush(); err != nil {
		return fmt.Errorf("pgagent: send BASE_BACKUP: %w", err)
	}
	lsn, tli, err := b.position("start")
	if err != nil {
		return err
	}
	b.meta.StartLSN, b.meta.Timeline = lsn, tli
	rows, err := b.resultSet("tablespaces", 3)
	if err != nil {
		return err
	}
	for _, row := range rows {
		if row[0] == nil { // the data directory
			continue
		}
		oid, err := strconv.ParseUint(string(row[0]), 10, 32)
		if err != nil || row[1] == nil {
			return fmt.Errorf("pgagent: BASE_BACKUP: bad tablespace row %q", row)
		}
		b.tablespaces[uint32(oid)] = string(row[1])
		b.meta.Tablespaces = append(b.meta.Tablespaces, Tablespace{OID: uint32(oid), Location: string(row[1])})
	}
	msg, err := b.receive()
	if err != nil {
		return err
	}
	if _, ok := msg.(*pgproto3.CopyOutResponse); !ok {
		return fmt.Errorf("pgagent: BASE_BACKUP: expected the archive stream, got %T", msg)
	}
	return nil
}

// receive returns the next message that is not a notice; an error
// response becomes an error.
func (b *baseStream) receive() (pgproto3.BackendMessage, error) {
	for {
		msg, err := b.conn.ReceiveMessage(b.ctx)
		if err != nil {
			return nil, fmt.Errorf("pgagent: BASE_BACKUP: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.NoticeResponse:
			b.log.Info("server notice during base backup", "severity", m.Severity, "message", m.Message)
			continue
		case *pgproto3.ParameterStatus:
			continue
		case *pgproto3.ErrorResponse:
			return nil, fmt.Errorf("pgagent: BASE_BACKUP: %w", pgconn.ErrorResponseToPgError(m))
		}
		return msg, nil
	}
}

// resultSet reads one result set of cols columns up to its CommandComplete.
// The rows' values are copied.
func (b *baseStream) resultSet(what string, cols int) ([][][]byte, error) {
	var rows [][][]byte
	for {
		msg, err := b.receive()
		if err != nil {
			return nil, err
		}
		switch m := msg.(type) {
		case *pgproto3.RowDescription:
			if len(m.Fields) != cols {
				return nil, fmt.Errorf("pgagent: BASE_BACKUP %s: %d columns, want %d", what, len(m.Fields), cols)
			}
		case *pgproto3.DataRow:
			if len(m.Values) != cols {
				return nil, fmt.Errorf("pgagent: BASE_BACKUP %s: %d values, want %d", what, len(m.Values), cols)
			}
			row := make([][]byte, cols)
			for i, v := range m.Values {
				if v != nil {
					row[i] = bytes.Clone(v)
				}
			}
			rows = append(rows, row)
		case *pgproto3.CommandComplete:
			return rows, nil
		default:
			return nil, fmt.Errorf("pgagent: BASE_BACKUP %s: unexpected %T", what, msg)
		}
	}
}

// position reads a (recptr, tli) result set.
func (b *baseStream) position(what string) (pgwal.LSN, uint32, error) {
	rows, err := b.resultSet(what+" position", 2)
	if err != nil {
		return 0, 0, err
	}
	if len(rows) != 1 || rows[0][0] == nil || rows[0][1] == nil {
		return 0, 0, fmt.Errorf("pgagent: BASE_BACKUP %s position: %d rows, want 1", what, len(rows))
	}
	lsn, err := pgwal.ParseLSN(string(rows[0][0]))
	if err != nil {
		return 0, 0, err
	}
	tli, err := strconv.ParseUint(string(rows[0][1]), 10, 32)
	if err != nil || tli == 0 {
		return 0, 0, fmt.Errorf("pgagent: BASE_BACKUP %s position: bad timeline %q", what, rows[0][1])
	}
	return lsn, uint32(tli), nil
}

// Read reads the current part (an archive or the manifest) of the copy
// stream; io.EOF ends the part.
func (b *baseStream) Read(p []byte) (int, error) {
	for len(b.buf) == 0 {
		if b.pending != 0 {
			return 0, io.EOF
		}
		msg, err := b.receive()
		if err != nil {
			return 0, err
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			if len(m.Data) == 0 {
				continue
			}
			switch m.Data[0] {
			case 'd':
				// Data stays valid until the next ReceiveMessage, which
				// comes only once it is consumed.
				b.buf = m.Data[1:]
			case 'p':
			case 'n':
				b.pending, b.next1 = 'n', bytes.Clone(m.Data[1:])
			case 'm':
				b.pending = 'm'
			default:
				return 0, fmt.Errorf("pgagent: BASE_BACKUP: unknown archive message %q", m.Data[0])
			}
		case *pgproto3.CopyDone:
			b.pending, b.ended = 'c', true
		default:
			return 0, fmt.Errorf("pgagent: BASE_BACKUP: unexpected %T in the archive stream", msg)
		}
	}
	n := copy(p, b.buf)
	b.buf = b.buf[n:]
	return n, nil
}

// nextPart skips what is left of the current part and returns the message
// that starts the next one.
func (b *baseStream) nextPart() (byte, error) {
	if _, err := io.Copy(io.Discard, b); err != nil {
		return 0, err
	}
	kind := b.pending
	b.pending = 0
	return kind, nil
}

// next is the archiver's source: it yields the archives' members, then the
// manifest, and returns io.EOF only once everything matched the manifest.
func (b *baseStream) next() (*archiver.Entry, error) {
	if err := b.finishFile(); err != nil {
		return nil, err
	}
	for {
		if b.done {
			return nil, io.EOF
		}
		if b.tr == nil {
			kind, err := b.nextPart()
			if err != nil {
				return nil, err
			}
			switch kind {
			case 'n':
				if err := b.newArchive(); err != nil {
					return nil, err
				}
			case 'm':
				m, err := io.ReadAll(io.LimitReader(b, maxManifest+1))
				if err != nil {
					return nil, fmt.Errorf("pgagent: read manifest: %w", err)
				}
				if b.manifest != nil {
					return nil, errors.New("pgagent: BASE_BACKUP sent two manifests")
				}
				b.manifest = m
			case 'c':
				return b.finish()
			}
			continue
		}
		hdr, err := b.tr.Next()
		if err == io.EOF {
			b.tr = nil
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("pgagent: archive: %w", err)
		}
		e, err := b.entry(hdr)
		if err != nil {
			return nil, err
		}
		if e != nil {
			return e, nil
		}
	}
}

func (b *baseStream) newArchive() error {
	name, rest, ok := bytes.Cut(b.next1, []byte{0})
	loc, _, ok2 := bytes.Cut(rest, []byte{0})
	if !ok || !ok2 {
		return errors.New("pgagent: BASE_BACKUP: malformed new-archive message")
	}
	b.tr = tar.NewReader(b)
	b.prefix = ""
	if len(loc) == 0 {
		b.log.Debug("archive", "name", string(name), "tablespace", "data directory")
		return nil
	}
	for oid, l := range b.tablespaces {
		if l == string(loc) {
			b.prefix = "pg_tblspc/" + strconv.FormatUint(uint64(oid), 10) + "/"
			b.log.Debug("archive", "name", string(name), "tablespace", oid, "location", l)
			return nil
		}
	}
	return fmt.Errorf("pgagent: BASE_BACKUP: archive %q of a tablespace at %q that was not announced", name, loc)
}

// entry turns a tar member into an archiver entry; nil means skip it.
func (b *baseStream) entry(hdr *tar.Header) (*archiver.Entry, error) {
	name := strings.TrimPrefix(hdr.Name, "./")
	name = strings.TrimSuffix(name, "/")
	if name == "" || name == "." {
		return nil, nil
	}
	p := b.prefix + name
	fi := hdr.FileInfo()
	n := snapshot.Node{Mode: fi.Mode(), UID: uint32(hdr.Uid), GID: uint32(hdr.Gid), User: hdr.Uname, Group: hdr.Gname,
		ModTime: hdr.ModTime.UTC(), AccessTime: hdr.ModTime.UTC(), ChangeTime: hdr.ModTime.UTC()}
	e := &archiver.Entry{Path: p}
	switch hdr.Typeflag {
	case tar.TypeReg:
		n.Type, n.Size = snapshot.File, uint64(hdr.Size)
		if p == ManifestName {
			return nil, fmt.Errorf("pgagent: the data directory holds a %s: the backup would hold two", ManifestName)
		}
		h, err := NewFileHash(b.algorithm)
		if err != nil {
			return nil, err
		}
		b.cur, b.curHash = p, h
		var rd io.Reader = b.tr
		if b.corrupt != nil {
			rd = b.corrupt(p, rd)
		}
		if h != nil {
			rd = io.TeeReader(rd, h)
		}
		if p == "backup_label" {
			b.label = &bytes.Buffer{}
			rd = io.TeeReader(rd, b.label)
		}
		b.curCount = &countingReader{r: rd}
		e.Content = b.curCount
	case tar.TypeDir:
		n.Type = snapshot.Dir
	case tar.TypeSymlink:
		if b.prefix == "" && strings.HasPrefix(p, "pg_tblspc/") {
			if oid, err := strconv.ParseUint(strings.TrimPrefix(p, "pg_tblspc/"), 10, 32); err == nil {
				if _, ok := b.tablespaces[uint32(oid)]; ok {
					return nil, nil // its files come in the tablespace's archive, stored at this path
				}
			}
		}
		n.Type, n.LinkTarget = snapshot.Symlink, hdr.Linkname
	default:
		return nil, fmt.Errorf("pgagent: archive member %q of unexpected type %q", hdr.Name, hdr.Typeflag)
	}
	e.Node = n
	return e, nil
}

// finishFile records the sum of the file the archiver has just read.
func (b *baseStream) finishFile() error {
	if b.cur == "" {
		return nil
	}
	if _, dup := b.sums[b.cur]; dup {
		return fmt.Errorf("pgagent: archive holds %q twice", b.cur)
	}
	fs := FileSum{Size: b.curCount.n, Algorithm: b.algorithm}
	if b.curHash != nil {
		fs.Sum = b.curHash.Sum(nil)
	}
	b.sums[b.cur] = fs
	if b.label != nil {
		if err := b.parseLabel(b.label.Bytes()); err != nil {
			return err
		}
		b.label = nil
	}
	b.cur, b.curHash, b.curCount = "", nil, nil
	return nil
}

// parseLabel reads backup_label and checks it against BASE_BACKUP's start.
func (b *baseStream) parseLabel(data []byte) error {
	l, err := parseBackupLabel(data)
	if err != nil {
		return err
	}
	if l.StartLSN != b.meta.StartLSN {
		return fmt.Errorf("pgagent: backup_label starts at %s, BASE_BACKUP said %s", l.StartLSN, b.meta.StartLSN)
	}
	b.meta.CheckpointLSN, b.meta.BackupFrom = l.CheckpointLSN, l.BackupFrom
	return nil
}

// backupLabel is what a backup uses of its backup_label.
type backupLabel struct {
	StartLSN, CheckpointLSN pgwal.LSN
	BackupFrom              string // "primary" or "standby"
	Timeline                uint32 // START TIMELINE
}

// parseBackupLabel reads backup_label ("START WAL LOCATION: 0/2000028 (file
// …)", "CHECKPOINT LOCATION: …", "BACKUP FROM: primary", "START TIMELINE:
// 1", …), as BASE_BACKUP sends it and pg_backup_stop returns it.
func parseBackupLabel(data []byte) (backupLabel, error) {
	var l backupLabel
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			continue
		}
		switch k {
		case "START WAL LOCATION":
			f, _, _ := strings.Cut(v, " ")
			lsn, err := pgwal.ParseLSN(f)
			if err != nil {
				return l, fmt.Errorf("pgagent: backup_label: %w", err)
			}
			l.StartLSN = lsn
		case "CHECKPOINT LOCATION":
			lsn, err := pgwal.ParseLSN(v)
			if err != nil {
				return l, fmt.Errorf("pgagent: backup_label: %w", err)
			}
			l.CheckpointLSN = lsn
		case "BACKUP FROM":
			l.BackupFrom = v
		case "START TIMELINE":
			tli, err := strconv.ParseUint(v, 10, 32)
			if err != nil || tli == 0 {
				return l, fmt.Errorf("pgagent: backup_label: bad start timeline %q", v)
			}
			l.Timeline = uint32(tli)
		}
	}
	if l.StartLSN.IsZero() {
		return l, errors.New("pgagent: backup_label has no start location")
	}
	if l.CheckpointLSN.IsZero() {
		return l, errors.New("pgagent: backup_label has no checkpoint location")
	}
	return l, nil
}

// finish reads the end of the response, checks everything against the
// manifest and yields the manifest as the last entry.
func (b *baseStream) finish() (*archiver.Entry, error) {
	lsn, tli, err := b.position("end")
	if err != nil {
		return nil, err
	}
	b.meta.EndLSN, b.meta.EndTimeline = lsn, tli
	for {
		msg, err := b.receive()
		if err != nil {
			return nil, err
		}
		if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
			break
		}
		if _, ok := msg.(*pgproto3.CommandComplete); !ok {
			return nil, fmt.Errorf("pgagent: BASE_BACKUP: unexpected %T after the end position", msg)
		}
	}
	if _, ok := b.sums["backup_label"]; !ok {
		return nil, errors.New("pgagent: BASE_BACKUP sent no backup_label")
	}
	if b.manifest == nil {
		return nil, errors.New("pgagent: BASE_BACKUP sent no manifest")
	}
	m, err := ParseManifest(b.manifest)
	if err != nil {
		return nil, err
	}
	if err := b.checkWAL(m); err != nil {
		return nil, err
	}
	if err := m.Check(b.sums); err != nil {
		return nil, err
	}
	b.meta.Size, b.meta.Files = m.Size()
	b.meta.ManifestChecksum = fmt.Sprintf("%x", m.Checksum)
	b.verified, b.done = true, true
	return manifestEntry(b.manifest, time.Now()), nil
}

// checkWAL compares the manifest's WAL ranges with the positions
// BASE_BACKUP returned.
func (b *baseStream) checkWAL(m *Manifest) error {
	if len(m.WAL) == 0 {
		return fmt.Errorf("%w: no WAL range", ErrManifest)
	}
	first, last := m.WAL[0], m.WAL[len(m.WAL)-1]
	if first.Start != b.meta.StartLSN || last.End != b.meta.EndLSN || last.Timeline != b.meta.EndTimeline {
		return fmt.Errorf("%w: WAL %s–%s (timeline %d), BASE_BACKUP said %s–%s (timeline %d)", ErrManifest,
			first.Start, last.End, last.Timeline, b.meta.StartLSN, b.meta.EndLSN, b.meta.EndTimeline)
	}
	return nil
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
