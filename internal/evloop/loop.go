// Package evloop runs callbacks for ready sockets on one goroutine with
// epoll: the design of PgBouncer (libevent), for the gate's hot path.
//
// Why not goroutines and Go's network poller: per message, the poller
// makes a read that finds nothing before every wait and hands the
// goroutine across threads when data arrives. On a small virtual machine,
// where a system call and a cross-CPU wake-up are expensive, that costs a
// proxy about half again the CPU of a loop that reads only what epoll
// reports ready and writes inline (bench/gatefloor, docs/gate.md).
//
// Everything that runs on the loop must not block: work that may (a
// database lookup, a disk write, a wait for another party) is handed to a
// goroutine, which posts its result back with Submit.
package evloop

import (
	"fmt"
	"runtime"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Handler is told that its fd is ready (epoll event bits) on the loop's
// thread.
type Handler interface {
	Ready(fd int, events uint32)
}

// Event bits for Add and Mod.
const (
	Readable = unix.EPOLLIN | unix.EPOLLRDHUP
	Writable = unix.EPOLLOUT
)

// Loop is one epoll goroutine, which keeps its processor (a thread).
type Loop struct {
	epfd int
	wake int // eventfd: Submit wakes the loop through it

	mu      sync.Mutex
	tasks   []func()
	stopped bool
	done    chan struct{}

	handlers map[int32]Handler // on the loop only
	evs      []unix.EpollEvent
	raw      bool   // wait in a raw system call (see wait)
	u        *uring // the io_uring backend; nil: epoll
	cpu      int    // the CPU RunOn pinned the loop's thread to; -1: none
}

// Backend is what a loop waits with and moves data through.
type Backend int

const (
	// Auto is io_uring where the kernel has what the loop needs (Linux
	// 6.1, io_uring not switched off), epoll elsewhere.
	Auto Backend = iota
	// Epoll waits with epoll; handlers read and write with system calls.
	Epoll
	// IOURing submits the round's receives and sends and waits for them in
	// one system call.
	IOURing
)

func (b Backend) String() string {
	switch b {
	case Epoll:
		return "epoll"
	case IOURing:
		return "io_uring"
	}
	return "auto"
}

// New returns a loop on the Auto backend; Run runs it.
func New() (*Loop, error) { return NewBackend(Auto) }

// NewBackend returns a loop on backend b: an error for IOURing where the
// kernel lacks it.
func NewBackend(b Backend) (*Loop, error) {
	l, err := newEpoll()
	if err != nil || b == Epoll {
		return l, err
	}
	if l.u, err = newURing(l.wake, l.epfd); err != nil {
		if b == IOURing {
			l.closeFds()
			return nil, err
		}
		l.u = nil // Auto: epoll it is
		return l, nil
	}
	// The ring polls the eventfd itself.
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, l.wake, nil); err != nil {
		l.closeFds()
		return nil, fmt.Errorf("evloop: %w", err)
	}
	return l, nil
}

// Backend returns the backend the loop runs on.
func (l *Loop) Backend() Backend {
	if l.u != nil {
		return IOURing
	}
	return Epoll
}

func newEpoll() (*Loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("evloop: epoll_create1: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("evloop: eventfd: %w", err)
	}
	l := &Loop{epfd: epfd, wake: wake, done: make(chan struct{}), handlers: map[int32]Handler{}, evs: make([]unix.EpollEvent, 256),
		raw: runtime.GOMAXPROCS(0) > 1, cpu: -1}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}); err != nil {
		l.closeFds()
		return nil, fmt.Errorf("evloop: add eventfd: %w", err)
	}
	return l, nil
}

func (l *Loop) closeFds() {
	unix.Close(l.epfd)
	unix.Close(l.wake)
	if l.u != nil {
		l.u.r.close()
	}
}

// Add registers fd with h for events (Readable, Writable or both); the
// handler reads and writes fd itself. On the loop only (from a handler or
// a submitted function), as every method but Submit and Stop.
func (l *Loop) Add(fd int, h Handler, events uint32) error {
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: events, Fd: int32(fd)}); err != nil {
		return fmt.Errorf("evloop: add fd %d: %w", fd, err)
	}
	l.handlers[int32(fd)] = h
	return nil
}

// Mod changes the events fd is watched for. epoll reports a hang-up or an
// error whatever the events, even 0, until the fd is deleted.
func (l *Loop) Mod(fd int, events uint32) error {
	if l.u != nil && l.u.lookup(fd) != nil {
		return l.u.mod(fd, events)
	}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, fd, &unix.EpollEvent{Events: events, Fd: int32(fd)}); err != nil {
		return fmt.Errorf("evloop: mod fd %d: %w", fd, err)
	}
	return nil
}

// AddConn registers a socket whose data moves through the loop: the
// handler reads it with Read and writes it with Flush, and lets it go with
// Release.
func (l *Loop) AddConn(fd int, h Handler, events uint32) error {
	if l.u != nil {
		return l.u.add(fd, h, events)
	}
	return l.Add(fd, h, events)
}

// Read reads what a socket added with AddConn has: as the package's Read.
func (l *Loop) Read(fd int, p []byte) (int, error) {
	if l.u != nil {
		return l.u.read(fd, p)
	}
	return Read(fd, p)
}

// Flush writes o to a socket added with AddConn: as Out.Flush. On
// io_uring the loop takes o's bytes and sends them after those it took
// before; false while it holds maxBacklog bytes for fd.
func (l *Loop) Flush(fd int, o *Out) (bool, error) {
	if l.u != nil {
		return l.u.flush(fd, o)
	}
	return o.Flush(fd)
}

// Release stops watching fd, added with AddConn, and calls done on the
// loop once the loop has no operation on it in flight (at once on epoll):
// with the bytes it received and Read did not return, and those Flush
// took and it did not send, in order. Only then may fd be closed or used
// elsewhere. done is called whatever the error.
func (l *Loop) Release(fd int, done func(in, out []byte)) error {
	if l.u != nil && l.u.lookup(fd) != nil {
		return l.u.releaseFd(fd, done)
	}
	err := l.Del(fd) // not on the ring: done at once, as on epoll
	done(nil, nil)
	return err
}

// Del stops watching fd; events already collected for it are dropped.
func (l *Loop) Del(fd int) error {
	if l.u != nil && l.u.lookup(fd) != nil {
		return l.u.releaseFd(fd, nil)
	}
	delete(l.handlers, int32(fd))
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil); err != nil {
		return fmt.Errorf("evloop: del fd %d: %w", fd, err)
	}
	return nil
}

// Submit runs f on the loop's thread soon, in the order submitted. It
// returns false (and f never runs) once the loop has stopped.
func (l *Loop) Submit(f func()) bool {
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return false
	}
	first := len(l.tasks) == 0
	l.tasks = append(l.tasks, f)
	l.mu.Unlock()
	if first {
		var one = [8]byte{1}
		unix.Write(l.wake, one[:]) // EAGAIN only when already signalled
	}
	return true
}

// Stop ends Run after the tasks already submitted; the handlers' fds are
// not closed (their owners do that, told by a task submitted before Stop).
func (l *Loop) Stop() {
	l.mu.Lock()
	if !l.stopped {
		l.stopped = true
		var one = [8]byte{1}
		unix.Write(l.wake, one[:])
	}
	l.mu.Unlock()
	<-l.done
}

// Run runs the loop on the calling goroutine until Stop. Not locked to
// its OS thread: a locked goroutine that the scheduler preempts (every
// 10 ms, as it never parks) is handed between threads with futex
// wake-ups, thousands a second under load; unlocked it just resumes.
func (l *Loop) Run() {
	defer close(l.done)
	if l.raw {
		keepProc(1)
		defer keepProc(-1) // before Stop returns
	}
	if l.u != nil {
		l.runRing()
		return
	}
	defer l.closeFds()
	var tasks []func()
	for {
		n, err := l.wait()
		if err != nil {
			panic(fmt.Sprintf("evloop: epoll_wait: %v", err)) // EBADF, EFAULT, EINVAL: a bug
		}
		for i := range n {
			ev := &l.evs[i]
			if ev.Fd == int32(l.wake) {
				var b [8]byte
				unix.Read(l.wake, b[:])
				continue
			}
			if h := l.handlers[ev.Fd]; h != nil {
				h.Ready(int(ev.Fd), ev.Events)
			}
		}
		l.mu.Lock()
		tasks, l.tasks = l.tasks, tasks[:0]
		stopped := l.stopped
		l.mu.Unlock()
		for i, f := range tasks {
			f()
			tasks[i] = nil
		}
		if stopped {
			return // Submit refuses from the moment stopped is set: no task is left
		}
	}
}

// RunOn is Run on a thread pinned to one CPU. It returns once the thread
// is pinned, or with the reason it could not be, and then the loop does
// not run. The thread stays locked to the loop and ends with it, so that
// no other goroutine inherits its affinity.
//
// Why pin: on io_uring the loop is woken by the ring, not by a socket, and
// that wake-up carries no "sync" hint (the waker is about to sleep), so
// the scheduler cannot place the loop next to what woke it as it places
// an epoll waiter. Left to it, under TPC-B with 8 clients on two cores,
// the loop waited on a run queue ~48% of its time; pinned, ~44%, as
// PgBouncer's thread does unpinned (docs/gate.md, "Scheduling").
func (l *Loop) RunOn(cpu int) error {
	if cpu < 0 || cpu >= 1024 {
		return fmt.Errorf("evloop: CPU %d out of range", cpu)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread exits with the loop
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("evloop: pin the loop to CPU %d: %w", cpu, err)
			return
		}
		l.cpu = cpu
		errc <- nil
		l.Run()
	}()
	return <-errc
}

// CPU returns the CPU RunOn pinned the loop to, or -1.
func (l *Loop) CPU() int { return l.cpu }

// keepProc counts a raw loop in (1) or out (-1). A loop that waits in a
// raw system call keeps its processor while it sleeps (see wait). The
// first running loop takes one of the program's processors, as the
// gate's single loop always did (on two cores the rest keeps one); each
// further loop adds one to GOMAXPROCS, so that the sessions' goroutines,
// the ledger's writer and the collector keep what they had rather than run
// only when the runtime preempts a loop (every 10 ms).
func keepProc(delta int) {
	procs.Lock()
	defer procs.Unlock()
	before := max(procs.running-1, 0)
	procs.running += delta
	added := max(procs.running-1, 0)
	if added != before {
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + added - before)
	}
}

var procs struct {
	sync.Mutex
	running int // raw loops running
}

// runRing is Run on io_uring. Locked to its thread: the ring has a single
// issuer, and completions run on that thread when it waits.
func (l *Loop) runRing() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer l.closeFds()
	u := l.u
	if err := u.r.enable(); err != nil {
		panic(err.Error())
	}
	// The fds added with Add stay in the epoll set, which the ring polls.
	if err := u.pollIn(l.wake, udWake); err != nil {
		panic(err.Error())
	}
	if err := u.pollIn(l.epfd, udEpoll); err != nil {
		panic(err.Error())
	}
	var tasks []func()
	for {
		if err := u.r.submit(len(u.ready) == 0 && !u.epReady, l.raw); err != nil {
			panic(err.Error()) // EBADF, EFAULT, EINVAL: a bug
		}
		var err error
		u.r.completions(func(c cqe) {
			if e := u.complete(c); e != nil && err == nil {
				err = e
			}
		})
		if err == nil && u.epReady {
			// Level-triggered: while the set had events, look again next
			// round (the ring's poll says only when new ones come).
			u.epReady = l.dispatchEpoll() > 0
		}
		if err == nil {
			err = u.dispatch()
		}
		if err != nil {
			panic(err.Error())
		}
		l.mu.Lock()
		tasks, l.tasks = l.tasks, tasks[:0]
		stopped := l.stopped
		l.mu.Unlock()
		for i, f := range tasks {
			f()
			tasks[i] = nil
		}
		if stopped {
			u.abandon()
			return
		}
	}
}

// dispatchEpoll calls the handlers of the fds added with Add that epoll
// has events for, without waiting, and returns how many.
func (l *Loop) dispatchEpoll() int {
	r, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_WAIT, uintptr(l.epfd), uintptr(unsafe.Pointer(&l.evs[0])), uintptr(len(l.evs)), 0, 0, 0)
	if e != 0 {
		return 0
	}
	for i := range int(r) {
		ev := &l.evs[i]
		if h := l.handlers[ev.Fd]; h != nil {
			h.Ready(int(ev.Fd), ev.Events)
		}
	}
	return int(r)
}

// wait collects ready events, blocking for at most waitTimeout.
//
// A raw system call the scheduler does not see: in an ordinary one, the
// runtime's monitor takes the thread's processor away whenever the wait
// lasts more than a few microseconds, and hands it back when the wait
// ends, which costs more than the wait's own work at thousands of rounds
// a second (futex wake-ups, and the monitor polling every 20 µs). The
// loop keeps its processor instead; the runtime still stops it when it
// must (garbage collection): its preemption signal interrupts epoll_wait
// (EINTR) and the goroutine yields at its next function call. With a
// single processor (GOMAXPROCS=1) that would leave every other goroutine
// waiting for the loop's preemption, so there the wait is an ordinary
// system call.
func (l *Loop) wait() (int, error) {
	timeout := uintptr(waitTimeout)
	if !l.raw {
		timeout = 0 // a look without blocking first
	}
	r, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_WAIT, uintptr(l.epfd), uintptr(unsafe.Pointer(&l.evs[0])), uintptr(len(l.evs)), timeout, 0, 0)
	switch {
	case e == syscall.EINTR:
		return 0, nil
	case e != 0:
		return 0, e
	case r > 0 || l.raw:
		return int(r), nil
	}
	n, err := unix.EpollWait(l.epfd, l.evs, -1)
	if err == unix.EINTR {
		return 0, nil
	}
	return n, err
}

// waitTimeout (ms) bounds a raw wait, so that an idle loop still gets to
// the scheduler now and then even if no signal comes.
const waitTimeout = 100
