//! Credentials never reach an error, a log or a `Debug`: the one scrubber every bucket client
//! (S3, GCS, Azure) passes its error messages through.

/// Replaces the values of credential environment variables in `msg` (a server's error body
/// may echo the access key id): credentials never reach an error, a log or a `Debug`.
pub(crate) fn scrub(msg: String) -> String {
    let mut msg = msg;
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CLIENT_SECRET",
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_TOKEN",
    ] {
        if let Ok(v) = std::env::var(var) {
            if v.len() >= 4 {
                msg = msg.replace(&v, "***");
            }
        }
    }
    msg
}
