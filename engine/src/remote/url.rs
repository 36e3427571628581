//! Store URLs: `s3://bucket/prefix` and `file:///absolute/dir` (for tests and shared mounts).
//! Credentials never live in a URL: they come from the environment (`AWS_ACCESS_KEY_ID`, ...),
//! and a URL that carries a user or password is refused without echoing it.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// Whether `s` names a bucket store rather than a directory.
pub fn is_url(s: &str) -> bool {
    s.starts_with("s3://") || s.starts_with("file://")
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
            RemoteUrl::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

impl std::str::FromStr for RemoteUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.contains('@') || bucket.contains(':') {
                // Never echo it: it may hold a secret.
                return Err(Error::invalid(
                    "s3:// URL with a user, password or port: credentials and endpoints come \
                     from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, \
                     AWS_ENDPOINT_URL), never from the URL",
                ));
            }
            if bucket.is_empty() {
                return Err(Error::invalid(format!("{s}: no bucket name")));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..")
                || prefix.contains("//")
                || prefix.chars().any(char::is_control)
            {
                return Err(Error::invalid(format!("{s}: invalid key prefix")));
            }
            return Ok(RemoteUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
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
            "{s:?} is not a store URL (s3://bucket/prefix or file:///dir)"
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
    fn credentials_in_a_url_are_refused_without_echo() {
        let e = "s3://AKIDSECRET:hunter2@bkt/p"
            .parse::<RemoteUrl>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2") && !e.contains("AKIDSECRET"), "{e}");
    }
}
