pub use ckptstore_engine::*;
