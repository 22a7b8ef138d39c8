package evloop

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kernel's io_uring interface, as much of it as the loop uses: a
// submission and a completion ring shared with the kernel, and a ring of
// provided buffers that receives pick from when data arrives. Numbers and
// layouts are the kernel's ABI (include/uapi/linux/io_uring.h); the system
// call numbers are the same on every architecture.

const (
	sysSetup    = 425
	sysEnter    = 426
	sysRegister = 427

	setupClamp        = 1 << 4
	setupRDisabled    = 1 << 6
	setupSubmitAll    = 1 << 7
	setupSingleIssuer = 1 << 12
	setupDeferTaskrun = 1 << 13
	enterGetEvents    = 1 << 0
	enterExtArg       = 1 << 3
	registerEnable    = 12
	registerPbufRing  = 22
	offSQRing         = 0
	offSQEs           = 0x10000000
	featSingleMmap    = 1 << 0
	featExtArg        = 1 << 8
	opPollAdd         = 6
	opAsyncCancel     = 14
	opSend            = 26
	opRecv            = 27
	sqeBufferSelect   = 1 << 5
	pollAddMulti      = 1 << 0
	cqeFBuffer        = 1 << 0
	cqeFMore          = 1 << 1
	cqeBufferShift    = 16
	recvsendPollFirst = 1 << 0
)

type ringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  [10]uint32 // head, tail, ring_mask, ring_entries, flags, dropped, array, resv1, user_addr (u64)
	cqOff                                                                  [10]uint32 // head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1, user_addr (u64)
}

type sqe struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	opFlags  uint32
	userData uint64
	bufGroup uint16
	pers     uint16
	splice   int32
	addr3    uint64
	pad      uint64
}

type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

type bufRegister struct {
	ringAddr    uint64
	ringEntries uint32
	bgid        uint16
	flags       uint16
	resv        [3]uint64
}

type getEventsArg struct {
	sigmask   uint64
	sigmaskSz uint32
	minWait   uint32
	ts        uint64
}

// ring is one io_uring with its mappings and the provided buffers.
type ring struct {
	fd                          int
	sqHead, sqTail, sqArray     *uint32
	sqMask                      uint32
	cqHead, cqTail              *uint32
	cqMask                      uint32
	sqes                        []sqe
	cqes                        []cqe
	tail                        uint32 // the submission tail not yet published
	unsubmitted                 uint32
	ringMem, sqeMem, bufRingMem []byte

	bufs     []byte // n buffers of bufSize bytes, received into by the kernel
	nBufs    int
	bufRing  []bufEntry
	bufTail  uint16
	bufDirty bool
}

type bufEntry struct {
	addr uint64
	len  uint32
	bid  uint16
	resv uint16 // entry 0's is the ring's tail
}

const (
	ringEntries = 4096
	bufSize     = 32 << 10
	bufGroup    = 0
)

// nBufs is the number of receive buffers, a power of 2 (a variable for
// the tests of running out).
var nBufs = 256

// errNoRing is why a loop runs on epoll: the kernel has no io_uring, or
// not the parts the loop needs (Linux 6.1), or it is switched off.
var errNoRing = errors.New("evloop: io_uring unavailable")

// newRing sets up a ring that is enabled later by the thread that will
// use it (single issuer: the kernel runs completions on that thread when
// it next waits, with no interrupts in between).
func newRing() (*ring, error) {
	if one := uint16(1); *(*byte)(unsafe.Pointer(&one)) != 1 {
		return nil, fmt.Errorf("%w: big-endian (publishBufs)", errNoRing)
	}
	var p ringParams
	p.flags = setupClamp | setupRDisabled | setupSubmitAll | setupSingleIssuer | setupDeferTaskrun
	fd, _, e := syscall.Syscall(sysSetup, ringEntries, uintptr(unsafe.Pointer(&p)), 0)
	if e != 0 {
		return nil, fmt.Errorf("%w: io_uring_setup: %v", errNoRing, e)
	}
	r := &ring{fd: int(fd)}
	if err := r.mapRings(&p); err != nil {
		r.close()
		return nil, err
	}
	if err := r.provideBuffers(); err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

func (r *ring) mapRings(p *ringParams) error {
	if p.features&featSingleMmap == 0 || p.features&featExtArg == 0 {
		return fmt.Errorf("%w: kernel too old (features %#x)", errNoRing, p.features)
	}
	size := max(p.sqOff[6]+p.sqEntries*4, p.cqOff[5]+p.cqEntries*uint32(unsafe.Sizeof(cqe{})))
	var err error
	if r.ringMem, err = unix.Mmap(r.fd, offSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("evloop: map io_uring: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries)*int(unsafe.Sizeof(sqe{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("evloop: map io_uring entries: %w", err)
	}
	base := unsafe.Pointer(&r.ringMem[0])
	at := func(off uint32) *uint32 { return (*uint32)(unsafe.Add(base, off)) }
	r.sqHead, r.sqTail, r.sqMask, r.sqArray = at(p.sqOff[0]), at(p.sqOff[1]), *at(p.sqOff[2]), at(p.sqOff[6])
	r.cqHead, r.cqTail, r.cqMask = at(p.cqOff[0]), at(p.cqOff[1]), *at(p.cqOff[2])
	r.sqes = unsafe.Slice((*sqe)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	r.cqes = unsafe.Slice((*cqe)(unsafe.Add(base, p.cqOff[5])), p.cqEntries)
	array := unsafe.Slice(r.sqArray, p.sqEntries)
	for i := range array {
		array[i] = uint32(i) // entry i in slot i, always
	}
	r.tail = atomic.LoadUint32(r.sqTail)
	return nil
}

// provideBuffers registers the receive buffers. A receive takes one only
// when data arrives, so idle sockets hold none.
func (r *ring) provideBuffers() error {
	var err error
	r.nBufs = nBufs
	if r.bufs, err = unix.Mmap(-1, 0, nBufs*bufSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON); err != nil {
		return fmt.Errorf("evloop: receive buffers: %w", err)
	}
	if r.bufRingMem, err = unix.Mmap(-1, 0, nBufs*int(unsafe.Sizeof(bufEntry{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON); err != nil {
		return fmt.Errorf("evloop: buffer ring: %w", err)
	}
	r.bufRing = unsafe.Slice((*bufEntry)(unsafe.Pointer(&r.bufRingMem[0])), nBufs)
	reg := bufRegister{ringAddr: uint64(uintptr(unsafe.Pointer(&r.bufRing[0]))), ringEntries: uint32(nBufs), bgid: bufGroup}
	if _, _, e := syscall.Syscall6(sysRegister, uintptr(r.fd), registerPbufRing, uintptr(unsafe.Pointer(&reg)), 1, 0, 0); e != 0 {
		return fmt.Errorf("%w: register buffer ring: %v", errNoRing, e)
	}
	for bid := range nBufs {
		r.recycle(uint16(bid))
	}
	r.publishBufs()
	return nil
}

// enable hands the ring to the calling thread, the only one that may use
// it from then on.
func (r *ring) enable() error {
	if _, _, e := syscall.Syscall6(sysRegister, uintptr(r.fd), registerEnable, 0, 0, 0, 0); e != 0 {
		return fmt.Errorf("evloop: enable io_uring: %v", e)
	}
	return nil
}

func (r *ring) close() {
	if r.fd >= 0 {
		unix.Close(r.fd)
		r.fd = -1
	}
	for _, m := range [][]byte{r.ringMem, r.sqeMem, r.bufRingMem, r.bufs} {
		if m != nil {
			unix.Munmap(m)
		}
	}
	r.ringMem, r.sqeMem, r.bufRingMem, r.bufs = nil, nil, nil, nil
}

// buf returns provided buffer bid.
func (r *ring) buf(bid uint16) []byte {
	off := int(bid) * bufSize
	return r.bufs[off : off+bufSize : off+bufSize]
}

// recycle gives buffer bid back to the kernel (published by
// publishBufs, before the next wait).
func (r *ring) recycle(bid uint16) {
	e := &r.bufRing[int(r.bufTail)&(r.nBufs-1)]
	e.addr = uint64(uintptr(unsafe.Pointer(&r.bufs[int(bid)*bufSize])))
	e.len = bufSize
	e.bid = bid
	r.bufTail++
	r.bufDirty = true
}

func (r *ring) publishBufs() {
	if !r.bufDirty {
		return
	}
	r.bufDirty = false
	// The tail is the 16 bits after entry 0's bid: stored with it in one
	// atomic 32-bit store (little-endian), after the entries.
	w := (*uint32)(unsafe.Pointer(&r.bufRing[0].bid))
	atomic.StoreUint32(w, uint32(r.bufRing[0].bid)|uint32(r.bufTail)<<16)
}

// get returns a cleared submission entry, submitting what is queued first
// if the ring is full.
func (r *ring) get() (*sqe, error) {
	for try := 0; r.tail-atomic.LoadUint32(r.sqHead) > r.sqMask; try++ {
		if try == 100 {
			return nil, errors.New("evloop: io_uring submission queue stays full")
		}
		if err := r.submit(false, false); err != nil {
			return nil, err
		}
	}
	s := &r.sqes[r.tail&r.sqMask]
	*s = sqe{}
	r.tail++
	r.unsubmitted++
	return s, nil
}

// waitTimeoutTS bounds a wait as the epoll loop's waitTimeout does.
var waitTimeoutTS = unix.NsecToTimespec(waitTimeout * 1e6)

// submit publishes the queued entries and, if wait, waits until at least
// one completion is there (or waitTimeout, or a signal). raw: a system
// call the scheduler does not see (see Loop.wait).
func (r *ring) submit(wait, raw bool) error {
	r.publishBufs()
	atomic.StoreUint32(r.sqTail, r.tail)
	var flags, minComplete uintptr
	var arg getEventsArg
	if wait {
		flags, minComplete = enterGetEvents|enterExtArg, 1
		arg.ts = uint64(uintptr(unsafe.Pointer(&waitTimeoutTS)))
	} else {
		// Completions that arrived are run here too (deferred task work
		// runs only when asked for events).
		flags = enterGetEvents | enterExtArg
	}
	var e syscall.Errno
	if raw || !wait {
		_, _, e = syscall.RawSyscall6(sysEnter, uintptr(r.fd), uintptr(r.unsubmitted), minComplete, flags, uintptr(unsafe.Pointer(&arg)), unsafe.Sizeof(arg))
	} else {
		_, _, e = syscall.Syscall6(sysEnter, uintptr(r.fd), uintptr(r.unsubmitted), minComplete, flags, uintptr(unsafe.Pointer(&arg)), unsafe.Sizeof(arg))
	}
	// The kernel's head says what it took, whatever the result: entries
	// not taken (a signal, a full completion ring) go with the next call.
	r.unsubmitted = r.tail - atomic.LoadUint32(r.sqHead)
	switch e {
	case 0, syscall.ETIME, syscall.EINTR, syscall.EBUSY, syscall.EAGAIN:
		return nil
	}
	return fmt.Errorf("evloop: io_uring_enter: %w", e)
}

// completions calls f for each completion and consumes them.
func (r *ring) completions(f func(c cqe)) {
	head := *r.cqHead
	for {
		tail := atomic.LoadUint32(r.cqTail)
		if head == tail {
			break
		}
		for ; head != tail; head++ {
			f(r.cqes[head&r.cqMask])
		}
		atomic.StoreUint32(r.cqHead, head)
	}
}
