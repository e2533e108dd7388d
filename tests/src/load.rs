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
