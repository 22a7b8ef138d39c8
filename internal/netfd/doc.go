// Package netfd accepts and dials stream sockets (TCP and Unix) with raw
// syscalls, keeping them out of Go's runtime network poller.
//
// The gate serves established sessions from its own epoll event loop on raw
// non-blocking fds. A socket that was ever registered with the runtime
// poller cannot be taken off it for good: the registration follows the open
// file description (it survives dup+close of the fd number), so the runtime
// would keep waking on every event of a socket it no longer serves. Sockets
// that may go to the event loop are therefore created here and used with
// poll(2) during connection startup ([Conn] in its blocking state), then
// either detached for the event loop ([Conn.Detach]) or handed to the
// runtime poller for good ([Conn.UseNetpoll]).
//
// Linux only.
package netfd
