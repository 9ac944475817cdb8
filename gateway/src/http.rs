//! The HTTP server: hyper's, with the limits a server on an open port needs, which
//! `axum::serve` does not set: a deadline for a request's headers (slowloris), one for reading
//! its body, a cap on open connections in all and on those from one address (so that one host
//! holding thousands of idle connections cannot shut everyone else out), and a graceful
//! shutdown that waits for running responses.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::log_budget::LogBudget;

/// How long a request's whole body may take to arrive (a request extension the JSON
/// extractor reads).
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub Duration);

/// Limits on the HTTP server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time a client gets to send a request's headers, from when the connection is ready for
    /// one (so it also closes a kept-alive connection left idle that long).
    pub header_read_timeout: Duration,
    /// Time a client gets to send a request's whole body.
    pub body_read_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections one client address (an IPv6 /64) may hold open at once; more of its are
    /// closed as soon as they are accepted. 0: no cap (behind a proxy, every client has the
    /// proxy's address).
    pub max_connections_per_address: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_address: 256,
        }
    }
}

/// The connections each client address holds: at most `max_connections` entries, since each
/// holds at least one open connection.
#[derive(Debug, Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its address's count; given back on drop.
#[derive(Debug)]
struct AddressPlace {
    book: Arc<PerAddress>,
    address: IpAddr,
}

impl PerAddress {
    /// A place for one more connection from `address`, unless it holds `cap` already.
    fn take(self: &Arc<Self>, address: IpAddr, cap: usize) -> Option<AddressPlace> {
        let address = client_address(address);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let held = open.entry(address).or_default();
        if *held >= cap {
            if *held == 0 {
                open.remove(&address);
            }
            return None;
        }
        *held += 1;
        Some(AddressPlace {
            book: Arc::clone(self),
            address,
        })
    }
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut open = self.book.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = open.get_mut(&self.address) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// The address a connection counts against: IPv4 as it is (an IPv4-mapped IPv6 address too),
/// IPv6 by its /64, the block one host is usually given.
fn client_address(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Connections closed at the door are logged at most once per 10 s, with how many since the
/// last line: a flood of connections must not become a flood of log lines.
static REFUSALS: LogBudget = LogBudget::new(Duration::from_secs(10), 1);

/// Counts one connection closed for `why`; logs the count now and then.
fn refused(peer: std::net::SocketAddr, why: &'static str) {
    tracing::debug!(%peer, why, "connection closed at once");
    if let Some(left_out) = REFUSALS.take() {
        tracing::warn!(
            %peer,
            why,
            closed = left_out + 1,
            "connections closed as soon as accepted (a flood, or limits set too low)"
        );
    }
}

/// Connections the kernel may hold accepted but not yet taken by the server (Linux caps it at
/// `net.core.somaxconn`, 4096 by default). Tokio's default is 1024: under a flood of new
/// connections from one host, a full queue made the kernel reset an honest client's.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the HTTP listener, with room for [`LISTEN_BACKLOG`] connections waiting for accept.
pub fn listen(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's own bind does: a restarted gateway can listen again while old connections
    // linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for
/// the open connections to finish their responses (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    // The body extractor reads the whole body within this (tower-http's body timeout restarts
    // with every frame, so a byte now and then would keep it alive).
    let app = app.layer(axum::Extension(BodyReadTimeout(limits.body_read_timeout)));
    // HTTP/1.1 only, as the OpenAI SDKs speak: sniffing for HTTP/2 would wait on a silent
    // client with no deadline at all, before hyper's header deadline starts.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, a connection reset before accept: wait a moment
                    // rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let address_place = match limits.max_connections_per_address {
            0 => None,
            cap => match per_address.take(peer.ip(), cap) {
                Some(place) => Some(place),
                None => {
                    refused(peer, "max_connections_per_address");
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            refused(peer, "max_connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
            drop(address_place);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_address_holds_at_most_its_cap_and_gets_places_back() {
        let book = Arc::new(PerAddress::default());
        let first = book.take(ip("192.0.2.7"), 2);
        let second = book.take(ip("192.0.2.7"), 2);
        assert!(first.is_some() && second.is_some());
        assert!(
            book.take(ip("192.0.2.7"), 2).is_none(),
            "a third from one address"
        );
        assert!(
            book.take(ip("192.0.2.8"), 2).is_some(),
            "another address is not affected"
        );
        drop(first);
        assert!(
            book.take(ip("192.0.2.7"), 2).is_some(),
            "a closed connection gives its place back"
        );
    }

    #[test]
    fn ipv6_hosts_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let one = client_address(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(one, client_address(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(one, client_address(ip("2001:db8:1:3::1")));
        assert_eq!(client_address(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn the_book_forgets_addresses_that_hold_nothing() {
        let book = Arc::new(PerAddress::default());
        drop(book.take(ip("192.0.2.7"), 1));
        assert!(book.take(ip("192.0.2.7"), 0).is_none());
        assert!(book.open.lock().unwrap().is_empty());
    }
}
