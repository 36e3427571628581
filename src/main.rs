//! The `ckptstore` command-line tool. Subcommands live in `src/cli/`, one file each.
#![deny(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
