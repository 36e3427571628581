//! Reading a bucket store: its newest commit object (segments are fetched when read:
//! store/lazy.rs).

use super::bucket::Bucket;
use super::layout::{parse_log_key, LOG_DIR};
use super::object::CommitObject;
use crate::error::{Error, Result};

/// The newest commit object (`None`: an empty store). Objects that are not commit objects are
/// ignored; a newest one that vanished under a concurrent writer's cleanup is looked up again.
pub fn latest(bucket: &Bucket) -> Result<Option<CommitObject>> {
    for _ in 0..5 {
        let newest = bucket
            .list(LOG_DIR)?
            .into_iter()
            .filter_map(|o| parse_log_key(&o.key).map(|s| (s, o.key)))
            .max();
        let Some((seq, key)) = newest else {
            return Ok(None);
        };
        if let Some(bytes) = bucket.get(&key)? {
            let obj = CommitObject::decode(&key, &bytes)?;
            if obj.seq != seq {
                return Err(Error::BadCommitObject {
                    name: key,
                    reason: format!("holds sequence number {}", obj.seq),
                });
            }
            return Ok(Some(obj));
        }
    }
    Err(Error::Remote {
        url: bucket.url().to_string(),
        op: "get",
        key: LOG_DIR.into(),
        message: "the newest commit object kept vanishing (another writer busy?)".into(),
    })
}
