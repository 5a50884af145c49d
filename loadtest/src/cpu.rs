//! Where a measurement's CPU went: the user + system time of each process taking part, per request
//! or per MiB, and the share of the machine that sat idle meanwhile.
//!
//! On a small machine that also runs the load generator and the backend, a tunnel's figure follows
//! two things: the CPU it spends per unit of work, and how well its processes keep the cores busy
//! (idle time while they wait on each other). The report shows both for every spawned target, so
//! anyone can see on their own machine whether a gap is work or waiting, without a profiler.

use std::future::Future;

use serde::Serialize;
use tokio::time::Instant;

use crate::load::Window;

/// Kernel clock ticks per second of `/proc` times (`USER_HZ`: 100 on every Linux ABI this runs
/// on; reading it needs `sysconf`, which needs `unsafe`).
pub const TICKS_PER_SEC: f64 = 100.0;

/// User + system CPU time of a process (all its threads), clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The whole machine's (busy, idle) clock ticks, all cores, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// (busy, idle) of the `cpu` line: idle is `idle` + `iowait`; busy is `user`, `nice`, `system`,
/// `irq`, `softirq` and `steal` (guest time is already inside `user`).
fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Some((busy, idle))
}

/// The processes of one target: the tunnel's two sides (a gateway or the cluster's nodes, and the
/// agent; or rathole's server and client), the backend, and this process, the load generator.
#[derive(Debug, Clone, Default)]
pub struct CpuProbe {
    server: Vec<u32>,
    client: Option<u32>,
    backend: Option<u32>,
}

/// Readings at one instant; `None` where there is no such process or it could not be read.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    server: Option<u64>,
    client: Option<u64>,
    backend: Option<u64>,
    generator: Option<u64>,
    machine: Option<(u64, u64)>,
}

impl CpuProbe {
    /// `server`: the tunnel's processes callers reach (empty for a direct target); `client`: the
    /// one next to the backend; `backend`: the backend's process, when it is one of its own.
    pub fn new(server: Vec<u32>, client: Option<u32>, backend: Option<u32>) -> Self {
        CpuProbe {
            server,
            client,
            backend,
        }
    }

    fn sample(&self) -> Sample {
        let server = match self.server.is_empty() {
            true => None,
            false => self.server.iter().map(|&p| cpu_ticks(p)).sum(),
        };
        Sample {
            at: Instant::now(),
            server,
            client: self.client.and_then(cpu_ticks),
            backend: self.backend.and_then(cpu_ticks),
            generator: cpu_ticks(std::process::id()),
            machine: machine_ticks(),
        }
    }

    /// What `work` used, over the whole of it (measurements without a warm-up).
    pub async fn around<F: Future>(&self, work: F) -> (F::Output, CpuUse) {
        let before = self.sample();
        let out = work.await;
        (out, CpuUse::between(&before, &self.sample()))
    }

    /// What was used over `window`'s measured part (warm-up excluded), read while the load runs.
    pub async fn during(&self, window: Window) -> CpuUse {
        tokio::time::sleep_until(window.measure_from).await;
        let before = self.sample();
        tokio::time::sleep_until(window.end).await;
        CpuUse::between(&before, &self.sample())
    }
}

/// CPU time each part used over a window, ms: what [`CpuUse::per`] divides by the window's work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// Length of the window, s.
    pub secs: f64,
    /// The tunnel's server side (gateway, both cluster nodes, rathole server).
    pub server_ms: Option<f64>,
    /// The tunnel's client side (agent, rathole client).
    pub client_ms: Option<f64>,
    /// The backend.
    pub backend_ms: Option<f64>,
    /// This process: the load generator.
    pub generator_ms: Option<f64>,
    /// Share of the machine's CPU time (all cores) that was idle, 0..1.
    pub machine_idle: Option<f64>,
}

impl CpuUse {
    fn between(b: &Sample, a: &Sample) -> CpuUse {
        let ms = |b: Option<u64>, a: Option<u64>| Some(a?.saturating_sub(b?) as f64 * 1000.0 / TICKS_PER_SEC);
        let machine_idle = match (b.machine, a.machine) {
            (Some((b_busy, b_idle)), Some((a_busy, a_idle))) => {
                let (busy, idle) = (a_busy.saturating_sub(b_busy), a_idle.saturating_sub(b_idle));
                (busy + idle > 0).then(|| idle as f64 / (busy + idle) as f64)
            }
            _ => None,
        };
        CpuUse {
            secs: a.at.duration_since(b.at).as_secs_f64(),
            server_ms: ms(b.server, a.server),
            client_ms: ms(b.client, a.client),
            backend_ms: ms(b.backend, a.backend),
            generator_ms: ms(b.generator, a.generator),
            machine_idle,
        }
    }

    /// The same per unit of work (`work` requests or MiB in the window); `None` for no work.
    pub fn per(&self, work: f64, unit: &'static str) -> Option<CpuPerUnit> {
        if work <= 0.0 {
            return None;
        }
        let us = |ms: Option<f64>| ms.map(|ms| ms * 1000.0 / work);
        Some(CpuPerUnit {
            unit,
            server_us: us(self.server_ms),
            client_us: us(self.client_ms),
            backend_us: us(self.backend_ms),
            generator_us: us(self.generator_ms),
            machine_idle: self.machine_idle,
        })
    }
}

/// CPU per request or per MiB of each part of a measurement, µs, and the machine's idle share.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuPerUnit {
    /// `request` or `MiB`.
    pub unit: &'static str,
    /// The tunnel's server side (gateway, both cluster nodes, rathole server).
    pub server_us: Option<f64>,
    /// The tunnel's client side (agent, rathole client).
    pub client_us: Option<f64>,
    /// The backend.
    pub backend_us: Option<f64>,
    /// The load generator.
    pub generator_us: Option<f64>,
    /// Share of the machine's CPU time that was idle, 0..1.
    pub machine_idle: Option<f64>,
}

impl CpuPerUnit {
    /// All the parts read, together: with the idle share, what the figure follows on a machine
    /// they share (two cores × (1 − idle) / this, per second; docs/benchmarks.md, twenty-sixth
    /// round).
    pub fn total_us(&self) -> f64 {
        [self.server_us, self.client_us, self.backend_us, self.generator_us]
            .into_iter()
            .flatten()
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "1234 (tokio (worker) 1) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 100 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn machine_ticks_count_iowait_as_idle_and_steal_as_busy() {
        let stat = "cpu  100 5 50 800 20 3 7 15 40 0\ncpu0 50 2 25 400 10 1 3 7 20 0\nintr 1 2 3\n";
        assert_eq!(parse_machine_ticks(stat), Some((100 + 5 + 50 + 3 + 7 + 15, 820)));
        assert_eq!(parse_machine_ticks("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_machine_ticks("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn this_process_and_the_machine_have_cpu_ticks() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(machine_ticks().is_some());
    }

    #[tokio::test]
    async fn the_generator_is_charged_for_what_it_spins() {
        let probe = CpuProbe::new(Vec::new(), None, None);
        let (_, used) = probe
            .around(async {
                let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
                let mut x = 0u64;
                while std::time::Instant::now() < until {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
            .await;
        assert_eq!((used.server_ms, used.client_ms, used.backend_ms), (None, None, None));
        // 500 ms of spinning, read in 10 ms ticks: at least a share of it even on a machine busy
        // with other tests, and no more than the test process can have used meanwhile.
        let spent = used.generator_ms.unwrap();
        assert!((50.0..=2000.0).contains(&spent), "generator charged {spent} ms");
        assert!(used.secs >= 0.5);
        assert!(used.machine_idle.is_some_and(|i| (0.0..=1.0).contains(&i)));
    }

    #[test]
    fn per_unit_divides_each_part_by_the_work() {
        let used = CpuUse {
            secs: 2.0,
            server_ms: Some(500.0),
            client_ms: Some(250.0),
            backend_ms: None,
            generator_ms: Some(100.0),
            machine_idle: Some(0.1),
        };
        let per = used.per(50_000.0, "request").unwrap();
        assert_eq!(per.server_us, Some(10.0));
        assert_eq!(per.client_us, Some(5.0));
        assert_eq!(per.backend_us, None);
        assert_eq!(per.generator_us, Some(2.0));
        assert_eq!(per.machine_idle, Some(0.1));
        assert_eq!(per.total_us(), 17.0, "the parts read, none for the missing backend");
        assert_eq!(used.per(0.0, "request"), None);
    }
}
