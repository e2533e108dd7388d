//! A small closed-loop load generator: `concurrency` tasks each issue calls back to back until a count or
//! a deadline; latencies are recorded per call and summarised (percentiles by sorting: exact, and cheap
//! at benchmark sizes).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    pub calls: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl LoadStats {
    pub fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((self.latencies.len() as f64 - 1.0) * p / 100.0).round() as usize;
        self.latencies[idx]
    }
}

/// Runs `call(i)` from `concurrency` tasks until `total` calls are issued or `max_time` passes.
pub async fn run<F, Fut, E>(concurrency: usize, total: u64, max_time: Duration, call: F) -> LoadStats
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Debug + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + max_time;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, errors, call) = (next.clone(), errors.clone(), call.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                match call(i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("call {i} failed: {e:?}");
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("load task"));
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    LoadStats { calls: latencies.len() as u64, errors: errors.load(Ordering::Relaxed), elapsed, latencies }
}

/// What an open-loop run measured.
#[derive(Clone, Debug, Default)]
pub struct OpenLoopStats {
    /// Calls per second asked for.
    pub rate: f64,
    /// Calls scheduled (rate × duration).
    pub scheduled: u64,
    /// Calls not issued because `max_outstanding` calls were already waiting (the system could not keep
    /// up); 0 in a valid run.
    pub dropped: u64,
    /// Completed calls; latencies are from each call's *scheduled* send time to its answer.
    pub stats: LoadStats,
    /// (scheduled send time since the start, latency) of every completed call, in completion order.
    pub timeline: Vec<(Duration, Duration)>,
}

impl OpenLoopStats {
    /// Periods of `window` in which some call took longer than `threshold`: (period start, calls over the
    /// threshold, slowest call), in time order. Shows whether slow calls come in bursts (a stall) and how
    /// often.
    pub fn slow_periods(&self, window: Duration, threshold: Duration) -> Vec<(Duration, usize, Duration)> {
        let mut periods: std::collections::BTreeMap<u128, (usize, Duration)> = Default::default();
        for (at, lat) in &self.timeline {
            if *lat > threshold {
                let p = periods.entry(at.as_nanos() / window.as_nanos().max(1)).or_default();
                p.0 += 1;
                p.1 = p.1.max(*lat);
            }
        }
        periods.into_iter().map(|(k, (n, max))| (window * k as u32, n, max)).collect()
    }
}

/// Open loop: issues `call(i)` at a fixed `rate` per second for `duration`, each call at its scheduled
/// time whatever the earlier calls are doing, and measures each call's latency from its scheduled send
/// time, so a stall delays (and counts against) every call scheduled during it instead of hiding them
/// (no coordinated omission).
///
/// The schedule is kept by a dedicated OS thread with `std::thread::sleep` (tens of µs of precision,
/// where tokio's timer has 1 ms), which hands each call to the runtime as a task at its time.
pub async fn run_open<F, Fut, E>(rate: f64, duration: Duration, max_outstanding: usize, call: F) -> OpenLoopStats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Debug + Send + 'static,
{
    assert!(rate > 0.0, "rate must be positive");
    let scheduled = (duration.as_secs_f64() * rate) as u64;
    let runtime = tokio::runtime::Handle::current();
    let call = Arc::new(call);
    let outstanding = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(scheduled as usize)));
    let dispatcher = {
        let (outstanding, errors, latencies) = (outstanding.clone(), errors.clone(), latencies.clone());
        std::thread::Builder::new()
            .name("open-loop".into())
            .spawn(move || {
                let start = Instant::now();
                let mut dropped = 0u64;
                for i in 0..scheduled {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if outstanding.load(Ordering::Relaxed) >= max_outstanding as u64 {
                        dropped += 1;
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let (call, outstanding, errors, latencies) =
                        (call.clone(), outstanding.clone(), errors.clone(), latencies.clone());
                    // Detached: a JoinHandle kept per call would keep every finished task's memory
                    // until the end of the run (tens of MB, and allocator stalls while it grows).
                    runtime.spawn(async move {
                        let result = call(i).await;
                        let latency = due.elapsed();
                        match result {
                            Ok(()) => latencies.lock().expect("latencies").push((due - start, latency)),
                            Err(e) => {
                                if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                    eprintln!("call {i} failed: {e:?}");
                                }
                            }
                        }
                        outstanding.fetch_sub(1, Ordering::Release);
                    });
                }
                (start, dropped)
            })
            .expect("open-loop thread")
    };
    let (start, dropped) =
        tokio::task::spawn_blocking(move || dispatcher.join().expect("open-loop thread")).await.expect("join");
    // Wait for the calls still in flight (each ends within its call timeout).
    let deadline = Instant::now() + Duration::from_secs(60);
    while outstanding.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let timeline = std::mem::take(&mut *latencies.lock().expect("latencies"));
    let mut latencies: Vec<Duration> = timeline.iter().map(|(_, l)| *l).collect();
    latencies.sort_unstable();
    OpenLoopStats {
        rate,
        scheduled,
        dropped,
        stats: LoadStats { calls: latencies.len() as u64, errors: errors.load(Ordering::Relaxed), elapsed, latencies },
        timeline,
    }
}

/// CPU time this process has used so far (user + system, all threads), from `/proc/self/stat`; `None`
/// where that file does not exist. Resolution: one clock tick (10 ms), fine over a multi-second phase.
pub fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state field (index 0).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Busy CPU time of the whole machine so far (all cores: user, nice, system, irq, softirq, steal), from
/// `/proc/stat`; `None` where that file does not exist.
pub fn machine_busy_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7).copied().unwrap_or(0);
    Some(Duration::from_millis(busy * 10))
}

/// How much of the machine other processes used during a measurement: a shared 2-core box is only
/// comparable with itself when this is known.
pub struct OthersMeter {
    started: Instant,
    own: Option<Duration>,
    machine: Option<Duration>,
}

impl OthersMeter {
    pub fn start() -> Self {
        OthersMeter { started: Instant::now(), own: process_cpu_time(), machine: machine_busy_time() }
    }

    /// The share of all cores (0.0 to 1.0) that other processes kept busy since [`OthersMeter::start`].
    pub fn others_share(&self) -> Option<f64> {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let own = process_cpu_time()?.checked_sub(self.own?)?;
        let machine = machine_busy_time()?.checked_sub(self.machine?)?;
        let others = machine.saturating_sub(own).as_secs_f64();
        Some((others / (self.started.elapsed().as_secs_f64() * cores)).clamp(0.0, 1.0))
    }
}
