//! Byte streams through TCP routes: integrity, half-close, independence, flow control, limits.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;
use crate::http::metric_value;

#[actix_rt::test]
async fn ten_megabytes_echo_through_a_tcp_route() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let node = TestNode::embedded().await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("echo={}", echo.url())])
        .await;
    let listen = node.route("alpha", "echo").await;

    let (mut rd, mut wr) = TcpStream::connect(listen).await.unwrap().into_split();
    let w = tokio::spawn(async move {
        write_pattern(&mut wr, 10 << 20, 3).await;
        wr.shutdown().await.unwrap();
        wr
    });
    assert_eq!(read_pattern(&mut rd, 3).await, 10 << 20);
    w.await.unwrap();
}

#[actix_rt::test]
async fn half_close_lets_the_reply_through() {
    let server = TcpServer::start(TcpBehaviour::CountThenReply).await;
    let node = TestNode::embedded().await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("count={}", server.url())])
        .await;
    let listen = node.route("alpha", "count").await;

    let mut s = TcpStream::connect(listen).await.unwrap();
    s.write_all(&vec![7u8; 300_000]).await.unwrap();
    s.shutdown().await.unwrap(); // FIN: the server sees EOF, then answers.
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "got 300000 bytes");
}

async fn echo_many(listen: std::net::SocketAddr, n: u64, len: u64) {
    let streams = (0..n).map(|i| async move {
        let (mut rd, mut wr) = TcpStream::connect(listen).await.unwrap().into_split();
        let w = tokio::spawn(async move {
            write_pattern(&mut wr, len, 1000 + i).await;
            wr.shutdown().await.unwrap();
        });
        assert_eq!(
            read_pattern(&mut rd, 1000 + i).await,
            len,
            "stream {i} mixed or lost bytes"
        );
        w.await.unwrap();
    });
    futures_util::future::join_all(streams).await;
}

#[actix_rt::test]
async fn concurrent_tunnels_stay_independent() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let node = TestNode::embedded().await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("echo={}", echo.url())])
        .await;
    let listen = node.route("alpha", "echo").await;
    echo_many(listen, 2, 2 << 20).await;
    echo_many(listen, 100, 200_000).await;
}

#[actix_rt::test]
async fn a_stalled_reader_holds_one_window_and_stalls_no_one_else() {
    let source = TcpServer::start(TcpBehaviour::Source(512 << 20)).await;
    let small = TcpServer::start(TcpBehaviour::Source(16 << 20)).await;
    let node = TestNode::embedded().await;
    let _agent = node
        .connect_agent_with(
            "alpha",
            &[format!("big={}", source.url()), format!("small={}", small.url())],
        )
        .await;
    let big = node.route("alpha", "big").await;
    let fast = node.route("alpha", "small").await;

    // Open the big stream and never read from it.
    let stalled = TcpStream::connect(big).await.unwrap();
    // Let it fill every buffer on its way, then see that it stopped growing.
    let out = || async { metric_value(&node.metrics().await, "strait_tunnel_bytes_total{direction=\"out\"}") };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut before = out().await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = out().await;
        if now == before {
            break;
        }
        before = now;
    }
    // The gateway forwards to the caller's socket only what its kernel buffers take, plus one
    // window held in the gateway: a few MiB on loopback, never the 512 MiB the source offers.
    assert!(
        before < 24 << 20,
        "stalled stream pulled {before} bytes through the gateway"
    );

    // Meanwhile, other streams on the same agent run at full speed.
    let started = Instant::now();
    let reads = (0..4).map(|_| async move {
        let mut s = TcpStream::connect(fast).await.unwrap();
        assert_eq!(read_pattern(&mut s, 55).await, 16 << 20);
    });
    futures_util::future::join_all(reads).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "others were held up: {:?}",
        started.elapsed()
    );
    let after = out().await;
    assert!(after - before >= 4 * (16 << 20));
    drop(stalled);
}

#[actix_rt::test]
async fn both_ends_writing_sixty_four_megabytes_first_do_not_deadlock() {
    let n: u64 = 64 << 20;
    let server = TcpServer::start(TcpBehaviour::Both(n)).await;
    let node = TestNode::embedded().await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("both={}", server.url())])
        .await;
    let listen = node.route("alpha", "both").await;

    let (mut rd, mut wr) = TcpStream::connect(listen).await.unwrap().into_split();
    let w = tokio::spawn(async move {
        write_pattern(&mut wr, n, 78).await;
        wr.shutdown().await.unwrap();
    });
    let got = tokio::time::timeout(Duration::from_secs(120), read_pattern(&mut rd, 77))
        .await
        .expect("deadlock");
    assert_eq!(got, n);
    w.await.unwrap();
}

async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let end = Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[actix_rt::test]
async fn idle_timeout_closes_the_stream_with_its_code() {
    let silent = TcpServer::start(TcpBehaviour::Silent).await;
    let node = TestNode::with(|c| c.idle_timeout = Some(Duration::from_millis(300))).await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("quiet={}", silent.url())])
        .await;
    let listen = node.route("alpha", "quiet").await;
    let mut s = TcpStream::connect(listen).await.unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "idle stream left open"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    let m = node.metrics().await;
    assert_eq!(
        metric_value(&m, "strait_byte_streams_total{outcome=\"IDLE_TIMEOUT\"}"),
        1,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "strait_stream_resets_total{code=\"IDLE_TIMEOUT\"}"),
        1,
        "{m}"
    );
}

#[actix_rt::test]
async fn quota_closes_the_stream_with_its_code() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let node = TestNode::with(|c| c.stream_quota = Some(1 << 20)).await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("echo={}", echo.url())])
        .await;
    let listen = node.route("alpha", "echo").await;
    let (mut rd, mut wr) = TcpStream::connect(listen).await.unwrap().into_split();
    let w = tokio::spawn(async move { write_pattern(&mut wr, 8 << 20, 1).await });
    let got = tokio::time::timeout(Duration::from_secs(10), read_pattern(&mut rd, 1))
        .await
        .unwrap();
    assert!(got < 1 << 20, "quota let {got} bytes back");
    let _ = w.await;
    let m = node.metrics().await;
    assert_eq!(
        metric_value(&m, "strait_byte_streams_total{outcome=\"QUOTA_EXCEEDED\"}"),
        1,
        "{m}"
    );
}

#[actix_rt::test]
async fn a_service_the_agent_does_not_expose_is_refused() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let node = TestNode::embedded().await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("echo={}", echo.url())])
        .await;
    let listen = node.route("alpha", "ssh").await;
    let mut s = TcpStream::connect(listen).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    let st = node.state.clone();
    eventually(Duration::from_secs(5), "refusal counted", || {
        let st = st.clone();
        async move { st.metrics.streams.with_label_values(&["SERVICE_UNAVAILABLE"]).get() == 1 }
    })
    .await;
}

#[actix_rt::test]
async fn streams_beyond_the_per_agent_cap_are_refused_and_the_others_untouched() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let node = TestNode::with(|c| c.limits.max_streams = 2).await;
    let _agent = node
        .connect_agent_with("alpha", &[format!("echo={}", echo.url())])
        .await;
    let listen = node.route("alpha", "echo").await;
    let mut a = TcpStream::connect(listen).await.unwrap();
    let mut b = TcpStream::connect(listen).await.unwrap();
    for s in [&mut a, &mut b] {
        s.write_all(b"ping").await.unwrap();
        let mut r = [0u8; 4];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(&r, b"ping");
    }
    let mut c = TcpStream::connect(listen).await.unwrap();
    assert!(
        closed_within(&mut c, Duration::from_secs(5)).await,
        "third stream was not refused"
    );
    assert_eq!(
        node.state
            .metrics
            .streams
            .with_label_values(&["TOO_MANY_STREAMS"])
            .get(),
        1
    );
    for s in [&mut a, &mut b] {
        s.write_all(b"pong").await.unwrap();
        let mut r = [0u8; 4];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(&r, b"pong");
    }
}

#[actix_rt::test]
async fn agent_killed_mid_stream_closes_the_caller_promptly() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let node = TestNode::embedded().await;
    let alpha = node
        .connect_agent_with("alpha", &[format!("echo={}", echo.url())])
        .await;
    let _beta = node.connect_agent_with("beta", &[format!("echo={}", echo.url())]).await;
    let la = node.route("alpha", "echo").await;
    let lb = node.route("beta", "echo").await;

    let mut s = TcpStream::connect(la).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.unwrap();
    alpha.kill();
    let started = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "caller left open after the agent died"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    echo_many(lb, 3, 100_000).await;
}

/// A WebSocket echo server on 127.0.0.1:0 (text and binary echoed, close answered).
async fn ws_echo_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        let _ = ws.close(None).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[actix_rt::test]
async fn websocket_echo_through_http_ingress() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (ws_addr, _server) = ws_echo_server().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &format!("http://{ws_addr}")).await;

    let sock = TcpStream::connect(node.http_addr).await.unwrap();
    let url = format!("ws://alpha.localhost:{}/socket?x=1", node.http_addr.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, sock)
        .await
        .expect("upgrade through the tunnel");
    assert_eq!(resp.status(), 101);

    ws.send(Message::Text("hello through strait".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("hello through strait".into())
    );
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(big.clone().into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(big.into()));
    for i in 0..50u32 {
        ws.send(Message::Binary(i.to_be_bytes().to_vec().into())).await.unwrap();
    }
    for i in 0..50u32 {
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(i.to_be_bytes().to_vec().into())
        );
    }
    // Close handshake: our close is answered by the server's, through the tunnel.
    ws.close(None).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => continue,
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "close handshake did not complete");
}

/// A caller that vanishes from an upgraded connection (a reset, no close handshake) ends its
/// stream at once, though the service behind the agent has nothing to say (before, the caller's
/// half waited for the idle timeout): the request is counted as ended, and a new upgrade through
/// the same agent still works.
#[actix_rt::test]
async fn a_vanished_upgraded_caller_ends_its_stream() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (ws_addr, _server) = ws_echo_server().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &format!("http://{ws_addr}")).await;
    let url = format!("ws://alpha.localhost:{}/socket", node.http_addr.port());
    let upgrade = || async {
        let sock = TcpStream::connect(node.http_addr).await.unwrap();
        sock.set_zero_linger().unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(url.clone(), sock).await.unwrap();
        ws.send(Message::Text("ping".into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("ping".into()));
        ws
    };
    let ended = |text: String| {
        text.lines()
            .filter(|l| l.starts_with("strait_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    // Dropped with SO_LINGER 0: the node reads a reset, not a FIN.
    drop(upgrade().await);
    eventually(
        Duration::from_secs(5),
        "the vanished caller's request ended",
        || async { ended(node.metrics().await) == 1 },
    )
    .await;
    let mut again = upgrade().await;
    again.close(None).await.unwrap();
}

/// An upgraded connection keeps half-close, as a TCP route does: the caller's half-close reaches
/// the service as end of input, and the service's answer still comes back after it.
#[actix_rt::test]
async fn an_upgraded_connection_keeps_half_close() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    // Switches to a protocol that reads to end of input, then says how much it got.
    let _server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: count\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
    });
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &format!("http://{service}")).await;

    let mut caller = TcpStream::connect(node.http_addr).await.unwrap();
    caller
        .write_all(b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\nConnection: upgrade\r\nUpgrade: count\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut caller).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    caller.write_all(b"hello").await.unwrap();
    caller.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), caller.read_to_string(&mut answer))
        .await
        .expect("the answer after the half-close, then the end")
        .unwrap();
    assert_eq!(answer, "got 5 bytes");
}

/// An upgrade the service declines is an ordinary answer: the caller gets it in full at once
/// (the caller's half of the stream, waiting for post-upgrade bytes, does not hold it), the
/// request is counted as ended, and the same connection serves the next request.
#[actix_rt::test]
async fn a_declined_upgrade_is_an_ordinary_answer_and_the_connection_serves_on() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let mut caller = TcpStream::connect(node.http_addr).await.unwrap();
    caller
        .write_all(
            b"GET /inspect HTTP/1.1\r\nHost: alpha.localhost\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut caller))
        .await
        .expect("the declined upgrade is answered");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .expect("the origin's length survives")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    caller.read_exact(&mut body).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("\"uri\":\"/inspect\""));

    caller
        .write_all(b"GET /inspect HTTP/1.1\r\nHost: alpha.localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut next = String::new();
    tokio::time::timeout(Duration::from_secs(5), caller.read_to_string(&mut next))
        .await
        .expect("the next request is answered and the connection closed")
        .unwrap();
    assert!(next.starts_with("HTTP/1.1 200 "), "{next}");
    node.metric_reaches("strait_requests_total{outcome=\"ok\"}", 2).await;
}

/// Reads an HTTP head off `s` byte by byte, so nothing after it is consumed.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    String::from_utf8(head).unwrap()
}
