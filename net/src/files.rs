//! Reading and replacing the small files the PKI and the TLS setup keep
//! (certificates, keys, CRLs, the revocation record): reads are bounded, so
//! a wrong path (a device, a huge log) is an error instead of a process that
//! fills its memory, and replacements are atomic, so a failed or interrupted
//! write leaves the old file whole.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

/// Most bytes of a PEM certificate chain or key file (a chain of a few
/// certificates is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Most bytes of a CRL file (about 40 bytes per revoked certificate: room
/// for hundreds of thousands).
pub const MAX_CRL_BYTES: u64 = 16 << 20;

/// Reads a regular file of at most `limit` bytes. Anything else (a
/// directory, a FIFO, a device, a larger file) is an error of kind
/// `InvalidData` that says why.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    // Checked before opening: opening a FIFO blocks until a writer comes.
    let not_regular = || io::Error::new(io::ErrorKind::InvalidData, "not a regular file");
    if !fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        )
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between the size check and the read.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, limit)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Replaces `path` with `contents` atomically: writes and syncs a new
/// temporary file beside it (a fresh random name, created exclusively, so
/// concurrent writers never share one), then renames it over `path` and
/// syncs the directory. Readers see the old file or the new one, never a
/// part; on any error the old file stays and the temporary one is removed.
/// The new file has mode 0644 (these files are public: certificates, CRLs,
/// records).
pub fn replace_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename itself survives a crash once the directory is synced.
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_and_need_a_regular_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("f.pem");
        fs::write(&path, b"0123456789").expect("write");
        assert_eq!(read_bounded(&path, 10).expect("fits"), b"0123456789");
        let err = read_bounded(&path, 9).expect_err("too large");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("larger than 9 bytes"), "{err}");
        let err = read_bounded(tmp.path(), 1 << 20).expect_err("a directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        fs::write(&path, [0xff, 0xfe]).expect("write");
        assert!(read_text_bounded(&path, 10).is_err());
        assert_eq!(
            read_bounded(&tmp.path().join("missing"), 10)
                .expect_err("missing")
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn replacement_is_whole_or_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("crl.pem");
        replace_file(&path, b"first").expect("create");
        replace_file(&path, b"second").expect("replace");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("crl.pem")]);
        // A target that cannot be replaced (a non-empty directory) keeps its
        // contents and leaves no temporary file.
        let dir = tmp.path().join("taken");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("inside"), b"x").expect("write");
        assert!(replace_file(&dir, b"new").is_err());
        assert!(dir.join("inside").exists());
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["crl.pem", "taken"], "no temporary file left");
    }
}
