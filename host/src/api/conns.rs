//! The connections a TCP listener (HTTP, the Redis protocol) holds open: at most a fixed number,
//! and when the table is full an idle connection gives way to a new client.
//!
//! A connection is idle while no request of it is in progress: between requests, and while the
//! bytes of a request's head trickle in. When the table is full, a new connection asks the
//! longest-idle one to close and takes its place, as nginx reuses idle keep-alive connections;
//! while every connection is busy, new ones wait in the kernel's accept queue until one ends. So
//! idle or slow clients cannot lock new ones out, and no request in progress is cut off.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::metrics::{ConnectionGuard, Metrics, Protocol};

/// A client connection's bytes: TCP, or TLS over it.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// How long a client has to finish its TLS handshake.
pub(crate) const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection accepted as `stream`: as it is, or after a TLS handshake with `tls`, which must
/// end within [`TLS_HANDSHAKE_TIMEOUT`].
pub(crate) async fn secure(stream: TcpStream, tls: Option<&TlsAcceptor>) -> std::io::Result<Box<dyn ClientStream>> {
    let Some(tls) = tls else { return Ok(Box::new(stream)) };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(stream)) => Ok(Box::new(stream)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the TLS handshake took too long")),
    }
}

/// Accepts connections on `listener` as `table` admits them and hands each to `serve`, until
/// `stopped` turns true. `what` names the protocol in logs.
pub(crate) async fn accept_loop(
    listener: &TcpListener,
    table: &Arc<ConnTable>,
    mut stopped: watch::Receiver<bool>,
    what: &str,
    mut serve: impl FnMut(TcpStream, SocketAddr, Conn),
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "accepting a {what} connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Admitted once it has arrived (an idle connection makes room only for a real one); the
        // ones behind it wait in the kernel's accept queue meanwhile.
        let conn = tokio::select! {
            conn = table.admit() => conn,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let _ = stream.set_nodelay(true);
        serve(stream, remote, conn);
    }
}

/// The connections of one listener.
pub(crate) struct ConnTable {
    max: usize,
    /// Where connections are counted (`grex_connections_total`, `grex_connections_open`).
    counted: Option<(Arc<Metrics>, Protocol)>,
    state: Mutex<TableState>,
    /// Signalled whenever a connection ends or falls idle.
    changed: Notify,
}

#[derive(Default)]
struct TableState {
    next_id: u64,
    conns: HashMap<u64, Entry>,
}

struct Entry {
    /// Requests in progress.
    busy: usize,
    /// When `busy` last fell to 0 (or the connection was accepted).
    idle_since: Instant,
    /// Notified once to ask the connection to close.
    evict: Arc<Notify>,
    evicting: bool,
}

impl ConnTable {
    /// A table of at most `max` connections.
    #[cfg(test)]
    pub(crate) fn new(max: usize) -> Arc<ConnTable> {
        Arc::new(ConnTable { max, counted: None, state: Mutex::new(TableState::default()), changed: Notify::new() })
    }

    /// [`new`](Self::new), counting its connections in `metrics` as `protocol`'s.
    pub(crate) fn counted(max: usize, metrics: &Arc<Metrics>, protocol: Protocol) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            max,
            counted: Some((metrics.clone(), protocol)),
            state: Mutex::new(TableState::default()),
            changed: Notify::new(),
        })
    }

    /// A place for a new connection: a free one, or one an idle connection gives up (it is asked
    /// to close, see [`Conn::evicted`]). Waits while every connection is busy.
    pub(crate) async fn admit(self: &Arc<Self>) -> Conn {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the table is read, so a change between the two is not missed.
            changed.as_mut().enable();
            {
                let mut state = self.state.lock().expect("connection table lock");
                if state.conns.len() < self.max {
                    let id = state.next_id;
                    state.next_id += 1;
                    let evict = Arc::new(Notify::new());
                    let entry = Entry { busy: 0, idle_since: Instant::now(), evict: evict.clone(), evicting: false };
                    state.conns.insert(id, entry);
                    let _counted = self.counted.as_ref().map(|(metrics, protocol)| metrics.connection(*protocol));
                    return Conn { table: self.clone(), id, evict, _counted };
                }
                // One eviction at a time is enough; the rest wait for it.
                if !state.conns.values().any(|e| e.evicting)
                    && let Some(victim) = state.conns.values_mut().filter(|e| e.busy == 0).min_by_key(|e| e.idle_since)
                {
                    victim.evicting = true;
                    victim.evict.notify_one();
                }
            }
            changed.await;
        }
    }

    /// Waits until every connection has ended.
    pub(crate) async fn closed(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.state.lock().expect("connection table lock").conns.is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// Connections open.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state.lock().expect("connection table lock").conns.len()
    }

    fn set_busy(&self, id: u64, busy: bool) {
        let mut state = self.state.lock().expect("connection table lock");
        if let Some(entry) = state.conns.get_mut(&id) {
            if busy {
                entry.busy += 1;
            } else {
                entry.busy -= 1;
                if entry.busy == 0 {
                    entry.idle_since = Instant::now();
                    self.changed.notify_waiters();
                }
            }
        }
    }
}

/// One connection's place in its table, given back when dropped.
pub(crate) struct Conn {
    table: Arc<ConnTable>,
    id: u64,
    evict: Arc<Notify>,
    _counted: Option<ConnectionGuard>,
}

impl Conn {
    /// Marks a request in progress until the guard is dropped: a busy connection is never asked
    /// to close to make room.
    pub(crate) fn busy(&self) -> Busy {
        self.table.set_busy(self.id, true);
        Busy { table: self.table.clone(), id: self.id }
    }

    /// Whether a request is in progress.
    pub(crate) fn is_busy(&self) -> bool {
        let state = self.table.state.lock().expect("connection table lock");
        state.conns.get(&self.id).is_some_and(|e| e.busy > 0)
    }

    /// Resolves when the table asks this connection to close to make room for a new one. The
    /// connection should finish the request in progress, if any, and close.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.state.lock().expect("connection table lock").conns.remove(&self.id);
        self.table.changed.notify_waiters();
    }
}

/// A request in progress on a connection (see [`Conn::busy`]).
pub(crate) struct Busy {
    table: Arc<ConnTable>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.table.set_busy(self.id, false);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn admitted_within(table: &Arc<ConnTable>, wait: Duration) -> Option<Conn> {
        tokio::time::timeout(wait, table.admit()).await.ok()
    }

    #[tokio::test]
    async fn a_full_table_asks_its_longest_idle_connection_to_close() {
        let table = ConnTable::new(3);
        let oldest = table.admit().await;
        let busy_one = table.admit().await;
        let _request = busy_one.busy();
        let newer = table.admit().await;
        assert_eq!(table.len(), 3);

        let waiting = tokio::spawn({
            let table = table.clone();
            async move { table.admit().await }
        });
        // The oldest idle connection is asked to go; the busy one (older than `newer`) is not.
        tokio::time::timeout(Duration::from_secs(5), oldest.evicted()).await.expect("the oldest idle was not evicted");
        let not_asked = tokio::time::timeout(Duration::from_millis(50), newer.evicted()).await;
        assert!(not_asked.is_err(), "a second connection was asked to close for one newcomer");
        assert!(!waiting.is_finished(), "the newcomer was admitted before a connection closed");
        drop(oldest);
        let _admitted = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("admitted").unwrap();
        assert_eq!(table.len(), 3);
    }

    #[tokio::test]
    async fn while_every_connection_is_busy_a_newcomer_waits_for_one_to_end() {
        let table = ConnTable::new(2);
        let first = table.admit().await;
        let second = table.admit().await;
        let busy_first = first.busy();
        let _busy_second = second.busy();
        assert!(admitted_within(&table, Duration::from_millis(100)).await.is_none());
        // A connection whose request ends becomes idle, and the next newcomer evicts it.
        drop(busy_first);
        let waiting = tokio::spawn({
            let table = table.clone();
            async move { table.admit().await }
        });
        tokio::time::timeout(Duration::from_secs(5), first.evicted()).await.expect("the now idle one was evicted");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("admitted").unwrap();
    }
}
