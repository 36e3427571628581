//! Google Cloud Storage and Azure Blob Storage clients (cargo features `gcs` and `azure`, on
//! by default), configured like object_store's `from_env`: every `GOOGLE_*` (resp. `AZURE_*`)
//! variable object_store knows (`GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_SERVICE_ACCOUNT_KEY`,
//! `GOOGLE_APPLICATION_CREDENTIALS`; `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_CLIENT_ID`, ...), taken from a list of variables so that tests configure a
//! client without touching the process's environment. Requests are bounded like S3's: the
//! client's own retries (2, within 30 s) and a 10 s connect timeout inside [`super::Bucket`]'s
//! bounded attempts, so an unreachable endpoint fails, it never hangs.
//!
//! Built and tested offline only (URL parsing, configuration, the errors of an unreachable
//! endpoint and of a missing account): no GCS or Azure emulator runs in CI.

use object_store::ObjectStore;
use std::sync::Arc;
#[cfg(any(feature = "gcs", feature = "azure"))]
use std::time::Duration;

/// The process's environment, as the clients read it.
pub fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

#[cfg(any(feature = "gcs", feature = "azure"))]
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

#[cfg(any(feature = "gcs", feature = "azure"))]
fn client() -> object_store::ClientOptions {
    object_store::ClientOptions::new().with_connect_timeout(Duration::from_secs(10))
}

/// Values of credential-like variables in `vars` replaced by `***` in `msg`.
#[cfg(any(feature = "gcs", feature = "azure"))]
fn scrub(vars: &[(String, String)], msg: String) -> String {
    let secret = |k: &str| {
        ["KEY", "SECRET", "TOKEN", "SAS", "PASSWORD"]
            .iter()
            .any(|w| k.contains(w))
    };
    let mut msg = msg;
    for (k, v) in vars {
        if secret(k) && v.len() >= 4 {
            msg = msg.replace(v.as_str(), "***");
        }
    }
    super::secrets::scrub(msg)
}

/// A GCS client for `bucket`, configured from the `GOOGLE_*` variables of `vars`.
#[cfg(feature = "gcs")]
pub fn gcs(vars: &[(String, String)], bucket: &str) -> Result<Arc<dyn ObjectStore>, String> {
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let mut b = GoogleCloudStorageBuilder::new();
    for (k, v) in vars.iter().filter(|(k, _)| k.starts_with("GOOGLE_")) {
        if let Ok(key) = k.to_ascii_lowercase().parse::<GoogleConfigKey>() {
            b = b.with_config(key, v);
        }
    }
    b.with_bucket_name(bucket)
        .with_retry(retry())
        .with_client_options(client())
        .build()
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| scrub(vars, e.to_string()))
}

/// Without the `gcs` feature: an error naming it.
#[cfg(not(feature = "gcs"))]
pub fn gcs(_: &[(String, String)], _: &str) -> Result<Arc<dyn ObjectStore>, String> {
    Err("this build has no Google Cloud Storage support (cargo feature `gcs`)".into())
}

/// An Azure Blob Storage client for `container` (in `account`, else the account of
/// `AZURE_STORAGE_ACCOUNT_NAME`), configured from the `AZURE_*` variables of `vars`.
#[cfg(feature = "azure")]
pub fn azure(
    vars: &[(String, String)],
    account: Option<&str>,
    container: &str,
) -> Result<Arc<dyn ObjectStore>, String> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut b = MicrosoftAzureBuilder::new();
    for (k, v) in vars.iter().filter(|(k, _)| k.starts_with("AZURE_")) {
        if let Ok(key) = k.to_ascii_lowercase().parse::<AzureConfigKey>() {
            b = b.with_config(key, v);
        }
    }
    if let Some(a) = account {
        b = b.with_account(a);
    }
    b.with_container_name(container)
        .with_retry(retry())
        .with_client_options(client())
        .build()
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| scrub(vars, e.to_string()))
}

/// Without the `azure` feature: an error naming it.
#[cfg(not(feature = "azure"))]
pub fn azure(
    _: &[(String, String)],
    _: Option<&str>,
    _: &str,
) -> Result<Arc<dyn ObjectStore>, String> {
    Err("this build has no Azure Blob Storage support (cargo feature `azure`)".into())
}

#[cfg(all(test, feature = "gcs", feature = "azure"))]
mod tests {
    use super::super::{Bucket, RemoteUrl, RetryPolicy};
    use super::*;
    use crate::error::Error;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    const SECRET: &str = "c2VjcmV0LWNsb3VkLWtleS0wMTIzNDU2Nzg5";

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A loopback endpoint answering every request `404 Not Found` (a bucket that does not
    /// exist), for a bounded number of connections.
    fn not_found_server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().take(256) {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
                let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code></Error>";
                let _ = write!(
                    s,
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://{addr}")
    }

    /// A loopback port nothing listens on (an unreachable endpoint).
    fn closed_port() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}")
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            request_timeout: Duration::from_secs(60),
            ..Default::default()
        }
    }

    /// `check_access` of a client built from `vars` against `url`: the error, its text and
    /// Debug never holding the secret.
    fn open_err(url: &str, store: Result<Arc<dyn ObjectStore>, String>) -> Error {
        let u: RemoteUrl = url.parse().unwrap();
        let prefix = match &u {
            RemoteUrl::Gcs { prefix, .. } | RemoteUrl::Azure { prefix, .. } => prefix.clone(),
            other => panic!("not a cloud URL: {other}"),
        };
        let bucket = Bucket::from_store(u, store.unwrap(), prefix).with_policy(policy());
        let e = bucket.check_access().unwrap_err();
        for text in [e.to_string(), format!("{e:?}"), format!("{bucket:?}")] {
            assert!(!text.contains(SECRET), "{text}");
        }
        e
    }

    fn is_open_error(e: &Error) -> bool {
        matches!(e, Error::Remote { op: "open", message, .. }
            if message.contains("does the bucket exist"))
    }

    /// GCS and Azure, offline: a missing bucket (the endpoint answers 404) and an unreachable
    /// endpoint are a clear `Error::Remote` from the access check, after bounded retries,
    /// before anything is written; the credentials appear in no error and no Debug.
    #[test]
    fn missing_bucket_and_unreachable_endpoint_fail_fast_offline() {
        for endpoint in [not_found_server(), closed_port()] {
            let g = vars(&[
                ("GOOGLE_BASE_URL", &endpoint),
                ("GOOGLE_SKIP_SIGNATURE", "true"),
                ("GOOGLE_ALLOW_HTTP", "true"),
                ("GOOGLE_SERVICE_ACCOUNT_KEY_UNUSED", SECRET),
            ]);
            let e = open_err("gs://no-such-bucket/run", gcs(&g, "no-such-bucket"));
            assert!(is_open_error(&e), "{endpoint}: {e}");
            let a = vars(&[
                ("AZURE_STORAGE_ACCOUNT_NAME", "acct"),
                ("AZURE_STORAGE_ACCOUNT_KEY", SECRET),
                ("AZURE_STORAGE_ENDPOINT", &endpoint),
                ("AZURE_ALLOW_HTTP", "true"),
            ]);
            let e = open_err(
                "az://no-such-container/run",
                azure(&a, None, "no-such-container"),
            );
            assert!(is_open_error(&e), "{endpoint}: {e}");
        }
    }

    /// Configuration errors need no network: no Azure account, an unreadable GCS service
    /// account file; neither echoes a secret.
    #[test]
    fn configuration_errors_are_immediate_and_secret_free() {
        let e = azure(&vars(&[("AZURE_STORAGE_ACCOUNT_KEY", SECRET)]), None, "c")
            .err()
            .unwrap();
        assert!(e.to_lowercase().contains("account"), "{e}");
        assert!(!e.contains(SECRET), "{e}");
        let e = gcs(
            &vars(&[("GOOGLE_SERVICE_ACCOUNT", "/nonexistent/sa.json")]),
            "b",
        )
        .err()
        .unwrap();
        assert!(e.contains("/nonexistent/sa.json"), "{e}");
        // The account from the URL wins over none in the environment.
        assert!(azure(
            &vars(&[("AZURE_STORAGE_ACCOUNT_KEY", SECRET)]),
            Some("acct"),
            "c"
        )
        .is_ok());
        // Unknown variables are ignored, as object_store's from_env does.
        assert!(gcs(
            &vars(&[("GOOGLE_NOT_A_KEY", "x"), ("GOOGLE_SKIP_SIGNATURE", "true")]),
            "b"
        )
        .is_ok());
    }
}
