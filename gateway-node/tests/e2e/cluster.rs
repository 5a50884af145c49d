//! Several nodes in one process on shared backends (in-process bus, memory directory, one
//! SQLite store): a caller on any node reaches an agent on any other.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use strait_agent::{AgentConfig, AgentHandle};
use strait_schema::AgentName;

use crate::harness::*;
use crate::http::metric_value;

async fn cluster(n: usize) -> (SharedBackends, Vec<TestNode>) {
    let b = SharedBackends::in_process();
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(
            TestNode::on_backends(&b, &format!("node-{}", (b'a' + i as u8) as char), |c| {
                c.heartbeat = Duration::from_millis(200)
            })
            .await,
        );
    }
    (b, nodes)
}

#[actix_rt::test]
async fn callers_on_any_node_reach_an_agent_on_another() {
    let backend = Backend::start().await;
    let (_b, nodes) = cluster(3).await;
    let _agent = nodes[1].connect_agent("alpha", &backend.url()).await;
    for caller in [&nodes[0], &nodes[2]] {
        let c = caller.client(&["alpha"]);
        caller.sees_presence("alpha").await;
        let res = c
            .get(caller.url("alpha", "/inspect?q=1"))
            .header("x-multi", "1")
            .header("x-multi", "2")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let j: serde_json::Value = res.json().await.unwrap();
        assert_eq!(j["uri"], "/inspect?q=1");

        let len: u64 = 100 << 20;
        let res = c
            .get(caller.url("alpha", &format!("/bytes/{len}?seed=11")))
            .send()
            .await
            .unwrap();
        assert_eq!(check_pattern(res, 11).await, len);
        let body = reqwest::Body::wrap_stream(pattern_stream(len, 12));
        let res = c
            .post(caller.url("alpha", "/echo"))
            .header("content-length", len)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(check_pattern(res, 12).await, len);
    }
    // Those requests crossed the bus: published by the callers' nodes, received by the agent's.
    let published = |n: &TestNode| n.state.metrics.bus.with_label_values(&["published"]).get();
    assert!(published(&nodes[0]) > 0 && published(&nodes[2]) > 0 && published(&nodes[1]) > 0);
}

#[actix_rt::test]
async fn the_same_node_path_never_touches_the_bus() {
    let backend = Backend::start().await;
    let (_b, nodes) = cluster(2).await;
    let _agent = nodes[0].connect_agent("alpha", &backend.url()).await;
    let c = nodes[0].client(&["alpha"]);
    for i in 0..20u64 {
        let res = c
            .get(nodes[0].url("alpha", &format!("/bytes/100000?seed={i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(check_pattern(res, i).await, 100_000);
    }
    for n in &nodes {
        let m = n.metrics().await;
        assert_eq!(
            metric_value(&m, "strait_bus_envelopes_total{event=\"published\"}"),
            0,
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "strait_bus_envelopes_total{event=\"received\"}"),
            0,
            "{m}"
        );
    }
}

#[actix_rt::test]
async fn a_reconnect_elsewhere_fences_the_old_connection() {
    let backend = Backend::start().await;
    let (_b, nodes) = cluster(3).await;
    let token = nodes[1].add_agent("alpha").await;
    // The old connection, on B: alive as far as B can tell, but its process has moved on.
    let old_closed = stale_looking_alive_agent(&nodes[1].agent_url(), &token, "i-fence").await;
    nodes[1].wait_agent("alpha").await;

    // The same instance dials node C.
    let mut cfg_c = AgentConfig::new(&nodes[2].agent_url(), token)
        .unwrap()
        .expose(&backend.url())
        .unwrap();
    cfg_c.instance_id = "i-fence".into();
    let new = AgentHandle::spawn(cfg_c);
    new.connected(Duration::from_secs(10)).await.unwrap();
    nodes[2].wait_agent("alpha").await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), old_closed)
        .await
        .expect("old connection left open")
        .ok();
    assert!(
        started.elapsed() <= Duration::from_millis(600),
        "took {:?} (heartbeat 200 ms)",
        started.elapsed()
    );
    assert!(nodes[1].state.sessions.get(&AgentName::new("alpha").unwrap()).is_none());

    // Requests from A go to the new connection on C, once each.
    let c = nodes[0].client(&["alpha"]);
    for i in 0..10u64 {
        let res = c
            .get(nodes[0].url("alpha", &format!("/bytes/1000?seed={i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(check_pattern(res, i).await, 1000);
    }
    assert_eq!(
        nodes[2].state.metrics.requests.with_label_values(&["ok"]).get(),
        0,
        "C's own ingress served nothing"
    );
    new.kill();
}

#[actix_rt::test]
async fn a_tcp_stream_crosses_nodes() {
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let (_b, nodes) = cluster(2).await;
    // The route is pinned to node A; the agent sits on node B.
    let _agent = nodes[1]
        .connect_agent_with("alpha", &[format!("echo={}", echo.url())])
        .await;
    let listen = nodes[0].route("alpha", "echo").await;
    assert!(nodes[1]
        .state
        .store
        .list_routes()
        .await
        .unwrap()
        .iter()
        .all(|r| !r.served_by("node-b")));
    let (mut rd, mut wr) = tokio::net::TcpStream::connect(listen).await.unwrap().into_split();
    let w = tokio::spawn(async move {
        write_pattern(&mut wr, 10 << 20, 21).await;
        tokio::io::AsyncWriteExt::shutdown(&mut wr).await.unwrap();
    });
    assert_eq!(read_pattern(&mut rd, 21).await, 10 << 20);
    w.await.unwrap();
}

#[actix_rt::test]
async fn draining_the_agents_node_under_load_fails_no_request() {
    let backend = Backend::start().await;
    let b = SharedBackends::in_process();
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b", "node-c"] {
        nodes.push(
            TestNode::on_backends(&b, id, |c| {
                c.heartbeat = Duration::from_millis(200);
                c.handoff = Duration::from_secs(5);
            })
            .await,
        );
    }
    let token = nodes[1].add_agent("alpha").await;
    // The agent knows B first, then C (as it would know a load balancer).
    let mut cfg = AgentConfig::new(&nodes[1].agent_url(), token)
        .unwrap()
        .expose(&backend.url())
        .unwrap();
    cfg.gateways
        .push(strait_agent::GatewayUrl::parse(&nodes[2].agent_url()).unwrap());
    let agent = AgentHandle::spawn(cfg);
    agent.connected(Duration::from_secs(10)).await.unwrap();
    nodes[1].wait_agent("alpha").await;

    // Steady load from A: slow-ish requests so some are in flight on B's connection when it drains.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c, url_slow, url_fast) = (
        nodes[0].client(&["alpha"]),
        nodes[0].url("alpha", "/slow/300"),
        nodes[0].url("alpha", "/bytes/2000?seed=3"),
    );
    let mut load = Vec::new();
    for w in 0..8 {
        let (c, stop) = (c.clone(), stop.clone());
        let url = if w % 2 == 0 { url_slow.clone() } else { url_fast.clone() };
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        ok += 1;
                    }
                    Ok(r) => failed.push(format!("{} {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let node_b = nodes.remove(1);
    let st = node_b.state.clone();
    node_b.shutdown().await;
    assert_eq!(st.phase(), strait_gateway::Phase::Stopped);
    nodes[1].wait_agent("alpha").await; // now on C
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(ok > 20, "load too thin to mean anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    agent.kill();
}

/// A frame for an agent at an epoch its node no longer holds (the agent reconnected since), or for
/// an agent the node does not hold, is dropped, counted and answered with a `Reset` naming why, so
/// the sending node never waits; a `Reset` itself is never answered (no reset ping-pong), and the
/// agent's own traffic is untouched.
#[actix_rt::test]
async fn stale_or_misdirected_bus_frames_are_answered_with_a_reset() {
    use strait_schema::{BusEnvelope, ErrorCode, Frame, RequestHead, Reset, StreamId};

    let backend = Backend::start().await;
    let (b, nodes) = cluster(1).await;
    let _agent = nodes[0].connect_agent("alpha", &backend.url()).await;
    let alpha = AgentName::new("alpha").unwrap();
    let epoch = nodes[0].state.directory.presence(&alpha).await.unwrap().unwrap().epoch;
    // A third participant on the same bus stands in for another node's caller side.
    let mut z = b.bus.subscribe("node-z").await.unwrap();
    let envelope = |agent: &AgentName, epoch: u64, frame: Frame| BusEnvelope {
        from_node: "node-z".into(),
        to_node: "node-a".into(),
        seq: 0,
        trace_parent: String::new(),
        agent: agent.clone(),
        epoch,
        frame,
    };
    let head = |stream: u64| {
        Frame::RequestHead(RequestHead {
            stream: StreamId(stream),
            service: String::new(),
            method: "GET".into(),
            uri: "/".into(),
            headers: vec![],
            end: true,
        })
    };
    let nobody = AgentName::new("nobody").unwrap();
    for (agent, at, stream, why) in [
        (&alpha, epoch + 7, 11, "stale agent epoch"),
        (&nobody, 1, 12, "agent is not on this node"),
    ] {
        b.bus.publish(envelope(agent, at, head(stream))).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), z.recv())
            .await
            .expect("no answer to a misdirected frame")
            .unwrap();
        match answer.frame {
            Frame::Reset(r) => {
                assert_eq!(r.stream, StreamId(stream));
                assert_eq!(r.code, ErrorCode::AgentUnavailable);
                assert_eq!(r.reason, why);
            }
            other => panic!("expected Reset, got {other:?}"),
        }
        assert_eq!((answer.agent, answer.epoch), (agent.clone(), at));
    }
    let reset = Frame::Reset(Reset {
        stream: StreamId(13),
        code: ErrorCode::Reset,
        reason: "caller went away".into(),
    });
    b.bus.publish(envelope(&alpha, epoch + 7, reset)).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), z.recv())
            .await
            .is_err(),
        "a stale Reset was answered"
    );
    let dropped = nodes[0].state.metrics.bus.with_label_values(&["dropped_stale"]).get();
    assert_eq!(dropped, 3);
    // Only an agent drains a carried connection: a caller's node that relays a `Drain` is refused,
    // and the agent never sees it.
    let carried = StreamId(14);
    let open = Frame::StreamOpen(strait_schema::StreamOpen {
        stream: carried,
        service: String::new(),
        http: true,
    });
    b.bus.publish(envelope(&alpha, epoch, open)).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), z.recv())
        .await
        .expect("no answer to a carried connection's open")
        .unwrap();
    assert!(matches!(answer.frame, Frame::ResponseHead(h) if h.stream == carried && h.status == 200));
    let drain = Frame::Drain(strait_schema::Drain { stream: carried });
    b.bus.publish(envelope(&alpha, epoch, drain)).await.unwrap();
    let refused = || {
        nodes[0]
            .state
            .metrics
            .frames_refused
            .with_label_values(&["relayed_drain"])
            .get()
    };
    eventually(Duration::from_secs(5), "the relayed Drain refused", || async {
        refused() == 1
    })
    .await;
    let res = nodes[0]
        .client(&["alpha"])
        .get(nodes[0].url("alpha", "/inspect"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// A node that drains does not wait for callers' idle carried connections to its agents: once the
/// agent's replacement connection is up elsewhere, the agent drains the old one's carried streams
/// (`Drain`), so the callers' node ends them at once, and the next request follows the agent.
#[actix_rt::test]
async fn a_draining_node_is_not_held_by_idle_carried_connections() {
    let backend = Backend::start().await;
    let b = SharedBackends::in_process();
    let cfg = |c: &mut strait_gateway::config::NodeConfig| {
        c.http_relay = strait_gateway::config::HttpRelay::Connection;
        c.heartbeat = Duration::from_millis(200);
        // Idle callers outlast the test, and a drain may wait for them as long: only the agent's
        // Drain can end their streams in time.
        c.caller_timeout = Duration::from_secs(60);
        c.drain_grace = Duration::from_secs(30);
        c.handoff = Duration::from_secs(5);
    };
    let callers = TestNode::on_backends(&b, "node-a", cfg).await;
    let old = TestNode::on_backends(&b, "node-b", cfg).await;
    let new = TestNode::on_backends(&b, "node-c", cfg).await;
    let token = old.add_agent("alpha").await;
    let mut agent_cfg = AgentConfig::new(&old.agent_url(), token)
        .unwrap()
        .expose(&backend.url())
        .unwrap();
    agent_cfg
        .gateways
        .push(strait_agent::GatewayUrl::parse(&new.agent_url()).unwrap());
    let agent = AgentHandle::spawn(agent_cfg);
    agent.connected(Duration::from_secs(10)).await.unwrap();
    old.wait_agent("alpha").await;
    let alpha = AgentName::new("alpha").unwrap();
    callers.sees_presence("alpha").await;
    // Two keep-alive callers on node A, each served once and then idle on a stream to node B.
    let host = format!("alpha.localhost:{}", callers.http_addr.port());
    let get = format!("GET /status/200 HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut idle = vec![callers.idle_caller("alpha").await, callers.idle_caller("alpha").await];
    assert_eq!(old.state.sessions.get(&alpha).map(|s| s.streams.open_count()), Some(2));

    let started = std::time::Instant::now();
    old.shutdown().await;
    let took = started.elapsed();
    println!("node-b drained in {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "the drain waited for idle callers: {took:?}"
    );
    new.wait_agent("alpha").await;
    for s in &mut idle {
        s.write_all(get.as_bytes()).await.unwrap();
        let (head, _) = read_answer(s).await;
        assert!(
            head.starts_with("http/1.1 200"),
            "the connection follows the agent: {head}"
        );
    }
    agent.kill();
}

/// A rolling upgrade runs old and new builds side by side. A caller's node carries a connection
/// (`StreamOpen { http }`) only to an agent's node that lists `http` next to its liveness key,
/// and serves the caller with requests when it does not: both callers are answered, and only
/// the one whose agent sits on the node that does not list it went the older way.
#[actix_rt::test]
async fn a_caller_is_carried_only_to_a_node_that_lists_carried_connections() {
    let backend = Backend::start().await;
    let b = SharedBackends::in_process();
    let relay = |c: &mut strait_gateway::config::NodeConfig| {
        c.http_relay = strait_gateway::config::HttpRelay::Connection;
    };
    let callers = TestNode::on_backends(&b, "node-a", relay).await;
    let older = TestNode::on_backends(&b, "node-b", |c| {
        relay(c);
        c.bus_features.retain(|f| *f != "http");
    })
    .await;
    let newer = TestNode::on_backends(&b, "node-c", relay).await;
    let _alpha = older.connect_agent("alpha", &backend.url()).await;
    let _beta = newer.connect_agent("beta", &backend.url()).await;
    callers.sees_presence("alpha").await;
    callers.sees_presence("beta").await;
    let lacks = "strait_bus_envelopes_total{event=\"peer_lacks_http\"}";
    for (agent, held_back) in [("beta", 0), ("alpha", 1), ("beta", 1), ("alpha", 2)] {
        // A fresh connection each time: a kept one would stay on the relay it started with.
        let client = reqwest::Client::builder()
            .resolve(&format!("{agent}.localhost"), callers.http_addr)
            .build()
            .unwrap();
        let r = client.get(callers.url(agent, "/status/200")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{agent}");
        assert_eq!(
            metric_value(&callers.metrics().await, lacks),
            held_back,
            "after a request to {agent}"
        );
    }
    callers.metric_reaches("strait_requests_total{outcome=\"ok\"}", 4).await;
}

/// A caller's node that does not list `drain` is not sent the agent's `Drain` (it would drop
/// the envelope as malformed): its carried connection holds the agent's drain as it always did,
/// while one from a node that lists it is ended at once.
#[actix_rt::test]
async fn a_drain_is_relayed_only_to_a_caller_node_that_lists_it() {
    let backend = Backend::start().await;
    let b = SharedBackends::in_process();
    let cfg = |c: &mut strait_gateway::config::NodeConfig| {
        c.http_relay = strait_gateway::config::HttpRelay::Connection;
        c.caller_timeout = Duration::from_secs(60);
    };
    let older = TestNode::on_backends(&b, "node-a", |c| {
        cfg(c);
        c.bus_features.retain(|f| *f != "drain");
    })
    .await;
    let agents = TestNode::on_backends(&b, "node-b", cfg).await;
    let newer = TestNode::on_backends(&b, "node-c", cfg).await;
    let token = agents.add_agent("alpha").await;
    let mut agent_cfg = AgentConfig::new(&agents.agent_url(), token)
        .unwrap()
        .expose(&backend.url())
        .unwrap();
    // Long enough that the held stream is still open when the test looks, on a slow machine too.
    agent_cfg.drain_timeout = Duration::from_secs(5);
    let agent = AgentHandle::spawn(agent_cfg);
    agent.connected(Duration::from_secs(10)).await.unwrap();
    agents.wait_agent("alpha").await;
    let alpha = AgentName::new("alpha").unwrap();
    // One idle keep-alive caller on each caller node.
    let mut idle = Vec::new();
    for callers in [&older, &newer] {
        callers.sees_presence("alpha").await;
        idle.push(callers.idle_caller("alpha").await);
    }
    let open = || agents.state.sessions.get(&alpha).map(|s| s.streams.open_count());
    assert_eq!(open(), Some(2));

    let stopping = tokio::spawn(agent.shutdown());
    eventually(Duration::from_secs(2), "the newer caller's stream ends", || async {
        open() == Some(1)
    })
    .await;
    agents
        .metric_reaches("strait_bus_envelopes_total{event=\"peer_lacks_drain\"}", 1)
        .await;
    assert_eq!(
        open(),
        Some(1),
        "the older caller's stream is held until the agent's drain ends"
    );
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the agent's drain timeout ends its wait")
        .unwrap();
    assert_eq!(
        metric_value(
            &agents.metrics().await,
            "strait_bus_envelopes_total{event=\"peer_lacks_drain\"}"
        ),
        1,
        "only the older caller's node was passed over"
    );
}
