//! The report: one row per scenario, case and target, each figure next to its ratio to the
//! baseline target (`direct`) measured in the same run; rendered as a Markdown table and as
//! JSON, with the machine, the versions and the exact command, so a figure can be reproduced
//! and compared.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cluster::{Cost, CrossNode};
use crate::cpu::CpuPerUnit;
use crate::machine::{Machine, Versions};
use crate::stats::{ratio, LatencySummary};
use crate::target::Spawned;

/// How a row came out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Measured: `value` holds the figure.
    Ok,
    /// The scenario means nothing for this target (e.g. memory per agent of a direct backend).
    NotApplicable,
    /// The scenario could not run against this target (rathole not installed, no TCP address).
    Unavailable,
    /// It ran and failed.
    Failed,
}

/// One figure.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario name (`http-small`, ...).
    pub scenario: String,
    /// What within the scenario (`64 conns`, `1 MiB down`, `8 streams up`, ...).
    pub case: String,
    /// Target name.
    pub target: String,
    /// Outcome.
    pub status: Status,
    /// Why a row has no figure (unavailable, failed, n/a).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unit of `value` (`req/s`, `MiB/s`, `KiB/agent`, ...).
    pub unit: String,
    /// The figure.
    pub value: Option<f64>,
    /// Whether more is better (throughput) or worse (memory, time).
    pub higher_is_better: bool,
    /// `value` / the baseline's `value` for the same scenario and case.
    pub ratio: Option<f64>,
    /// Latency percentiles, where the scenario records them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    /// p99 / the baseline's p99.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ratio: Option<f64>,
    /// Failed operations during the measurement.
    pub errors: u64,
    /// Other figures of the same measurement (RSS before/after, set-up times, ...).
    pub extra: BTreeMap<String, f64>,
    /// Remarks (first error seen, how a figure is derived).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// What the measurement cost a cluster target (node CPU, bus envelopes), over its window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// On `strait-cross` rows: what crossing nodes added, against `strait-same`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_node: Option<CrossNode>,
    /// CPU per request or MiB of each process, and the machine's idle share, over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuPerUnit>,
}

impl Row {
    /// A row with a figure.
    pub fn ok(scenario: &str, case: &str, target: &str, unit: &str, value: f64, higher_is_better: bool) -> Self {
        Row {
            scenario: scenario.to_owned(),
            case: case.to_owned(),
            target: target.to_owned(),
            status: Status::Ok,
            reason: None,
            unit: unit.to_owned(),
            value: Some(value),
            higher_is_better,
            ratio: None,
            latency: None,
            p99_ratio: None,
            errors: 0,
            extra: BTreeMap::new(),
            notes: Vec::new(),
            cost: None,
            cross_node: None,
            cpu: None,
        }
    }

    /// A row without a figure, saying why.
    pub fn without(scenario: &str, case: &str, target: &str, status: Status, reason: impl Into<String>) -> Self {
        Row {
            status,
            reason: Some(reason.into()),
            value: None,
            ..Row::ok(scenario, case, target, "", 0.0, true)
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command line, as typed.
    pub command: String,
    /// When the run started (UTC, RFC 3339).
    pub started_at: String,
    /// How long it took, s.
    pub duration_secs: f64,
    /// Whether it was a `--quick` run (short and small: proof the tool works, not figures).
    pub quick: bool,
    /// Baseline target name.
    pub baseline: String,
    /// What it ran on.
    pub machine: Machine,
    /// What it ran.
    pub versions: Versions,
    /// The figures.
    pub rows: Vec<Row>,
}

impl Report {
    /// Fills in the ratio of every row that has none yet (the runner fills them per round) to
    /// the baseline row of the same scenario and case.
    pub fn compute_ratios(&mut self) {
        fill_ratios(&mut self.rows, &self.baseline);
        fill_cross_node(&mut self.rows);
    }

    /// Problems that make a `--check` run fail: rows that failed or could not run, and scenarios
    /// with no figure at all.
    pub fn problems(&self, scenarios: &[String]) -> Vec<String> {
        let mut out: Vec<String> = self
            .rows
            .iter()
            .filter(|r| matches!(r.status, Status::Failed | Status::Unavailable))
            .map(|r| {
                format!(
                    "{} / {} / {}: {:?} {}",
                    r.scenario,
                    r.case,
                    r.target,
                    r.status,
                    r.reason.as_deref().unwrap_or("")
                )
            })
            .collect();
        for s in scenarios {
            if !self.rows.iter().any(|r| &r.scenario == s && r.status == Status::Ok) {
                out.push(format!("{s}: no figure"));
            }
        }
        // A spawned tunnel's traffic figure comes with what its own processes spent on it.
        let tunnels = [
            Spawned::Strait,
            Spawned::Rathole,
            Spawned::StraitSame,
            Spawned::StraitCross,
        ]
        .map(Spawned::name);
        for r in &self.rows {
            let traffic = r.unit == "req/s" || r.unit == "MiB/s";
            if r.status != Status::Ok || !traffic || !tunnels.contains(&r.target.as_str()) {
                continue;
            }
            if r.cpu.is_none_or(|c| c.server_us.is_none() || c.client_us.is_none()) {
                out.push(format!(
                    "{} / {} / {}: the tunnel's processes' CPU was not read",
                    r.scenario, r.case, r.target
                ));
            }
        }
        // A cross-node figure proves something only if frames did cross the bus.
        for r in &self.rows {
            if r.target != Spawned::StraitCross.name() || r.status != Status::Ok {
                continue;
            }
            let frames = r.cost.map_or(0.0, |c| c.bus_published);
            if frames <= 0.0 {
                out.push(format!(
                    "{} / {} / {}: no frame crossed the bus",
                    r.scenario, r.case, r.target
                ));
            }
            let has_same = self
                .rows
                .iter()
                .any(|s| s.target == Spawned::StraitSame.name() && s.scenario == r.scenario && s.case == r.case);
            if has_same && r.cross_node.is_none_or(|x| x.vs_same.is_none()) {
                out.push(format!(
                    "{} / {} / {}: no comparison with {}",
                    r.scenario,
                    r.case,
                    r.target,
                    Spawned::StraitSame.name()
                ));
            }
        }
        out
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The Markdown form: a header (command, machine, versions) and one table.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let v = &self.versions;
        let _ = writeln!(
            s,
            "## strait-loadtest{}\n",
            if self.quick { " (quick run)" } else { "" }
        );
        let _ = writeln!(s, "- command: `{}`", self.command);
        let _ = writeln!(s, "- started: {} (took {:.0} s)", self.started_at, self.duration_secs);
        let _ = writeln!(
            s,
            "- machine: {} cores, {}, {} MiB, Linux {}, TCP congestion control {}",
            m.cores, m.cpu_model, m.memory_mib, m.kernel, m.tcp_congestion
        );
        let _ = writeln!(
            s,
            "- versions: strait-loadtest {}, git {}, {}, gateway `{}` ({} build), rathole {}",
            v.loadtest,
            v.git.as_deref().unwrap_or("n/a"),
            v.rustc.as_deref().unwrap_or("rustc n/a"),
            v.gateway.as_deref().unwrap_or("n/a"),
            v.profile,
            v.rathole.as_deref().unwrap_or("n/a"),
        );
        if v.profile == "debug" || v.loadtest_profile == "debug" {
            let _ = writeln!(
                s,
                "- **debug build (gateway/agent: {}, load generator: {}): these figures only prove the tool works**",
                v.profile, v.loadtest_profile
            );
        }
        let _ = writeln!(
            s,
            "\n| scenario | case | target | figure | × {} | p50 | p90 | p99 | p999 | p99 × {} | notes |",
            self.baseline, self.baseline
        );
        let _ = writeln!(s, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
        for r in &self.rows {
            let figure = match (&r.status, r.value) {
                (Status::Ok, Some(v)) => format!("{} {}", human(v), r.unit),
                (Status::NotApplicable, _) => "n/a".to_owned(),
                (Status::Unavailable, _) => "unavailable".to_owned(),
                _ => "FAILED".to_owned(),
            };
            let lat = |f: fn(&LatencySummary) -> u64| r.latency.as_ref().map_or(String::new(), |l| micros(f(l)));
            let mut notes: Vec<String> = Vec::new();
            if let Some(why) = &r.reason {
                notes.push(why.replace('|', "/").replace('\n', " "));
            }
            if r.errors > 0 {
                notes.push(format!("{} errors", r.errors));
            }
            notes.extend(r.notes.iter().map(|n| n.replace('|', "/").replace('\n', " ")));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.case,
                r.target,
                figure,
                r.ratio.map_or(String::new(), |x| format!("{x:.2}x")),
                lat(|l| l.p50_us),
                lat(|l| l.p90_us),
                lat(|l| l.p99_us),
                lat(|l| l.p999_us),
                r.p99_ratio.map_or(String::new(), |x| format!("{x:.2}x")),
                notes.join("; "),
            );
        }
        self.cpu_markdown(&mut s);
        self.cluster_markdown(&mut s);
        s
    }

    /// What each process spent per request or MiB, and how idle the machine was, for every row
    /// that read it. Empty when none did.
    fn cpu_markdown(&self, s: &mut String) {
        let rows: Vec<(&Row, CpuPerUnit)> = self.rows.iter().filter_map(|r| Some((r, r.cpu?))).collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n### CPU per unit of work\n\n\
             User + system CPU of each process over the measured window, per request or per MiB (`/proc`, \
             10 ms ticks). Tunnel: the gateway (both nodes for a cluster target) or rathole's server, then \
             the agent or rathole's client. Load generator: this process (with the backend too when that is \
             not a process of its own). Idle: the share of all cores' time nobody used; on a small shared \
             machine a tunnel that leaves cores idle is waiting on hand-offs, not short of CPU.\n"
        );
        let _ = writeln!(
            s,
            "| scenario | case | target | figure | per | tunnel (server + client) | backend | load generator | all | machine idle |"
        );
        let _ = writeln!(s, "|---|---|---|--:|---|--:|--:|--:|--:|--:|");
        let us = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1} µs"));
        for (r, c) in rows {
            let tunnel = match (c.server_us, c.client_us) {
                (Some(a), Some(b)) => format!("{a:.1} + {b:.1} µs"),
                (a, b) => us(a.or(b)),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.case,
                r.target,
                r.value.map_or(String::new(), |v| format!("{} {}", human(v), r.unit)),
                c.unit,
                tunnel,
                us(c.backend_us),
                us(c.generator_us),
                us(Some(c.total_us())),
                c.machine_idle.map_or(String::new(), |i| format!("{:.0}%", i * 100.0)),
            );
        }
    }

    /// The cluster section: each `strait-cross` figure next to `strait-same`'s, with what the
    /// bus added (latency, envelopes, CPU per envelope). Empty when no cluster target ran.
    fn cluster_markdown(&self, s: &mut String) {
        let (same_name, cross_name) = (Spawned::StraitSame.name(), Spawned::StraitCross.name());
        let cross_rows: Vec<&Row> = self.rows.iter().filter(|r| r.target == cross_name).collect();
        if cross_rows.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n### Cluster: across nodes (`{cross_name}`) vs same node (`{same_name}`)\n\n\
             Two nodes of one cluster, the agent on B. `{same_name}`: load to B (the bus is skipped); \
             `{cross_name}`: load to A (every frame crosses RabbitMQ). Bus frames are envelopes published \
             by both nodes in the window (and per AMQP message: the broker's CPU follows messages); CPU per frame is (CPU per request or MiB across − same) / \
             frames per request or MiB, both nodes; RabbitMQ + Redis are this machine's servers.\n"
        );
        let _ = writeln!(
            s,
            "| scenario | case | same node | across | × same | p50 same / across | p99 same / across | added p50 / p99 | bus frames (per unit) | node CPU / frame | RabbitMQ+Redis CPU / frame |"
        );
        let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for c in cross_rows {
            let same = self
                .rows
                .iter()
                .find(|r| r.target == same_name && r.scenario == c.scenario && r.case == c.case);
            let fig = |r: Option<&Row>| match r {
                Some(r) if r.status == Status::Ok => {
                    r.value.map_or(String::new(), |v| format!("{} {}", human(v), r.unit))
                }
                Some(r) => format!("{:?}", r.status),
                None => String::new(),
            };
            let lat = |f: fn(&LatencySummary) -> u64| {
                let one = |r: Option<&Row>| r.and_then(|r| r.latency).map(|l| micros(f(&l)));
                match (one(same), one(Some(c))) {
                    (Some(a), Some(b)) => format!("{a} / {b}"),
                    _ => String::new(),
                }
            };
            let x = c.cross_node.unwrap_or_default();
            let us = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1} µs"));
            let added = match (x.added_p50_us, x.added_p99_us) {
                (Some(a), Some(b)) => format!("{} / {}", signed_micros(a), signed_micros(b)),
                _ => String::new(),
            };
            let per_unit = c.cost.map_or("unit", |c| c.work_unit);
            let batched = x.frames_per_batch.map_or(String::new(), |b| format!(", {b:.1}/batch"));
            let frames = match (x.bus_frames.or(c.cost.map(|c| c.bus_published)), x.frames_per_unit) {
                (Some(n), Some(p)) => format!("{} ({p:.2}/{per_unit}{batched})", human(n)),
                (Some(n), None) => human(n),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.scenario,
                c.case,
                fig(same),
                fig(Some(c)),
                x.vs_same.map_or(String::new(), |v| format!("{v:.2}x")),
                lat(|l| l.p50_us),
                lat(|l| l.p99_us),
                added,
                frames,
                us(x.node_cpu_us_per_frame),
                us(x.services_cpu_us_per_frame),
            );
        }
    }
}

/// A latency difference in µs, signed (`+1.20 ms`, `-80 µs`).
fn signed_micros(us: f64) -> String {
    let sign = if us < 0.0 { "-" } else { "+" };
    format!("{sign}{}", micros(us.abs().round() as u64))
}

/// Sets `cross_node` of `strait-cross` rows that have none, against the `strait-same` row of the
/// same scenario and case among `rows` (one round, so both saw the same spell of the machine).
pub fn fill_cross_node(rows: &mut [Row]) {
    type Side = (f64, Option<(u64, u64)>, Option<Cost>);
    let same: BTreeMap<(String, String), Side> = rows
        .iter()
        .filter(|r| r.target == Spawned::StraitSame.name() && r.status == Status::Ok)
        .filter_map(|r| {
            let lat = r.latency.map(|l| (l.p50_us, l.p99_us));
            r.value
                .map(|v| ((r.scenario.clone(), r.case.clone()), (v, lat, r.cost)))
        })
        .collect();
    for r in rows.iter_mut() {
        if r.target != Spawned::StraitCross.name() || r.status != Status::Ok || r.cross_node.is_some() {
            continue;
        }
        let (Some(v), Some((sv, slat, scost))) = (r.value, same.get(&(r.scenario.clone(), r.case.clone()))) else {
            continue;
        };
        let lat = r.latency.map(|l| (l.p50_us, l.p99_us));
        r.cross_node = Some(CrossNode::compare(
            (v, lat, r.cost.as_ref()),
            (*sv, *slat, scost.as_ref()),
        ));
    }
}

/// Sets `ratio` and `p99_ratio` of rows that have none to their figure over the `baseline`
/// row's of the same scenario and case, among `rows`.
pub fn fill_ratios(rows: &mut [Row], baseline: &str) {
    let base: BTreeMap<(String, String), (f64, Option<u64>)> = rows
        .iter()
        .filter(|r| r.target == baseline && r.status == Status::Ok)
        .filter_map(|r| {
            r.value
                .map(|v| ((r.scenario.clone(), r.case.clone()), (v, r.latency.map(|l| l.p99_us))))
        })
        .collect();
    for r in rows.iter_mut() {
        let Some((bv, bp99)) = base.get(&(r.scenario.clone(), r.case.clone())) else {
            continue;
        };
        if r.ratio.is_none() {
            r.ratio = r.value.and_then(|v| ratio(v, *bv));
        }
        if r.p99_ratio.is_none() {
            r.p99_ratio = match (r.latency, bp99) {
                (Some(l), Some(b)) => ratio(l.p99_us as f64, *b as f64),
                _ => None,
            };
        }
    }
}

/// A figure with sensible precision and thousands separators (`41,234`, `812.5`, `3.42`).
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.abs() >= 10_000.0 {
        let n = v.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A latency in µs as `812 µs`, `3.42 ms` or `1.20 s`.
pub fn micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2} s", us as f64 / 1_000_000.0)
    }
}

/// Seconds since the Unix epoch as an RFC 3339 UTC timestamp.
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rows: Vec<Row>) -> Report {
        Report {
            command: "strait-loadtest run --spawn".into(),
            started_at: rfc3339(0),
            duration_secs: 1.0,
            quick: false,
            baseline: "direct".into(),
            machine: Machine {
                cores: 2,
                cpu_model: "Test CPU".into(),
                memory_mib: 1024,
                kernel: "6.1".into(),
                tcp_congestion: "bbr".into(),
            },
            versions: Versions {
                loadtest: "0.1.0".into(),
                profile: "release".into(),
                ..Versions::default()
            },
            rows,
        }
    }

    fn lat(p99: u64) -> LatencySummary {
        LatencySummary {
            count: 10,
            mean_us: 1.0,
            p50_us: 100,
            p90_us: 200,
            p99_us: p99,
            p999_us: 900,
            max_us: 1000,
        }
    }

    #[test]
    fn ratios_pair_rows_by_scenario_and_case() {
        let mut direct = Row::ok("http-small", "64 conns", "direct", "req/s", 40_000.0, true);
        direct.latency = Some(lat(1_000));
        let mut strait = Row::ok("http-small", "64 conns", "strait", "req/s", 20_000.0, true);
        strait.latency = Some(lat(1_500));
        let other_case = Row::ok("http-small", "8 conns", "strait", "req/s", 1.0, true);
        let mut r = report(vec![direct, strait, other_case]);
        r.compute_ratios();
        assert_eq!(r.rows[0].ratio, Some(1.0));
        assert_eq!(r.rows[1].ratio, Some(0.5));
        assert_eq!(r.rows[1].p99_ratio, Some(1.5));
        assert_eq!(r.rows[2].ratio, None, "no baseline for that case");
    }

    #[test]
    fn markdown_has_one_line_per_row_and_the_context() {
        let mut r = report(vec![
            Row::ok("tcp-bulk", "1 stream down", "direct", "MiB/s", 2_500.0, true),
            Row::ok("tcp-bulk", "1 stream down", "strait", "MiB/s", 1_000.0, true),
            Row::without(
                "tcp-bulk",
                "1 stream down",
                "rathole",
                Status::Unavailable,
                "rathole not installed",
            ),
        ]);
        r.compute_ratios();
        let md = r.to_markdown();
        assert!(md.contains("`strait-loadtest run --spawn`"));
        assert!(md.contains("2 cores, Test CPU"));
        assert!(md.contains("TCP congestion control bbr"), "{md}");
        assert!(
            md.contains("| tcp-bulk | 1 stream down | strait | 1000 MiB/s | 0.40x |"),
            "{md}"
        );
        assert!(md.contains("| rathole | unavailable |"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| tcp-bulk")).count(), 3);
    }

    #[test]
    fn json_carries_rows_and_machine() {
        let r = report(vec![Row::ok(
            "agents-idle",
            "1000 agents",
            "strait",
            "KiB/agent",
            21.5,
            false,
        )]);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["machine"]["cores"], 2);
        assert_eq!(v["machine"]["tcp_congestion"], "bbr");
        assert_eq!(v["rows"][0]["status"], "ok");
        assert_eq!(v["rows"][0]["value"], 21.5);
    }

    #[test]
    fn problems_name_failed_rows_and_empty_scenarios() {
        let r = report(vec![
            Row::ok("http-small", "64 conns", "direct", "req/s", 1.0, true),
            Row::without("tcp-bulk", "1 stream down", "strait", Status::Failed, "boom"),
            Row::without("agents-idle", "10 agents", "direct", Status::NotApplicable, "no tunnel"),
        ]);
        let p = r.problems(&["http-small".into(), "tcp-bulk".into(), "agents-idle".into()]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("boom"));
        assert!(p.iter().any(|x| x == "tcp-bulk: no figure"));
        assert!(p.iter().any(|x| x == "agents-idle: no figure"));
    }

    fn cost(published: f64, work: f64) -> Cost {
        crate::cluster::test_cost(100.0, published, work)
    }

    /// A tunnel's CPU per unit of work, as the runner puts it on a traffic row.
    fn tunnel_cpu(unit: &'static str) -> Option<CpuPerUnit> {
        Some(CpuPerUnit {
            unit,
            server_us: Some(10.64),
            client_us: Some(6.8),
            backend_us: Some(7.0),
            generator_us: Some(5.25),
            machine_idle: Some(0.094),
        })
    }

    #[test]
    fn cross_node_rows_are_compared_with_same_node_rows() {
        let mut same = Row::ok("http-small", "64 conns", "strait-same", "req/s", 20_000.0, true);
        same.latency = Some(lat(2_000));
        same.cost = Some(cost(0.0, 200_000.0));
        let mut cross = Row::ok("http-small", "64 conns", "strait-cross", "req/s", 10_000.0, true);
        cross.latency = Some(lat(5_000));
        cross.cost = Some(cost(500_000.0, 100_000.0));
        (same.cpu, cross.cpu) = (tunnel_cpu("request"), tunnel_cpu("request"));
        let mut r = report(vec![same, cross]);
        r.compute_ratios();
        let x = r.rows[1].cross_node.unwrap();
        assert_eq!(x.vs_same, Some(0.5));
        assert_eq!(x.added_p99_us, Some(3_000.0));
        assert_eq!(x.frames_per_unit, Some(5.0));
        let md = r.to_markdown();
        assert!(md.contains("### Cluster: across nodes"), "{md}");
        assert!(
            md.contains("| http-small | 64 conns | 20,000 req/s | 10,000 req/s | 0.50x |"),
            "{md}"
        );
        assert!(r.problems(&["http-small".into()]).is_empty());
    }

    #[test]
    fn problems_name_cross_node_rows_without_bus_frames() {
        let mut cross = Row::ok("tcp-bulk", "1 stream down", "strait-cross", "MiB/s", 90.0, true);
        cross.cost = Some(cost(0.0, 10.0));
        cross.cpu = tunnel_cpu("MiB");
        let r = report(vec![cross]);
        let p = r.problems(&["tcp-bulk".into()]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("no frame crossed the bus"));
        assert!(!report(vec![]).to_markdown().contains("Cluster"));
    }

    #[test]
    fn cpu_per_unit_is_shown_for_the_rows_that_read_it() {
        let direct = Row::ok("http-small", "64 conns", "direct", "req/s", 100_000.0, true);
        let mut strait = Row::ok("http-small", "64 conns", "strait", "req/s", 45_000.0, true);
        strait.cpu = tunnel_cpu("request");
        let md = report(vec![direct.clone(), strait]).to_markdown();
        assert!(md.contains("### CPU per unit of work"), "{md}");
        assert!(
            md.contains(
                "| http-small | 64 conns | strait | 45,000 req/s | request | 10.6 + 6.8 µs | 7.0 µs | 5.2 µs | 29.7 µs | 9% |"
            ),
            "{md}"
        );
        // Rows without CPU figures (user-run targets) get no line, and no section when none has.
        assert!(
            !md.contains("| http-small | 64 conns | direct | 100,000 req/s | request"),
            "{md}"
        );
        assert!(!report(vec![direct]).to_markdown().contains("CPU per unit"));
    }

    #[test]
    fn problems_name_tunnel_rows_whose_processes_were_not_read() {
        let mut read = Row::ok("http-small", "64 conns", "rathole", "req/s", 50_000.0, true);
        read.cpu = tunnel_cpu("request");
        let mut half = Row::ok("tcp-bulk", "1 stream up", "strait", "MiB/s", 900.0, true);
        half.cpu = tunnel_cpu("MiB").map(|c| CpuPerUnit { client_us: None, ..c });
        let unread = Row::ok("http-large", "1 MiB down x4", "strait", "MiB/s", 800.0, true);
        // The baseline and memory rows have no tunnel processes to read.
        let direct = Row::ok("http-small", "64 conns", "direct", "req/s", 100_000.0, true);
        let memory = Row::ok("agents-idle", "10 agents", "strait", "KiB/agent", 20.0, false);
        let r = report(vec![read, half, unread, direct, memory]);
        let p = r.problems(&[]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("tcp-bulk / 1 stream up / strait: the tunnel's processes' CPU was not read"));
        assert!(p[1].starts_with("http-large / 1 MiB down x4 / strait"));
    }

    #[test]
    fn number_formatting() {
        assert_eq!(human(41_234.4), "41,234");
        assert_eq!(human(1_234_567.0), "1,234,567");
        assert_eq!(human(812.46), "812");
        assert_eq!(human(31.25), "31.2");
        assert_eq!(human(3.421), "3.42");
        assert_eq!(micros(812), "812 µs");
        assert_eq!(micros(3_420), "3.42 ms");
        assert_eq!(micros(1_200_000), "1.20 s");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
