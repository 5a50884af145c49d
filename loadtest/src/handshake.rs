//! A bare agent handshake (dial, signed `Hello`, wait for `Welcome`) for `connect-storm`. The
//! real agent carries upstream pools, TLS and a frame loop; here only the gateway's side of the
//! handshake should cost anything, so a storm of thousands stays cheap for the load generator
//! that shares the machine with the gateway it measures.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use strait_schema::{credentials, decode, encode, AgentToken, Frame, Hello, Limits, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Error;

/// An agent connection that got its `Welcome`; dropping it closes the socket.
pub type Connected = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Dials `ws_url` (`ws://host:port/v1/connect`) as `token`'s agent and returns once the gateway
/// answered `Welcome`; a `Refused` or anything else is an error. Bounded by `timeout`.
pub async fn connect(ws_url: &str, token: &AgentToken, timeout: Duration) -> Result<Connected, Error> {
    let fut = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .map_err(|e| Error::Handshake(format!("dial {ws_url}: {e}")))?;
        let hello = Frame::Hello(signed_hello(token));
        ws.send(Message::Binary(encode(&hello).into()))
            .await
            .map_err(|e| Error::Handshake(format!("send Hello: {e}")))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    return match decode(&b, &Limits::default()) {
                        Ok(Frame::Welcome(_)) => Ok(ws),
                        Ok(Frame::Refused(r)) => Err(Error::Handshake(format!("refused: {} {}", r.code, r.message))),
                        Ok(other) => Err(Error::Handshake(format!("expected Welcome, got {}", other.kind()))),
                        Err(e) => Err(Error::Handshake(format!("undecodable answer: {e}"))),
                    };
                }
                Some(Ok(Message::Close(_))) | None => return Err(Error::Handshake("closed before Welcome".into())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Error::Handshake(format!("read: {e}"))),
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| Error::Timeout(format!("no Welcome within {}s", timeout.as_secs_f64())))?
}

fn signed_hello(token: &AgentToken) -> Hello {
    let mut hello = Hello {
        agent: token.agent.clone(),
        instance_id: format!("storm-{:08x}", rand::random::<u32>()),
        key_id: token.key_id.clone(),
        timestamp_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        nonce: rand::random(),
        signature: [0; 32],
        version: PROTOCOL_VERSION,
        capabilities: Vec::new(),
        services: Vec::new(),
    };
    hello.signature = credentials::sign(&token.secret, &hello);
    hello
}
