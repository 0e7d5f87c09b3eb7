//! Measuring: CPU seconds of a process, percentiles, CPU affinity, and result lines.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads), in seconds; `None` when it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

/// CPU seconds of this process.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// A process whose CPU time is tracked over a measurement window.
#[derive(Debug, Clone)]
pub struct CpuProbe {
    pub label: String,
    pub pid: u32,
    start: Option<f64>,
}

impl CpuProbe {
    pub fn new(label: &str, pid: u32) -> CpuProbe {
        CpuProbe {
            label: label.to_string(),
            pid,
            start: cpu_seconds(pid),
        }
    }

    /// Restarts the window now.
    pub fn reset(&mut self) {
        self.start = cpu_seconds(self.pid);
    }

    /// CPU seconds used since the window started.
    pub fn used(&self) -> Option<f64> {
        Some(cpu_seconds(self.pid)? - self.start?)
    }
}

/// Pins the calling thread (and the threads it creates later) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(*cpu, &mut set);
        }
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        anyhow::ensure!(
            rc == 0,
            "sched_setaffinity({cpus:?}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Parses a taskset-style CPU list ("1", "0,1", "0-1").
pub fn parse_cpus(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if let Some((from, to)) = part.split_once('-') {
            let (from, to): (usize, usize) = (from.parse()?, to.parse()?);
            cpus.extend(from..=to);
        } else {
            cpus.push(part.parse()?);
        }
    }
    anyhow::ensure!(!cpus.is_empty(), "empty CPU list {text:?}");
    Ok(cpus)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Latency summary of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(samples: &mut [Duration]) -> Latency {
        let mut millis: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        millis.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Latency {
            count: millis.len(),
            p50_ms: percentile(&millis, 50.0),
            p99_ms: percentile(&millis, 99.0),
            max_ms: millis.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

/// One result line: actions, seconds, and CPU of the processes that matter.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub what: String,
    pub actions: u64,
    pub seconds: f64,
    /// (label, CPU seconds) — the stage first.
    pub cpu: Vec<(String, f64)>,
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        self.actions as f64 / self.seconds
    }

    /// CPU seconds per million actions of the first (stage) process.
    pub fn stage_cpu_per_million(&self) -> Option<f64> {
        self.cpu
            .first()
            .map(|(_, cpu)| cpu / self.actions as f64 * 1e6)
    }
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} actions in {:.2} s = {:.0} actions/s",
            self.what,
            self.actions,
            self.seconds,
            self.per_second()
        )?;
        for (index, (label, cpu)) in self.cpu.iter().enumerate() {
            let per_million = cpu / self.actions as f64 * 1e6;
            write!(
                f,
                "\n    {label}: {cpu:.2} CPU-s = {per_million:.2} CPU-s per million actions ({:.0}% of one core)",
                cpu / self.seconds * 100.0
            )?;
            if index == 0 && *cpu > 0.0 {
                write!(
                    f,
                    ", i.e. {:.0} actions per CPU-second",
                    self.actions as f64 / cpu
                )?;
            }
        }
        Ok(())
    }
}
