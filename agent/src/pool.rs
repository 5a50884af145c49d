//! Keep-alive connections to one local HTTP service, on hyper's HTTP/1 connection API.
//!
//! hyper-util's pooled client did the same job with more per request than a one-service pool
//! needs (a hashed pool key, a checkout future, a task spawned per request to hand the connection
//! back; docs/benchmarks.md, "Fourteenth round"). Here a finished exchange puts its sender back
//! itself and the next request takes the newest idle one.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1;
use parking_lot::Mutex;
use tower_service::Service;

use crate::http_fwd::Connector;

/// One dialled connection to the service, plain or TLS.
pub(crate) type Conn = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;

/// Why a request never got a response from the local service.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Dialling (TCP, or TLS for `https`) failed.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed during the HTTP/1 handshake or the exchange.
    Http(hyper::Error),
}

/// A sender parked between exchanges.
struct Idle<B> {
    tx: http1::SendRequest<B>,
    since: Instant,
}

/// Idle connections to one service, newest last.
pub(crate) struct Pool<B> {
    connector: Connector,
    /// `scheme://authority` of the service, what the connector dials.
    dial: Uri,
    idle: Arc<Mutex<Vec<Idle<B>>>>,
    idle_timeout: Duration,
    reaper: std::sync::Once,
}

/// A connection lent to one exchange: [`Pool::put`] it back once its response is fully read, or
/// drop it (an upgraded or broken connection is never reused).
pub(crate) struct Lent<B> {
    tx: http1::SendRequest<B>,
}

impl<B> Pool<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool that dials `dial` (`scheme://authority`) with `connector`.
    pub(crate) fn new(connector: Connector, dial: Uri, idle_timeout: Duration) -> Self {
        Pool {
            connector,
            dial,
            idle: Arc::new(Mutex::new(Vec::new())),
            idle_timeout,
            reaper: std::sync::Once::new(),
        }
    }

    /// Sends `req` (origin-form target, `Host` set) on an idle connection, or a new one.
    ///
    /// A pooled connection the service closed just before the request went out hands the request
    /// back unsent; it is then sent once more on a fresh connection, as hyper-util's client did.
    pub(crate) async fn send(&self, req: Request<B>) -> Result<(Response<Incoming>, Lent<B>), Failure> {
        let req = match self.checkout() {
            Some(mut tx) => match tx.try_send_request(req).await {
                Ok(res) => return Ok((res, Lent { tx })),
                // Handed back means never written: safe to send again.
                Err(mut e) => match e.take_message() {
                    Some(req) => req,
                    None => return Err(Failure::Http(e.into_error())),
                },
            },
            None => req,
        };
        let mut tx = self.dial().await?;
        let res = tx.send_request(req).await.map_err(Failure::Http)?;
        Ok((res, Lent { tx }))
    }

    /// Parks a connection whose exchange is complete. One not yet ready for its next request
    /// (hyper still finishing the last one) is parked once it is, by a task of its own.
    pub(crate) fn put(&self, lent: Lent<B>) {
        let Lent { mut tx } = lent;
        if tx.is_closed() {
            return;
        }
        if tx.is_ready() {
            park(&self.idle, tx);
            return;
        }
        let idle = Arc::downgrade(&self.idle);
        tokio::spawn(async move {
            if tx.ready().await.is_ok() {
                if let Some(idle) = idle.upgrade() {
                    park(&idle, tx);
                }
            }
        });
    }

    /// The newest idle sender that is still usable; stale and closed ones are dropped.
    fn checkout(&self) -> Option<http1::SendRequest<B>> {
        let mut idle = self.idle.lock();
        while let Some(Idle { tx, since }) = idle.pop() {
            if since.elapsed() < self.idle_timeout && tx.is_ready() {
                return Some(tx);
            }
        }
        None
    }

    /// A new connection to the service (TLS for `https`), outside the pool: for a caller's
    /// connection carried as bytes, which is never shared.
    pub(crate) async fn connect(&self) -> Result<Conn, Failure> {
        self.connector
            .clone()
            .call(self.dial.clone())
            .await
            .map_err(Failure::Connect)
    }

    async fn dial(&self) -> Result<http1::SendRequest<B>, Failure> {
        self.reaper
            .call_once(|| spawn_reaper(Arc::downgrade(&self.idle), self.idle_timeout));
        let io = self.connect().await?;
        let (tx, conn) = http1::Builder::new().handshake(io).await.map_err(Failure::Http)?;
        // The connection runs on its own; it ends when the service closes it or every sender
        // for it is dropped. `with_upgrades` keeps a `101` connection usable as a byte stream.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "connection to local service ended");
            }
        });
        Ok(tx)
    }
}

fn park<B>(idle: &Mutex<Vec<Idle<B>>>, tx: http1::SendRequest<B>) {
    idle.lock().push(Idle {
        tx,
        since: Instant::now(),
    });
}

/// Closes connections idle longer than `timeout`, so a quiet agent holds no sockets open to its
/// services; stops with the pool.
fn spawn_reaper<B: Send + 'static>(idle: Weak<Mutex<Vec<Idle<B>>>>, timeout: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(timeout / 3);
        loop {
            tick.tick().await;
            let Some(idle) = idle.upgrade() else { return };
            idle.lock().retain(|i| i.since.elapsed() < timeout && !i.tx.is_closed());
        }
    });
}
