//! Store URLs: `s3://bucket/prefix`, `gs://bucket/prefix` (Google Cloud Storage),
//! `az://container/prefix` (Azure Blob Storage; also `abfs[s]://container/prefix`,
//! `az|abfs[s]://container@ACCOUNT.{blob,dfs}.core.windows.net/prefix` and
//! `https://ACCOUNT.blob.core.windows.net/container/prefix`), and `file:///absolute/dir` (for
//! tests and shared mounts). Credentials never live in a URL: they come from the environment
//! (`AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_KEY`, ...), and a URL
//! that carries a user or password is refused without echoing it.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// Whether `s` names a bucket store rather than a directory.
pub fn is_url(s: &str) -> bool {
    ["s3://", "file://", "gs://", "az://", "abfs://", "abfss://"]
        .iter()
        .any(|p| s.starts_with(p))
        || s.strip_prefix("https://")
            .and_then(|r| r.split('/').next())
            .is_some_and(|host| azure_account(host).is_some())
}

/// The account of an Azure storage host (`ACCOUNT.blob.core.windows.net`, `.dfs.` alike).
fn azure_account(host: &str) -> Option<&str> {
    let account = host
        .strip_suffix(".blob.core.windows.net")
        .or_else(|| host.strip_suffix(".dfs.core.windows.net"))?;
    let ok = !account.is_empty()
        && account
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    ok.then_some(account)
}

/// A URL with a user, password or port; never echoed (it may hold a secret).
fn credentials_refused() -> Error {
    Error::invalid(
        "store URL with a user, password or port: credentials and endpoints come from the \
         environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_SERVICE_ACCOUNT, \
         AZURE_STORAGE_ACCOUNT_KEY, ...), never from the URL",
    )
}

/// A bucket (or container) name and key prefix: `rest` is `NAME[/PREFIX]`, `scheme` for errors.
fn name_and_prefix(s: &str, rest: &str) -> Result<(String, String)> {
    let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if name.contains('@') || name.contains(':') {
        return Err(credentials_refused());
    }
    if name.is_empty() {
        return Err(Error::invalid(format!("{s}: no bucket name")));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|p| p == "." || p == "..")
        || prefix.contains("//")
        || prefix.chars().any(char::is_control)
    {
        return Err(Error::invalid(format!("{s}: invalid key prefix")));
    }
    Ok((name.to_string(), prefix.to_string()))
}

/// A parsed store URL.
#[derive(Clone, PartialEq, Eq)]
pub enum RemoteUrl {
    /// An S3 (or S3-compatible) bucket and a key prefix (no leading or trailing `/`).
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix ("" for the bucket's root).
        prefix: String,
    },
    /// A Google Cloud Storage bucket and a key prefix.
    Gcs {
        /// The bucket.
        bucket: String,
        /// The key prefix ("" for the bucket's root).
        prefix: String,
    },
    /// An Azure Blob Storage container and a key prefix; the account from the URL, else from
    /// `AZURE_STORAGE_ACCOUNT_NAME`.
    Azure {
        /// The storage account, when the URL names it.
        account: Option<String>,
        /// The container.
        container: String,
        /// The key prefix ("" for the container's root).
        prefix: String,
    },
    /// A local directory used as a bucket (object_store's `LocalFileSystem`).
    File {
        /// The absolute directory.
        root: PathBuf,
    },
}

impl std::fmt::Debug for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteUrl({self})")
    }
}

impl std::fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RemoteUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            RemoteUrl::Gcs { bucket, prefix } if prefix.is_empty() => write!(f, "gs://{bucket}"),
            RemoteUrl::Gcs { bucket, prefix } => write!(f, "gs://{bucket}/{prefix}"),
            RemoteUrl::Azure {
                account,
                container,
                prefix,
            } => {
                write!(f, "az://{container}")?;
                if let Some(a) = account {
                    write!(f, "@{a}.blob.core.windows.net")?;
                }
                if !prefix.is_empty() {
                    write!(f, "/{prefix}")?;
                }
                Ok(())
            }
            RemoteUrl::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

impl std::str::FromStr for RemoteUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = name_and_prefix(s, rest)?;
            return Ok(RemoteUrl::S3 { bucket, prefix });
        }
        if let Some(rest) = s.strip_prefix("gs://") {
            let (bucket, prefix) = name_and_prefix(s, rest)?;
            return Ok(RemoteUrl::Gcs { bucket, prefix });
        }
        let azure = ["az://", "abfs://", "abfss://"]
            .iter()
            .find_map(|p| s.strip_prefix(p));
        if let Some(rest) = azure {
            // `container@ACCOUNT.blob.core.windows.net/prefix` (the Hadoop form) or
            // `container/prefix` (fsspec); any other `@` is refused as a credential.
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let (container, account) = match authority.split_once('@') {
                Some((c, host)) => match azure_account(host) {
                    Some(a) => (c, Some(a.to_string())),
                    None => return Err(credentials_refused()),
                },
                None => (authority, None),
            };
            let (container, prefix) = name_and_prefix(s, &format!("{container}/{path}"))?;
            return Ok(RemoteUrl::Azure {
                account,
                container,
                prefix,
            });
        }
        if let Some(rest) = s.strip_prefix("https://") {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            if let Some(account) = azure_account(host) {
                let (container, prefix) = name_and_prefix(s, path)?;
                return Ok(RemoteUrl::Azure {
                    account: Some(account.to_string()),
                    container,
                    prefix,
                });
            }
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Error::invalid(format!(
                    "{s}: a file:// URL takes an absolute path (file:///dir)"
                )));
            }
            return Ok(RemoteUrl::File {
                root: PathBuf::from(path),
            });
        }
        Err(Error::invalid(format!(
            "{s:?} is not a store URL (s3://bucket/prefix, gs://bucket/prefix, \
             az://container/prefix or file:///dir)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let u: RemoteUrl = "s3://bkt/run/a/".parse().unwrap();
        assert_eq!(
            u,
            RemoteUrl::S3 {
                bucket: "bkt".into(),
                prefix: "run/a".into()
            }
        );
        assert_eq!(u.to_string(), "s3://bkt/run/a");
        assert_eq!(
            "s3://bkt".parse::<RemoteUrl>().unwrap().to_string(),
            "s3://bkt"
        );
        let f: RemoteUrl = "file:///tmp/x".parse().unwrap();
        assert_eq!(f.to_string(), "file:///tmp/x");
        assert!("file://rel".parse::<RemoteUrl>().is_err());
        assert!("s3:///x".parse::<RemoteUrl>().is_err());
        assert!("s3://b/../x".parse::<RemoteUrl>().is_err());
        assert!(is_url("s3://b") && !is_url("/tmp/s3://"));
    }

    #[test]
    fn gcs_and_azure_urls_parse_and_print() {
        let g: RemoteUrl = "gs://bkt/run/a/".parse().unwrap();
        assert_eq!(
            g,
            RemoteUrl::Gcs {
                bucket: "bkt".into(),
                prefix: "run/a".into()
            }
        );
        assert_eq!(g.to_string(), "gs://bkt/run/a");
        let az = |container: &str, account: Option<&str>, prefix: &str| RemoteUrl::Azure {
            account: account.map(str::to_string),
            container: container.into(),
            prefix: prefix.into(),
        };
        for (url, want) in [
            ("az://ctr/run", az("ctr", None, "run")),
            ("abfs://ctr/run/x", az("ctr", None, "run/x")),
            ("abfss://ctr", az("ctr", None, "")),
            (
                "az://ctr@acct.blob.core.windows.net/run",
                az("ctr", Some("acct"), "run"),
            ),
            (
                "abfss://fs@acct.dfs.core.windows.net/a/b",
                az("fs", Some("acct"), "a/b"),
            ),
            (
                "https://acct.blob.core.windows.net/ctr/run",
                az("ctr", Some("acct"), "run"),
            ),
        ] {
            assert!(is_url(url), "{url}");
            let u: RemoteUrl = url.parse().unwrap();
            assert_eq!(u, want, "{url}");
            // What it prints parses back to itself (the cache and REMOTE_SEGMENTS keep it).
            assert_eq!(u.to_string().parse::<RemoteUrl>().unwrap(), u, "{url}");
        }
        assert_eq!(
            az("ctr", Some("acct"), "run").to_string(),
            "az://ctr@acct.blob.core.windows.net/run"
        );
        assert!(!is_url("https://example.com/x"));
        assert!("https://example.com/x".parse::<RemoteUrl>().is_err());
        assert!("https://acct.blob.core.windows.net"
            .parse::<RemoteUrl>()
            .is_err());
        assert!("gs://".parse::<RemoteUrl>().is_err());
        assert!("az://ctr/../x".parse::<RemoteUrl>().is_err());
    }

    #[test]
    fn credentials_in_a_url_are_refused_without_echo() {
        for url in [
            "gs://AKIDSECRET:hunter2@bkt/p",
            "az://AKIDSECRET:hunter2@evil.example.com/p",
            "az://ctr@AKIDSECRET:hunter2@acct.blob.core.windows.net/p",
        ] {
            let e = url.parse::<RemoteUrl>().unwrap_err().to_string();
            assert!(!e.contains("hunter2") && !e.contains("AKIDSECRET"), "{e}");
        }
        let e = "s3://AKIDSECRET:hunter2@bkt/p"
            .parse::<RemoteUrl>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2") && !e.contains("AKIDSECRET"), "{e}");
    }
}
