//! Node lifecycle: ops endpoints, restart with the same data dir, the command line.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use strait_agent::{AgentConfig, AgentHandle};
use strait_schema::AgentToken;

use crate::harness::*;

#[actix_rt::test]
async fn ops_endpoints_report_health_readiness_and_metrics() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let ops = format!("http://{}", node.ops_addr);
    assert_eq!(reqwest::get(format!("{ops}/healthz")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("{ops}/readyz")).await.unwrap().status(), 200);
    let res = node
        .client(&["alpha"])
        .post(node.url("alpha", "/echo"))
        .body("12345")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "12345");
    let st = node.state.clone();
    eventually(Duration::from_secs(5), "request counted", || {
        let st = st.clone();
        async move { st.metrics.requests.with_label_values(&["ok"]).get() >= 1 }
    })
    .await;
    let m = node.metrics().await;
    assert!(m.contains("strait_agents_connected 1"), "{m}");
    assert!(m.contains("strait_requests_total{outcome=\"ok\"} 1"), "{m}");
    assert!(m.contains("strait_request_duration_seconds_bucket"), "{m}");
    assert!(crate::http::metric_value(&m, "strait_tunnel_bytes_total{direction=\"in\"}") >= 5);
}

/// A single node told to stop lets the requests it is serving finish before it drops its
/// agents, and takes no new connection meanwhile.
#[actix_rt::test]
async fn a_stopping_node_finishes_its_in_flight_requests_first() {
    let backend = Backend::start().await;
    let node = TestNode::embedded().await;
    let _agent = node.connect_agent("alpha", &backend.url()).await;
    let c = node.client(&["alpha"]);
    let slow = tokio::spawn(c.get(node.url("alpha", "/slow/1500")).send());
    let st = node.state.clone();
    eventually(Duration::from_secs(5), "request in flight", || {
        let st = st.clone();
        async move { st.sessions.all().iter().any(|s| s.streams.open_count() > 0) }
    })
    .await;
    let http_addr = node.http_addr;
    let stopping = tokio::spawn(node.shutdown());
    eventually(Duration::from_secs(5), "ingress closed", || async move {
        tokio::net::TcpStream::connect(http_addr).await.is_err()
    })
    .await;
    let res = slow.await.unwrap().expect("the in-flight request is answered");
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "slow");
    stopping.await.unwrap();
}

#[actix_rt::test]
async fn a_restarted_node_still_knows_its_agents() {
    let backend = Backend::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let node = TestNode::in_dir(dir.clone(), |_| {}).await;
    let token = node.add_agent("alpha").await;
    node.shutdown().await;

    let node = TestNode::in_dir(dir, |_| {}).await;
    let agent = AgentHandle::spawn(
        AgentConfig::new(&node.agent_url(), token)
            .unwrap()
            .expose(&backend.url())
            .unwrap(),
    );
    agent.connected(Duration::from_secs(10)).await.unwrap();
    node.wait_agent("alpha").await;
    let res = node
        .client(&["alpha"])
        .get(node.url("alpha", "/status/200"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    agent.kill();
}

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strait-gateway"))
}

#[actix_rt::test]
async fn the_command_line_manages_agents_and_a_real_process_serves_them() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();

    let out = gateway()
        .args(["agent", "add", "alpha", "--json", "--data-dir", data])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = AgentToken::parse(j["token"].as_str().unwrap()).unwrap();
    assert_eq!(token.agent.as_str(), "alpha");
    // The secret is printed once, on stdout, and nowhere else.
    assert!(!String::from_utf8_lossy(&out.stderr).contains(j["token"].as_str().unwrap()));

    let dup = gateway()
        .args(["agent", "add", "alpha", "--data-dir", data])
        .output()
        .unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let bad = gateway()
        .args(["agent", "add", "Not_A_Label", "--data-dir", data])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let (agent_port, http_port, ops_port, api_port) = (
        free_addr().port(),
        free_addr().port(),
        free_addr().port(),
        free_addr().port(),
    );
    let spawn = || {
        gateway()
            .args(["serve", "--data-dir", data, "--heartbeat-ms", "200"])
            .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--ops-listen", &format!("127.0.0.1:{ops_port}")])
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut proc = spawn();
    let echo = TcpServer::start(TcpBehaviour::Echo).await;
    let agent = AgentHandle::spawn(
        AgentConfig::new(&format!("ws://127.0.0.1:{agent_port}"), token.clone())
            .unwrap()
            .expose(&backend.url())
            .unwrap()
            .expose(&format!("echo={}", echo.url()))
            .unwrap(),
    );
    agent.connected(Duration::from_secs(20)).await.unwrap();
    let client = reqwest::Client::builder()
        .resolve("alpha.localhost", ([127, 0, 0, 1], http_port).into())
        .build()
        .unwrap();
    let url = format!("http://alpha.localhost:{http_port}/bytes/5000?seed=8");
    let fetch = || async { client.get(&url).send().await.ok().filter(|r| r.status() == 200) };
    let mut res = None;
    for _ in 0..100 {
        if let Some(r) = fetch().await {
            res = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        check_pattern(res.expect("request through the real process"), 8).await,
        5000
    );

    // A TCP route added through the CLI while the node runs is served within a second or so.
    let route_port = free_addr().port();
    let route = format!("127.0.0.1:{route_port}");
    let out = gateway()
        .args([
            "route",
            "add",
            "--tcp",
            &route,
            "--agent",
            "alpha",
            "--service",
            "echo",
            "--data-dir",
            data,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = gateway().args(["route", "list", "--data-dir", data]).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&route));
    let mut echoed = false;
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&route).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"over the route").await.unwrap();
            let mut buf = [0u8; 14];
            if tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                assert_eq!(&buf, b"over the route");
                echoed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(echoed, "route added at run time was not served");
    let out = gateway()
        .args(["route", "remove", &route, "--data-dir", data])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = gateway()
        .args(["route", "remove", &route, "--data-dir", data])
        .output()
        .unwrap();
    assert!(!out.status.success(), "removing a missing route must fail");

    // Kill the process; a new one on the same data dir serves the same agent, which reconnects.
    proc.kill().unwrap();
    proc.wait().unwrap();
    let mut proc = spawn();
    let mut res = None;
    for _ in 0..300 {
        if let Some(r) = fetch().await {
            res = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        check_pattern(res.expect("agent reconnected after restart"), 8).await,
        5000
    );

    // Revoking through the CLI drops the connected agent.
    let out = gateway()
        .args(["agent", "revoke", "alpha", "--data-dir", data])
        .output()
        .unwrap();
    assert!(out.status.success());
    let list = gateway().args(["agent", "list", "--data-dir", data]).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("revoked"));
    let mut gone = false;
    for _ in 0..200 {
        if client
            .get(&url)
            .send()
            .await
            .map(|r| r.status() == 502)
            .unwrap_or(false)
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "revoked agent still served");
    agent.kill();

    // SIGTERM stops the node cleanly.
    let _ = Command::new("kill").args(["-TERM", &proc.id().to_string()]).status();
    let status = tokio::task::spawn_blocking(move || proc.wait()).await.unwrap().unwrap();
    assert!(status.success(), "gateway exited with {status}");
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[actix_rt::test]
async fn a_gibibyte_each_way_leaves_the_gateway_rss_flat() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = gateway()
        .args(["agent", "add", "alpha", "--json", "--data-dir", data])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = AgentToken::parse(j["token"].as_str().unwrap()).unwrap();
    let (agent_port, http_port, ops_port, api_port) = (
        free_addr().port(),
        free_addr().port(),
        free_addr().port(),
        free_addr().port(),
    );
    let mut proc = gateway()
        .args(["serve", "--data-dir", data])
        .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--ops-listen", &format!("127.0.0.1:{ops_port}")])
        .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = AgentHandle::spawn(
        AgentConfig::new(&format!("ws://127.0.0.1:{agent_port}"), token)
            .unwrap()
            .expose(&backend.url())
            .unwrap(),
    );
    agent.connected(Duration::from_secs(20)).await.unwrap();
    let client = reqwest::Client::builder()
        .resolve("alpha.localhost", ([127, 0, 0, 1], http_port).into())
        .build()
        .unwrap();
    let url = |p: &str| format!("http://alpha.localhost:{http_port}{p}");

    // Warm up (allocator arenas, worker buffers), then take the baseline.
    for _ in 0..3 {
        let res = client.get(url("/fill/8388608")).send().await.unwrap();
        assert_eq!(res.bytes().await.unwrap().len(), 8 << 20);
    }
    let pid = proc.id();
    let baseline = rss_bytes(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let gib: u64 = 1 << 30;
    let res = client.get(url(&format!("/fill/{gib}"))).send().await.unwrap();
    let mut got = 0u64;
    let mut body = res.bytes_stream();
    while let Some(c) = futures_util::StreamExt::next(&mut body).await {
        got += c.unwrap().len() as u64;
    }
    assert_eq!(got, gib);
    let chunk = bytes::Bytes::from(vec![0x5Au8; 256 * 1024]);
    let up =
        futures_util::stream::iter((0..gib / chunk.len() as u64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let res = client
        .post(url("/count"))
        .body(reqwest::Body::wrap_stream(up))
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), gib.to_string());
    sampler.abort();

    let growth = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "gateway RSS baseline {} KiB, peak growth {} KiB over 2 GiB carried",
        baseline / 1024,
        growth / 1024
    );
    assert!(
        growth < 48 << 20,
        "gateway RSS grew by {} MiB while carrying 1 GiB each way",
        growth >> 20
    );
    agent.kill();
    let _ = proc.kill();
    let _ = proc.wait();
}
