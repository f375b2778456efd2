//! Accepting connections: the listener's socket ([`bind`]), and the guard
//! around tonic's accept loop: at most MAX_CONNECTIONS open at once, each
//! closed when idle or past MAX_CONNECTION_AGE plus its grace, and a pause
//! when accepting fails for want of file descriptors or memory.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::TcpIncoming;

use super::{Bounds, tls};
use crate::log_gate::LogGate;

/// Binds a listener on `addr`. An unspecified IPv6 address (`[::]`) listens
/// on IPv4 too (IPV6_V6ONLY off, whatever the host's default,
/// `net.ipv6.bindv6only`), so one setting serves IPv4, IPv6-only and
/// dual-stack clusters; IPv4 peers then appear as `::ffff:a.b.c.d`.
///
/// # Errors
///
/// The I/O error of creating, configuring or binding the socket.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};

    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // As std and tokio do: a restarted server can bind while old
    // connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // The backlog tokio's `TcpListener::bind` uses.
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The connections accepted on `listener`, at most `bounds.max_connections`
/// open at once, each closed once it has sent nothing for
/// `bounds.connection_idle_timeout`, or once it has been open for
/// `closed_at_age` (MAX_CONNECTION_AGE plus its grace) when that is set.
/// `port` names the port in the accept warnings ("grpc" or "health").
pub(crate) fn guarded(
    listener: TcpListener,
    bounds: Bounds,
    closed_at_age: Option<Duration>,
    port: &'static str,
) -> Guard {
    Guard {
        incoming: TcpIncoming::from(listener).with_nodelay(Some(true)),
        permits: Arc::new(Semaphore::new(bounds.max_connections)),
        acquiring: None,
        permit: None,
        idle: bounds.connection_idle_timeout,
        closed_at_age,
        port,
        max_connections: bounds.max_connections,
        paused: None,
        exhausted: LogGate::new(1, ACCEPT_WARNING_INTERVAL),
    }
}

/// How long accepting pauses after an accept fails for want of a resource
/// (file descriptors, kernel memory). tonic retries a failed accept at once
/// and logs it only at trace level, so without a pause the accept loop spins
/// on EMFILE at 100 % of a core, starving the health port and the calls on
/// open connections, until a connection closes. Connections wait in the
/// kernel's backlog meanwhile. hyper 0.14 paused 1 s (`sleep_on_errors`);
/// 100 ms costs nothing (ten failed `accept` calls a second) and takes up
/// the waiting connections soon after a descriptor is freed.
const ACCEPT_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// The least time between two warnings about failed accepts on one port.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a failed accept means the process or the host is out of a
/// resource (file descriptors, memory): retrying at once cannot succeed.
/// Other errors (ECONNABORTED: the peer gave up while queued) concern one
/// connection, and the next accept may succeed at once.
fn is_resource_exhaustion(err: &std::io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(err).is_some_and(|errno| {
        [Errno::MFILE, Errno::NFILE, Errno::NOMEM, Errno::NOBUFS].contains(&errno)
    })
}

/// Logs `err`, a failed accept for want of a resource, naming the cause and
/// the fix, unless `gate` (one per port) had a warning written within
/// [`ACCEPT_WARNING_INTERVAL`]; the warning counts the failures since the
/// last one, this one included (`failed_accepts`).
fn warn_exhausted(
    gate: &LogGate,
    err: &std::io::Error,
    port: &'static str,
    max_connections: usize,
) {
    // tokio's clock, as the pause's.
    let Some(suppressed) = gate.admit(tokio::time::Instant::now().into_std()) else {
        return;
    };
    tracing::warn!(
        port,
        error = %err,
        failed_accepts = suppressed.saturating_add(1),
        pause_ms = ACCEPT_EXHAUSTED_PAUSE.as_millis(),
        max_connections,
        "cannot accept connections: the process is out of file descriptors or memory; \
         pausing accepts (connections wait in the backlog). Fix: raise the file \
         descriptor limit (ulimit -n, the container runtime's nofile) above twice \
         MAX_CONNECTIONS plus the Redis pool, or lower MAX_CONNECTIONS"
    );
}

/// The stream of accepted connections made by [`guarded`]: it takes a
/// connection permit before it accepts, so at the cap it stops accepting
/// rather than accept and close.
pub(crate) struct Guard {
    incoming: TcpIncoming,
    permits: Arc<Semaphore>,
    /// The wait for a permit, while none is free.
    acquiring: Option<Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>>,
    /// The permit for the next connection accepted.
    permit: Option<OwnedSemaphorePermit>,
    idle: Duration,
    closed_at_age: Option<Duration>,
    /// The port's name, for the warnings.
    port: &'static str,
    /// MAX_CONNECTIONS, for the warnings.
    max_connections: usize,
    /// Set after an accept failed for want of a resource: no accept until
    /// it fires (see [`ACCEPT_EXHAUSTED_PAUSE`]).
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The rate limit of the warnings about failed accepts.
    exhausted: LogGate,
}

impl tokio_stream::Stream for Guard {
    type Item = std::io::Result<Guarded>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // `Guard` is `Unpin`: its fields are.
        let this = self.get_mut();
        loop {
            if let Some(paused) = this.paused.as_mut() {
                std::task::ready!(paused.as_mut().poll(cx));
                this.paused = None;
            }
            if this.permit.is_none() {
                let permits = &this.permits;
                let acquiring = this.acquiring.get_or_insert_with(|| {
                    let permits = permits.clone();
                    // The semaphore is never closed, so `None` cannot happen;
                    // the stream would end if it did.
                    Box::pin(async move { permits.acquire_owned().await.ok() })
                });
                let permit = std::task::ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                let Some(permit) = permit else {
                    return Poll::Ready(None);
                };
                this.permit = Some(permit);
            }
            let accepted = match std::task::ready!(Pin::new(&mut this.incoming).poll_next(cx)) {
                None => return Poll::Ready(None),
                // Not handed to tonic, which would only retry at once: the
                // pause is polled on the next turn of the loop, so this
                // task wakes when it ends. The permit is kept for the next
                // connection.
                Some(Err(err)) if is_resource_exhaustion(&err) => {
                    warn_exhausted(&this.exhausted, &err, this.port, this.max_connections);
                    this.paused = Some(Box::pin(tokio::time::sleep(ACCEPT_EXHAUSTED_PAUSE)));
                    continue;
                }
                Some(accepted) => accepted,
            };
            // Any other accept error goes to tonic, which retries at once;
            // the permit is kept for the next connection.
            let inner = match accepted {
                Ok(inner) => inner,
                Err(err) => return Poll::Ready(Some(Err(err))),
            };
            let permit = this.permit.take();
            return Poll::Ready(Some(Ok(Guarded {
                inner,
                _permit: permit,
                idle: this.idle,
                last_read: tokio::time::Instant::now(),
                silent_until: Alarm::new(tokio::time::sleep(this.idle)),
                closed_at_age: this.closed_at_age,
                too_old_at: this
                    .closed_at_age
                    .map(|age| Alarm::new(tokio::time::sleep(age))),
            })));
        }
    }
}

/// An accepted connection: holds its connection permit until it closes,
/// and fails its next read once the peer has sent nothing for `idle`, or
/// once it is older than MAX_CONNECTION_AGE plus its grace.
pub(crate) struct Guarded {
    inner: tokio::net::TcpStream,
    /// Always `Some` (taken from [`Guard`], which had one before accepting);
    /// an `Option` only so no code path has to assert it.
    _permit: Option<OwnedSemaphorePermit>,
    idle: Duration,
    /// When the last read that brought bytes returned.
    last_read: tokio::time::Instant,
    /// Fires at the earliest moment the connection can have been silent for
    /// `idle`; when it fires it is pushed to `last_read + idle` if bytes came
    /// since. Moving the timer on every read instead cost a timer-wheel
    /// removal and insertion per read (BENCHMARKS.md, #15).
    silent_until: Alarm,
    /// MAX_CONNECTION_AGE plus its grace, when set.
    closed_at_age: Option<Duration>,
    /// When the connection, asked to close at MAX_CONNECTION_AGE, has had
    /// its grace: what is still open on it then (a stream) is cut. Counted
    /// from the accept, and again from the end of the TLS handshake (see
    /// [`Guarded::start_age_clock`]).
    too_old_at: Option<Alarm>,
}

/// One of a connection's timers, polled only when a poll can tell
/// something new. hyper reads until the socket has nothing, so every read
/// ends in a pending one, and polling the timers there (to have them wake
/// the connection's task) cost a waker registration each, about five a
/// GetSession (BENCHMARKS.md, #22). Once polled, a timer wakes the task it
/// was polled by when it fires, and then reports itself elapsed; until
/// then, a pending read of the same task needs no poll.
struct Alarm {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The waker of the last poll that left the timer pending, which the
    /// timer will wake; `None` before the first poll and after a reset.
    armed_for: Option<Waker>,
}

impl Alarm {
    fn new(sleep: tokio::time::Sleep) -> Self {
        Self {
            sleep: Box::pin(sleep),
            armed_for: None,
        }
    }

    /// Whether the timer has fired; if not, it wakes `cx`'s task when it
    /// does.
    fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        let armed = self
            .armed_for
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        // Elapsed is read from the timer's own state, set before it wakes
        // anyone: when in doubt, the poll decides, as before.
        if armed && !self.sleep.is_elapsed() {
            return false;
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            return true;
        }
        if !armed {
            self.armed_for = Some(cx.waker().clone());
        }
        false
    }

    /// Moves the timer to `at`; the next [`Alarm::fired`] polls it.
    fn reset(&mut self, at: tokio::time::Instant) {
        self.sleep.as_mut().reset(at);
        self.armed_for = None;
    }
}

impl tls::AgeClock for Guarded {
    /// tonic starts its MAX_CONNECTION_AGE clock when it is handed the
    /// connection: at once in plaintext, after the handshake with TLS. The
    /// grace is counted from the same moment, so a slow handshake does not
    /// eat into it and cut a call before the GOAWAY.
    fn start_age_clock(&mut self) {
        if let (Some(age), Some(at)) = (self.closed_at_age, self.too_old_at.as_mut()) {
            at.reset(tokio::time::Instant::now() + age);
        }
    }
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // `Guarded` is `Unpin`: its fields are.
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_read = tokio::time::Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            // hyper (or the TLS handshake) always has a read waiting, so the
            // timer is polled for as long as the connection is open.
            Poll::Pending => {
                if this.too_old_at.as_mut().is_some_and(|at| at.fired(cx)) {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the connection outlived MAX_CONNECTION_AGE and its grace",
                    )));
                }
                while this.silent_until.fired(cx) {
                    let due = this.last_read + this.idle;
                    if due <= tokio::time::Instant::now() {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the peer sent nothing within the connection idle timeout",
                        )));
                    }
                    // Bytes came since it was set: wait for the rest.
                    this.silent_until.reset(due);
                }
                Poll::Pending
            }
        }
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    // The peer's address, as tonic gives it for a plain `TcpStream`: the
    // rate limits key on it.
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept errors that pause accepting are those of an exhausted
    /// resource; a connection aborted while queued is retried at once.
    #[test]
    fn only_resource_exhaustion_pauses_accepting() {
        for errno in [24, 23, 12, 105] {
            assert!(
                is_resource_exhaustion(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [103, 104, 71, 110] {
            assert!(
                !is_resource_exhaustion(&std::io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!is_resource_exhaustion(&std::io::Error::other("x")));
    }

    /// `[::]` takes IPv4 connections too (the manifests' LISTEN_ADDR), and an
    /// IPv4 address binds as before.
    #[tokio::test]
    async fn unspecified_ipv6_listens_on_ipv4_too() {
        let listener = match bind("[::]:0".parse().unwrap()) {
            Ok(listener) => listener,
            // A kernel without IPv6 (ipv6.disable=1) cannot test this.
            Err(err) if err.raw_os_error() == Some(97) => {
                eprintln!("skipped: no IPv6 here ({err})");
                return;
            }
            Err(err) => panic!("binding [::]:0: {err}"),
        };
        let port = listener.local_addr().unwrap().port();
        let accepted = tokio::spawn(async move { listener.accept().await.map(|(_, peer)| peer) });
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("an IPv4 client could not connect to [::]");
        let peer = accepted.await.unwrap().unwrap();
        assert_eq!(
            peer.ip(),
            "::ffff:127.0.0.1".parse::<std::net::IpAddr>().unwrap()
        );

        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
    }
}
