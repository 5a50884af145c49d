//! HTTP ingress through a tunnel: fidelity, streaming, concurrency, errors.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[actix_rt::test]
async fn get_round_trips_status_headers_and_query() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);

    let res = c
        .get(node.url("alpha", "/inspect?a=1&b=two%20words&a=3"))
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "hop-by-hop")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let j: serde_json::Value = res.json().await.unwrap();
    assert_eq!(j["method"], "GET");
    assert_eq!(j["uri"], "/inspect?a=1&b=two%20words&a=3");
    let headers: Vec<(String, String)> = serde_json::from_value(j["headers"].clone()).unwrap();
    let values = |n: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(values("x-multi"), vec!["one", "two"]);
    assert!(
        values("x-drop-me").is_empty(),
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(values("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(values("x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        values("x-forwarded-host"),
        vec![format!("alpha.localhost:{}", node.http_addr.port())]
    );

    for code in [200u16, 201, 204, 302, 404, 418, 500, 503] {
        let res = c
            .get(node.url("alpha", &format!("/status/{code}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), code);
        let cookies: Vec<_> = res
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            cookies,
            vec!["a=1", "b=2"],
            "multi-valued response headers survive ({code})"
        );
        assert_eq!(res.headers()["x-custom"], "yes");
        let body = res.text().await.unwrap();
        assert_eq!(
            body,
            if code == 204 {
                String::new()
            } else {
                format!("status {code}")
            }
        );
    }
    // HEAD keeps the length and sends no body.
    let res = c.head(node.url("alpha", "/bytes/12345")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-length"], "12345");
    assert!(res.bytes().await.unwrap().is_empty());
}

#[actix_rt::test]
async fn post_bodies_round_trip_empty_small_chunked() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);

    let res = c.post(node.url("alpha", "/echo")).body("").send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-method"], "POST");
    assert!(res.bytes().await.unwrap().is_empty());

    let res = c
        .put(node.url("alpha", "/echo?x=1"))
        .body("hello tunnel")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-uri"], "/echo?x=1");
    assert_eq!(res.bytes().await.unwrap(), "hello tunnel");

    // A chunked upload (no content-length) of 3 MiB, streamed.
    let body = reqwest::Body::wrap_stream(pattern_stream(3 << 20, 9));
    let res = c.post(node.url("alpha", "/echo")).body(body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(check_pattern(res, 9).await, 3 << 20);

    // A chunked download (no content-length).
    let res = c
        .get(node.url("alpha", "/bytes/1000000?seed=4&chunked=1"))
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("content-length").is_none());
    assert!(
        res.headers().get("content-type").is_none(),
        "the gateway must not invent headers"
    );
    assert_eq!(check_pattern(res, 4).await, 1_000_000);
}

#[actix_rt::test]
async fn hundred_megabyte_bodies_round_trip_both_ways() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);
    let len: u64 = 100 << 20;

    let res = c
        .get(node.url("alpha", &format!("/bytes/{len}?seed=5")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-length"], len.to_string().as_str());
    assert_eq!(check_pattern(res, 5).await, len);

    let body = reqwest::Body::wrap_stream(pattern_stream(len, 6));
    let res = c
        .post(node.url("alpha", "/echo"))
        .header("content-length", len)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(check_pattern(res, 6).await, len);
}

#[actix_rt::test]
async fn two_hundred_concurrent_requests_through_one_agent() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);
    let reqs = (0..200u64).map(|i| {
        let c = c.clone();
        let url = node.url("alpha", &format!("/bytes/{}?seed={i}", 1000 + i * 97));
        async move {
            let res = c.get(url).send().await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(check_pattern(res, i).await, 1000 + i * 97);
        }
    });
    futures_util::future::join_all(reqs).await;
}

#[actix_rt::test]
async fn a_client_that_stops_reading_does_not_slow_the_others() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);

    // A raw client asks for 256 MiB and then reads nothing.
    let mut stalled = tokio::net::TcpStream::connect(node.http_addr).await.unwrap();
    stalled
        .write_all(format!("GET /bytes/{} HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n", 256u64 << 20).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = stalled.read(&mut head).await.unwrap();
    assert!(std::str::from_utf8(&head[..n]).unwrap().starts_with("HTTP/1.1 200"));

    // Meanwhile other requests on the same agent, including a 32 MiB download, go at full speed.
    let started = Instant::now();
    for i in 0..20u64 {
        let res = c
            .get(node.url("alpha", &format!("/bytes/4096?seed={i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(check_pattern(res, i).await, 4096);
    }
    let res = c
        .get(node.url("alpha", &format!("/bytes/{}?seed=3", 32 << 20)))
        .send()
        .await
        .unwrap();
    assert_eq!(check_pattern(res, 3).await, 32 << 20);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "other streams were held up: {:?}",
        started.elapsed()
    );

    // The stalled stream holds about one window in the gateway, not the whole body: the agent is
    // only allowed one window beyond what the caller's socket took.
    let out_bytes = metric_value(&node.metrics().await, "strait_tunnel_bytes_total{direction=\"out\"}");
    assert!(
        out_bytes < (32u64 << 20) + 4096 * 20 + (16 << 20),
        "gateway pulled {out_bytes} bytes; the stalled stream was not flow-controlled"
    );
    drop(stalled);
}

pub fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse::<f64>().unwrap() as u64))
        .unwrap_or(0)
}

#[actix_rt::test]
async fn offline_or_unknown_agent_is_502_agent_unavailable() {
    let node = TestNode::embedded().await;
    node.add_agent("alpha").await;
    let c = node.client(&["alpha", "nobody"]);
    for agent in ["alpha", "nobody"] {
        let res = c.get(node.url(agent, "/")).send().await.unwrap();
        assert_eq!(res.status(), 502);
        assert_eq!(res.headers()["x-strait-error"], "AGENT_UNAVAILABLE");
        let j: serde_json::Value = res.json().await.unwrap();
        assert_eq!(j["code"], "AGENT_UNAVAILABLE");
    }
    // A host outside the domain is a bad request, not a tunnel.
    let res = reqwest::Client::new()
        .get(format!("http://{}/", node.http_addr))
        .header("host", "example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["x-strait-error"], "BAD_REQUEST");
}

#[actix_rt::test]
async fn slow_backend_is_504_timeout() {
    let backend = Backend::start().await;
    let node = TestNode::with(|c| c.head_timeout = Duration::from_millis(500)).await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);
    let started = Instant::now();
    let res = c.get(node.url("alpha", "/slow/5000")).send().await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["x-strait-error"], "TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The agent is fine afterwards.
    let res = c.get(node.url("alpha", "/slow/10")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[actix_rt::test]
async fn local_service_refused_is_502_with_reason() {
    // Bind then drop, so nothing listens on the port.
    let port = free_addr().port();
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &format!("http://127.0.0.1:{port}")).await;
    let res = node
        .client(&["alpha"])
        .get(node.url("alpha", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-strait-error"], "SERVICE_UNAVAILABLE");
    let j: serde_json::Value = res.json().await.unwrap();
    assert!(j["message"].as_str().unwrap().contains("refused"), "{j}");
}

#[actix_rt::test]
async fn agent_killed_mid_response_aborts_the_caller_promptly_and_spares_others() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let alpha = node.connect_agent("alpha", &backend.url()).await;
    let _beta = node.connect_agent("beta", &backend.url()).await;
    let c = node.client(&["alpha", "beta"]);

    let res = c.get(node.url("alpha", "/drip")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    assert!(body.next().await.unwrap().is_ok());
    let killed = Instant::now();
    alpha.kill();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match body.next().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the caller was left hanging");
    assert!(ended, "an aborted response must not look complete");
    assert!(killed.elapsed() < Duration::from_secs(3));

    let res = c.get(node.url("beta", "/bytes/1000?seed=2")).send().await.unwrap();
    assert_eq!(check_pattern(res, 2).await, 1000);
    let res = c.get(node.url("alpha", "/")).send().await.unwrap();
    assert_eq!(res.status(), 502);
}

/// The agent endpoint and the ingress share one server's workers; each listener still serves
/// only its own side.
#[actix_rt::test]
async fn each_listener_serves_only_its_own_side() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;

    // The agent endpoint's path on the ingress is an ordinary request for the agent's service.
    let res = node
        .client(&["alpha"])
        .get(node.url("alpha", "/v1/connect"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.text().await.unwrap(), "no such route", "answered by the backend");

    // A request for the agent's host on the agent listener never reaches the agent.
    let agent_side = reqwest::Client::builder()
        .resolve("alpha.localhost", node.agent_addr)
        .build()
        .unwrap();
    let url = |path: &str| format!("http://alpha.localhost:{}{path}", node.agent_addr.port());
    let res = agent_side.get(url("/inspect")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert!(res.headers().get("x-strait-error").is_none());
    assert_eq!(res.text().await.unwrap(), "agents connect on /v1/connect");
    let res = agent_side.post(url("/v1/connect")).send().await.unwrap();
    assert_eq!(res.status(), 405);
    // A plain GET of the endpoint is not a WebSocket handshake.
    let res = agent_side.get(url("/v1/connect")).send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().to_lowercase().contains("upgrade"));
}

/// A caller that keeps up gets a bigger window (a stream moves one window per credit round
/// trip), lent from the node's pool and given back when the stream ends; with no pool, windows
/// stay as configured.
#[actix_rt::test]
async fn a_fast_callers_window_grows_from_the_pool_and_is_given_back() {
    let backend = Backend::start().await;
    for (pool, grows) in [(3u64 << 20, true), (0, false)] {
        let node = TestNode::with(|c| c.window_pool = pool).await;
        let _agent = node.connect_agent("alpha", &backend.url()).await;
        let c = node.client(&["alpha"]);
        let res = c
            .get(node.url("alpha", &format!("/bytes/{}?seed=9", 64 << 20)))
            .send()
            .await
            .unwrap();
        assert_eq!(check_pattern(res, 9).await, 64 << 20);
        // With `--http-relay connection` the stream lasts as long as the caller's connection.
        drop(c);
        let text = node.metrics().await;
        let grown = metric_value(&text, "strait_stream_windows_grown_total");
        if grows {
            // 1 MiB -> 2 MiB -> 4 MiB, the most one stream may have.
            assert_eq!(grown, 2, "window growth with a {pool}-byte pool");
        } else {
            assert_eq!(grown, 0, "no pool, no growth");
        }
        // The stream is over, so what it borrowed is back in the pool.
        let mut lent = u64::MAX;
        for _ in 0..50 {
            lent = metric_value(&node.metrics().await, "strait_stream_window_lent_bytes");
            if lent == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(lent, 0, "window bytes still lent after the stream ended");
    }
}

#[actix_rt::test]
async fn routes_by_the_host_header_never_by_headers_a_caller_writes() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _alpha = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);
    // A caller naming another agent in `Forwarded` / `X-Forwarded-Host` still reaches the agent
    // its `Host` names, and the agent is told the host that was routed.
    let res = c
        .get(node.url("alpha", "/inspect"))
        .header("x-forwarded-host", "beta.localhost")
        .header("forwarded", "host=beta.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let j: serde_json::Value = res.json().await.unwrap();
    let headers: Vec<(String, String)> = serde_json::from_value(j["headers"].clone()).unwrap();
    let fwd_host: Vec<_> = headers.iter().filter(|(k, _)| k == "x-forwarded-host").collect();
    assert_eq!(fwd_host.len(), 1, "{headers:?}");
    assert_eq!(fwd_host[0].1, format!("alpha.localhost:{}", node.http_addr.port()));

    // A request that names no host at all is refused for what it is.
    let mut raw = tokio::net::TcpStream::connect(node.http_addr).await.unwrap();
    raw.write_all(b"GET /small HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.0 400"), "{answer}");
    assert!(answer.contains("x-strait-error: bad_request"), "{answer}");
    assert!(answer.contains("names no host"), "{answer}");
}

/// A caller whose head never ends, one idle after its answer, one with an oversized head and one
/// with a malformed head each get closed (with 431 or 400 where there is something to answer),
/// while a real request is served beside them.
#[actix_rt::test]
async fn slow_idle_oversized_or_malformed_callers_are_closed_beside_a_served_one() {
    let backend = Backend::start().await;
    let node = TestNode::with(|c| c.caller_timeout = Duration::from_millis(400)).await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let slow = raw_exchange(node.http_addr, b"GET /small HTTP/1.1\r\nHost: alpha.localhost\r\n");
    let idle = raw_exchange(
        node.http_addr,
        b"GET /inspect HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    );
    let mut big = b"GET /small HTTP/1.1\r\nHost: alpha.localhost\r\nX-Pad: ".to_vec();
    big.resize(40 * 1024, b'x');
    big.extend_from_slice(b"\r\n\r\n");
    let oversized = raw_exchange(node.http_addr, &big);
    let malformed = raw_exchange(node.http_addr, b"GET /small HTTP/1.1\r\nHost alpha.localhost\r\n\r\n");
    let served = node.get_status("alpha", "/inspect");
    let (slow, idle, oversized, malformed, served) = tokio::join!(slow, idle, oversized, malformed, served);
    assert_eq!(slow.0, "", "a head that never ends gets no answer");
    assert!(
        slow.1 >= Duration::from_millis(350),
        "closed after the caller timeout, not before: {:?}",
        slow.1
    );
    assert!(idle.0.starts_with("HTTP/1.1 200 "), "{}", idle.0);
    assert!(
        idle.1 >= Duration::from_millis(350),
        "idle keep-alive closed after the timeout: {:?}",
        idle.1
    );
    assert!(oversized.0.starts_with("HTTP/1.1 431 "), "{}", oversized.0);
    assert!(malformed.0.starts_with("HTTP/1.1 400 "), "{}", malformed.0);
    node.metric_reaches("strait_requests_total{outcome=\"BAD_REQUEST\"}", 2)
        .await;
    assert_eq!(served, 200);
}
