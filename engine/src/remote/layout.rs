//! Object names under a store's prefix (docs/FORMAT.md, "Bucket layout").

use crate::segment;

/// Commit objects: `log/<seq, 20 digits>`; sorted by name = sorted by sequence number.
pub const LOG_DIR: &str = "log";
/// Segment objects: `segments/<token>/<NNNNNNNN>.seg`; the token is the uploader's (one per
/// local directory), so two writers never upload to the same name.
pub const SEGMENTS_DIR: &str = "segments";

/// The key of commit object `seq`.
pub fn log_key(seq: u64) -> String {
    format!("{LOG_DIR}/{seq:020}")
}

/// The sequence number of a commit object key (relative to the prefix); foreign names `None`.
pub fn parse_log_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(LOG_DIR)?.strip_prefix('/')?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The key of segment `id` uploaded by `token`.
pub fn segment_key(token: &str, id: u64) -> String {
    format!("{SEGMENTS_DIR}/{token}/{}", segment::file_name(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_round_trip_and_sort_by_seq() {
        assert_eq!(parse_log_key(&log_key(42)), Some(42));
        assert!(log_key(9) < log_key(10));
        assert_eq!(parse_log_key("log/42"), None);
        assert_eq!(parse_log_key("segments/00000000000000000001"), None);
        assert_eq!(segment_key("ab", 3), "segments/ab/00000003.seg");
    }
}
