//! `ckptstore pull URL DIR`: a bucket store's newest state into an empty local directory.

use super::{emit, emit_json, fail, is_url, CliResult};
use ckptstore::Options;
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `ckptstore pull`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bucket store: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix
    /// (endpoint and credentials from the AWS_*, GOOGLE_*, AZURE_* environment variables) or
    /// file:///dir.
    pub url: PathBuf,
    /// The local directory to fill (created; must not hold a store).
    pub dir: PathBuf,
    /// Fetch every segment now (the directory no longer needs the bucket), not when first read.
    #[arg(long)]
    pub all: bool,
    /// Print JSON: {"url", "dir", "seq"} (seq null: the bucket store is empty).
    #[arg(long)]
    pub json: bool,
}

/// Pulls (lazily unless --all); the directory then opens as an ordinary store.
pub fn run(a: Args) -> CliResult {
    if !is_url(&a.url) {
        return fail(format!(
            "{}: not a bucket URL (s3://, gs://, az:// or file:///dir)",
            a.url.display()
        ));
    }
    let url = a.url.to_string_lossy().into_owned();
    let seq = ckptstore::store::pull(&url, &a.dir, &Options::default())?;
    if a.all && seq.is_some() {
        ckptstore::Store::open(&a.dir, Options::default())?.fetch_all()?;
    }
    if a.json {
        return emit_json(&json!({"url": url, "dir": a.dir, "seq": seq}));
    }
    match seq {
        Some(s) => emit(&format!(
            "pulled {url} (commit {s}) into {}",
            a.dir.display()
        )),
        None => emit(&format!(
            "{url} is empty; {} holds no store",
            a.dir.display()
        )),
    }
}
