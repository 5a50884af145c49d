//! Byte-stream forwarding: a `StreamOpen` for a TCP service becomes one local TCP connection,
//! pumped both ways under the stream's credit, with half-close in each direction.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use strait_schema::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::TcpTarget;
use crate::flow::{Inbound, StreamCtx};

/// Bound on dialling a local service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Dials the service and pumps until both directions finished, or resets the stream.
///
/// Gateway `Fin` shuts down our write half (the service sees EOF) while we keep reading; the
/// service's EOF becomes our `Fin`. Bytes from the gateway count as consumed once written to
/// the socket.
pub(crate) async fn pump(ctx: StreamCtx, target: TcpTarget) {
    let StreamCtx {
        tx,
        mut recv_credit,
        mut inbound,
    } = ctx;
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
    let (mut rd, mut wr) = sock.into_split();

    let to_local = async {
        loop {
            match inbound.recv().await {
                Some(Inbound::Data(bytes)) => {
                    wr.write_all(&bytes)
                        .await
                        .map_err(|e| format!("write to local service failed ({addr}): {e}"))?;
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
        loop {
            // Take credit first, then read at most that much: nothing is buffered beyond it.
            let n = tx.credit.take(tx.max_data_bytes).await;
            if n == 0 {
                return Err("connection to gateway closed".to_owned());
            }
            buf.reserve(n);
            let got = {
                let mut limited = (&mut buf).limit(n);
                rd.read_buf(&mut limited)
                    .await
                    .map_err(|e| format!("read from local service failed ({addr}): {e}"))?
            };
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
