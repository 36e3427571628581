//! README.md's command-line quick start runs as written, top to bottom, against the built
//! binary: each `ckptstore ...` line of its `### Command line` block is run in a fresh
//! directory holding a small `model.safetensors`, and must exit 0. Two substitutions keep it
//! quick and local: the crash test's directory is a temporary one, and its 500 kills are 3
//! (the full loop runs in tests/kill_loop.rs). `cargo install` is not run.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ckptstore");

fn quick_start_lines() -> Vec<String> {
    let readme = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let text = std::fs::read_to_string(readme).expect("README.md");
    let section = &text[text
        .find("\n### Command line\n")
        .expect("README has a `### Command line` section")..];
    let start = section.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = start + section[start..].find("\n```").expect("the block closes");
    section[start..end]
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| l.starts_with("ckptstore "))
        .collect()
}

/// A safetensors file of one f32 tensor, at step 1875.
fn safetensors_file() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"step":"1875"}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend((0u8..16).collect::<Vec<_>>());
    f
}

#[test]
fn readme_cli_quick_start_runs_as_written() {
    let dir = std::env::temp_dir().join(format!("ckpt-readme-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_file()).unwrap();
    let lines = quick_start_lines();
    assert!(lines.len() >= 5, "too few commands found: {lines:?}");
    for line in &lines {
        let line = line
            .replace("/mnt/scratch/ct", &dir.join("ct").display().to_string())
            .replace("--kills 500", "--kills 3");
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = Command::new(BIN)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{line}` failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(dir.join("out.ckpt").exists());
    std::fs::remove_dir_all(&dir).ok();
}
