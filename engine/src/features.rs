//! Format features: the one registry of what a store may use beyond the baseline format, and
//! the rule an open applies to the feature bits a WAL header declares (docs/FORMAT.md,
//! "Feature flags").
//!
//! Three kinds, as ext4 and SQLite have them:
//! * **compatible**: a build that lacks the feature may open the store read-write (it ignores
//!   what the feature wrote, and may drop it, e.g. the feature's WAL records at a compaction);
//! * **read-only compatible**: a build that lacks it may open the store read-only (what it
//!   reads stays right, but a write of its would break the feature's invariant);
//! * **incompatible**: a build that lacks it must refuse the store (it would misread it).
//!
//! The **baseline** needs no flag: WAL record types 1 Commit, 2 Delete, 3 Snapshot, 4 Pin,
//! 5 Relocate; codecs 0 NONE .. 4 ZSTD_SHUFFLE8; dtypes 1 F64 .. 12 BOOL; segment and frame
//! version 1. Everything added after it (a record type, a codec, a dtype, a segment trailer,
//! an encryption mode, a store layout) is declared here, once, with a bit of its kind that is
//! never reused, and turned on for a store with `Store::enable_feature` before its first use.

use std::fmt;

/// How a build that lacks a feature must treat a store that uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// Such a build may open the store read-write.
    Compatible,
    /// Such a build may open the store read-only only.
    ReadOnlyCompatible,
    /// Such a build must refuse the store.
    Incompatible,
}

impl FeatureKind {
    fn label(self) -> &'static str {
        match self {
            FeatureKind::Compatible => "compatible",
            FeatureKind::ReadOnlyCompatible => "read-only-compatible",
            FeatureKind::Incompatible => "incompatible",
        }
    }
}

/// One format feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Feature {
    /// Its name, as messages and `ckptstore inspect` show it.
    pub name: &'static str,
    /// What a build without it must do.
    pub kind: FeatureKind,
    /// Its bit (0..16) within the flags of its kind.
    pub bit: u8,
}

/// Every feature this build knows. To add one: a `pub const` below with the next free bit of
/// its kind (bits are never reused, even of a feature that is withdrawn), an entry here, its
/// row in docs/FORMAT.md ("Feature flags"), and a fixture store that uses it
/// (tests/fixtures/stores/).
pub const KNOWN: &[Feature] = &[
    SEGMENT_COMMIT_TRAILER,
    QUARANTINE,
    ENCRYPTION,
    LAZY_SEGMENTS,
];

/// Each commit's last new segment ends with a copy of its commit record (docs/FORMAT.md,
/// "Commit trailer"), so `ckptstore recover --rebuild` can restore the store from its
/// segments. Compatible: the trailer lies past the segment's committed length, which builds
/// without it never read.
pub const SEGMENT_COMMIT_TRAILER: Feature = Feature {
    name: "segment-commit-trailer",
    kind: FeatureKind::Compatible,
    bit: 0,
};

/// WAL record type 6 (Quarantine): chunks found bad, and references repointed at fresh
/// copies (docs/FORMAT.md, "Quarantine and healing"). Incompatible: a build that skipped the
/// records would read healed checkpoints at their old, freed locations — a resume would fall
/// back to an older checkpoint than the newest intact one — and as a writer would deduplicate
/// against the bad chunk again (docs/DECISIONS.md, "Quarantine and self-healing"). Turned on
/// at a store's first quarantine, and off again by a WAL compaction once nothing is
/// quarantined.
pub const QUARANTINE: Feature = Feature {
    name: "quarantine",
    kind: FeatureKind::Incompatible,
    bit: 0,
};

/// Sealed checkpoints (docs/FORMAT.md, "Encryption"): chunks stored as AES-256-GCM ciphertext
/// with keyed chunk ids, sealed manifest bodies, commit MACs. Incompatible: a build without it
/// would take every sealed chunk for a BLAKE3 mismatch (the nonce, tag and key id are
/// protobuf fields it ignores) and call the store corrupt. Turned on by the first writer
/// opened with a key.
pub const ENCRYPTION: Feature = Feature {
    name: "encryption",
    kind: FeatureKind::Incompatible,
    bit: 1,
};

/// A lazy restore (docs/DECISIONS.md, "Lazy restore"): segments listed in `REMOTE_SEGMENTS`
/// are still in the bucket, fetched by the first read that needs them. Incompatible: a build
/// without it would take every segment not yet fetched for a missing one, skip the newest
/// checkpoints as damaged and resume from an older one (and its retention or gc would act on
/// that wrong view). Set in the WAL header a restore writes before its `CURRENT`; cleared (the
/// header rewritten first, `REMOTE_SEGMENTS` removed after) by a writer once every segment the
/// live checkpoints need is local (`Store::fetch_all`, `ckptstore pull --all`, or the next
/// writer open). Never published to a bucket: a bucket's state holds its segments.
pub const LAZY_SEGMENTS: Feature = Feature {
    name: "lazy-segments",
    kind: FeatureKind::Incompatible,
    bit: 2,
};

/// The features a store this build creates starts with.
pub const NEW_STORE: FeatureSet = FeatureSet {
    compat: 1 << SEGMENT_COMMIT_TRAILER.bit,
    ro_compat: 0,
    incompat: 0,
};

/// A set of feature bits, as a WAL header carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet {
    /// Compatible feature bits.
    pub compat: u16,
    /// Read-only-compatible feature bits.
    pub ro_compat: u16,
    /// Incompatible feature bits.
    pub incompat: u16,
}

impl FeatureSet {
    /// No feature: the baseline format.
    pub const EMPTY: FeatureSet = FeatureSet {
        compat: 0,
        ro_compat: 0,
        incompat: 0,
    };

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::EMPTY
    }

    fn mask_mut(&mut self, kind: FeatureKind) -> &mut u16 {
        match kind {
            FeatureKind::Compatible => &mut self.compat,
            FeatureKind::ReadOnlyCompatible => &mut self.ro_compat,
            FeatureKind::Incompatible => &mut self.incompat,
        }
    }

    fn mask(&self, kind: FeatureKind) -> u16 {
        match kind {
            FeatureKind::Compatible => self.compat,
            FeatureKind::ReadOnlyCompatible => self.ro_compat,
            FeatureKind::Incompatible => self.incompat,
        }
    }

    /// This set with `f` added.
    pub fn with(mut self, f: &Feature) -> FeatureSet {
        *self.mask_mut(f.kind) |= 1 << f.bit;
        self
    }

    /// This set with `f` removed.
    pub fn without(mut self, f: &Feature) -> FeatureSet {
        *self.mask_mut(f.kind) &= !(1 << f.bit);
        self
    }

    /// Whether `f` is in the set.
    pub fn contains(&self, f: &Feature) -> bool {
        self.mask(f.kind) & (1 << f.bit) != 0
    }

    /// The union of two sets.
    pub fn union(self, o: FeatureSet) -> FeatureSet {
        FeatureSet {
            compat: self.compat | o.compat,
            ro_compat: self.ro_compat | o.ro_compat,
            incompat: self.incompat | o.incompat,
        }
    }

    /// The bits of this set that `known` does not declare.
    pub fn unknown_in(&self, known: &[Feature]) -> FeatureSet {
        let all = known.iter().fold(FeatureSet::EMPTY, |s, f| s.with(f));
        FeatureSet {
            compat: self.compat & !all.compat,
            ro_compat: self.ro_compat & !all.ro_compat,
            incompat: self.incompat & !all.incompat,
        }
    }

    /// The bits of this set that this build does not know.
    pub fn unknown(&self) -> FeatureSet {
        self.unknown_in(KNOWN)
    }

    /// One name per bit: a known feature by its name, an unknown bit as
    /// `incompatible feature bit 3`.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for kind in [
            FeatureKind::Incompatible,
            FeatureKind::ReadOnlyCompatible,
            FeatureKind::Compatible,
        ] {
            let m = self.mask(kind);
            for bit in 0..16u8 {
                if m & (1 << bit) == 0 {
                    continue;
                }
                match KNOWN.iter().find(|f| f.kind == kind && f.bit == bit) {
                    Some(f) => out.push(f.name.to_string()),
                    None => out.push(format!("{} feature bit {bit}", kind.label())),
                }
            }
        }
        out
    }

    /// What keeps a store with these features from being opened by this build (`read_only`:
    /// the open would be read-only): its unknown incompatible bits, and for a read-write open
    /// its unknown read-only-compatible bits too. `None`: the open may go on (unknown
    /// compatible bits never stop it).
    pub fn blocking(&self, read_only: bool) -> Option<FeatureSet> {
        self.blocking_in(KNOWN, read_only)
    }

    /// [`FeatureSet::blocking`] for a build whose registry is `known` (an older build's: what
    /// it would refuse).
    pub fn blocking_in(&self, known: &[Feature], read_only: bool) -> Option<FeatureSet> {
        let u = self.unknown_in(known);
        let b = FeatureSet {
            compat: 0,
            ro_compat: if read_only { 0 } else { u.ro_compat },
            incompat: u.incompat,
        };
        (!b.is_empty()).then_some(b)
    }

    /// Whether the set holds a bit this build does not know whose kind lets the store be
    /// opened anyway (compatible, read-only compatible): WAL records of a type this build does
    /// not know may then be that feature's, and are skipped rather than called corruption.
    pub fn may_hold_unknown_records(&self) -> bool {
        let u = self.unknown();
        u.compat != 0 || u.ro_compat != 0
    }
}

impl fmt::Display for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&self.names().join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Feature = Feature {
        name: "a",
        kind: FeatureKind::Incompatible,
        bit: 3,
    };
    const B: Feature = Feature {
        name: "b",
        kind: FeatureKind::Compatible,
        bit: 14,
    };

    #[test]
    fn registry_bits_are_unique_and_in_range() {
        for (i, f) in KNOWN.iter().enumerate() {
            assert!(f.bit < 16, "{f:?}");
            for g in &KNOWN[i + 1..] {
                assert!(!(f.kind == g.kind && f.bit == g.bit), "{f:?} and {g:?}");
                assert_ne!(f.name, g.name);
            }
        }
    }

    #[test]
    fn unknown_bits_are_named_by_kind_and_bit() {
        let s = FeatureSet::EMPTY.with(&A).with(&B);
        assert!(s.contains(&A) && s.contains(&B));
        assert_eq!(s.unknown_in(&[A]), FeatureSet::EMPTY.with(&B));
        // Neither is in this build's registry.
        assert_eq!(
            s.names(),
            ["incompatible feature bit 3", "compatible feature bit 14"]
        );
        assert_eq!(s.blocking(true), Some(FeatureSet::EMPTY.with(&A)));
        assert_eq!(FeatureSet::EMPTY.with(&B).blocking(false), None);
        let ro = FeatureSet {
            ro_compat: 1,
            ..FeatureSet::EMPTY
        };
        assert_eq!(ro.blocking(true), None);
        assert_eq!(ro.blocking(false), Some(ro));
        assert!(ro.may_hold_unknown_records());
        assert!(!FeatureSet::EMPTY.may_hold_unknown_records());
        assert_eq!(s.without(&A), FeatureSet::EMPTY.with(&B));
        assert_eq!(s.without(&A).without(&A), FeatureSet::EMPTY.with(&B));
    }

    /// A lazily restored store's header is refused, even read-only, by a build that has every
    /// feature but `lazy-segments` (the build that introduced lazy restore without a bit, and
    /// every one before it): that build would take segments still in the bucket for missing
    /// ones and resume from an older checkpoint.
    #[test]
    fn a_build_without_lazy_segments_refuses_a_lazily_restored_store() {
        let older: Vec<Feature> = KNOWN
            .iter()
            .copied()
            .filter(|f| *f != LAZY_SEGMENTS)
            .collect();
        let lazy = NEW_STORE.with(&LAZY_SEGMENTS);
        let refused = FeatureSet::EMPTY.with(&LAZY_SEGMENTS);
        assert_eq!(lazy.blocking_in(&older, true), Some(refused));
        assert_eq!(lazy.blocking_in(&older, false), Some(refused));
        assert_eq!(refused.to_string(), "lazy-segments");
        // This build opens it; once cleared, so does the older one.
        assert_eq!(lazy.blocking(true), None);
        assert_eq!(
            lazy.without(&LAZY_SEGMENTS).blocking_in(&older, false),
            None
        );
    }
}
