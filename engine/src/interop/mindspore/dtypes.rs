//! MindSpore's type strings and ckptstore's dtypes.

use crate::dtype::DType;

/// MindSpore's type string of a ckptstore dtype, or `None` for the float8 types: MindSpore
/// 2.10 writes `Float8E4M3FN`/`Float8E5M2` but its `load_checkpoint` cannot read them, so the
/// export refuses them rather than write a file MindSpore fails on.
pub fn dtype_name(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F64 => "Float64",
        DType::F32 => "Float32",
        DType::F16 => "Float16",
        DType::BF16 => "BFloat16",
        DType::I64 => "Int64",
        DType::I32 => "Int32",
        DType::I16 => "Int16",
        DType::I8 => "Int8",
        DType::U8 => "UInt8",
        DType::Bool => "Bool",
        DType::F8E4M3 | DType::F8E5M2 => return None,
    })
}

/// What a `tensor_type` string means here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A tensor of this dtype.
    Tensor(DType),
    /// An `append_info` string (`str`).
    Str,
}

/// Parses a `tensor_type`. `Err(Some(why))`: a MindSpore type ckptstore cannot hold;
/// `Err(None)`: a string MindSpore does not write.
pub(crate) fn parse_dtype(s: &str) -> Result<ValueKind, Option<&'static str>> {
    Ok(ValueKind::Tensor(match s {
        "Float64" => DType::F64,
        "Float32" => DType::F32,
        "Float16" => DType::F16,
        "BFloat16" => DType::BF16,
        "Float8E4M3FN" => DType::F8E4M3,
        "Float8E5M2" => DType::F8E5M2,
        "Int64" => DType::I64,
        "Int32" => DType::I32,
        "Int16" => DType::I16,
        "Int8" => DType::I8,
        "UInt8" => DType::U8,
        "Bool" => DType::Bool,
        "str" => return Ok(ValueKind::Str),
        "UInt16" | "UInt32" | "UInt64" => {
            return Err(Some(
                "ckptstore has no unsigned integer dtype wider than 8 bits; convert it \
                 (e.g. to Int32/Int64) in MindSpore before saving",
            ))
        }
        "Int4" => {
            return Err(Some(
                "ckptstore has no packed 4-bit dtype (MindSpore's qint4x2)",
            ))
        }
        "HiFloat8" | "Complex64" | "Complex128" => {
            return Err(Some("ckptstore has no equivalent dtype"))
        }
        _ => return Err(None),
    }))
}
