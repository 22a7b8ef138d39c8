package evloop

// SetBuffers sets the number of receive buffers of the io_uring loops
// made from now on (a power of 2) and returns a function that restores it.
func SetBuffers(n int) (restore func()) {
	old := nBufs
	nBufs = n
	return func() { nBufs = old }
}

// NoBuffers returns how many receives found no free buffer (on the loop).
func (l *Loop) NoBuffers() int {
	if l.u == nil {
		return 0
	}
	return l.u.nobufs
}
