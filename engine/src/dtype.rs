//! The element type of a tensor.

use ckptstore_proto::v1 as pb;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// float8 e4m3.
    F8E4M3,
    /// float8 e5m2.
    F8E5M2,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte each.
    Bool,
}

impl DType {
    /// Every dtype, in the order of their protobuf numbers.
    pub const ALL: [DType; 12] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Lower-case name (`f32`, `bf16`, ...), as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    /// Parses a name printed by [`DType::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    pub(crate) fn to_pb(self) -> pb::DType {
        match self {
            DType::F64 => pb::DType::F64,
            DType::F32 => pb::DType::F32,
            DType::F16 => pb::DType::F16,
            DType::BF16 => pb::DType::Bf16,
            DType::F8E4M3 => pb::DType::F8e4m3,
            DType::F8E5M2 => pb::DType::F8e5m2,
            DType::I64 => pb::DType::I64,
            DType::I32 => pb::DType::I32,
            DType::I16 => pb::DType::I16,
            DType::I8 => pb::DType::I8,
            DType::U8 => pb::DType::U8,
            DType::Bool => pb::DType::Bool,
        }
    }

    pub(crate) fn from_pb(v: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.to_pb() as i32 == v)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_pb(d.to_pb() as i32), Some(d));
        }
        assert_eq!(DType::from_pb(0), None);
    }
}
