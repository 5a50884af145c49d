//! The service every scenario ends at, direct or through a tunnel: an HTTP/1.1 server (hyper,
//! keep-alive) and a TCP server that sinks, sources or echoes bytes. It does the least work that
//! answers each request, so on a shared machine it is never the bottleneck it would be if it
//! were, say, a Python server.
//!
//! HTTP: `GET /small` answers [`SMALL_BODY_BYTES`] bytes; `GET /bytes/N` answers N bytes;
//! `POST /upload` drains the body and answers its length in decimal.
//!
//! TCP: the first byte picks the mode. [`TCP_SINK`]: read to EOF, then write the count as a
//! big-endian u64. [`TCP_SOURCE`] + u64 N: write N bytes, shut down writing, read to EOF.
//! [`TCP_ECHO`]: echo until EOF.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::body::{BenchBody, CHUNK_BYTES};
use crate::Error;

/// Length of the `/small` response body.
pub const SMALL_BODY_BYTES: usize = 100;
/// TCP mode byte: read to EOF, answer the byte count.
pub const TCP_SINK: u8 = b'S';
/// TCP mode byte: followed by a big-endian u64 N, answer N bytes.
pub const TCP_SOURCE: u8 = b'D';
/// TCP mode byte: echo every byte until EOF.
pub const TCP_ECHO: u8 = b'E';

/// A bound backend; [`Backend::serve`] runs it.
pub struct Backend {
    http: TcpListener,
    tcp: TcpListener,
}

impl Backend {
    /// Binds both listeners (port 0 picks free ports).
    pub async fn bind(http: SocketAddr, tcp: SocketAddr) -> Result<Self, Error> {
        Ok(Backend {
            http: TcpListener::bind(http)
                .await
                .map_err(Error::io(format!("bind {http}")))?,
            tcp: TcpListener::bind(tcp).await.map_err(Error::io(format!("bind {tcp}")))?,
        })
    }

    /// Where the HTTP server listens.
    pub fn http_addr(&self) -> Result<SocketAddr, Error> {
        self.http.local_addr().map_err(Error::io("http local_addr"))
    }

    /// Where the TCP server listens.
    pub fn tcp_addr(&self) -> Result<SocketAddr, Error> {
        self.tcp.local_addr().map_err(Error::io("tcp local_addr"))
    }

    /// Serves both listeners forever (until the runtime stops).
    pub async fn serve(self) {
        let http = tokio::spawn(serve_http(self.http));
        let tcp = tokio::spawn(serve_tcp(self.tcp));
        let _ = tokio::join!(http, tcp);
    }
}

async fn serve_http(listener: TcpListener) {
    let small = Bytes::from(vec![b'x'; SMALL_BODY_BYTES]);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = sock.set_nodelay(true);
        let small = small.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, small.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, small: Bytes) -> Result<Response<BenchBody>, Infallible> {
    let path = req.uri().path();
    let reply = |status: StatusCode, body: BenchBody| {
        let mut res = Response::new(body);
        *res.status_mut() = status;
        Ok(res)
    };
    match (req.method(), path) {
        (&Method::GET, "/small") => reply(StatusCode::OK, BenchBody::full(small)),
        (&Method::GET, p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<u64>() {
            Ok(n) => reply(StatusCode::OK, BenchBody::repeat(n)),
            Err(_) => reply(StatusCode::BAD_REQUEST, BenchBody::full("bad length\n")),
        },
        (&Method::POST, "/upload") => {
            let mut body = req.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => return reply(StatusCode::BAD_REQUEST, BenchBody::full("body failed\n")),
                }
            }
            reply(StatusCode::OK, BenchBody::full(total.to_string()))
        }
        _ => reply(StatusCode::NOT_FOUND, BenchBody::Empty),
    }
}

async fn serve_tcp(listener: TcpListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let _ = tcp_conn(sock).await;
        });
    }
}

async fn tcp_conn(mut sock: TcpStream) -> std::io::Result<()> {
    let mode = sock.read_u8().await?;
    // Echo streams are held by the thousand and carry a few bytes: a small buffer.
    let mut buf = vec![0u8; if mode == TCP_ECHO { 4096 } else { CHUNK_BYTES }];
    match mode {
        TCP_SINK => {
            let mut total = 0u64;
            loop {
                let n = sock.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            sock.write_all(&total.to_be_bytes()).await?;
            sock.shutdown().await?;
        }
        TCP_SOURCE => {
            let mut left = sock.read_u64().await?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                sock.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            sock.shutdown().await?;
            while sock.read(&mut buf).await? > 0 {}
        }
        TCP_ECHO => loop {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).await?;
        },
        _ => {}
    }
    Ok(())
}
