//! Byte-stream forwarding: a `StreamOpen` for a TCP service becomes one local TCP connection,
//! pumped both ways under the stream's credit, with half-close in each direction. [`relay`] is
//! also what carries an HTTP connection once it switched protocols (see `http_fwd`).

use std::time::Duration;

use bytes::BytesMut;
use strait_schema::read_size::ReadSize;
use strait_schema::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::TcpTarget;
use crate::flow::{Inbound, StreamCtx};

/// Bound on dialling a local service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Dials the service and [`relay`]s until both directions finished, or resets the stream.
pub(crate) async fn pump(ctx: StreamCtx, target: TcpTarget) {
    let tx = &ctx.tx;
    let addr = target.addr();
    let sock =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((target.host.as_str(), target.port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return tx
                    .reset(
                        ErrorCode::ServiceUnavailable,
                        &format!("local service refused connection ({addr})"),
                    )
                    .await
            }
            Ok(Err(e)) => {
                return tx
                    .reset(
                        ErrorCode::ServiceUnavailable,
                        &format!("local service unreachable ({addr}): {e}"),
                    )
                    .await
            }
            Err(_) => {
                return tx
                    .reset(
                        ErrorCode::ServiceUnavailable,
                        &format!("timed out connecting to local service ({addr})"),
                    )
                    .await
            }
        };
    let _ = sock.set_nodelay(true);
    let (rd, wr) = sock.into_split();
    relay(ctx, rd, wr, &addr).await;
}

/// Pumps one stream's bytes both ways between the gateway and a local byte stream (a TCP
/// connection, or an HTTP connection after `101 Switching Protocols`) until both directions
/// finished, or resets the stream with `SERVICE_UNAVAILABLE`.
///
/// Takes the two halves separately so a TCP socket can use its lock-free `into_split`, while
/// any other `AsyncRead + AsyncWrite` goes through `tokio::io::split`. Gateway `Fin` shuts down
/// the write half (the service sees EOF) while reading goes on; the service's EOF becomes our
/// `Fin`. Bytes from the gateway count as consumed (and are credited back) once written out,
/// including bytes that were buffered before `relay` started.
pub(crate) async fn relay<R, W>(ctx: StreamCtx, mut rd: R, mut wr: W, peer: &str)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let StreamCtx {
        tx,
        mut recv_credit,
        mut inbound,
    } = ctx;

    let to_local = async {
        loop {
            match inbound.recv().await {
                Some(Inbound::Data(bytes)) => {
                    wr.write_all(&bytes)
                        .await
                        .map_err(|e| format!("write to local service failed ({peer}): {e}"))?;
                    recv_credit.consumed(bytes.len());
                }
                Some(Inbound::Fin) => {
                    // The service may already have closed its side; EOF delivery is best effort.
                    let _ = wr.shutdown().await;
                    return Ok::<(), String>(());
                }
                None => return Err("stream closed before the gateway's Fin".to_owned()),
            }
        }
    };

    let to_gateway = async {
        let mut buf = BytesMut::new();
        let mut size = ReadSize::new(tx.max_data_bytes);
        loop {
            // Take credit first, then read at most that much: nothing is buffered beyond it.
            let n = tx.credit.take(size.next()).await;
            if n == 0 {
                return Err("connection to gateway closed".to_owned());
            }
            let got = size
                .read_from(&mut rd, &mut buf, n)
                .await
                .map_err(|e| format!("read from local service failed ({peer}): {e}"))?;
            tx.credit.give_back(n - got);
            if got == 0 {
                tx.fin().await.map_err(|_| "connection to gateway closed".to_owned())?;
                return Ok(());
            }
            let chunk = buf.split().freeze();
            tx.frame(&strait_schema::Frame::Data(strait_schema::Data {
                stream: tx.id,
                bytes: chunk,
            }))
            .await
            .map_err(|_| "connection to gateway closed".to_owned())?;
        }
    };

    if let Err(reason) = tokio::try_join!(to_local, to_gateway) {
        tracing::debug!(stream = %tx.id, %reason, "byte stream failed");
        tx.reset(ErrorCode::ServiceUnavailable, &reason).await;
    }
}
