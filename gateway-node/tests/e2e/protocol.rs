//! The agent socket under hostile or broken peers: handshake refusals, malformed frames,
//! silence. Each case gets its specific refusal, and other agents keep working.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use strait_agent::{AgentConfig, AgentHandle, AgentStatus};
use strait_schema::{
    credentials, decode, encode, AgentName, AgentToken, Data, Drain, ErrorCode, Frame, Hello, Limits, RefuseCode,
    ResponseHead, Secret, StreamId, CAP_DRAIN, CAP_INLINE_END, CAP_RAW_HTTP, PROTOCOL_VERSION,
};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn hello(token: &AgentToken, timestamp_ms: u64) -> Hello {
    signed_hello(token, "test-1", timestamp_ms)
}

async fn dial(node: &TestNode) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("{}/v1/connect", node.agent_url()))
        .await
        .unwrap();
    ws
}

/// Next protocol frame, skipping pings; None when the connection closed.
async fn next_frame(ws: &mut Ws) -> Option<Frame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("peer went silent")
        {
            Some(Ok(Message::Binary(b))) => match decode(&b, &Limits::default()).unwrap() {
                Frame::Ping(_) => continue,
                f => return Some(f),
            },
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Waits for the connection to be closed by the gateway (pings are skipped, other frames allowed).
async fn closed(ws: &mut Ws) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return true,
            Ok(Some(Ok(_))) => continue,
            Err(_) => return false,
        }
    }
    false
}

async fn handshake(ws: &mut Ws, h: Hello) -> Frame {
    ws.send(Message::Binary(encode(&Frame::Hello(h)).into())).await.unwrap();
    next_frame(ws).await.expect("an answer to Hello")
}

fn refused_with(f: Frame) -> RefuseCode {
    match f {
        Frame::Refused(r) => r.code,
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[actix_rt::test]
async fn handshake_refusals_carry_their_codes() {
    let node = TestNode::embedded().await;
    let token = node.add_agent("alpha").await;
    let now = strait_gateway::store::now_ms();

    // Bad signature: right agent and key id, wrong secret.
    let forged = AgentToken {
        secret: Secret::generate(),
        ..token.clone()
    };
    assert_eq!(
        refused_with(handshake(&mut dial(&node).await, hello(&forged, now)).await),
        RefuseCode::BadSignature
    );

    // Unknown agent.
    let stranger = AgentToken {
        agent: AgentName::new("stranger").unwrap(),
        ..token.clone()
    };
    assert_eq!(
        refused_with(handshake(&mut dial(&node).await, hello(&stranger, now)).await),
        RefuseCode::UnknownAgent
    );

    // Clock skew, both ways.
    for ts in [now - 5 * 60_000, now + 5 * 60_000] {
        assert_eq!(
            refused_with(handshake(&mut dial(&node).await, hello(&token, ts)).await),
            RefuseCode::ClockSkew
        );
    }

    // Unsupported version (correctly signed).
    let mut h = hello(&token, now);
    h.version = PROTOCOL_VERSION + 1;
    h.signature = credentials::sign(&token.secret, &h);
    assert_eq!(
        refused_with(handshake(&mut dial(&node).await, h).await),
        RefuseCode::UnsupportedVersion
    );

    // Replay: the same signed Hello twice.
    let h = hello(&token, now);
    let mut first = dial(&node).await;
    assert!(matches!(handshake(&mut first, h.clone()).await, Frame::Welcome(_)));
    drop(first);
    assert_eq!(
        refused_with(handshake(&mut dial(&node).await, h).await),
        RefuseCode::Replay
    );

    // Revoked.
    node.state.store.revoke_agent(&token.agent, now).await.unwrap();
    assert_eq!(
        refused_with(handshake(&mut dial(&node).await, hello(&token, now)).await),
        RefuseCode::Revoked
    );

    // The first frame must be a Hello.
    let mut ws = dial(&node).await;
    ws.send(Message::Binary(
        encode(&Frame::Ping(strait_schema::Ping { timestamp_ms: 1 })).into(),
    ))
    .await
    .unwrap();
    assert_eq!(refused_with(next_frame(&mut ws).await.unwrap()), RefuseCode::Malformed);

    let m = node.metrics().await;
    for code in [
        "BAD_SIGNATURE",
        "UNKNOWN_AGENT",
        "CLOCK_SKEW",
        "REPLAY",
        "REVOKED",
        "UNSUPPORTED_VERSION",
        "MALFORMED",
    ] {
        assert!(
            m.contains(&format!("strait_handshakes_total{{result=\"{code}\"}}")),
            "{code} not counted"
        );
    }
}

#[actix_rt::test]
async fn the_agent_reports_a_refusal() {
    let node = TestNode::embedded().await;
    let token = node.add_agent("alpha").await;
    let forged = AgentToken {
        secret: Secret::generate(),
        ..token
    };
    let agent = AgentHandle::spawn(AgentConfig::new(&node.agent_url(), forged).unwrap());
    let err = agent.connected(Duration::from_secs(10)).await.unwrap_err();
    assert!(err.to_string().contains("BAD_SIGNATURE"), "{err}");
    let refused =
        matches!(&*agent.status().borrow(), AgentStatus::Refused { code, .. } if *code == RefuseCode::BadSignature);
    let backing_off = matches!(&*agent.status().borrow(), AgentStatus::Backoff { .. });
    assert!(refused || backing_off, "status is refused or backing off");
    agent.kill();
}

#[actix_rt::test]
async fn revoking_a_connected_agent_drops_it_and_refuses_it_after() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let agent = node.connect_agent("alpha", &backend.url()).await;
    let name = AgentName::new("alpha").unwrap();
    node.state
        .store
        .revoke_agent(&name, strait_gateway::store::now_ms())
        .await
        .unwrap();
    let st = node.state.clone();
    eventually(Duration::from_secs(5), "revoked agent dropped", || {
        let gone = st.sessions.get(&name).is_none();
        async move { gone }
    })
    .await;
    let mut status = agent.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s, AgentStatus::Refused { code, .. } if *code == RefuseCode::Revoked)),
    )
    .await
    .expect("agent sees REVOKED on its next handshake")
    .unwrap();
    agent.kill();
}

/// The one-frame forms of `inline-end`: a bodiless request arrives as a head with `end` and no
/// `Fin`; an agent's head with `end` and a body is the whole response; a body beyond the stream's
/// window is reset like any other overrun, and the agent's other streams carry on.
#[actix_rt::test]
async fn whole_responses_in_one_frame_and_their_window() {
    let node = TestNode::with(|c| {
        // A window below max_data_bytes, so one frame can overrun it and still decode.
        c.limits.max_data_bytes = 4096;
        c.limits.stream_window = 1024;
    })
    .await;
    let token = node.add_agent("whole").await;
    let mut ws = dial(&node).await;
    match handshake(&mut ws, hello(&token, strait_gateway::store::now_ms())).await {
        Frame::Welcome(w) => assert!(w.capabilities.iter().any(|c| c == CAP_INLINE_END)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let base = format!("http://whole.localhost:{}", node.http_addr.port());
    let c = node.client(&["whole"]);

    for (body, expect) in [(vec![b'x'; 5], 200u16), (vec![b'y'; 1025], 502)] {
        let (c, url) = (c.clone(), format!("{base}/small"));
        let req = tokio::spawn(async move { c.get(url).send().await.unwrap() });
        let head = match next_frame(&mut ws).await.unwrap() {
            Frame::RequestHead(h) => h,
            other => panic!("expected RequestHead, got {other:?}"),
        };
        assert!(head.end, "a bodiless GET is one frame");
        let whole = Frame::ResponseHead(ResponseHead {
            stream: head.stream,
            status: 200,
            headers: vec![],
            end: true,
            body: body.clone().into(),
        });
        ws.send(Message::Binary(encode(&whole).into())).await.unwrap();
        let res = req.await.unwrap();
        assert_eq!(res.status().as_u16(), expect);
        if expect == 200 {
            assert_eq!(res.bytes().await.unwrap().as_ref(), &body[..]);
        } else {
            assert_eq!(res.headers()["x-strait-error"], "PROTOCOL_ERROR");
            match next_frame(&mut ws).await.unwrap() {
                Frame::Reset(r) => {
                    assert_eq!(r.stream, head.stream);
                    assert!(r.reason.contains("window"), "{}", r.reason);
                }
                other => panic!("expected Reset, got {other:?}"),
            }
        }
    }
}

/// Connects a hand-driven agent that completed the handshake.
async fn raw_agent(node: &TestNode, name: &str) -> Ws {
    let token = node.add_agent(name).await;
    let mut ws = dial(node).await;
    assert!(matches!(
        handshake(&mut ws, hello(&token, strait_gateway::store::now_ms())).await,
        Frame::Welcome(_)
    ));
    ws
}

#[actix_rt::test]
async fn malformed_input_closes_only_the_offending_connection() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _good = node.connect_agent("good", &backend.url()).await;
    let c = node.client(&["good"]);

    // Random bytes before the handshake: refused as malformed.
    let mut ws = dial(&node).await;
    ws.send(Message::Binary(
        (0..200).map(|_| rand::random::<u8>()).collect::<Vec<u8>>().into(),
    ))
    .await
    .unwrap();
    assert_eq!(refused_with(next_frame(&mut ws).await.unwrap()), RefuseCode::Malformed);

    // After the handshake: random bytes, truncated Cap'n Proto, oversized frame, a text message.
    let valid = encode(&Frame::Data(Data {
        stream: StreamId(7),
        bytes: vec![1u8; 100].into(),
    }));
    let cases: Vec<(&str, Message)> = vec![
        (
            "random",
            Message::Binary((0..300).map(|_| rand::random::<u8>()).collect::<Vec<u8>>().into()),
        ),
        ("truncated", Message::Binary(valid[..valid.len() / 2].to_vec().into())),
        ("oversized", Message::Binary(vec![0u8; 2 << 20].into())),
        ("text", Message::Text("hello".into())),
    ];
    for (i, (what, msg)) in cases.into_iter().enumerate() {
        let mut ws = raw_agent(&node, &format!("bad{i}")).await;
        let _ = ws.send(msg).await;
        assert!(closed(&mut ws).await, "{what}: connection not closed");
        let res = c.get(node.url("good", "/bytes/100?seed=1")).send().await.unwrap();
        assert_eq!(check_pattern(res, 1).await, 100, "{what}: the good agent was disturbed");
    }

    // Below the messages: an unmasked frame (an agent is a client, whose frames are masked) and
    // a reserved opcode, written straight onto the socket.
    for (what, raw) in [
        ("unmasked", &[0x82u8, 0x03, 1, 2, 3][..]),
        ("opcode", &[0x83, 0x80, 0, 0, 0, 0][..]),
    ] {
        let mut ws = raw_agent(&node, what).await;
        tokio::io::AsyncWriteExt::write_all(ws.get_mut(), raw).await.unwrap();
        assert!(closed(&mut ws).await, "{what}: connection not closed");
    }
    let res = c.get(node.url("good", "/bytes/100?seed=1")).send().await.unwrap();
    assert_eq!(check_pattern(res, 1).await, 100, "the good agent was disturbed");

    // Frames naming unknown streams get a Reset with a reason; the connection stays up.
    let mut ws = raw_agent(&node, "stray").await;
    ws.send(Message::Binary(valid.into())).await.unwrap();
    match next_frame(&mut ws).await.unwrap() {
        Frame::Reset(r) => {
            assert_eq!(r.stream, StreamId(7));
            assert_eq!(r.code, ErrorCode::ProtocolError);
            assert!(r.reason.contains("unknown stream"));
        }
        f => panic!("expected Reset, got {f:?}"),
    }
    ws.send(Message::Binary(
        encode(&Frame::Ping(strait_schema::Ping { timestamp_ms: 42 })).into(),
    ))
    .await
    .unwrap();
    assert!(matches!(next_frame(&mut ws).await, Some(Frame::Pong(p)) if p.timestamp_ms == 42));

    let m = node.metrics().await;
    for reason in ["malformed_frame", "text_message", "unknown_stream", "websocket_error"] {
        assert!(
            m.contains(&format!("strait_frames_refused_total{{reason=\"{reason}\"}}")),
            "{reason} not counted:\n{m}"
        );
    }
}

#[actix_rt::test]
async fn a_silent_agent_is_dropped_and_its_callers_answered() {
    let node = TestNode::with(|c| c.heartbeat = Duration::from_millis(100)).await;
    let mut ws = raw_agent(&node, "mute").await;
    let c = node.client(&["mute"]);
    // The caller's request reaches the silent agent, which never answers anything again.
    let req = tokio::spawn(async move {
        let started = Instant::now();
        let res = c
            .get(format!("http://mute.localhost:{}/", node.http_addr.port()))
            .send()
            .await
            .unwrap();
        (
            res.status(),
            res.headers().get("x-strait-error").cloned(),
            started.elapsed(),
            node,
        )
    });
    // Read (and ignore) frames without answering pings, until the gateway gives up on us.
    assert!(closed(&mut ws).await, "silent agent was not dropped");
    let (status, code, took, _node) = req.await.unwrap();
    assert_eq!(status, 502);
    assert_eq!(code.unwrap(), "AGENT_UNAVAILABLE");
    assert!(took < Duration::from_secs(3), "caller waited {took:?}");
}

/// A caller that hangs up before the agent answered: the agent is told (`Reset`, "caller went
/// away"), the stream leaves the session's table (a late head is answered as for an unknown
/// stream), and the request is counted as `caller_gone`.
#[actix_rt::test]
async fn a_caller_that_hangs_up_before_the_head_resets_its_stream() {
    // Heartbeats far apart: this hand-driven agent answers none.
    let node = TestNode::with(|c| c.heartbeat = Duration::from_secs(5)).await;
    let mut ws = raw_agent(&node, "slowpoke").await;
    let mut caller = tokio::net::TcpStream::connect(node.http_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut caller, b"GET / HTTP/1.1\r\nHost: slowpoke.localhost\r\n\r\n")
        .await
        .unwrap();
    let id = match next_frame(&mut ws).await {
        Some(Frame::RequestHead(h)) => h.stream,
        other => panic!("expected the request head, got {other:?}"),
    };
    drop(caller);
    match next_frame(&mut ws).await {
        Some(Frame::Reset(r)) => {
            assert_eq!((r.stream, r.code), (id, ErrorCode::Reset));
            assert!(r.reason.contains("caller went away"), "{}", r.reason);
        }
        other => panic!("expected Reset, got {other:?}"),
    }
    node.metric_reaches("strait_requests_total{outcome=\"caller_gone\"}", 1)
        .await;
    let late = ResponseHead {
        stream: id,
        status: 200,
        headers: vec![],
        end: true,
        body: Default::default(),
    };
    ws.send(Message::Binary(encode(&Frame::ResponseHead(late)).into()))
        .await
        .unwrap();
    match next_frame(&mut ws).await {
        Some(Frame::Reset(r)) => {
            assert_eq!(r.stream, id);
            assert!(r.reason.contains("unknown stream"), "{}", r.reason);
        }
        other => panic!("expected Reset for the late head, got {other:?}"),
    }
}

/// An upgrade request that never ends, or one with an oversized head, gets its status and
/// reason and the connection closed, while a real agent connects and serves beside them.
#[actix_rt::test]
async fn a_slow_or_oversized_upgrade_is_answered_and_closed() {
    let backend = Backend::start().await;
    let node = TestNode::with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let slow = raw_exchange(node.agent_addr, b"GET /v1/connect HTTP/1.1\r\nHost: gw\r\n");
    let mut big = b"GET /v1/connect HTTP/1.1\r\nX-Pad: ".to_vec();
    big.resize(9 * 1024, b'x');
    let oversized = raw_exchange(node.agent_addr, &big);
    let agent = async {
        let _agent = node.connect_agent("alpha", &backend.url()).await;
        node.get_status("alpha", "/inspect").await
    };
    let ((slow, _), (oversized, _), served) = tokio::join!(slow, oversized, agent);
    assert!(slow.starts_with("HTTP/1.1 408 "), "{slow}");
    assert!(slow.ends_with("no upgrade request within 300 ms"), "{slow}");
    assert!(oversized.starts_with("HTTP/1.1 431 "), "{oversized}");
    assert!(oversized.contains("request head over 8192 bytes"), "{oversized}");
    assert_eq!(served, 200);
}

/// With `--http-relay connection`, an agent that does not list `raw-http` (one older than the
/// node) is still served: its callers' requests reach it as `RequestHead`s, as with the request
/// relay, on the connection the node began reading.
#[actix_rt::test]
async fn an_agent_without_raw_http_is_served_request_by_request() {
    let node = TestNode::with(|c| c.http_relay = strait_gateway::config::HttpRelay::Connection).await;
    let mut ws = raw_agent(&node, "older").await;
    let c = node.client(&["older"]);
    for i in 0..2u8 {
        let req = tokio::spawn(c.get(node.url("older", "/x")).send());
        let head = match next_frame(&mut ws).await {
            Some(Frame::RequestHead(h)) => h,
            other => panic!("expected a RequestHead, got {other:?}"),
        };
        assert_eq!(head.uri, "/x");
        let whole = Frame::ResponseHead(ResponseHead {
            stream: head.stream,
            status: 200,
            headers: vec![],
            end: true,
            body: vec![b'0' + i].into(),
        });
        ws.send(Message::Binary(encode(&whole).into())).await.unwrap();
        let res = req.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.bytes().await.unwrap().as_ref(), &[b'0' + i]);
    }
}

/// The same across nodes: the agent's node refuses the carried open for the agent (which lacks
/// `raw-http`) over the bus, and the caller's node then serves that connection request by request.
#[actix_rt::test]
async fn an_agent_without_raw_http_on_another_node_is_served_request_by_request() {
    let b = SharedBackends::in_process();
    let carried = |c: &mut strait_gateway::config::NodeConfig| {
        c.http_relay = strait_gateway::config::HttpRelay::Connection;
        // Heartbeats far apart: this hand-driven agent answers none.
        c.heartbeat = Duration::from_secs(5);
    };
    let a = TestNode::on_backends(&b, "node-a", carried).await;
    let node_b = TestNode::on_backends(&b, "node-b", carried).await;
    let mut ws = raw_agent(&node_b, "older").await;
    a.sees_presence("older").await;
    let req = tokio::spawn(a.client(&["older"]).get(a.url("older", "/far")).send());
    let head = match next_frame(&mut ws).await {
        Some(Frame::RequestHead(h)) => h,
        other => panic!("expected a RequestHead, got {other:?}"),
    };
    assert_eq!(head.uri, "/far");
    let whole = Frame::ResponseHead(ResponseHead {
        stream: head.stream,
        status: 200,
        headers: vec![],
        end: true,
        body: b"far".to_vec().into(),
    });
    ws.send(Message::Binary(encode(&whole).into())).await.unwrap();
    let res = req.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().as_ref(), b"far");
}

/// A hand-driven agent `name` that takes carried connections (`raw-http`), welcomed by `node`.
async fn raw_http_agent(node: &TestNode, name: &str) -> Ws {
    let token = node.add_agent(name).await;
    let mut ws = dial(node).await;
    let mut h = hello(&token, strait_gateway::store::now_ms());
    h.capabilities = vec![CAP_RAW_HTTP.to_owned()];
    h.signature = credentials::sign(&token.secret, &h);
    assert!(matches!(handshake(&mut ws, h).await, Frame::Welcome(_)));
    ws
}

/// An agent that takes carried connections but opens one without naming its service's host
/// (the gateway could not write a single request head): the caller gets 502 `PROTOCOL_ERROR`,
/// and the agent is told the stream is over.
#[actix_rt::test]
async fn a_carried_connection_opened_without_a_host_is_refused() {
    let node = TestNode::with(|c| {
        c.http_relay = strait_gateway::config::HttpRelay::Connection;
        c.heartbeat = Duration::from_secs(5);
    })
    .await;
    let mut ws = raw_http_agent(&node, "nohost").await;
    let req = tokio::spawn(node.client(&["nohost"]).get(node.url("nohost", "/x")).send());
    let open = match next_frame(&mut ws).await {
        Some(Frame::StreamOpen(o)) => o,
        other => panic!("expected a StreamOpen, got {other:?}"),
    };
    assert!(open.http && open.service.is_empty(), "{open:?}");
    let nameless = Frame::ResponseHead(ResponseHead {
        stream: open.stream,
        status: 200,
        headers: vec![],
        end: false,
        body: Default::default(),
    });
    ws.send(Message::Binary(encode(&nameless).into())).await.unwrap();
    let res = req.await.unwrap().unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-strait-error"], "PROTOCOL_ERROR");
    match next_frame(&mut ws).await {
        Some(Frame::Reset(r)) => assert_eq!(r.stream, open.stream),
        other => panic!("expected the stream's Reset, got {other:?}"),
    }
}

/// `Drain` is only for a carried connection: on a request's stream it is
/// a protocol error that resets that stream (its caller gets 502 `PROTOCOL_ERROR`), and on a
/// stream the node does not know it is answered with a `Reset`; the connection serves on.
#[actix_rt::test]
async fn a_drain_on_a_stream_that_is_not_carried_is_refused() {
    let node = TestNode::with(|c| {
        c.http_relay = strait_gateway::config::HttpRelay::Request;
        c.heartbeat = Duration::from_secs(5);
    })
    .await;
    let token = node.add_agent("drainer").await;
    let mut ws = dial(&node).await;
    let h = hello(&token, strait_gateway::store::now_ms());
    match handshake(&mut ws, h).await {
        Frame::Welcome(w) => assert!(w.capabilities.iter().any(|c| c == CAP_DRAIN), "{w:?}"),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let send = |f: Frame| Message::Binary(encode(&f).into());
    let req = tokio::spawn(node.client(&["drainer"]).get(node.url("drainer", "/x")).send());
    let head = match next_frame(&mut ws).await {
        Some(Frame::RequestHead(h)) => h,
        other => panic!("expected a RequestHead, got {other:?}"),
    };
    ws.send(send(Frame::Drain(Drain { stream: head.stream })))
        .await
        .unwrap();
    let res = req.await.unwrap().unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-strait-error"], "PROTOCOL_ERROR");
    match next_frame(&mut ws).await {
        Some(Frame::Reset(r)) => assert_eq!((r.stream, r.code), (head.stream, ErrorCode::ProtocolError)),
        other => panic!("expected the stream's Reset, got {other:?}"),
    }
    let unknown = StreamId(0x5eed);
    ws.send(send(Frame::Drain(Drain { stream: unknown }))).await.unwrap();
    match next_frame(&mut ws).await {
        Some(Frame::Reset(r)) => assert_eq!((r.stream, r.reason.as_str()), (unknown, "unknown stream")),
        other => panic!("expected a Reset for the unknown stream, got {other:?}"),
    }
    // The connection still carries requests.
    let req = tokio::spawn(node.client(&["drainer"]).get(node.url("drainer", "/y")).send());
    let head = match next_frame(&mut ws).await {
        Some(Frame::RequestHead(h)) => h,
        other => panic!("expected a RequestHead, got {other:?}"),
    };
    let whole = Frame::ResponseHead(ResponseHead {
        stream: head.stream,
        status: 200,
        headers: vec![],
        end: true,
        body: b"on".to_vec().into(),
    });
    ws.send(send(whole)).await.unwrap();
    assert_eq!(req.await.unwrap().unwrap().text().await.unwrap(), "on");
    let m = node.metrics().await;
    assert_eq!(
        crate::http::metric_value(&m, "strait_frames_refused_total{reason=\"drain_not_carried\"}"),
        1
    );
}

/// A `Drain` may reach the node before the carried connection's head (the agent sends it ahead of
/// its queued frames): the node still serves the request in flight on it, then ends the stream
/// with `Fin` without waiting for the caller's next request, which goes on a new stream.
#[actix_rt::test]
async fn a_drain_ahead_of_the_head_lets_the_request_finish_then_ends_the_stream() {
    let node = TestNode::with(|c| {
        c.http_relay = strait_gateway::config::HttpRelay::Connection;
        c.heartbeat = Duration::from_secs(5);
    })
    .await;
    let mut ws = raw_http_agent(&node, "leaving").await;
    let send = |f: Frame| Message::Binary(encode(&f).into());
    let client = node.client(&["leaving"]);
    let req = tokio::spawn(client.get(node.url("leaving", "/one")).send());
    let open = match next_frame(&mut ws).await {
        Some(Frame::StreamOpen(o)) if o.http => o,
        other => panic!("expected a carried StreamOpen, got {other:?}"),
    };
    let id = open.stream;
    ws.send(send(Frame::Drain(Drain { stream: id }))).await.unwrap();
    let head = Frame::ResponseHead(ResponseHead {
        stream: id,
        status: 200,
        headers: vec![strait_schema::Header {
            name: "host".into(),
            value: bytes::Bytes::from_static(b"127.0.0.1:9"),
        }],
        end: false,
        body: Default::default(),
    });
    ws.send(send(head)).await.unwrap();
    let request = match next_frame(&mut ws).await {
        Some(Frame::Data(d)) if d.stream == id => String::from_utf8(d.bytes.to_vec()).unwrap(),
        other => panic!("expected the request's bytes, got {other:?}"),
    };
    assert!(request.starts_with("GET /one HTTP/1.1\r\n"), "{request}");
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbye.".to_vec();
    ws.send(send(Frame::Data(Data {
        stream: id,
        bytes: answer.into(),
    })))
    .await
    .unwrap();
    let res = req.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "bye.");
    match next_frame(&mut ws).await {
        Some(Frame::Fin(f)) => assert_eq!(f.stream, id, "the drained stream ends"),
        other => panic!("expected the drained stream's Fin, got {other:?}"),
    }
    // The same caller's next request opens a new stream.
    let req = tokio::spawn(client.get(node.url("leaving", "/two")).send());
    match next_frame(&mut ws).await {
        Some(Frame::StreamOpen(o)) => assert_ne!(o.stream, id),
        other => panic!("expected a new StreamOpen, got {other:?}"),
    }
    req.abort();
}
