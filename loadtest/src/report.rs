//! The report: one row per scenario, case and target, each figure next to its ratio to the
//! baseline target (`direct`) measured in the same run; rendered as a Markdown table and as
//! JSON, with the machine, the versions and the exact command, so a figure can be reproduced
//! and compared.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::{Machine, Versions};
use crate::stats::{ratio, LatencySummary};

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
            "- machine: {} cores, {}, {} MiB, Linux {}",
            m.cores, m.cpu_model, m.memory_mib, m.kernel
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
        s
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
