//! How the real-file backends (`StdIo`, `UringIo`) open and create things inside a store, so
//! that a store directory from a tarball or a shared path cannot turn an open into an attack:
//!
//! * every file is opened with `O_NOFOLLOW` (a symlink named `LOCK`, `CURRENT`, a WAL, a segment
//!   or a lease is refused with `ELOOP`, never followed to a victim file), with `O_NONBLOCK`
//!   for the open itself (a FIFO named like one cannot hang it), and then must be a regular file
//!   (`fstat` on the descriptor, not the name): anything else is refused as `InvalidInput`
//!   (a directory as `IsADirectory`), see [`is_refused_kind`];
//! * files are created with the store's permission bits ([`DEFAULT_FILE_MODE`], 0600, unless the
//!   store was opened to share with a group), directories with [`dir_mode_for`] of them;
//! * [`dir_status`] reports a directory's owner and mode, and whether it is a symlink, for the
//!   store's refusal of world-writable or foreign-owned directories (`store::perms`).
//!
//! Modes change no bytes on disk: a store written with looser modes opens as before.

use rustix::fs::{Mode, OFlags};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Permission bits of a new store file unless the store says otherwise: the owner only.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// The directory mode that goes with file mode `file`: each read bit also grants search (x),
/// so 0600 gives 0700, 0640 gives 0750, 0660 gives 0770 (a group that may write files may also
/// create them, e.g. its readers' leases).
pub fn dir_mode_for(file: u32) -> u32 {
    let file = file & 0o777;
    file | ((file & 0o444) >> 2)
}

/// How [`open_file`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The file must exist.
    No,
    /// Create it if absent (never truncates).
    IfAbsent,
    /// It must not exist (`O_EXCL`).
    New,
}

/// Opens a regular file without following a symlink in its last component and without
/// blocking on a FIFO; `mode` is used only when the file is created (less the umask).
pub fn open_file(path: &Path, write: bool, create: Create, mode: u32) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(write || create != Create::No);
    match create {
        Create::No => {}
        Create::IfAbsent => {
            o.create(true).truncate(false);
        }
        Create::New => {
            o.create_new(true);
        }
    }
    o.mode(mode & 0o777)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC).bits() as i32);
    let f = o.open(path).map_err(|e| explain_loop(path, e))?;
    regular_only(path, &f)?;
    // The open is done: positioned I/O on a regular file never blocks anyway, but the flag
    // would be inherited by anything that duplicates the descriptor.
    let flags = rustix::fs::fcntl_getfl(&f)?;
    rustix::fs::fcntl_setfl(&f, flags - OFlags::NONBLOCK)?;
    Ok(f)
}

/// Refuses a descriptor that is not a regular file (a FIFO, socket, device or directory).
pub fn regular_only(path: &Path, f: &File) -> io::Result<()> {
    let ft = f.metadata()?.file_type();
    if ft.is_file() {
        return Ok(());
    }
    // A directory keeps EISDIR's kind (what reading one would give), the rest InvalidInput.
    let kind = if ft.is_dir() {
        io::ErrorKind::IsADirectory
    } else {
        io::ErrorKind::InvalidInput
    };
    Err(io::Error::new(
        kind,
        format!(
            "{} is not a regular file ({}); a store holds only regular files there",
            path.display(),
            kind_name(&ft)
        ),
    ))
}

fn kind_name(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else if ft.is_symlink() {
        "a symlink"
    } else {
        "not a file"
    }
}

/// `ELOOP` from `O_NOFOLLOW` means the name is a symlink: say so.
fn explain_loop(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        return io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symlink; files inside a store are never followed through symlinks",
                path.display()
            ),
        );
    }
    e
}

/// Whether an open failed because the name is not a regular file (a symlink, FIFO, socket,
/// device or directory in its place): callers treat that like damage, not like an I/O error.
pub fn is_refused_kind(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidInput | io::ErrorKind::IsADirectory
    )
}

/// Creates `path` and its missing parents with mode `mode` (less the umask). An existing
/// `path` is left as it is (its mode is not changed: a store written with looser modes opens).
pub fn create_dir_all(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode & 0o777)
        .create(path)
}

/// Opens a directory (following symlinks unless `nofollow`) to fsync or list it.
pub fn open_dir(path: &Path, nofollow: bool) -> io::Result<File> {
    let mut flags = OFlags::DIRECTORY | OFlags::CLOEXEC;
    if nofollow {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = rustix::fs::open(path, flags | OFlags::RDONLY, Mode::empty())
        .map_err(|e| explain_loop(path, e.into()))?;
    Ok(File::from(fd))
}

/// What [`dir_status`] found at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirStatus {
    /// The name itself is a symlink (reported without following it).
    pub symlink: bool,
    /// It is (or, when `symlink`, leads to) a directory.
    pub is_dir: bool,
    /// Owner of what the name leads to.
    pub uid: u32,
    /// Permission bits of what the name leads to.
    pub mode: u32,
}

/// Owner, mode and kind of `path`; `Ok(None)` if nothing is there.
pub fn dir_status(path: &Path) -> io::Result<Option<DirStatus>> {
    let l = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let symlink = l.file_type().is_symlink();
    let m = if symlink {
        match std::fs::metadata(path) {
            Ok(m) => m,
            // A dangling symlink: report it as one, leading nowhere.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Some(DirStatus {
                    symlink,
                    is_dir: false,
                    uid: l.uid(),
                    mode: l.mode() & 0o7777,
                }))
            }
            Err(e) => return Err(e),
        }
    } else {
        l
    };
    Ok(Some(DirStatus {
        symlink,
        is_dir: m.is_dir(),
        uid: m.uid(),
        mode: m.mode() & 0o7777,
    }))
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dir_modes_follow_file_modes() {
        assert_eq!(dir_mode_for(0o600), 0o700);
        assert_eq!(dir_mode_for(0o640), 0o750);
        assert_eq!(dir_mode_for(0o660), 0o770);
        assert_eq!(dir_mode_for(0o644), 0o755);
    }

    #[test]
    fn symlink_is_refused_and_victim_untouched() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.path().join("LOCK");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for create in [Create::No, Create::IfAbsent, Create::New] {
            let e = open_file(&link, true, create, 0o600).unwrap_err();
            assert!(
                e.to_string().contains("symlink") || e.kind() == io::ErrorKind::AlreadyExists,
                "{create:?}: {e}"
            );
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn fifo_open_does_not_hang() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("00000001.wal");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_raw_mode(0o600)).unwrap();
        for write in [false, true] {
            let e = open_file(&fifo, write, Create::No, 0o600).unwrap_err();
            assert!(e.to_string().contains("FIFO"), "{e}");
        }
    }

    #[test]
    fn new_files_and_dirs_get_the_mode_less_umask() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        open_file(&f, true, Create::New, 0o600).unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sub = d.path().join("a/b");
        create_dir_all(&sub, 0o700).unwrap();
        let mode = std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
