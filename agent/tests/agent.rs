//! The agent against a scripted gateway: a WebSocket peer on 127.0.0.1:0 that speaks the
//! schema codec, plus real local HTTP and TCP services.

// Test helpers outside `#[test]` functions panic on purpose when the scripted peer goes wrong.
#![allow(clippy::unwrap_used, clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use strait_agent::{AgentConfig, AgentHandle, AgentStatus, Error};
use strait_schema::credentials;
use strait_schema::{
    decode, encode, AgentName, AgentToken, Credit, Data, Drain, ErrorCode, Fin, Frame, GoAway, Header, Limits, Pong,
    RefuseCode, Refused, RequestHead, Secret, ServiceDecl, ServiceKind, StreamId, StreamOpen, Welcome, WireLimits,
    CAP_DRAIN, CAP_INLINE_END, CAP_RAW_HTTP, PATH_PREFIX_HEADER, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request as WsRequest, Response as WsResponse};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WINDOW: u32 = 64 << 10;
const MAX_DATA: u32 = 16 << 10;
const STEP: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

fn token() -> AgentToken {
    AgentToken {
        agent: AgentName::new("alpha").unwrap(),
        key_id: "k1".into(),
        secret: Secret::generate(),
    }
}

fn seeded(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i % 251) as u8).wrapping_add(seed)).collect()
}

/// What a draining node sends each of its agents.
fn go_away() -> Frame {
    Frame::GoAway(GoAway {
        reason: "draining".into(),
    })
}

fn welcome() -> Frame {
    Frame::Welcome(Welcome {
        node_id: "node-test".into(),
        heartbeat_ms: 1000,
        limits: WireLimits {
            max_frame_bytes: 1 << 20,
            max_data_bytes: MAX_DATA,
            stream_window: WINDOW,
            max_streams: 64,
        },
        capabilities: vec![],
    })
}

fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

fn value<'a>(headers: &'a [Header], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|h| h.name == name)
        .map(|h| h.value.as_ref())
        .collect()
}

/// A local HTTP service: `/base/big` (1 MiB, two `x-multi` values), `/base/echo` (echoes the
/// body and reports the `Host` and target it saw).
async fn http_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let host = req
                        .headers()
                        .get("host")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let target = req.uri().to_string();
                    let resp = if target.starts_with("/base/big") {
                        Response::builder()
                            .header("x-multi", "a")
                            .header("x-multi", "b")
                            .header("x-seen-host", host)
                            .body(Full::new(Bytes::from(seeded(1 << 20, 1))))
                            .unwrap()
                    } else if target == "/base/hugehead" {
                        Response::builder()
                            .header("x-big", "h".repeat(8 << 10))
                            .body(Full::new(Bytes::from_static(b"ok")))
                            .unwrap()
                    } else if target == "/base/echo" {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        Response::builder()
                            .header("x-seen-host", host)
                            .header("x-seen-target", target)
                            .body(Full::new(body))
                            .unwrap()
                    } else {
                        Response::builder().status(404).body(Full::new(Bytes::new())).unwrap()
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    addr
}

/// A local TCP service that echoes until EOF, then closes.
async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if sock.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

/// A port with nothing listening on it.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Accepts the agent's WebSocket; returns it with the request path it used.
async fn accept(listener: &TcpListener) -> (Ws, String) {
    let (sock, _) = tokio::time::timeout(STEP, listener.accept())
        .await
        .expect("agent did not dial")
        .unwrap();
    let mut path = String::new();
    let ws = tokio_tungstenite::accept_hdr_async(sock, |req: &WsRequest, resp: WsResponse| {
        path = req.uri().path().to_owned();
        Ok(resp)
    })
    .await
    .unwrap();
    (ws, path)
}

async fn send(ws: &mut Ws, frame: Frame) {
    ws.send(Message::Binary(encode(&frame).into())).await.unwrap();
}

/// The caller's last bytes on `stream`, then its half-close.
async fn send_last(ws: &mut Ws, stream: StreamId, bytes: &'static [u8]) {
    send(
        ws,
        Frame::Data(Data {
            stream,
            bytes: Bytes::from_static(bytes),
        }),
    )
    .await;
    send(ws, Frame::Fin(Fin { stream })).await;
}

/// Next frame from the agent, answering its `Ping`s on the way.
async fn next(ws: &mut Ws) -> Frame {
    loop {
        let msg = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no frame from agent")
            .unwrap()
            .unwrap();
        match msg {
            Message::Binary(b) => match decode(&b, &Limits::default()).unwrap() {
                Frame::Ping(p) => {
                    send(
                        ws,
                        Frame::Pong(Pong {
                            timestamp_ms: p.timestamp_ms,
                        }),
                    )
                    .await
                }
                f => return f,
            },
            Message::Close(_) => panic!("agent closed the connection"),
            _ => {}
        }
    }
}

/// Like [`next`], but `None` if nothing but pings arrives within `quiet`.
async fn next_within(ws: &mut Ws, quiet: Duration) -> Option<Frame> {
    tokio::time::timeout(quiet, next(ws)).await.ok()
}

async fn expect_reset(ws: &mut Ws, stream: StreamId) -> (ErrorCode, String) {
    match next(ws).await {
        Frame::Reset(r) if r.stream == stream => (r.code, r.reason),
        other => panic!("expected Reset for {stream}, got {other:?}"),
    }
}

async fn start(services: &[String]) -> (AgentHandle, TcpListener, AgentToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = token();
    let mut cfg = AgentConfig::new(&format!("ws://{}", listener.local_addr().unwrap()), token.clone()).unwrap();
    for s in services {
        cfg = cfg.expose(s).unwrap();
    }
    cfg.max_backoff = Duration::from_millis(300);
    cfg.drain_timeout = Duration::from_secs(5);
    (AgentHandle::spawn(cfg), listener, token)
}

#[tokio::test]
async fn streams_round_trip_under_credit() {
    let http = http_upstream().await;
    let echo = tcp_echo().await;
    let closed = closed_port().await;
    let (agent, listener, token) = start(&[
        format!("http://{http}/base"),
        format!("down=http://127.0.0.1:{closed}"),
        format!("echo=tcp://{echo}"),
        format!("gone=tcp://127.0.0.1:{closed}"),
    ])
    .await;

    // Handshake: a signed Hello on the default path, answered with Welcome.
    let (mut ws, path) = accept(&listener).await;
    assert_eq!(path, "/v1/connect");
    let Frame::Hello(hello) = next(&mut ws).await else {
        panic!("first frame must be Hello")
    };
    assert!(
        credentials::verify(&token.secret, &hello),
        "Hello signature must verify"
    );
    assert_eq!(hello.agent.as_str(), "alpha");
    assert_eq!(hello.key_id, "k1");
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert_eq!(
        hello.services,
        vec![
            ServiceDecl {
                name: "".into(),
                kind: ServiceKind::Http
            },
            ServiceDecl {
                name: "down".into(),
                kind: ServiceKind::Http
            },
            ServiceDecl {
                name: "echo".into(),
                kind: ServiceKind::Tcp
            },
            ServiceDecl {
                name: "gone".into(),
                kind: ServiceKind::Tcp
            },
        ]
    );
    send(&mut ws, welcome()).await;
    assert_eq!(agent.connected(STEP).await.unwrap(), "node-test");

    // Frames for streams that do not exist are ignored.
    let ghost = StreamId(999);
    send(
        &mut ws,
        Frame::Data(Data {
            stream: ghost,
            bytes: Bytes::from_static(b"x"),
        }),
    )
    .await;
    send(
        &mut ws,
        Frame::Credit(Credit {
            stream: ghost,
            bytes: 10,
        }),
    )
    .await;
    send(&mut ws, Frame::Fin(Fin { stream: ghost })).await;
    // So is a `Drain`, which only agents send.
    send(&mut ws, Frame::Drain(Drain { stream: ghost })).await;

    // GET of 1 MiB with a 64 KiB window: the agent stops at the window until credit comes.
    let s = StreamId(1);
    send(
        &mut ws,
        Frame::RequestHead(RequestHead {
            stream: s,
            service: "".into(),
            method: "GET".into(),
            uri: "/big?x=1".into(),
            headers: vec![header("x-forwarded-host", "alpha.example.com"), header("accept", "*/*")],
            end: false,
        }),
    )
    .await;
    send(&mut ws, Frame::Fin(Fin { stream: s })).await;
    let Frame::ResponseHead(head) = next(&mut ws).await else {
        panic!("expected ResponseHead")
    };
    assert_eq!(head.stream, s);
    assert_eq!(head.status, 200);
    assert_eq!(value(&head.headers, "content-length"), vec![b"1048576".as_ref()]);
    assert_eq!(value(&head.headers, "x-multi"), vec![b"a".as_ref(), b"b".as_ref()]);
    assert_eq!(value(&head.headers, "x-seen-host"), vec![http.to_string().as_bytes()]);
    assert!(value(&head.headers, "transfer-encoding").is_empty());
    assert!(value(&head.headers, "connection").is_empty());
    let mut body = Vec::new();
    let mut outstanding = 0u32;
    let mut checked_stall = false;
    loop {
        match next(&mut ws).await {
            Frame::Data(d) if d.stream == s => {
                assert!(d.bytes.len() as u32 <= MAX_DATA, "Data frame over max_data_bytes");
                outstanding += d.bytes.len() as u32;
                assert!(
                    outstanding <= WINDOW,
                    "agent sent {outstanding} bytes on a {WINDOW} window"
                );
                body.extend_from_slice(&d.bytes);
                if outstanding == WINDOW {
                    if !checked_stall {
                        let quiet = next_within(&mut ws, Duration::from_millis(300)).await;
                        assert!(quiet.is_none(), "agent sent beyond its credit: {quiet:?}");
                        checked_stall = true;
                    }
                    send(
                        &mut ws,
                        Frame::Credit(Credit {
                            stream: s,
                            bytes: outstanding,
                        }),
                    )
                    .await;
                    outstanding = 0;
                }
            }
            Frame::Fin(f) if f.stream == s => break,
            other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
        }
    }
    assert!(checked_stall);
    assert_eq!(body, seeded(1 << 20, 1));

    // POST of 200 KiB: we send under the agent's credit; it credits in batches.
    let s = StreamId(2);
    let req_body = seeded(200 << 10, 7);
    send(
        &mut ws,
        Frame::RequestHead(RequestHead {
            stream: s,
            service: "".into(),
            method: "POST".into(),
            uri: "/echo".into(),
            headers: vec![
                header("host", "alpha.example.com"),
                header("content-length", &req_body.len().to_string()),
            ],
            end: false,
        }),
    )
    .await;
    let mut credit = WINDOW as usize;
    let mut sent = 0usize;
    let mut fin_sent = false;
    let mut resp_head = None;
    let mut resp_body = Vec::new();
    loop {
        while sent < req_body.len() && credit > 0 {
            let n = (req_body.len() - sent).min(MAX_DATA as usize).min(credit);
            send(
                &mut ws,
                Frame::Data(Data {
                    stream: s,
                    bytes: Bytes::copy_from_slice(&req_body[sent..sent + n]),
                }),
            )
            .await;
            sent += n;
            credit -= n;
        }
        if sent == req_body.len() && !fin_sent {
            send(&mut ws, Frame::Fin(Fin { stream: s })).await;
            fin_sent = true;
        }
        match next(&mut ws).await {
            Frame::Credit(c) if c.stream == s => {
                assert!(c.bytes >= WINDOW / 4, "credit should be batched, got {}", c.bytes);
                credit += c.bytes as usize;
            }
            Frame::ResponseHead(h) if h.stream == s => resp_head = Some(h),
            Frame::Data(d) if d.stream == s => {
                resp_body.extend_from_slice(&d.bytes);
                send(
                    &mut ws,
                    Frame::Credit(Credit {
                        stream: s,
                        bytes: d.bytes.len() as u32,
                    }),
                )
                .await;
            }
            Frame::Fin(f) if f.stream == s => break,
            other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
        }
    }
    let resp_head = resp_head.expect("no ResponseHead");
    assert_eq!(resp_head.status, 200);
    assert_eq!(
        value(&resp_head.headers, "x-seen-host"),
        vec![http.to_string().as_bytes()]
    );
    assert_eq!(value(&resp_head.headers, "x-seen-target"), vec![b"/base/echo".as_ref()]);
    assert_eq!(resp_body, req_body);

    // Unknown service, wrong kind, refused local ports: Reset SERVICE_UNAVAILABLE.
    let rh = |stream, service: &str| {
        Frame::RequestHead(RequestHead {
            stream,
            service: service.into(),
            method: "GET".into(),
            uri: "/".into(),
            headers: vec![],
            end: false,
        })
    };
    // An invalid head (the codec refuses the method) is skipped without hurting the link.
    let Frame::RequestHead(mut bad) = rh(StreamId(30), "") else {
        unreachable!()
    };
    bad.method = "G ET".into();
    send(&mut ws, Frame::RequestHead(bad)).await;
    send(&mut ws, rh(StreamId(3), "nope")).await;
    assert_eq!(
        expect_reset(&mut ws, StreamId(3)).await.0,
        ErrorCode::ServiceUnavailable
    );
    send(&mut ws, rh(StreamId(4), "echo")).await;
    assert_eq!(
        expect_reset(&mut ws, StreamId(4)).await.0,
        ErrorCode::ServiceUnavailable
    );
    send(&mut ws, rh(StreamId(5), "down")).await;
    send(&mut ws, Frame::Fin(Fin { stream: StreamId(5) })).await;
    let (code, reason) = expect_reset(&mut ws, StreamId(5)).await;
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert_eq!(reason, format!("local service refused connection (127.0.0.1:{closed})"));
    send(
        &mut ws,
        Frame::StreamOpen(StreamOpen {
            stream: StreamId(6),
            service: "gone".into(),
            http: false,
        }),
    )
    .await;
    let (code, reason) = expect_reset(&mut ws, StreamId(6)).await;
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert!(reason.contains("refused connection"), "{reason}");
    send(
        &mut ws,
        Frame::StreamOpen(StreamOpen {
            stream: StreamId(7),
            service: "down".into(),
            http: false,
        }),
    )
    .await;
    assert_eq!(
        expect_reset(&mut ws, StreamId(7)).await.0,
        ErrorCode::ServiceUnavailable
    );

    // Byte stream: data both ways, half-close each way.
    let s = StreamId(8);
    send(
        &mut ws,
        Frame::StreamOpen(StreamOpen {
            stream: s,
            service: "echo".into(),
            http: false,
        }),
    )
    .await;
    send_last(&mut ws, s, b"hello tcp").await;
    let mut echoed = Vec::new();
    loop {
        match next(&mut ws).await {
            Frame::Data(d) if d.stream == s => echoed.extend_from_slice(&d.bytes),
            Frame::Credit(c) if c.stream == s => {}
            Frame::Fin(f) if f.stream == s => break,
            other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
        }
    }
    assert_eq!(echoed, b"hello tcp");

    // Graceful shutdown ends with a WebSocket close frame.
    let stopping = tokio::spawn(agent.shutdown());
    let closed_by_agent = tokio::time::timeout(STEP, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(_) = msg {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(closed_by_agent, "expected a close frame");
    stopping.await.unwrap();
}

/// A GET on the default service whose head is also the gateway's `Fin` (`end`).
fn bodiless_get(stream: u64, uri: &str) -> Frame {
    Frame::RequestHead(RequestHead {
        stream: StreamId(stream),
        service: "".into(),
        method: "GET".into(),
        uri: uri.into(),
        headers: vec![],
        end: true,
    })
}

/// A gateway that lists `inline-end` gets small responses as one frame, and may send a bodiless
/// request as one frame; large responses still stream under credit.
#[tokio::test]
async fn small_answers_are_one_frame_when_the_gateway_takes_them() {
    let http = http_upstream().await;
    let (agent, listener, _token) = start(&[format!("http://{http}/base")]).await;
    let (mut ws, _) = accept(&listener).await;
    let Frame::Hello(hello) = next(&mut ws).await else {
        panic!("first frame must be Hello")
    };
    assert!(hello.capabilities.iter().any(|c| c == CAP_INLINE_END));
    let Frame::Welcome(mut w) = welcome() else {
        unreachable!()
    };
    w.capabilities = vec![CAP_INLINE_END.into()];
    send(&mut ws, Frame::Welcome(w)).await;

    // A bodiless GET with `end` (no Fin follows) and an empty 404: one frame back, nothing after.
    send(&mut ws, bodiless_get(1, "/missing")).await;
    match next(&mut ws).await {
        Frame::ResponseHead(h) => {
            assert_eq!((h.stream, h.status, h.end), (StreamId(1), 404, true));
            assert!(h.body.is_empty());
        }
        other => panic!("expected one whole ResponseHead, got {other:?}"),
    }
    assert_eq!(next_within(&mut ws, Duration::from_millis(300)).await, None);

    // A POST whose echo is small: the body rides in the head, counted against the window.
    let s = StreamId(2);
    send(
        &mut ws,
        Frame::RequestHead(RequestHead {
            stream: s,
            service: "".into(),
            method: "POST".into(),
            uri: "/echo".into(),
            headers: vec![header("content-length", "5")],
            end: false,
        }),
    )
    .await;
    send_last(&mut ws, s, b"hello").await;
    loop {
        match next(&mut ws).await {
            Frame::Credit(c) if c.stream == s => continue,
            Frame::ResponseHead(h) => {
                assert_eq!((h.stream, h.status, h.end), (s, 200, true));
                assert_eq!(h.body, Bytes::from_static(b"hello"));
                assert_eq!(value(&h.headers, "content-length"), vec![b"5".as_ref()]);
                break;
            }
            other => panic!("expected one whole ResponseHead, got {other:?}"),
        }
    }
    assert!(!matches!(
        next_within(&mut ws, Duration::from_millis(300)).await,
        Some(Frame::Data(_) | Frame::Fin(_))
    ));

    // 1 MiB is past the inline size: head, then Data within the window.
    send(&mut ws, bodiless_get(3, "/big")).await;
    let Frame::ResponseHead(h) = next(&mut ws).await else {
        panic!("expected ResponseHead")
    };
    assert!(!h.end && h.body.is_empty());
    let Frame::Data(d) = next(&mut ws).await else {
        panic!("expected Data")
    };
    assert_eq!(d.stream, StreamId(3));
    agent.kill();
}

/// A response head that cannot fit the connection's `max_frame_bytes` resets its stream with a
/// reason, whether it would go as one whole frame (`inline-end`) or as a head followed by `Data`,
/// and the connection carries on.
#[tokio::test]
async fn a_response_head_past_the_frame_limit_resets_only_its_stream() {
    let http = http_upstream().await;
    for inline in [true, false] {
        let (agent, listener, _token) = start(&[format!("http://{http}/base")]).await;
        let (mut ws, _) = accept(&listener).await;
        assert!(matches!(next(&mut ws).await, Frame::Hello(_)));
        let Frame::Welcome(mut w) = welcome() else {
            unreachable!()
        };
        w.limits.max_frame_bytes = 4 << 10;
        w.limits.max_data_bytes = 1 << 10;
        w.capabilities = if inline { vec![CAP_INLINE_END.into()] } else { vec![] };
        send(&mut ws, Frame::Welcome(w)).await;
        for (stream, uri) in [(1, "/hugehead"), (2, "/missing")] {
            send(&mut ws, bodiless_get(stream, uri)).await;
            if stream == 1 {
                let (code, reason) = expect_reset(&mut ws, StreamId(1)).await;
                assert_eq!(code, ErrorCode::Internal, "inline: {inline}");
                assert!(reason.contains("too large"), "{reason}");
            } else {
                match next(&mut ws).await {
                    Frame::ResponseHead(h) => assert_eq!((h.stream, h.status, h.end), (StreamId(2), 404, inline)),
                    other => panic!("expected ResponseHead, got {other:?}"),
                }
            }
        }
        agent.kill();
    }
}

#[tokio::test]
async fn refusal_shows_in_status_and_connected() {
    let (agent, listener, _) = start(&[]).await;
    let (mut ws, _) = accept(&listener).await;
    assert!(matches!(next(&mut ws).await, Frame::Hello(_)));
    send(
        &mut ws,
        Frame::Refused(Refused {
            code: RefuseCode::BadSignature,
            message: "bad signature".into(),
        }),
    )
    .await;
    let _ = ws.close(None).await;
    match agent.connected(STEP).await {
        Err(Error::Refused { code, message }) => {
            assert_eq!(code, RefuseCode::BadSignature);
            assert_eq!(message, "bad signature");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        *agent.status().borrow(),
        AgentStatus::Refused {
            code: RefuseCode::BadSignature,
            ..
        }
    ));
    agent.kill();
}

#[tokio::test]
async fn reconnects_after_loss_and_on_go_away_while_old_streams_finish() {
    let http = http_upstream().await;
    let (agent, listener, token) = start(&[format!("http://{http}/base")]).await;
    let mut status = agent.status();

    // First connection: welcomed, then dropped without a close frame.
    let (mut ws, _) = accept(&listener).await;
    let Frame::Hello(first) = next(&mut ws).await else {
        panic!()
    };
    send(&mut ws, welcome()).await;
    agent.connected(STEP).await.unwrap();
    drop(ws);

    // The agent comes back with a fresh, valid Hello.
    let (mut ws, _) = accept(&listener).await;
    let Frame::Hello(second) = next(&mut ws).await else {
        panic!()
    };
    assert!(credentials::verify(&token.secret, &second));
    assert_ne!(first.nonce, second.nonce);
    assert_eq!(first.instance_id, second.instance_id);
    send(&mut ws, welcome()).await;
    tokio::time::timeout(STEP, status.wait_for(|s| matches!(s, AgentStatus::Connected { .. })))
        .await
        .unwrap()
        .unwrap();

    // A stream in flight on the old connection, then GoAway: a new connection is dialled while
    // the old one still finishes the stream.
    let s = StreamId(1);
    send(
        &mut ws,
        Frame::RequestHead(RequestHead {
            stream: s,
            service: "".into(),
            method: "GET".into(),
            uri: "/big".into(),
            headers: vec![],
            end: false,
        }),
    )
    .await;
    send(&mut ws, Frame::Fin(Fin { stream: s })).await;
    let Frame::ResponseHead(_) = next(&mut ws).await else {
        panic!()
    };
    send(&mut ws, go_away()).await;
    let (mut ws2, _) = accept(&listener).await;
    assert!(matches!(next(&mut ws2).await, Frame::Hello(_)));
    send(&mut ws2, welcome()).await;

    let mut got = 0usize;
    let mut granted: HashMap<StreamId, u32> = HashMap::new();
    loop {
        match next(&mut ws).await {
            Frame::Data(d) => {
                got += d.bytes.len();
                *granted.entry(d.stream).or_default() += d.bytes.len() as u32;
                send(
                    &mut ws,
                    Frame::Credit(Credit {
                        stream: d.stream,
                        bytes: d.bytes.len() as u32,
                    }),
                )
                .await;
            }
            Frame::Fin(_) => break,
            other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
        }
    }
    assert_eq!(got, 1 << 20);
    // With its last stream done, the retired connection closes itself.
    let closed = tokio::time::timeout(STEP, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(_) = msg {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(closed);
    agent.shutdown().await;
}

/// The connection dialled after a `GoAway` dies at once (as one did behind HAProxy in a rolling
/// restart): the agent dials again without a backoff delay, since its old connection is retiring
/// and no node may reach it meanwhile. (That a longer-lived or later loss still backs off is
/// `backoff`'s unit test.)
#[tokio::test]
async fn a_replacement_lost_during_handover_is_redialled_at_once() {
    let (agent, listener, _) = start(&["http://127.0.0.1:9".to_owned()]).await;
    let (mut old, _) = accept(&listener).await;
    assert!(matches!(next(&mut old).await, Frame::Hello(_)));
    send(&mut old, welcome()).await;
    agent.connected(STEP).await.unwrap();
    send(&mut old, go_away()).await;

    let (mut replacement, _) = accept(&listener).await;
    assert!(matches!(next(&mut replacement).await, Frame::Hello(_)));
    // Every status the agent shows from here on: a `Backoff` with a delay lasts that long, so
    // the watcher sees it.
    let mut status = agent.status();
    let delays = tokio::spawn(async move {
        let mut delays = Vec::new();
        while status.changed().await.is_ok() {
            if let AgentStatus::Backoff { delay, reason } = &*status.borrow_and_update() {
                delays.push((*delay, reason.clone()));
            }
        }
        delays
    });
    send(&mut replacement, welcome()).await;
    // Lost after its Welcome (before it, the handshake failed: that backs off).
    agent.connected(STEP).await.unwrap();
    drop(replacement);

    let (mut third, _) = accept(&listener).await;
    assert!(matches!(next(&mut third).await, Frame::Hello(_)));
    send(&mut third, welcome()).await;
    agent.connected(STEP).await.unwrap();
    drop(old);
    agent.kill();
    let delays = delays.await.unwrap();
    assert!(
        delays.iter().all(|(d, _)| d.is_zero()),
        "the lost replacement waited: {delays:?}"
    );
}

#[tokio::test]
async fn shutdown_refuses_new_streams_and_drains_in_flight_ones() {
    let http = http_upstream().await;
    let (agent, listener, _) = start(&[format!("http://{http}/base")]).await;
    let (mut ws, _) = accept(&listener).await;
    assert!(matches!(next(&mut ws).await, Frame::Hello(_)));
    send(&mut ws, welcome()).await;
    agent.connected(STEP).await.unwrap();
    let get = |stream| {
        Frame::RequestHead(RequestHead {
            stream,
            service: "".into(),
            method: "GET".into(),
            uri: "/big".into(),
            headers: vec![],
            end: false,
        })
    };

    // One stream in flight, stalled on credit after its first window.
    let s = StreamId(1);
    send(&mut ws, get(s)).await;
    send(&mut ws, Frame::Fin(Fin { stream: s })).await;
    let Frame::ResponseHead(_) = next(&mut ws).await else {
        panic!()
    };
    let mut got = 0usize;
    while got < WINDOW as usize {
        let Frame::Data(d) = next(&mut ws).await else { panic!() };
        got += d.bytes.len();
    }

    let mut status = agent.status();
    let stopping = tokio::spawn(agent.shutdown());
    // New streams are refused while draining (retry until the stop has reached the session).
    let mut id = 100;
    'retry: loop {
        id += 1;
        let this = StreamId(id);
        send(&mut ws, get(this)).await;
        send(&mut ws, Frame::Fin(Fin { stream: this })).await;
        loop {
            match next(&mut ws).await {
                Frame::Reset(r) if r.stream == this => {
                    assert_eq!(r.code, ErrorCode::ShuttingDown);
                    break 'retry;
                }
                // Accepted before the stop reached the session: cut it and try again.
                Frame::ResponseHead(h) if h.stream == this => {
                    let reset = strait_schema::Reset {
                        stream: this,
                        code: ErrorCode::Reset,
                        reason: "test".into(),
                    };
                    send(&mut ws, Frame::Reset(reset)).await;
                    continue 'retry;
                }
                Frame::Data(d) if d.stream == s => got += d.bytes.len(),
                Frame::Data(_) | Frame::Fin(_) | Frame::Reset(_) => {}
                other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
            }
        }
    }

    // The in-flight stream still completes once credit flows again, then the link closes.
    assert_eq!(finish_under_credit(&mut ws, s, got).await, 1 << 20);
    assert!(closes_with_a_close_frame(&mut ws).await);
    stopping.await.unwrap();
    assert_eq!(*status.borrow_and_update(), AgentStatus::Stopped);
}

/// Gives `stream`, stalled after `got` bytes, a window of credit and then credit for every
/// `Data` until its `Fin`; returns the bytes received in all. Other streams' `Data` and `Fin`
/// are ignored.
async fn finish_under_credit(ws: &mut Ws, stream: StreamId, mut got: usize) -> usize {
    send(ws, Frame::Credit(Credit { stream, bytes: WINDOW })).await;
    loop {
        match next(ws).await {
            Frame::Data(d) if d.stream == stream => {
                got += d.bytes.len();
                let bytes = d.bytes.len() as u32;
                send(ws, Frame::Credit(Credit { stream, bytes })).await;
            }
            Frame::Fin(f) if f.stream == stream => return got,
            Frame::Data(_) | Frame::Fin(_) => {}
            other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
        }
    }
}

/// True when the agent sends a WebSocket close frame (within [`STEP`]) before its connection ends.
async fn closes_with_a_close_frame(ws: &mut Ws) -> bool {
    tokio::time::timeout(STEP, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(_) = msg {
                return true;
            }
        }
        false
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn silent_gateway_is_dropped_after_three_heartbeats() {
    let (agent, listener, _) = start(&[]).await;
    let (mut ws, _) = accept(&listener).await;
    assert!(matches!(next(&mut ws).await, Frame::Hello(_)));
    let Frame::Welcome(mut w) = welcome() else {
        unreachable!()
    };
    w.heartbeat_ms = 100;
    send(&mut ws, Frame::Welcome(w)).await;
    agent.connected(STEP).await.unwrap();
    // Say nothing (not even Pong): the agent must give up on this link and dial again.
    let started = std::time::Instant::now();
    let (_ws2, _) = accept(&listener).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "dropped too early: {waited:?}");
    drop(ws);
    agent.kill();
}

/// A local WebSocket service (tokio-tungstenite): echoes text and binary messages, answers a
/// close, and reports the `Host` it saw in an `x-seen-host` header of its 101.
async fn ws_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let seen_host = |req: &WsRequest, mut resp: WsResponse| {
                    if let Some(host) = req.headers().get("host") {
                        resp.headers_mut().insert("x-seen-host", host.clone());
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, seen_host).await else {
                    return;
                };
                // Reading on after a close flushes tungstenite's close reply, then ends the loop;
                // dropping the stream closes the TCP connection, as a server does.
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A client WebSocket frame (FIN set, masked as RFC 6455 requires of clients).
fn ws_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Takes one complete server frame (`(opcode, payload)`) off the front of `buf`, if there is one.
fn ws_server_frame(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[0] & 0x80, 0x80, "expected unfragmented frames");
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let payload = buf[at..at + len].to_vec();
    buf.drain(..at + len);
    Some((opcode, payload))
}

/// The scripted gateway's side of one upgraded stream: sends under the agent's credit, credits
/// back everything the agent sends, and collects it.
struct Upgraded<'a> {
    ws: &'a mut Ws,
    stream: StreamId,
    credit: usize,
    received: Vec<u8>,
    fin: bool,
}

impl<'a> Upgraded<'a> {
    fn new(ws: &'a mut Ws, stream: StreamId) -> Self {
        Upgraded {
            ws,
            stream,
            credit: WINDOW as usize,
            received: Vec::new(),
            fin: false,
        }
    }

    /// Handles one frame from the agent for this stream; returns any `ResponseHead`.
    async fn step(&mut self) -> Option<strait_schema::ResponseHead> {
        match next(self.ws).await {
            Frame::Credit(c) if c.stream == self.stream => self.credit += c.bytes as usize,
            Frame::Data(d) if d.stream == self.stream => {
                assert!(!self.fin, "Data after Fin");
                assert!(d.bytes.len() as u32 <= MAX_DATA, "Data frame over max_data_bytes");
                self.received.extend_from_slice(&d.bytes);
                let credit = Frame::Credit(Credit {
                    stream: self.stream,
                    bytes: d.bytes.len() as u32,
                });
                send(self.ws, credit).await;
            }
            Frame::Fin(f) if f.stream == self.stream => self.fin = true,
            Frame::ResponseHead(h) if h.stream == self.stream => return Some(h),
            other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
        }
        None
    }

    async fn head(&mut self) -> strait_schema::ResponseHead {
        loop {
            if let Some(h) = self.step().await {
                return h;
            }
        }
    }

    /// Sends `bytes` as `Data`, never beyond the credit the agent granted.
    async fn send(&mut self, bytes: &[u8]) {
        let mut sent = 0;
        while sent < bytes.len() {
            if self.credit == 0 {
                assert!(self.step().await.is_none());
                continue;
            }
            let n = (bytes.len() - sent).min(MAX_DATA as usize).min(self.credit);
            let data = Frame::Data(Data {
                stream: self.stream,
                bytes: Bytes::copy_from_slice(&bytes[sent..sent + n]),
            });
            send(self.ws, data).await;
            sent += n;
            self.credit -= n;
        }
    }

    async fn ws_frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some(frame) = ws_server_frame(&mut self.received) {
                return frame;
            }
            assert!(!self.fin, "Fin before a complete WebSocket frame");
            assert!(self.step().await.is_none());
        }
    }
}

fn upgrade_request(stream: StreamId, service: &str, uri: &str, key: &str) -> Frame {
    Frame::RequestHead(RequestHead {
        stream,
        service: service.into(),
        method: "GET".into(),
        uri: uri.into(),
        headers: vec![
            header("host", "alpha.example.com"),
            header("connection", "Upgrade"),
            header("upgrade", "websocket"),
            header("sec-websocket-key", key),
            header("sec-websocket-version", "13"),
        ],
        end: false,
    })
}

/// One WebSocket conversation through the agent, ending with the close handshake and `Fin` both
/// ways. The first message is sent before the 101 arrives, as a client may do.
async fn websocket_session(ws: &mut Ws, stream: StreamId, service_addr: SocketAddr) {
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let key = generate_key();
    send(ws, upgrade_request(stream, "ws", "/chat", &key)).await;
    let mut up = Upgraded::new(ws, stream);
    up.send(&ws_client_frame(0x1, b"early hello")).await;

    let head = up.head().await;
    assert_eq!(head.status, 101);
    assert_eq!(
        value(&head.headers, "sec-websocket-accept"),
        vec![derive_accept_key(key.as_bytes()).as_bytes()]
    );
    let lower = |name| {
        value(&head.headers, name)
            .iter()
            .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    assert_eq!(lower("upgrade"), vec!["websocket"]);
    assert_eq!(lower("connection"), vec!["upgrade"]);
    assert_eq!(
        value(&head.headers, "x-seen-host"),
        vec![service_addr.to_string().as_bytes()]
    );

    assert_eq!(up.ws_frame().await, (0x1, b"early hello".to_vec()));
    // Larger than the window both ways, so credit must flow in each direction.
    let big = seeded(150 << 10, 3);
    up.send(&ws_client_frame(0x2, &big)).await;
    assert_eq!(up.ws_frame().await, (0x2, big));
    up.send(&ws_client_frame(0x1, "ünïcode".as_bytes())).await;
    assert_eq!(up.ws_frame().await, (0x1, "ünïcode".as_bytes().to_vec()));

    up.send(&ws_client_frame(0x8, &1000u16.to_be_bytes())).await;
    let (opcode, payload) = up.ws_frame().await;
    assert_eq!(opcode, 0x8);
    assert_eq!(payload[..2], 1000u16.to_be_bytes());
    send(up.ws, Frame::Fin(Fin { stream })).await;
    // The service closes TCP after the close handshake: its EOF comes back as our Fin.
    while !up.fin {
        assert!(up.step().await.is_none());
    }
    assert!(up.received.is_empty(), "bytes after the close frame");
}

#[tokio::test]
async fn websocket_upgrade_passes_through_and_plain_answers_stay_ordinary() {
    let http = http_upstream().await;
    let wsd = ws_echo().await;
    let (agent, listener, _) = start(&[format!("http://{http}/base"), format!("ws=http://{wsd}")]).await;
    let (mut ws, _) = accept(&listener).await;
    assert!(matches!(next(&mut ws).await, Frame::Hello(_)));
    send(&mut ws, welcome()).await;
    agent.connected(STEP).await.unwrap();

    // Twice on the same service: the upgraded connection must not come back from the pool.
    websocket_session(&mut ws, StreamId(1), wsd).await;
    websocket_session(&mut ws, StreamId(2), wsd).await;
    // The streams are finished: nothing more (no Reset) arrives for them.
    assert_eq!(next_within(&mut ws, Duration::from_millis(300)).await, None);

    // A service that does not upgrade: an ordinary response, and the client's early bytes are
    // neither forwarded as a body nor left uncredited.
    let s = StreamId(3);
    send(&mut ws, upgrade_request(s, "", "/echo", "dGhlIHNhbXBsZSBub25jZQ==")).await;
    let mut up = Upgraded::new(&mut ws, s);
    up.send(&seeded(WINDOW as usize, 9)).await;
    let head = up.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(value(&head.headers, "x-seen-target"), vec![b"/base/echo".as_ref()]);
    assert!(value(&head.headers, "upgrade").is_empty());
    assert!(value(&head.headers, "connection").is_empty());
    while !up.fin {
        assert!(up.step().await.is_none());
    }
    assert!(
        up.received.is_empty(),
        "the service saw a body: {:?}",
        up.received.len()
    );

    // The plain connection stays usable for ordinary requests.
    let s = StreamId(4);
    send(
        &mut ws,
        Frame::RequestHead(RequestHead {
            stream: s,
            service: "".into(),
            method: "GET".into(),
            uri: "/echo".into(),
            headers: vec![],
            end: false,
        }),
    )
    .await;
    send(&mut ws, Frame::Fin(Fin { stream: s })).await;
    let mut up = Upgraded::new(&mut ws, s);
    assert_eq!(up.head().await.status, 200);
    while !up.fin {
        assert!(up.step().await.is_none());
    }
    agent.shutdown().await;
}

/// A hand-written HTTP/1.1 service that answers every request `200 ok` and counts the
/// connections it accepted; with `close_after` it closes each connection that long after its
/// first answer, without saying so (as a service with a short keep-alive timeout does).
async fn counting_service(
    close_after: Option<Duration>,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if sock.write_all(answer).await.is_err() {
                        return;
                    }
                    if let Some(after) = close_after {
                        tokio::time::sleep(after).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn expect_ok(ws: &mut Ws, stream: u64) {
    match next(ws).await {
        Frame::ResponseHead(h) if h.stream == StreamId(stream) => {
            assert_eq!(h.status, 200);
            let mut body = h.body.to_vec();
            if !h.end {
                loop {
                    match next(ws).await {
                        Frame::Data(d) if d.stream == StreamId(stream) => body.extend_from_slice(&d.bytes),
                        Frame::Fin(f) if f.stream == StreamId(stream) => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            assert_eq!(body, b"ok");
        }
        other => panic!("expected the answer to {stream}, got {other:?}"),
    }
}

/// Requests one after another share one keep-alive connection; a connection the service closed
/// while it sat idle is never used again, and the next request goes out on a fresh one.
#[tokio::test]
async fn local_connections_are_reused_and_closed_ones_replaced() {
    use std::sync::atomic::Ordering;
    let (keep, kept) = counting_service(None).await;
    let (short, shorts) = counting_service(Some(Duration::from_millis(50))).await;
    let (agent, listener, _token) = start(&[format!("http://{keep}"), format!("short=http://{short}")]).await;
    let (mut ws, _) = accept(&listener).await;
    let Frame::Hello(_) = next(&mut ws).await else {
        panic!("first frame must be Hello")
    };
    send(&mut ws, welcome()).await;

    for i in 1..=5 {
        send(&mut ws, bodiless_get(i, "/")).await;
        expect_ok(&mut ws, i).await;
    }
    assert_eq!(
        kept.load(Ordering::SeqCst),
        1,
        "sequential requests share one connection"
    );

    for i in 11..=13 {
        let Frame::RequestHead(mut h) = bodiless_get(i, "/") else {
            unreachable!()
        };
        h.service = "short".into();
        send(&mut ws, Frame::RequestHead(h)).await;
        expect_ok(&mut ws, i).await;
        // Past the service's keep-alive: the pooled connection is closed by now.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        shorts.load(Ordering::SeqCst),
        3,
        "each request after a close dials anew"
    );
    agent.kill();
}

fn open_http(stream: u64, service: &str) -> Frame {
    Frame::StreamOpen(StreamOpen {
        stream: StreamId(stream),
        service: service.into(),
        http: true,
    })
}

/// The stream's bytes until `want` of them arrived (or its `Fin`).
async fn read_stream(ws: &mut Ws, stream: StreamId, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        match next(ws).await {
            Frame::Data(d) if d.stream == stream => got.extend_from_slice(&d.bytes),
            Frame::Fin(f) if f.stream == stream => break,
            other => panic!("expected bytes of {stream}, got {other:?}"),
        }
    }
    got
}

/// `StreamOpen` with `http` carries a caller's HTTP/1.1 connection as bytes: the agent dials the
/// service once, says where it is (`host`, path prefix) before any byte, and copies requests and
/// answers both ways unparsed, all on that one local connection; the gateway's `Fin` ends it.
/// A service that is down, or a TCP service named as HTTP, gets a reset with a reason.
#[tokio::test]
async fn an_http_connection_is_carried_as_bytes_on_one_local_connection() {
    use std::sync::atomic::Ordering;
    let (plain, accepted) = counting_service(None).await;
    let prefixed = http_upstream().await;
    let echo = tcp_echo().await;
    let closed = closed_port().await;
    let (agent, listener, _token) = start(&[
        format!("http://{plain}"),
        format!("web=http://{prefixed}/base"),
        format!("down=http://127.0.0.1:{closed}"),
        format!("echo=tcp://{echo}"),
    ])
    .await;
    let (mut ws, _) = accept(&listener).await;
    let Frame::Hello(hello) = next(&mut ws).await else {
        panic!("first frame must be Hello")
    };
    assert!(hello.capabilities.iter().any(|c| c == CAP_RAW_HTTP), "{hello:?}");
    send(&mut ws, welcome()).await;

    // The default service: two requests, two answers, one connection.
    let s = StreamId(1);
    send(&mut ws, open_http(1, "")).await;
    match next(&mut ws).await {
        Frame::ResponseHead(h) if h.stream == s => {
            assert_eq!(h.status, 200);
            assert_eq!(value(&h.headers, "host"), vec![plain.to_string().as_bytes()]);
            assert!(value(&h.headers, PATH_PREFIX_HEADER).is_empty(), "{h:?}");
            assert!(!h.end);
        }
        other => panic!("expected the connection's head, got {other:?}"),
    }
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    for _ in 0..2 {
        send(
            &mut ws,
            Frame::Data(Data {
                stream: s,
                bytes: Bytes::from_static(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
            }),
        )
        .await;
        assert_eq!(read_stream(&mut ws, s, answer.len()).await, answer);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one caller connection, one local one"
    );
    // The caller hung up: the service sees EOF, closes, and the stream ends cleanly.
    send(&mut ws, Frame::Fin(Fin { stream: s })).await;
    match next(&mut ws).await {
        Frame::Fin(f) if f.stream == s => {}
        other => panic!("expected Fin, got {other:?}"),
    }

    // A named service under a path: the head says so, and bytes pass as they are.
    let s = StreamId(2);
    send(&mut ws, open_http(2, "web")).await;
    match next(&mut ws).await {
        Frame::ResponseHead(h) if h.stream == s => {
            assert_eq!(value(&h.headers, "host"), vec![prefixed.to_string().as_bytes()]);
            assert_eq!(value(&h.headers, PATH_PREFIX_HEADER), vec![&b"/base"[..]]);
        }
        other => panic!("expected the connection's head, got {other:?}"),
    }
    send_last(
        &mut ws,
        s,
        b"POST /base/echo HTTP/1.1\r\nhost: local\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    )
    .await;
    let got = String::from_utf8(read_stream(&mut ws, s, usize::MAX).await).unwrap();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(
        got.contains("x-seen-host: local\r\n"),
        "the gateway's head is not rewritten: {got}"
    );
    assert!(got.contains("x-seen-target: /base/echo\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nhello"), "{got}");

    let (code, reason) = {
        send(&mut ws, open_http(3, "down")).await;
        expect_reset(&mut ws, StreamId(3)).await
    };
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert_eq!(reason, format!("local service refused connection (127.0.0.1:{closed})"));
    send(&mut ws, open_http(4, "echo")).await;
    let (code, reason) = expect_reset(&mut ws, StreamId(4)).await;
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert!(reason.contains("is a TCP service"), "{reason}");
    agent.kill();
}

/// Shutting down, the agent asks a node that takes it (`Welcome` lists `drain`) to end each
/// carried connection between requests: one `Drain` per carried stream, none for a request's
/// stream, and none at all to a node that does not list it. The exchange in flight finishes, and
/// the node's `Fin` lets the agent's drain end at once.
#[tokio::test]
async fn shutdown_asks_the_node_to_end_carried_connections_between_requests() {
    for listed in [true, false] {
        let (service, _) = counting_service(None).await;
        let echo = tcp_echo().await;
        let (agent, listener, _) = start(&[format!("http://{service}"), format!("echo=tcp://{echo}")]).await;
        let (mut ws, _) = accept(&listener).await;
        assert!(matches!(next(&mut ws).await, Frame::Hello(_)));
        let mut w = welcome();
        if let Frame::Welcome(w) = &mut w {
            if listed {
                w.capabilities = vec![CAP_DRAIN.into()];
            }
        }
        send(&mut ws, w).await;
        agent.connected(STEP).await.unwrap();

        let carried = StreamId(1);
        send(&mut ws, open_http(1, "")).await;
        assert!(matches!(next(&mut ws).await, Frame::ResponseHead(h) if h.stream == carried));
        // A TCP stream, open: not a carried connection.
        let tcp = StreamId(2);
        send(
            &mut ws,
            Frame::StreamOpen(StreamOpen {
                stream: tcp,
                service: "echo".into(),
                http: false,
            }),
        )
        .await;
        let ping = Bytes::from_static(b"ping");
        send(
            &mut ws,
            Frame::Data(Data {
                stream: tcp,
                bytes: ping,
            }),
        )
        .await;
        assert_eq!(read_stream(&mut ws, tcp, 4).await, b"ping", "the TCP stream is open");

        let stopping = tokio::spawn(agent.shutdown());
        if listed {
            match next(&mut ws).await {
                Frame::Drain(d) => assert_eq!(d.stream, carried),
                other => panic!("expected Drain, got {other:?}"),
            }
        }
        assert_eq!(
            next_within(&mut ws, Duration::from_millis(300)).await,
            None,
            "listed: {listed}"
        );
        // The carried connection still serves the exchange in flight.
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let get = Bytes::from_static(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        send(
            &mut ws,
            Frame::Data(Data {
                stream: carried,
                bytes: get,
            }),
        )
        .await;
        assert_eq!(read_stream(&mut ws, carried, answer.len()).await, answer);
        // The node ends both; the agent's drain is then over.
        send(&mut ws, Frame::Fin(Fin { stream: carried })).await;
        send(&mut ws, Frame::Fin(Fin { stream: tcp })).await;
        let mut open = vec![carried, tcp];
        while !open.is_empty() {
            match next(&mut ws).await {
                Frame::Fin(f) if open.contains(&f.stream) => open.retain(|s| *s != f.stream),
                other => panic!("expected the streams' Fin, got {other:?}"),
            }
        }
        assert!(closes_with_a_close_frame(&mut ws).await);
        tokio::time::timeout(STEP, stopping).await.unwrap().unwrap();
    }
}

/// A service that reads a request and hangs up without answering: the stream is reset with a
/// reason that says the service failed (not that it refused or was unreachable), and the
/// agent's connection to the gateway carries on.
#[tokio::test]
async fn a_service_that_hangs_up_without_answering_resets_only_its_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
            });
        }
    });
    let (keep, _) = counting_service(None).await;
    let (agent, listener, _token) = start(&[format!("http://{keep}"), format!("mute=http://{mute}")]).await;
    let (mut ws, _) = accept(&listener).await;
    let Frame::Hello(_) = next(&mut ws).await else {
        panic!("first frame must be Hello")
    };
    send(&mut ws, welcome()).await;

    let Frame::RequestHead(mut h) = bodiless_get(1, "/") else {
        unreachable!()
    };
    h.service = "mute".into();
    send(&mut ws, Frame::RequestHead(h)).await;
    let (code, reason) = expect_reset(&mut ws, StreamId(1)).await;
    assert_eq!(code, ErrorCode::ServiceUnavailable);
    assert!(
        reason.starts_with(&format!("local service failed ({mute})")),
        "{reason}"
    );

    send(&mut ws, bodiless_get(2, "/")).await;
    expect_ok(&mut ws, 2).await;
    agent.kill();
}

/// The `strait-agent` binary on its default one thread (a current-thread runtime driven by
/// `main`): it dials, serves a stream, and on SIGTERM finishes the stream in flight, closes the
/// WebSocket and exits 0. (`AgentHandle` above runs on a multi-thread runtime instead.)
#[tokio::test]
async fn the_binary_serves_on_one_thread_and_drains_on_sigterm() {
    let http = http_upstream().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = token();
    // Killed if the test fails before the agent exits by itself.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait-agent"))
        .arg("--gateway")
        .arg(format!("ws://{}", listener.local_addr().unwrap()))
        .arg("--expose")
        .arg(format!("http://{http}/base"))
        .env("STRAIT_TOKEN", token.reveal())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (mut ws, _) = accept(&listener).await;
    assert!(matches!(next(&mut ws).await, Frame::Hello(_)));
    send(&mut ws, welcome()).await;

    // A 1 MiB download, stalled on credit after its first window when the stop arrives.
    let s = StreamId(1);
    send(&mut ws, bodiless_get(1, "/big")).await;
    let Frame::ResponseHead(h) = next(&mut ws).await else {
        panic!("expected ResponseHead")
    };
    assert_eq!((h.stream, h.status), (s, 200));
    let mut got = 0usize;
    while got < WINDOW as usize {
        let Frame::Data(d) = next(&mut ws).await else {
            panic!("expected Data")
        };
        got += d.bytes.len();
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().expect("agent running").to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // The stop has reached the agent once it refuses a new stream.
    let mut id = 100;
    'retry: loop {
        id += 1;
        send(&mut ws, bodiless_get(id, "/missing")).await;
        loop {
            match next(&mut ws).await {
                Frame::Reset(r) if r.stream == StreamId(id) => {
                    assert_eq!(r.code, ErrorCode::ShuttingDown);
                    break 'retry;
                }
                Frame::ResponseHead(h) if h.stream == StreamId(id) => {}
                Frame::Fin(f) if f.stream == StreamId(id) => continue 'retry,
                other => panic!("unexpected {} on {:?}", other.kind(), other.stream()),
            }
        }
    }

    assert_eq!(finish_under_credit(&mut ws, s, got).await, 1 << 20);
    assert!(
        closes_with_a_close_frame(&mut ws).await,
        "the agent ended without a close frame"
    );
    let exit = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("the agent did not exit after its drain")
        .unwrap();
    assert!(exit.success(), "{exit}");
}
