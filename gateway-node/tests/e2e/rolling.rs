//! The compose/ topology as real processes: three `strait-gateway` nodes on the machine's Redis,
//! RabbitMQ and Postgres behind HAProxy (rendered from `compose/haproxy.cfg.in`), one agent that
//! knows only HAProxy, steady HTTP load through HAProxy, and a rolling restart of every node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_agent::{AgentConfig, AgentHandle};

use crate::harness::*;
use crate::procs::ProcCluster;

const HAPROXY: &str = "/usr/sbin/haproxy";

/// HAProxy as a child process (`-db`: foreground, logging to stderr), killed when dropped, so a
/// failing test leaves no load balancer behind.
struct Haproxy {
    agent: SocketAddr,
    http: SocketAddr,
    stats: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Renders `compose/haproxy.cfg.in` for `c`'s nodes on free loopback ports (with fast health
    /// checks, logging to stderr and a stats page), checks it with `haproxy -c`, and starts it.
    async fn start(c: &ProcCluster) -> Self {
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/haproxy.cfg.in");
        let template = std::fs::read_to_string(&template).unwrap();
        let (agent, http, stats) = (free_addr(), free_addr(), free_addr());
        let servers = |port: fn(&crate::procs::ProcNode) -> SocketAddr| {
            c.nodes
                .iter()
                .map(|n| {
                    format!(
                        "    server {} {} check port {} inter 200ms fall 1 rise 1\n",
                        n.id,
                        port(n),
                        n.ops.port()
                    )
                })
                .collect::<String>()
        };
        let mut cfg = String::new();
        for line in template.lines() {
            match line.trim() {
                "@AGENT_SERVERS@" => cfg.push_str(&servers(|n| n.agent)),
                "@HTTP_SERVERS@" => cfg.push_str(&servers(|n| n.http)),
                _ => {
                    cfg.push_str(
                        &line
                            .replace("@AGENT_BIND@", &agent.to_string())
                            .replace("@HTTP_BIND@", &http.to_string()),
                    );
                    cfg.push('\n');
                }
            }
            // Test-only additions: every request and server state change on stderr.
            match line.trim() {
                "global" => cfg.push_str("    log stderr format raw local0 info\n"),
                "defaults" => cfg.push_str("    log global\n    option httplog\n"),
                _ => {}
            }
        }
        cfg.push_str(&format!(
            "\nlisten stats\n    bind {stats}\n    stats enable\n    stats uri /stats\n"
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let check = Command::new(HAPROXY).arg("-c").arg("-f").arg(&path).output().unwrap();
        assert!(
            check.status.success(),
            "haproxy -c refused the rendered config:\n{}{}\n{cfg}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = dir.path().join("haproxy.log");
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(std::fs::File::options().append(true).open(&log).unwrap()))
            .spawn()
            .unwrap();
        let mut h = Haproxy {
            agent,
            http,
            stats,
            log,
            child: Some(child),
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !reqwest::get(format!("http://{stats}/stats"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            if let Some(Ok(Some(status))) = h.child.as_mut().map(|c| c.try_wait()) {
                panic!("haproxy exited with {status}:\n{}", h.log());
            }
            assert!(Instant::now() < end, "haproxy does not answer:\n{}", h.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ingress request log lines (`option httplog`) that HAProxy retried (`+`: on another server)
    /// or that did not end in 200.
    fn retried_or_refused(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.starts_with("127.0.0.1:") && l.contains(" gateway_ingress/"))
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let retries = f.get(10).and_then(|c| c.rsplit('/').next()).unwrap_or("?");
                retries != "0" || f.get(5) != Some(&"200")
            })
            .map(str::to_owned)
            .collect()
    }

    /// Waits until HAProxy sees `server` UP in both backends (its health checks passed again).
    async fn wait_up(&self, server: &str) {
        let url = format!("http://{}/stats;csv", self.stats);
        eventually(Duration::from_secs(10), &format!("haproxy marks {server} UP"), || {
            let url = url.clone();
            async move {
                let Ok(csv) = reqwest::get(&url).await.and_then(|r| r.error_for_status()) else {
                    return false;
                };
                let Ok(csv) = csv.text().await else { return false };
                let mut lines = csv.lines();
                let header: Vec<&str> = lines.next().unwrap_or("").trim_start_matches("# ").split(',').collect();
                let Some(status) = header.iter().position(|h| *h == "status") else {
                    return false;
                };
                let states: Vec<&str> = lines
                    .map(|l| l.split(',').collect::<Vec<_>>())
                    .filter(|f| f.get(1) == Some(&server))
                    .filter_map(|f| f.get(status).copied())
                    .collect();
                states.len() == 2 && states.iter().all(|s| *s == "UP")
            }
        })
        .await;
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One load loop's tally: successes, and each failure with what the caller saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
}

/// Sends requests until `stop`: `/bytes/2000?seed=N` (content checked) alternating with
/// `/slow/200`, so some are always in flight when a node drains.
async fn load_loop(http: reqwest::Client, base: String, w: u64, stop: Arc<AtomicBool>) -> Tally {
    let mut t = Tally::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let seed = w * 1_000_000 + n;
        let path = if n.is_multiple_of(2) {
            format!("/bytes/2000?seed={seed}")
        } else {
            "/slow/200".to_owned()
        };
        let started = Instant::now();
        let res = match http.get(format!("{base}{path}")).send().await {
            Ok(r) => r,
            Err(e) => {
                t.failed.push(format!("{path}: {e:?} after {:?}", started.elapsed()));
                continue;
            }
        };
        let status = res.status();
        let error = res
            .headers()
            .get("x-strait-error")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = match res.bytes().await {
            Ok(b) => b,
            Err(e) => {
                t.failed.push(format!("{path}: {status}, body aborted: {e:?}"));
                continue;
            }
        };
        let good = status == 200
            && if path.starts_with("/bytes") {
                body.len() == 2000 && body.iter().enumerate().all(|(i, b)| *b == pattern(seed, i as u64))
            } else {
                body.as_ref() == b"slow"
            };
        if good {
            t.ok += 1;
        } else {
            t.failed.push(format!(
                "{path}: {status} {error:?} after {:?}: {}",
                started.elapsed(),
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
        }
    }
    t
}

/// Every status the agent publishes, with when it was seen: why it left a node (the `Backoff`
/// reason) is what a failed run needs to show.
fn record_status(agent: &AgentHandle) -> Arc<std::sync::Mutex<Vec<(Instant, strait_agent::AgentStatus)>>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut rx = agent.status();
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let s = rx.borrow_and_update().clone();
            out.lock().unwrap().push((Instant::now(), s));
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    seen
}

#[actix_rt::test]
async fn rolling_restart_behind_haproxy_fails_no_request() {
    let backend = Backend::start().await;
    ProcCluster::run(3, |mut c| async move {
        let lb = Haproxy::start(&c).await;
        for n in &c.nodes {
            lb.wait_up(&n.id).await;
        }
        let token = c.add_agent("alpha").await;
        let cfg = AgentConfig::new(&format!("ws://{}", lb.agent), token)
            .unwrap()
            .expose(&backend.url())
            .unwrap();
        let agent = AgentHandle::spawn(cfg);
        let first = agent.connected(Duration::from_secs(20)).await.unwrap();
        println!("agent connected through haproxy to {first}");
        let history = record_status(&agent);

        let http = reqwest::Client::builder()
            .resolve("alpha.localhost", lb.http)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let base = format!("http://alpha.localhost:{}", lb.http.port());
        // Every node's ingress must reach the agent (presence is cluster-wide) before the load.
        let probe = format!("{base}/bytes/10?seed=1");
        eventually(Duration::from_secs(10), "requests through haproxy succeed", || {
            let (http, probe) = (http.clone(), probe.clone());
            async move {
                for _ in 0..6 {
                    if !http.get(&probe).send().await.is_ok_and(|r| r.status() == 200) {
                        return false;
                    }
                }
                true
            }
        })
        .await;

        let stop = Arc::new(AtomicBool::new(false));
        let load: Vec<_> = (0..8)
            .map(|w| tokio::spawn(load_loop(http.clone(), base.clone(), w, stop.clone())))
            .collect();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        for i in 0..c.nodes.len() {
            let t = Instant::now();
            c.stop(i).await;
            let stopped = t.elapsed();
            c.start(i).await;
            lb.wait_up(&c.nodes[i].id).await;
            println!(
                "{} restarted: drained in {stopped:?}, back in haproxy after {:?}; agent: {:?}",
                c.nodes[i].id,
                t.elapsed(),
                *agent.status().borrow()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for l in load {
            let t = l.await.unwrap();
            total.ok += t.ok;
            total.failed.extend(t.failed);
        }
        println!(
            "rolling restart took {:?}: {} requests ok, {} failed",
            started.elapsed(),
            total.ok,
            total.failed.len()
        );
        // Requests a node refused or dropped (its ingress closes soon after SIGTERM, possibly before
        // the health check took it out) that HAProxy retried elsewhere: invisible to callers.
        let retried = lb.retried_or_refused();
        println!("haproxy retried (or saw fail) {} requests:", retried.len());
        for l in &retried {
            println!("  {l}");
        }
        if !total.failed.is_empty() {
            eprintln!("===== agent status changes =====");
            for (at, s) in history.lock().unwrap().iter() {
                eprintln!("  {:>8.3}s {s:?}", at.saturating_duration_since(started).as_secs_f64());
            }
            for i in 0..c.nodes.len() {
                eprintln!("===== {} log =====\n{}", c.nodes[i].id, c.log(i));
            }
            eprintln!("===== haproxy log =====\n{}", lb.log());
        }
        assert!(
            total.failed.is_empty(),
            "{} of {} requests failed: {:#?}",
            total.failed.len(),
            total.ok as usize + total.failed.len(),
            &total.failed[..total.failed.len().min(20)]
        );
        assert!(total.ok > 200, "load too thin to mean anything: {}", total.ok);
        agent.kill();
        drop(lb);
        c
    })
    .await;
}
