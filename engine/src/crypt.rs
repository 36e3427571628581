//! Encryption at rest: the store key, the keys derived from it, and the sealing of one chunk
//! (docs/FORMAT.md, "Encryption"; the choices in docs/DECISIONS.md, "Encryption at rest").
//!
//! A store key is 32 bytes the caller supplies (a key file or an environment variable); it is
//! never written to the store. Three values are derived from it with BLAKE3's `derive_key`,
//! each under its own context string, so none reveals another or the key:
//! * the **key id** (16 bytes), recorded in each sealed manifest, which tells a wrong key
//!   from a damaged chunk;
//! * the **chunk-id key**: a sealed chunk's `blake3` field is the *keyed* BLAKE3 of its raw
//!   bytes, so a manifest or a frame table never confirms a guess of the plaintext, and two
//!   stores under different keys share no chunk ids; deduplication works within one key;
//! * the **encryption key** of AES-256-GCM. Each sealed chunk has a fresh random 96-bit
//!   nonce and a 16-byte tag, both kept in its `ChunkRef`; the associated data binds the
//!   ciphertext to its chunk id, raw length and codec.
//!
//! The key's bytes are zeroed when dropped, and no `Debug`, `Display` or error shows them:
//! only the key id appears.

use crate::error::{Error, Result};
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use ckptstore_proto::v1 as pb;
use prost::Message;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Bytes of a store key.
pub const KEY_LEN: usize = 32;
/// Bytes of a key id.
pub const KEY_ID_LEN: usize = 16;
/// Bytes of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of an AES-GCM tag.
pub const TAG_LEN: usize = 16;

/// Environment variable naming a key file (see [`Key::from_env`]).
pub const KEY_FILE_ENV: &str = "CKPTSTORE_KEY_FILE";
/// Environment variable holding a key as 64 hex digits (see [`Key::from_env`]).
pub const KEY_ENV: &str = "CKPTSTORE_KEY";

const CTX_KEY_ID: &str = "ckptstore 2026-12 key id v1";
const CTX_CHUNK_ID: &str = "ckptstore 2026-12 chunk id v1";
const CTX_ENCRYPT: &str = "ckptstore 2026-12 chunk encryption v1";
const CTX_COMMIT_MAC: &str = "ckptstore 2026-12 commit mac v1";

/// Bytes of a commit MAC.
pub const MAC_LEN: usize = 32;

/// A 256-bit store key. Its bytes are zeroed on drop; `Debug` shows only its id.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl Key {
    /// A key from exactly 32 bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Key> {
        let bytes: [u8; KEY_LEN] = b.try_into().map_err(|_| {
            Error::invalid(format!(
                "an encryption key is {KEY_LEN} bytes (or 64 hex digits); got {} bytes",
                b.len()
            ))
        })?;
        Ok(Key {
            bytes: Zeroizing::new(bytes),
        })
    }

    /// A key from 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Key> {
        let s = s.trim();
        if s.len() != 2 * KEY_LEN || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::invalid(
                "an encryption key in hex is exactly 64 hex digits",
            ));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        for (i, b) in bytes.iter_mut().enumerate() {
            // Both digits were checked above.
            let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            *b = digit(s.as_bytes()[2 * i]) << 4 | digit(s.as_bytes()[2 * i + 1]);
        }
        Ok(Key { bytes })
    }

    /// A key from a file of exactly 32 bytes, or of 64 hex digits (a trailing newline
    /// allowed). The error names the file, never its content.
    pub fn from_file(path: &Path) -> Result<Key> {
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| Error::io("read", path, e))?);
        if raw.len() == KEY_LEN {
            return Key::from_bytes(&raw);
        }
        std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| Key::from_hex(s).ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "key file {}: expected {KEY_LEN} bytes or 64 hex digits ({} bytes found)",
                    path.display(),
                    raw.len()
                ))
            })
    }

    /// The key the environment names: the file `CKPTSTORE_KEY_FILE` names, else the hex
    /// digits in `CKPTSTORE_KEY`, else none.
    pub fn from_env() -> Result<Option<Key>> {
        if let Some(p) = std::env::var_os(KEY_FILE_ENV) {
            return Key::from_file(Path::new(&p)).map(Some);
        }
        match std::env::var(KEY_ENV) {
            Ok(s) => Key::from_hex(&Zeroizing::new(s))
                .map(Some)
                .map_err(|_| Error::invalid(format!("{KEY_ENV}: expected 64 hex digits"))),
            Err(_) => Ok(None),
        }
    }

    /// A fresh random key (from the operating system's generator).
    pub fn generate() -> Result<Key> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(&mut bytes[..])
            .map_err(|e| Error::invalid(format!("no random bytes for a key: {e}")))?;
        Ok(Key { bytes })
    }

    /// The key as 64 hex digits (to write a key file; never logged).
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(2 * KEY_LEN));
        for b in self.bytes.iter() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The key's id, as sealed manifests record it.
    pub fn id(&self) -> KeyId {
        let d = Zeroizing::new(blake3::derive_key(CTX_KEY_ID, &self.bytes[..]));
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&d[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key {{ id: {} }}", self.id())
    }
}

/// The id of a store key: 16 bytes derived from it, shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// From a manifest's `key_id` field (16 bytes; validated manifests only).
    pub(crate) fn from_slice(b: &[u8]) -> Option<KeyId> {
        b.try_into().ok().map(KeyId)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// How chunk ids are computed: BLAKE3 of the raw bytes, or keyed BLAKE3 under a store key's
/// chunk-id key.
#[derive(Clone, Copy)]
pub(crate) enum ChunkHash {
    Plain,
    Keyed([u8; 32]),
}

impl ChunkHash {
    pub(crate) fn hasher(&self) -> blake3::Hasher {
        match self {
            ChunkHash::Plain => blake3::Hasher::new(),
            ChunkHash::Keyed(k) => blake3::Hasher::new_keyed(k),
        }
    }

    pub(crate) fn hash(&self, data: &[u8]) -> [u8; 32] {
        match self {
            ChunkHash::Plain => *blake3::hash(data).as_bytes(),
            ChunkHash::Keyed(k) => *blake3::keyed_hash(k, data).as_bytes(),
        }
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkHash::Plain => "ChunkHash::Plain",
            ChunkHash::Keyed(_) => "ChunkHash::Keyed",
        })
    }
}

/// A nonce and tag, as a sealed `ChunkRef` holds them.
pub(crate) struct Seal {
    pub(crate) nonce: [u8; NONCE_LEN],
    pub(crate) tag: [u8; TAG_LEN],
}

/// The keys derived from one store key: what seals and opens chunks.
pub(crate) struct Sealer {
    id: KeyId,
    chunk_hash: ChunkHash,
    aead: Aes256Gcm,
    mac_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer {{ key id: {} }}", self.id)
    }
}

/// Associated data of a sealed manifest body: a label, the checkpoint id and the key id.
fn body_aad(m: &pb::Manifest) -> Vec<u8> {
    let mut a = b"ckptstore manifest body v1".to_vec();
    a.extend_from_slice(&m.id.to_le_bytes());
    a.extend_from_slice(&m.key_id);
    a
}

/// The copy of `m` the WAL holds: for a manifest with a sealed body, without the names,
/// dtypes, shapes and metadata the body carries; otherwise `m` itself.
pub(crate) fn wal_form(m: &pb::Manifest) -> std::borrow::Cow<'_, pb::Manifest> {
    if m.sealed_body.is_empty() {
        return std::borrow::Cow::Borrowed(m);
    }
    let mut c = m.clone();
    c.metadata.clear();
    for t in &mut c.tensors {
        t.name.clear();
        t.dtype = 0;
        t.shape.clear();
    }
    for b in &mut c.blobs {
        b.name.clear();
    }
    std::borrow::Cow::Owned(c)
}

/// Associated data of a sealed chunk: its chunk id, raw length and codec.
fn aad(hash: &[u8], raw_len: u64, codec: i32) -> [u8; 44] {
    let mut a = [0u8; 44];
    a[..32].copy_from_slice(&hash[..32.min(hash.len())]);
    a[32..40].copy_from_slice(&raw_len.to_le_bytes());
    a[40..44].copy_from_slice(&codec.to_le_bytes());
    a
}

impl Sealer {
    pub(crate) fn new(key: &Key) -> Sealer {
        let enc = Zeroizing::new(blake3::derive_key(CTX_ENCRYPT, &key.bytes[..]));
        Sealer {
            id: key.id(),
            chunk_hash: ChunkHash::Keyed(blake3::derive_key(CTX_CHUNK_ID, &key.bytes[..])),
            aead: Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(&enc[..])),
            mac_key: Zeroizing::new(blake3::derive_key(CTX_COMMIT_MAC, &key.bytes[..])),
        }
    }

    /// Seals `m`'s names, dtypes, shapes and metadata into its `sealed_body` (see
    /// [`wal_form`] for the copy the WAL holds). The associated data binds the body to the
    /// checkpoint id and key id.
    pub(crate) fn seal_body(&self, m: &mut pb::Manifest) -> Result<()> {
        let body = pb::ManifestBody {
            metadata: m.metadata.clone(),
            tensors: m
                .tensors
                .iter()
                .map(|t| pb::TensorHead {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })
                .collect(),
            blob_names: m.blobs.iter().map(|b| b.name.clone()).collect(),
        };
        let mut buf = body.encode_to_vec();
        let seal = self.seal_raw(&mut buf, &body_aad(m))?;
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len() + TAG_LEN);
        out.extend_from_slice(&seal.nonce);
        out.extend_from_slice(&buf);
        out.extend_from_slice(&seal.tag);
        m.sealed_body = out;
        Ok(())
    }

    /// Fills a sealed manifest's names, dtypes, shapes and metadata from its `sealed_body`;
    /// `Err` with the reason when it does not authenticate or fit.
    pub(crate) fn open_body(&self, m: &mut pb::Manifest) -> std::result::Result<(), String> {
        let b = &m.sealed_body;
        if b.len() < NONCE_LEN + TAG_LEN {
            return Err("sealed body too short".into());
        }
        let (nonce, rest) = b.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        self.aead
            .decrypt_in_place_detached(
                aes_gcm::Nonce::from_slice(nonce),
                &body_aad(m),
                &mut buf,
                aes_gcm::Tag::from_slice(tag),
            )
            .map_err(|_| "sealed body does not authenticate (altered or moved)".to_string())?;
        let body = pb::ManifestBody::decode(&buf[..]).map_err(|e| e.to_string())?;
        if body.tensors.len() != m.tensors.len() || body.blob_names.len() != m.blobs.len() {
            return Err("sealed body does not match the entries".into());
        }
        m.metadata = body.metadata;
        for (t, h) in m.tensors.iter_mut().zip(body.tensors) {
            (t.name, t.dtype, t.shape) = (h.name, h.dtype, h.shape);
        }
        for (b, n) in m.blobs.iter_mut().zip(body.blob_names) {
            b.name = n;
        }
        Ok(())
    }

    /// Encrypts `buf` in place under a fresh random nonce with associated data `aad`.
    fn seal_raw(&self, buf: &mut [u8], aad: &[u8]) -> Result<Seal> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| Error::invalid(format!("no random bytes for a nonce: {e}")))?;
        let tag = self
            .aead
            .encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&nonce), aad, buf)
            .map_err(|_| Error::invalid("AES-GCM refused to seal a manifest (too long)"))?;
        Ok(Seal {
            nonce,
            tag: tag.into(),
        })
    }

    /// The commit MAC of `m`: keyed BLAKE3 over the manifest with its chunk locations, its
    /// `new_segments` and its `mac` cleared (compaction moves chunks and rewrites those; what a
    /// checkpoint *is* stays covered), `prev_mac` included.
    pub(crate) fn commit_mac(&self, m: &pb::Manifest) -> [u8; MAC_LEN] {
        let mut c = m.clone();
        c.mac.clear();
        c.new_segments.clear();
        c.sealed_body.clear();
        let chunks = c
            .tensors
            .iter_mut()
            .flat_map(|t| t.chunks.iter_mut())
            .chain(c.blobs.iter_mut().flat_map(|b| b.chunks.iter_mut()));
        for ch in chunks {
            ch.segment = 0;
            ch.offset = 0;
        }
        *blake3::keyed_hash(&self.mac_key, &c.encode_to_vec()).as_bytes()
    }

    pub(crate) fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn chunk_hash(&self) -> ChunkHash {
        self.chunk_hash
    }

    /// Encrypts `buf` (a chunk's stored bytes) in place under a fresh random nonce.
    pub(crate) fn seal(
        &self,
        buf: &mut [u8],
        hash: &[u8],
        raw_len: u64,
        codec: i32,
    ) -> Result<Seal> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| Error::invalid(format!("no random bytes for a nonce: {e}")))?;
        let tag = self
            .aead
            .encrypt_in_place_detached(
                aes_gcm::Nonce::from_slice(&nonce),
                &aad(hash, raw_len, codec),
                buf,
            )
            .map_err(|_| Error::invalid("AES-GCM refused to seal a chunk (too long)"))?;
        Ok(Seal {
            nonce,
            tag: tag.into(),
        })
    }

    /// Checks the tag and decrypts `buf` in place; `false` when it does not authenticate
    /// (then `buf` is left encrypted).
    #[must_use]
    pub(crate) fn open(
        &self,
        buf: &mut [u8],
        nonce: &[u8],
        tag: &[u8],
        hash: &[u8],
        raw_len: u64,
        codec: i32,
    ) -> bool {
        if nonce.len() != NONCE_LEN || tag.len() != TAG_LEN || hash.len() != 32 {
            return false;
        }
        self.aead
            .decrypt_in_place_detached(
                aes_gcm::Nonce::from_slice(nonce),
                &aad(hash, raw_len, codec),
                buf,
                aes_gcm::Tag::from_slice(tag),
            )
            .is_ok()
    }
}

/// The keys a store was opened with: the current one (new checkpoints are sealed with it)
/// and older ones (to read checkpoints sealed before a rotation).
#[derive(Debug, Default, Clone)]
pub(crate) struct Keyring {
    current: Option<Arc<Sealer>>,
    all: Vec<Arc<Sealer>>,
}

impl Keyring {
    pub(crate) fn new(current: Option<&Key>, old: &[Key]) -> Keyring {
        let current = current.map(|k| Arc::new(Sealer::new(k)));
        let mut all: Vec<Arc<Sealer>> = current.iter().cloned().collect();
        for k in old {
            if all.iter().all(|s| s.id != k.id()) {
                all.push(Arc::new(Sealer::new(k)));
            }
        }
        Keyring { current, all }
    }

    /// The key new checkpoints are sealed with.
    pub(crate) fn current(&self) -> Option<&Arc<Sealer>> {
        self.current.as_ref()
    }

    /// How new chunk ids are computed.
    pub(crate) fn chunk_hash(&self) -> ChunkHash {
        self.current
            .as_ref()
            .map_or(ChunkHash::Plain, |s| s.chunk_hash())
    }

    /// The key with this id, if supplied.
    pub(crate) fn find(&self, id: &KeyId) -> Option<&Arc<Sealer>> {
        self.all.iter().find(|s| s.id == *id)
    }

    /// Ids of the supplied keys, for messages.
    pub(crate) fn ids(&self) -> Vec<String> {
        self.all.iter().map(|s| s.id.to_string()).collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = Key::from_bytes(&[7u8; 32]).unwrap();
        let s = Sealer::new(&key);
        let plain = b"the weights of a model".to_vec();
        let hash = s.chunk_hash().hash(&plain);
        let mut buf = plain.clone();
        let seal = s.seal(&mut buf, &hash, plain.len() as u64, 0).unwrap();
        assert_ne!(buf, plain);
        let mut ok = buf.clone();
        assert!(s.open(
            &mut ok,
            &seal.nonce,
            &seal.tag,
            &hash,
            plain.len() as u64,
            0
        ));
        assert_eq!(ok, plain);
        // A flipped ciphertext bit, another raw length, codec or chunk id: refused.
        let mut bad = buf.clone();
        bad[3] ^= 1;
        assert!(!s.open(
            &mut bad,
            &seal.nonce,
            &seal.tag,
            &hash,
            plain.len() as u64,
            0
        ));
        let mut b = buf.clone();
        assert!(!s.open(&mut b, &seal.nonce, &seal.tag, &hash, 1, 0));
        assert!(!s.open(&mut b, &seal.nonce, &seal.tag, &hash, plain.len() as u64, 1));
        assert!(!s.open(
            &mut b,
            &seal.nonce,
            &seal.tag,
            &[0; 32],
            plain.len() as u64,
            0
        ));
        // Another key: refused.
        let other = Sealer::new(&Key::from_bytes(&[8u8; 32]).unwrap());
        assert!(!other.open(&mut b, &seal.nonce, &seal.tag, &hash, plain.len() as u64, 0));
        // Two seals of the same bytes differ (fresh nonces).
        let mut again = plain.clone();
        let seal2 = s.seal(&mut again, &hash, plain.len() as u64, 0).unwrap();
        assert_ne!(seal.nonce, seal2.nonce);
        assert_ne!(again, buf);
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = Sealer::new(&Key::from_bytes(&[1u8; 32]).unwrap());
        let b = Sealer::new(&Key::from_bytes(&[2u8; 32]).unwrap());
        let data = b"same bytes";
        assert_ne!(a.chunk_hash().hash(data), *blake3::hash(data).as_bytes());
        assert_ne!(a.chunk_hash().hash(data), b.chunk_hash().hash(data));
        assert_eq!(a.chunk_hash().hash(data), a.chunk_hash().hash(data));
        let mut h = a.chunk_hash().hasher();
        h.update(data);
        assert_eq!(*h.finalize().as_bytes(), a.chunk_hash().hash(data));
    }

    #[test]
    fn keys_parse_and_never_show() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let k = Key::from_hex(&format!("{hex}\n")).unwrap();
        assert_eq!(k.to_hex().as_str(), hex);
        let shown = format!("{k:?}");
        assert!(
            !shown.contains(hex) && !shown.contains("0, 17, 34"),
            "{shown}"
        );
        assert!(shown.contains(&k.id().to_string()));
        assert!(Key::from_hex("zz").is_err());
        assert!(Key::from_bytes(&[0; 31]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, [9u8; 32]).unwrap();
        assert_eq!(
            Key::from_file(&p).unwrap().id(),
            Key::from_bytes(&[9; 32]).unwrap().id()
        );
        std::fs::write(&p, format!("{hex}\n")).unwrap();
        assert_eq!(Key::from_file(&p).unwrap().id(), k.id());
        std::fs::write(&p, "secret-but-wrong-length").unwrap();
        let e = Key::from_file(&p).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        let ring = Keyring::new(Some(&k), std::slice::from_ref(&k));
        assert_eq!(ring.ids().len(), 1);
        assert!(!format!("{ring:?}").contains(hex));
    }
}
