//! What one measured step of `ckptstore bench` cost the machine, next to its time: the
//! process's CPU (user and system, all threads) and, sampled every 10 ms while it ran, the
//! peak of the kernel's dirty + writeback page-cache bytes (/proc/meminfo) and of the
//! process's RSS. Wall clock on a shared machine moves with the neighbours; CPU time and
//! these counts move much less, and say where the time went (copying out of the page cache
//! is system time; dirty pages piling up means writeback throttling).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One step's cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cost {
    /// CPU seconds in user mode, all threads of this process.
    pub user: f64,
    /// CPU seconds in the kernel, all threads of this process.
    pub sys: f64,
    /// Peak of Dirty + Writeback in /proc/meminfo while it ran (bytes; 0 where unreadable).
    pub dirty_peak: u64,
    /// Peak RSS of this process while it ran (bytes).
    pub rss_peak: u64,
}

impl Cost {
    /// Medians, field by field, of several rounds' costs.
    pub fn median(costs: &[Cost]) -> Cost {
        let med = |f: &dyn Fn(&Cost) -> f64| {
            let mut v: Vec<f64> = costs.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        Cost {
            user: med(&|c| c.user),
            sys: med(&|c| c.sys),
            dirty_peak: med(&|c| c.dirty_peak as f64) as u64,
            rss_peak: med(&|c| c.rss_peak as f64) as u64,
        }
    }
}

/// Process CPU (user, system) seconds so far, from /proc/self/stat.
fn cpu() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ, fixed at 100 on Linux
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>();
            Some((
                rest.get(11)?.parse::<f64>().ok()? / ticks,
                rest.get(12)?.parse::<f64>().ok()? / ticks,
            ))
        })
        .unwrap_or((0.0, 0.0))
}

/// Dirty + Writeback bytes now, from /proc/meminfo (0 where unreadable).
fn dirty_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    s.lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// Runs `f`, returning its result and what it cost.
pub fn costed<T>(f: impl FnOnce() -> T) -> (T, Cost) {
    let stop = Arc::new(AtomicBool::new(false));
    let (dirty, rss) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (stop, dirty, rss) = (stop.clone(), dirty.clone(), rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                dirty.fetch_max(dirty_bytes(), Ordering::Relaxed);
                rss.fetch_max(super::bench::rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (u0, s0) = cpu();
    let out = f();
    let (u1, s1) = cpu();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let cost = Cost {
        user: u1 - u0,
        sys: s1 - s0,
        dirty_peak: dirty.load(Ordering::Relaxed),
        rss_peak: rss.load(Ordering::Relaxed),
    };
    (out, cost)
}
