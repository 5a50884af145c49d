//! Public HTTP carried as bytes (`--http-relay connection`): what only that relay has to get
//! right. Everything else about public HTTP is the same suite for both relays (`scripts/test`
//! runs it once per relay).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strait_gateway::config::HttpRelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

async fn carried_node() -> TestNode {
    TestNode::with(|c| c.http_relay = HttpRelay::Connection).await
}

/// Requests written back to back are answered in order on the one connection; an HTTP/1.0
/// caller's requests go to the service in 1.0, so a service that would chunk its answer does not.
#[actix_rt::test]
async fn pipelined_requests_are_answered_in_order_and_a_1_0_caller_in_1_0() {
    let backend = Backend::start().await;
    let node = carried_node().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let host = format!("alpha.localhost:{}", node.http_addr.port());
    let pipelined = format!(
        "GET /status/201 HTTP/1.1\r\nHost: {host}\r\n\r\nGET /status/202 HTTP/1.1\r\nHost: {host}\r\n\r\n\
         GET /status/203 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let (answer, _) = raw_exchange(node.http_addr, pipelined.as_bytes()).await;
    let at = |status: &str| {
        answer
            .find(&format!("HTTP/1.1 {status}"))
            .unwrap_or_else(|| panic!("no {status} in {answer}"))
    };
    assert!(at("201") < at("202") && at("202") < at("203"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 3, "{answer}");

    // (A 1.0 request without keep-alive is one request: the request relay serves it.)
    let old = format!("GET /bytes/1000?seed=3&chunked=1 HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n");
    let mut s = TcpStream::connect(node.http_addr).await.unwrap();
    s.write_all(old.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("a 1.0 answer ends with the connection")
        .unwrap();
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(!head.contains("chunked"), "{head}");
    let body = &answer[end..];
    assert_eq!(body.len(), 1000);
    assert!(body.iter().enumerate().all(|(i, b)| *b == pattern(3, i as u64)));
}

/// Each request on a connection is routed by its own `Host`: a connection that asks for another
/// agent is carried to that one from then on.
#[actix_rt::test]
async fn one_connection_follows_the_host_of_each_request() {
    let backend = Backend::start().await;
    let node = carried_node().await;
    let _alpha = node.connect_agent("alpha", &backend.url()).await;
    let _beta = node.connect_agent("beta", &backend.url()).await;
    let mut s = TcpStream::connect(node.http_addr).await.unwrap();
    for agent in ["alpha", "beta", "alpha"] {
        let host = format!("{agent}.localhost:{}", node.http_addr.port());
        let req = format!("GET /inspect HTTP/1.1\r\nHost: {host}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = read_answer(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let headers: Vec<(String, String)> = serde_json::from_value(j["headers"].clone()).unwrap();
        let routed: Vec<_> = headers.iter().filter(|(k, _)| k == "x-forwarded-host").collect();
        assert_eq!(routed.len(), 1, "{headers:?}");
        assert_eq!(routed[0].1, host);
    }
}

/// A request whose length two parsers could read differently never reaches the service (the bytes
/// after it would be forwarded as a next request); nor does a body that breaks chunked framing
/// get further than where it breaks. Each is answered 400 and its connection closed.
#[actix_rt::test]
async fn ambiguous_or_broken_framing_is_refused() {
    let backend = Backend::start().await;
    let node = carried_node().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let host = format!("alpha.localhost:{}", node.http_addr.port());
    for req in [
        format!(
            "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\n\r\nxx"),
        format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
    ] {
        let (answer, _) = raw_exchange(node.http_addr, req.as_bytes()).await;
        let answer = answer.to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 400"), "{req:?}: {answer}");
        assert!(answer.contains("x-strait-error: bad_request"), "{answer}");
    }
    // The node serves on.
    assert_eq!(node.get_status("alpha", "/status/200").await, 200);
}

/// A service that closes idle keep-alive connections (as many do after a few seconds) without
/// saying so. If the close reached the node before the next request, that request goes on a new
/// connection; if the two crossed (the service hangs up on the request, unanswered), the request
/// is sent once more on a new one. Either way the caller sees no failure.
#[actix_rt::test]
async fn a_request_that_meets_a_closed_service_connection_is_sent_on_a_new_one() {
    for close in [Close::WhenIdle, Close::OnNextRequest] {
        let (addr, accepted) = counting_service(close).await;
        let node = carried_node().await;
        let _agent = node.connect_agent("alpha", &format!("http://{addr}")).await;
        let c = node.client(&["alpha"]);
        for _ in 0..3 {
            let res = c.get(node.url("alpha", "/")).send().await.unwrap();
            assert_eq!(res.status(), 200, "{close:?}");
            assert_eq!(res.text().await.unwrap(), "ok");
            if close == Close::WhenIdle {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "one service connection per request");
        node.metric_reaches("strait_requests_total{outcome=\"ok\"}", 3).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// 50 ms after the answer.
    WhenIdle,
    /// When the next request arrives, without answering it.
    OnNextRequest,
    /// Only when the other side does (answering every request).
    Never,
}

/// Answers requests `200 ok`, closing each connection as `close` says, without saying so.
async fn counting_service(close: Close) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    match close {
                        Close::WhenIdle => return tokio::time::sleep(Duration::from_millis(50)).await,
                        Close::OnNextRequest => {
                            let _ = sock.read(&mut chunk).await;
                            return;
                        }
                        Close::Never => {}
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A connection that will close after its one request (`Connection: close`, or HTTP/1.0 without
/// keep-alive) gains nothing from a service connection of its own: the request relay serves it,
/// on the agent's pooled connections.
#[actix_rt::test]
async fn one_request_connections_share_the_agents_service_connections() {
    let (addr, accepted) = counting_service(Close::Never).await;
    let node = carried_node().await;
    let _agent = node.connect_agent("alpha", &format!("http://{addr}")).await;
    let host = format!("alpha.localhost:{}", node.http_addr.port());
    for version in ["1.1\r\nConnection: close", "1.0", "1.1\r\nConnection: close"] {
        let req = format!("GET / HTTP/{version}\r\nHost: {host}\r\n\r\n");
        let (answer, _) = raw_exchange(node.http_addr, req.as_bytes()).await;
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "three callers, one pooled service connection"
    );
    // A kept-alive connection is carried on a service connection of its own.
    let c = node.client(&["alpha"]);
    for _ in 0..2 {
        assert_eq!(
            c.get(node.url("alpha", "/"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "ok"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A service that answers before it read the whole request (a 413 for an upload it will not
/// take) and keeps its connection: the caller gets the answer at once, and since the rest of its
/// body could not be told from a next request, its connection then closes instead of waiting
/// for bytes nobody reads.
#[actix_rt::test]
async fn an_answer_before_the_whole_body_ends_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
                    .await;
                // Reads on, as a server draining before its close would.
                while let Ok(n) = sock.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    let node = carried_node().await;
    let _agent = node.connect_agent("alpha", &format!("http://{addr}")).await;
    let mut s = TcpStream::connect(node.http_addr).await.unwrap();
    let host = format!("alpha.localhost:{}", node.http_addr.port());
    let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 104857600\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'x'; 64 << 10]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the connection closes after the early answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nbig"), "{answer}");
    node.metric_reaches("strait_requests_total{outcome=\"ok\"}", 1).await;
}

/// A service whose answer is not HTTP: the caller gets 502 `SERVICE_UNAVAILABLE` saying so,
/// never the service's bytes, and the node serves on.
#[actix_rt::test]
async fn an_answer_that_is_not_http_is_a_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut chunk = [0u8; 1024];
                let _ = sock.read(&mut chunk).await;
                let _ = sock.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
                let _ = sock.read(&mut chunk).await;
            });
        }
    });
    let node = carried_node().await;
    let _agent = node.connect_agent("alpha", &format!("http://{addr}")).await;
    let res = node
        .client(&["alpha"])
        .get(node.url("alpha", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-strait-error"], "SERVICE_UNAVAILABLE");
    let body = res.text().await.unwrap();
    assert!(body.contains("malformed response head"), "{body}");
    assert!(!body.contains("SSH"), "{body}");
    node.metric_reaches("strait_requests_total{outcome=\"SERVICE_UNAVAILABLE\"}", 1)
        .await;
}

/// A caller that hangs up while its answer is awaited ends the carried connection at once: the
/// request is counted as `caller_gone`, long before the slow service would have answered.
#[actix_rt::test]
async fn a_caller_that_hangs_up_before_its_answer_ends_the_stream() {
    let backend = Backend::start().await;
    let node = carried_node().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let mut s = TcpStream::connect(node.http_addr).await.unwrap();
    let host = format!("alpha.localhost:{}", node.http_addr.port());
    s.write_all(format!("GET /slow/20000 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    node.metric_reaches("strait_requests_total{outcome=\"caller_gone\"}", 1)
        .await;
    eventually(Duration::from_secs(3), "the stream left the agent's table", || async {
        node.state
            .sessions
            .get(&strait_schema::AgentName::new("alpha").unwrap())
            .map(|s| s.streams.open_count())
            == Some(0)
    })
    .await;
}

/// An agent shutting down has its node end every carried connection between requests, on the
/// agent's node or, across the bus, on another: the exchange in flight is answered in full, the
/// agent's drain ends as soon as that answer is out (not when its callers hang up, which keep-alive
/// callers never do), and the caller's next request finds the agent gone.
#[actix_rt::test]
async fn a_draining_agent_ends_carried_connections_between_requests() {
    for cross in [false, true] {
        let backend = Backend::start().await;
        let b = SharedBackends::in_process();
        let cfg = |c: &mut strait_gateway::config::NodeConfig| {
            c.http_relay = HttpRelay::Connection;
            // Callers' idle connections outlast the test: they cannot be what ends the drain.
            c.caller_timeout = Duration::from_secs(60);
        };
        let callers = TestNode::on_backends(&b, "node-a", cfg).await;
        let other = match cross {
            true => Some(TestNode::on_backends(&b, "node-b", cfg).await),
            false => None,
        };
        let agents = other.as_ref().unwrap_or(&callers);
        let agent = agents.connect_agent("alpha", &backend.url()).await;
        let name = strait_schema::AgentName::new("alpha").unwrap();
        callers.sees_presence("alpha").await;
        let host = format!("alpha.localhost:{}", callers.http_addr.port());
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        // One connection idle after an answer, one waiting for a slow one.
        let mut idle = callers.idle_caller("alpha").await;
        let mut busy = TcpStream::connect(callers.http_addr).await.unwrap();
        busy.write_all(get("/slow/500").as_bytes()).await.unwrap();
        eventually(
            Duration::from_secs(5),
            "both connections' streams open on the agent's node",
            || async { agents.state.sessions.get(&name).map(|s| s.streams.open_count()) == Some(2) },
        )
        .await;
        // The slow request's bytes reach the agent well within its 500 ms.
        tokio::time::sleep(Duration::from_millis(150)).await;

        let started = std::time::Instant::now();
        let stopping = tokio::spawn(agent.shutdown());
        let (head, body) = read_answer(&mut busy).await;
        assert!(head.starts_with("http/1.1 200"), "cross: {cross}: {head}");
        assert_eq!(body, b"slow");
        tokio::time::timeout(Duration::from_secs(5), stopping)
            .await
            .unwrap_or_else(|_| panic!("cross: {cross}: the agent's drain waited for its callers"))
            .unwrap();
        println!("cross: {cross}: the agent drained in {:?}", started.elapsed());
        // Both connections are still the callers'; their next requests find no agent.
        for s in [&mut busy, &mut idle] {
            s.write_all(get("/status/200").as_bytes()).await.unwrap();
            let (head, _) = read_answer(s).await;
            assert!(
                head.starts_with("http/1.1 502") || head.starts_with("http/1.1 503"),
                "cross: {cross}: {head}"
            );
        }
        callers.metric_reaches("strait_requests_total{outcome=\"ok\"}", 2).await;
    }
}
