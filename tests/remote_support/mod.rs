//! Buckets for the bucket-tier tests: a `file://` directory (always), and a real S3 protocol
//! server, `moto_server` on 127.0.0.1 (started once per test binary on a free port, stopped
//! when the binary exits). Without moto_server the S3 tests print why and skip, unless
//! `CKPTSTORE_REQUIRE_MOTO=1` (CI) makes them fail instead.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The secret key the tests give the client: it must never appear in an error or `Debug`.
pub const SECRET: &str = "SeCrEt-test-key-0123456789";

/// The endpoint of this binary's moto server, started on first use; `None` (printed) when
/// moto_server is missing and not required.
pub fn moto() -> Option<&'static str> {
    static ENDPOINT: OnceLock<Option<String>> = OnceLock::new();
    ENDPOINT
        .get_or_init(|| {
            let required = std::env::var("CKPTSTORE_REQUIRE_MOTO").is_ok_and(|v| v == "1");
            let found = Command::new("moto_server")
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                assert!(
                    !required,
                    "CKPTSTORE_REQUIRE_MOTO=1 but moto_server is not on PATH (pip install 'moto[server]')"
                );
                eprintln!("SKIP: moto_server not on PATH; the S3 tests need it (pip install 'moto[server]')");
                return None;
            }
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // The server's output, to say why it did not start; removed once this binary has
            // exited and the server is stopped (kept if the server died first).
            let log = std::env::temp_dir().join(format!("ckptstore-moto-{port}.log"));
            // A watchdog shell stops the server once this test binary has exited.
            let script = format!(
                "moto_server -H 127.0.0.1 -p {port} >'{log}' 2>&1 & m=$!; \
                 while kill -0 {pid} 2>/dev/null && kill -0 $m 2>/dev/null; do sleep 1; done; \
                 kill -0 {pid} 2>/dev/null && exit 1; kill $m 2>/dev/null; wait $m; rm -f '{log}'",
                pid = std::process::id(),
                log = log.display()
            );
            let mut watchdog = Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto_server");
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                // The watchdog ends as soon as the server has: say why, at once.
                let ended = watchdog.try_wait().ok().flatten().is_some();
                let tail = || std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    !ended,
                    "moto_server exited before it listened ({}):\n{}",
                    log.display(),
                    tail()
                );
                assert!(
                    Instant::now() < deadline,
                    "moto_server did not listen within 30 s:\n{}",
                    tail()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            // Reaped when it exits (after the server, once this binary is gone or it died).
            std::thread::spawn(move || watchdog.wait());
            let endpoint = format!("http://127.0.0.1:{port}");
            // Set once, before any client reads them (every S3 test calls this first).
            std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
            std::env::set_var("AWS_ALLOW_HTTP", "true");
            std::env::set_var("AWS_ACCESS_KEY_ID", "testing-key-id");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
            std::env::set_var("AWS_REGION", "us-east-1");
            Some(endpoint)
        })
        .as_deref()
}

/// Creates bucket `name` on the moto server (an unsigned PUT, which moto accepts).
pub fn create_bucket(endpoint: &str, name: &str) {
    let host = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "create bucket {name}: {resp}"
    );
}

/// A fresh `s3://` store URL on moto (its own bucket), or `None` to skip.
pub fn s3_url(test: &str) -> Option<String> {
    let endpoint = moto()?;
    let bucket = format!("t-{}", test.replace('_', "-"));
    create_bucket(endpoint, &bucket);
    Some(format!("s3://{bucket}/run"))
}

/// A fresh `file://` store URL (the directory lives as long as the returned guard).
pub fn file_url() -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    let url = format!("file://{}", d.path().display());
    (d, url)
}
