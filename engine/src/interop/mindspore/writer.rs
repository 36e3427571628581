//! Writing a `.ckpt` file as MindSpore's `save_checkpoint` does.

use super::wire::{crc_trailer, put_varint, varint_len, Crc32};
use super::{io_err, FormatError};
use std::io::Write;

/// Writes a `.ckpt` file value by value, as MindSpore's `save_checkpoint` does (dims as
/// unpacked varints, one `Checkpoint` message per value, a tensor over `slice_bytes` as
/// several values), computing the CRC-32 for the optional trailer.
pub struct ValueWriter<'w, W> {
    out: &'w mut W,
    crc: Crc32,
    written: u64,
    slice_bytes: u64,
}

impl<'w, W: Write> ValueWriter<'w, W> {
    /// A writer cutting tensors into slices of at most `slice_bytes` (MindSpore:
    /// [`DEFAULT_SLICE_BYTES`]).
    pub fn new(out: &'w mut W, slice_bytes: u64) -> Self {
        ValueWriter {
            out,
            crc: Crc32::new(),
            written: 0,
            slice_bytes: slice_bytes.max(1),
        }
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), FormatError> {
        self.out.write_all(b).map_err(io_err("write"))?;
        self.crc.update(b);
        self.written += b.len() as u64;
        Ok(())
    }

    /// Writes one value: tag, dims, type and `content` (one slice).
    fn value(
        &mut self,
        tag: &str,
        dims: &[i64],
        type_name: &str,
        content: &[u8],
    ) -> Result<(), FormatError> {
        let mut tensor_head = Vec::with_capacity(32 + type_name.len());
        for &d in dims {
            tensor_head.push(0x08);
            put_varint(&mut tensor_head, d as u64);
        }
        tensor_head.push(0x12);
        put_varint(&mut tensor_head, type_name.len() as u64);
        tensor_head.extend_from_slice(type_name.as_bytes());
        tensor_head.push(0x1A);
        put_varint(&mut tensor_head, content.len() as u64);
        let tensor_len = tensor_head.len() as u64 + content.len() as u64;
        let value_len = 1
            + varint_len(tag.len() as u64)
            + tag.len() as u64
            + 1
            + varint_len(tensor_len)
            + tensor_len;
        let mut head = Vec::with_capacity(tensor_head.len() + tag.len() + 24);
        head.push(0x0A);
        put_varint(&mut head, value_len);
        head.push(0x0A);
        put_varint(&mut head, tag.len() as u64);
        head.extend_from_slice(tag.as_bytes());
        head.push(0x12);
        put_varint(&mut head, tensor_len);
        head.extend_from_slice(&tensor_head);
        self.raw(&head)?;
        self.raw(content)
    }

    /// Writes a tensor (one value per slice; one empty value for an empty tensor).
    pub fn tensor(
        &mut self,
        tag: &str,
        dims: &[i64],
        type_name: &str,
        data: &[u8],
    ) -> Result<(), FormatError> {
        if data.is_empty() {
            return self.value(tag, dims, type_name, data);
        }
        for slice in data.chunks(self.slice_bytes.min(usize::MAX as u64) as usize) {
            self.value(tag, dims, type_name, slice)?;
        }
        Ok(())
    }

    /// Writes a `str` value as MindSpore does (dims `[0]`, UTF-32LE).
    pub fn str_value(&mut self, tag: &str, s: &str) -> Result<(), FormatError> {
        let bytes: Vec<u8> = s.chars().flat_map(|c| (c as u32).to_le_bytes()).collect();
        self.value(tag, &[0], "str", &bytes)
    }

    /// Ends the file: appends the CRC trailer when `crc` is set, flushes. Returns the bytes
    /// written.
    pub fn finish(self, crc: bool) -> Result<u64, FormatError> {
        let mut written = self.written;
        if crc {
            let t = crc_trailer(self.crc.value());
            self.out.write_all(&t).map_err(io_err("write"))?;
            written += t.len() as u64;
        }
        self.out.flush().map_err(io_err("write"))?;
        Ok(written)
    }
}
