//! Compiles the .proto schemas with the pure-Rust `protox` compiler, so a fresh machine needs
//! nothing but cargo (no system `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ckptstore.proto");
    println!("cargo:rerun-if-changed=proto/mindspore_checkpoint.proto");
    let fds = protox::compile(
        ["proto/ckptstore.proto", "proto/mindspore_checkpoint.proto"],
        ["proto"],
    )?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
