//! The tool end to end, without a gateway: an in-process backend measured as a user-run
//! `direct` target by every traffic scenario with tiny windows, then the report built from it.
//! (The spawned Strait and rathole stacks are exercised by `scripts/test`'s quick run.)

use std::time::Duration;

use strait_loadtest::backend::Backend;
use strait_loadtest::machine::{Machine, Versions};
use strait_loadtest::report::{Report, Status};
use strait_loadtest::scenario::{Plan, Progress, Runner, Scenario};
use strait_loadtest::target::{External, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_only_quick_run_produces_every_traffic_figure() {
    let backend = Backend::bind("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (http, tcp) = (backend.http_addr().unwrap(), backend.tcp_addr().unwrap());
    tokio::spawn(backend.serve());

    let plan = Plan {
        connections: 4,
        new_conn_concurrency: 2,
        warmup: Duration::from_millis(50),
        duration: Duration::from_millis(300),
        large_sizes: vec![256 << 10],
        large_connections: 2,
        bulk_duration: Duration::from_millis(200),
        bulk_streams: vec![1, 2],
        ..Plan::quick()
    };
    let work = tempfile::tempdir().unwrap();
    let runner = Runner {
        plan,
        bins: None,
        backend: None,
        backend_pid: None,
        workdir: work.path().to_path_buf(),
        progress: Progress::new(0, false),
        baseline: "direct".into(),
        services: Default::default(),
    };
    let direct = External::parse(&format!("direct:http={http},tcp={tcp}")).unwrap();
    let scenarios = [
        Scenario::HttpSmall,
        Scenario::HttpNewConn,
        Scenario::HttpLarge,
        Scenario::TcpBulk,
        Scenario::AgentsIdle,
    ];
    let rows = runner.run(&scenarios, &[Target::External(direct)]).await;

    let traffic: Vec<_> = rows.iter().filter(|r| r.scenario != "agents-idle").collect();
    // http-small closed and paced, 1, (1 size x 2 directions), (2 stream counts x 2 directions).
    assert_eq!(traffic.len(), 9, "{rows:#?}");
    for r in &traffic {
        assert_eq!(r.status, Status::Ok, "{r:#?}");
        assert!(r.value.unwrap() > 0.0, "{r:#?}");
    }
    // Every traffic row says what it cost this process (load generator and, here, backend), per
    // request or MiB, and how idle the machine was; there is no tunnel process to read.
    for r in &traffic {
        let cpu = r.cpu.unwrap_or_else(|| panic!("no CPU figures: {r:#?}"));
        assert!(cpu.generator_us.is_some_and(|us| us >= 0.0), "{r:#?}");
        assert_eq!((cpu.server_us, cpu.client_us, cpu.backend_us), (None, None, None));
        assert!(cpu.machine_idle.is_some_and(|i| (0.0..=1.0).contains(&i)), "{r:#?}");
        assert_eq!(cpu.unit, if r.unit == "req/s" { "request" } else { "MiB" });
    }
    // The paced case keeps to its schedule: never more than it, and it is easily kept here.
    let paced = rows.iter().find(|r| r.case == "4 conns at 500 req/s").unwrap();
    let rate = paced.value.unwrap();
    assert!((250.0..=600.0).contains(&rate), "paced at {rate} req/s: {paced:#?}");
    assert!(paced.latency.is_some_and(|l| l.count > 0));
    let small = rows.iter().find(|r| r.scenario == "http-small").unwrap();
    let lat = small.latency.unwrap();
    assert!(lat.count > 0 && lat.p50_us <= lat.p99_us && lat.p99_us <= lat.p999_us);
    // A user-run target without ws=/data-dir= cannot host agents: said so, not faked.
    let agents = rows.iter().find(|r| r.scenario == "agents-idle").unwrap();
    assert_eq!(agents.status, Status::Unavailable);

    let mut report = Report {
        command: "test".into(),
        started_at: "1970-01-01T00:00:00Z".into(),
        duration_secs: 1.0,
        quick: true,
        baseline: "direct".into(),
        machine: Machine::detect(),
        versions: Versions::default(),
        rows,
    };
    report.compute_ratios();
    assert!(report
        .rows
        .iter()
        .filter(|r| r.status == Status::Ok)
        .all(|r| r.ratio == Some(1.0)));
    let md = report.to_markdown();
    assert!(md.contains("| http-small | 4 conns | direct |"), "{md}");
    assert!(md.contains("### CPU per unit of work"), "{md}");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 10);
}
