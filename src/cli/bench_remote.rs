//! `ckptstore bench --dir s3://bucket/prefix`: a bucket store's save (durable in the bucket on
//! return) and load (from an empty cache: pull, then read and verify every chunk), in GB/s,
//! with the requests each sends per checkpoint. Each round writes its own store under the
//! prefix and removes it after. The figures are the server's as much as ckptstore's: a local
//! test server (moto) is not a speed reference; compare ratios measured in one run
//! (trainer-bindings/benches/s3_vs_boto3.py puts boto3's transfer manager next to it).

use super::bench::{median, pseudo_random, put_all, stamp, touch, Args};
use super::{emit, emit_json, human_bytes, CliResult};
use ckptstore::remote::{Bucket, Faults, RemoteUrl, LOG_DIR, SEGMENTS_DIR};
use ckptstore::{DType, Options, Selector, Store};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

struct Round {
    save: f64,
    load: f64,
    save_requests: u64,
    load_requests: u64,
}

/// Saves then loads `data` as store `url`; the requests are counted by a fault injector that
/// injects nothing.
fn round(url: &str, data: &[u8], step: u64, work: &std::path::Path) -> CliResult<Round> {
    // A file:// bucket is a directory, which must exist.
    let dir = match url.parse()? {
        RemoteUrl::File { root } => Some(root),
        _ => None,
    };
    if let Some(d) = &dir {
        std::fs::create_dir_all(d)?;
    }
    let counter = Arc::new(Faults::new());
    let base = super::store_options();
    let opts = |cache: &str, read_only: bool| Options {
        cache_dir: Some(work.join(cache)),
        remote_faults: Some(counter.clone()),
        read_only,
        ..base.clone()
    };
    let mut store = Store::open(url, opts("w", false))?;
    let before = counter.requests();
    let t = Instant::now();
    let mut txn = store.begin(step)?;
    put_all(data, |name, b| {
        txn.put_tensor(name, DType::U8, &[b.len() as u64], b)
    })?;
    txn.commit()?;
    let save = t.elapsed().as_secs_f64();
    let save_requests = counter.requests() - before;
    drop(store);
    let before = counter.requests();
    let t = Instant::now();
    {
        let store = Store::open(url, opts("r", true))?;
        let ck = store.checkpoint(Selector::Latest)?;
        let mut n = 0usize;
        for name in ck.tensor_names() {
            n += touch(&ck.tensor(name)?.data);
        }
        std::hint::black_box(n);
    }
    let load = t.elapsed().as_secs_f64();
    let load_requests = counter.requests() - before;
    for d in ["w", "r"] {
        let _ = std::fs::remove_dir_all(work.join(d));
    }
    // The round's store goes: every object under its prefix.
    let bucket = Bucket::open(&url.parse()?)?.with_policy(base.remote_policy);
    for dir in [LOG_DIR, SEGMENTS_DIR] {
        for o in bucket.list(dir)? {
            bucket.delete(&o.key)?;
        }
    }
    if let Some(d) = &dir {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(Round {
        save,
        load,
        save_requests,
        load_requests,
    })
}

pub fn run(a: &Args, sizes: &[u64]) -> CliResult {
    let url = a.dir.to_string_lossy().trim_end_matches('/').to_string();
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("ckptstore-bench-{pid}"));
    let mut reports = Vec::new();
    for &size in sizes {
        let mut rounds = Vec::new();
        for r in 0..a.rounds {
            let mut data = pseudo_random(size as usize);
            stamp(&mut data, r, size);
            let store_url = format!("{url}/bench-{pid}-{size}-{r}");
            let got = round(&store_url, &data, r as u64, &work);
            if got.is_err() {
                let _ = std::fs::remove_dir_all(&work);
            }
            rounds.push(got?);
        }
        let med = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        let gb = |secs: f64| size as f64 / secs / 1e9;
        reports.push((
            size,
            gb(med(&|r| r.save)),
            gb(med(&|r| r.load)),
            med(&|r| r.save_requests as f64) as u64,
            med(&|r| r.load_requests as f64) as u64,
        ));
    }
    let _ = std::fs::remove_dir_all(&work);
    if a.json {
        let v: Vec<_> = reports
            .iter()
            .map(|&(size, save, load, sr, lr)| {
                json!({
                    "url": url,
                    "bytes": size,
                    "rounds": a.rounds,
                    "save_gb_s": save,
                    "load_gb_s": load,
                    "save_requests": sr,
                    "load_requests": lr,
                })
            })
            .collect();
        return emit_json(&match &v[..] {
            [one] => one.clone(),
            _ => json!({ "sizes": v }),
        });
    }
    let mut out = String::new();
    for (size, save, load, sr, lr) in reports {
        out += &format!(
            "bucket store {url}: {} per checkpoint, {} round(s), medians\n\
             \x20 save (durable in the bucket)        {save:>8.3} GB/s  {sr:>5} requests\n\
             \x20 load (empty cache, chunks verified) {load:>8.3} GB/s  {lr:>5} requests\n",
            human_bytes(size),
            a.rounds,
        );
    }
    out += "The server sets these figures as much as ckptstore does: a local test server (moto) \
            is not a speed reference; compare ratios measured in one run.\n";
    emit(&out)
}
