//! What the figures were measured on and with: cores, CPU model, memory, kernel and its TCP
//! congestion control, and the versions of everything involved. A figure without these cannot
//! be compared with another.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores the process may use.
    pub cores: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// The kernel's default TCP congestion control. A pacing one (`bbr`) spends CPU on timers
    /// for every loopback hop and caps one loopback stream, so it moves every figure, the
    /// direct ones most (docs/benchmarks.md, twenty-fifth round).
    pub tcp_congestion: String,
}

impl Machine {
    /// Reads it from /proc (fields stay "unknown" where /proc says nothing).
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model: proc_field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            memory_mib: proc_field(&meminfo, "MemTotal")
                .and_then(|v| v.split_whitespace().next().and_then(|k| k.parse::<u64>().ok()))
                .map_or(0, |kib| kib / 1024),
            kernel: proc_line("/proc/sys/kernel/osrelease"),
            tcp_congestion: proc_line("/proc/sys/net/ipv4/tcp_congestion_control"),
        }
    }
}

/// A one-line /proc file, trimmed; "unknown" where it cannot be read.
fn proc_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The value of the first `key : value` line of a /proc file.
pub fn proc_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// Versions of what was measured and what measured it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Versions {
    /// This tool.
    pub loadtest: String,
    /// `git describe` of the workspace, when it is a checkout.
    pub git: Option<String>,
    /// `rustc --version` on PATH (the toolchain the binaries were most likely built with).
    pub rustc: Option<String>,
    /// `strait-gateway --version` of the binary driven.
    pub gateway: Option<String>,
    /// `rathole --version`, when rathole was measured.
    pub rathole: Option<String>,
    /// `release` or `debug`: the profile of the Strait binaries driven. Debug figures only prove
    /// the tool works.
    pub profile: String,
    /// `release` or `debug`: the profile of this tool (the load generator and backend). A debug
    /// load generator caps the direct baseline, and so every ratio.
    pub loadtest_profile: String,
}

/// First line of a command's stdout, if it ran and succeeded.
pub fn command_line_output(program: &Path, args: &[&str], dir: Option<&Path>) -> Option<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_field_reads_the_first_match() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(proc_field(text, "model name").as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(proc_field(text, "flags"), None);
    }
}
