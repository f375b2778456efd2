//! How every secret file is read: AUTH_TOKENS_FILE, the TLS certificate, key
//! and client CA, REDIS_PASSWORD_FILE and REDIS_CA_FILE. One way for all, so
//! each is safe against the same writers: a Kubernetes Secret volume (the
//! kubelet swaps a `..data` symlink, so every file of the Secret changes at
//! once) and a file rewritten in place (defended against, not supported:
//! write a new file and rename it over the old one).
//!
//! A read examines each file ([`Stamp`]: size, modification time, inode)
//! before and after reading all of them, and keeps the read only when
//! nothing moved and every file's text is as long as the file: so it never
//! takes half of a file being written, nor, for files read together (a
//! certificate and its key), one file's old version with another's new one.
//! A read that straddles a change is tried again, up to the caller's number
//! of attempts; what to do when it keeps failing (refuse to start, keep the
//! previous secret) is the caller's. When to read again differs by secret
//! and stays with each: the tokens when the file settled or on SIGHUP (auth),
//! the TLS files every few seconds (server::tls), the Redis secrets at each
//! new connection (store::credentials).

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

/// What identifies one version of a file: a change to any of these means the
/// file was rewritten or replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) len: u64,
    pub(crate) modified: Option<SystemTime>,
    /// Tells a renamed-in replacement from the file it replaced even when
    /// both have the same size and time.
    #[cfg(unix)]
    pub(crate) inode: u64,
}

impl Stamp {
    /// The stamp of `path` now (of the file a symlink points to).
    pub(crate) fn of(path: &Path) -> std::io::Result<Self> {
        let metadata = std::fs::metadata(path)?;
        Ok(Self {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            #[cfg(unix)]
            inode: std::os::unix::fs::MetadataExt::ino(&metadata),
        })
    }
}

/// A secret file named by a setting.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SecretFile<'a> {
    /// The setting, for messages: `TLS_KEY`.
    pub(crate) variable: &'a str,
    pub(crate) path: &'a Path,
}

/// Why a secret file was not read; the message names the setting and path.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretError {
    /// The file could not be read.
    #[error("{variable} {}: {source}", path.display())]
    Read {
        variable: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file changed during every attempt to read it.
    #[error(
        "{variable} {} changed while it was read; write a new file and rename it into place",
        path.display()
    )]
    Changing { variable: String, path: PathBuf },
}

/// One file's contents and the version they are.
#[derive(Debug)]
pub(crate) struct Read {
    pub(crate) bytes: Vec<u8>,
    pub(crate) stamp: Stamp,
}

/// How many times [`read`] tries a file that changes while it is read.
const ATTEMPTS: usize = 3;

/// Reads the one file `path` that `variable` names (see the module docs).
///
/// # Errors
///
/// A message naming `variable` and the path.
pub(crate) fn read(variable: &str, path: &Path) -> Result<Vec<u8>, String> {
    let mut reads =
        read_settled(&[SecretFile { variable, path }], ATTEMPTS).map_err(|e| e.to_string())?;
    Ok(reads.pop().map(|read| read.bytes).unwrap_or_default())
}

/// Reads `files` together (see the module docs), trying `attempts` times.
///
/// # Errors
///
/// [`SecretError::Read`] for a file that cannot be examined or read;
/// [`SecretError::Changing`] when one changed during every attempt.
pub(crate) fn read_settled(
    files: &[SecretFile<'_>],
    attempts: usize,
) -> Result<Vec<Read>, SecretError> {
    read_settled_with(files, attempts, |path| std::fs::read(path))
}

/// [`read_settled`] with the read given, so tests can change a file in the
/// middle of it.
pub(crate) fn read_settled_with(
    files: &[SecretFile<'_>],
    attempts: usize,
    mut read: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<Vec<Read>, SecretError> {
    let failed = |file: &SecretFile<'_>| {
        let (variable, path) = (file.variable.to_string(), file.path.to_owned());
        move |source| SecretError::Read {
            variable,
            path,
            source,
        }
    };
    let mut attempt = 1;
    loop {
        let before = files
            .iter()
            .map(|file| Stamp::of(file.path).map_err(failed(file)))
            .collect::<Result<Vec<_>, _>>()?;
        let texts = files
            .iter()
            .map(|file| read(file.path).map_err(failed(file)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut moved = None;
        let mut reads = Vec::with_capacity(files.len());
        for ((file, bytes), before) in files.iter().zip(texts).zip(before) {
            let after = Stamp::of(file.path).map_err(failed(file))?;
            if after != before || u64::try_from(bytes.len()).ok() != Some(after.len) {
                moved.get_or_insert(file);
            }
            reads.push(Read {
                bytes,
                stamp: after,
            });
        }
        match moved {
            None => return Ok(reads),
            Some(file) if attempt >= attempts => {
                return Err(SecretError::Changing {
                    variable: file.variable.to_string(),
                    path: file.path.to_owned(),
                });
            }
            Some(_) => attempt += 1,
        }
    }
}

/// A file removed when dropped, for the tests of the secret files' readers.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TempFile(pub(crate) PathBuf);

#[cfg(test)]
impl TempFile {
    pub(crate) fn new(contents: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("secret-file-{}-{n}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

#[cfg(test)]
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_read_together_are_one_version_of_each() {
        let (cert_file, key_file) = (TempFile::new("cert-1"), TempFile::new("key-1"));
        let (cert, key) = (cert_file.0.clone(), key_file.0.clone());
        let files = [
            SecretFile {
                variable: "TLS_CERT",
                path: &cert,
            },
            SecretFile {
                variable: "TLS_KEY",
                path: &key,
            },
        ];
        // The swap lands between the two reads of the first attempt: that
        // attempt is thrown away and the second reads the new pair.
        let mut swapped = false;
        let reads = read_settled_with(&files, 3, |path| {
            let bytes = std::fs::read(path)?;
            if !swapped {
                swapped = true;
                std::fs::write(&cert, "cert-two")?;
                std::fs::write(&key, "key-two")?;
            }
            Ok(bytes)
        })
        .unwrap();
        let texts: Vec<_> = reads.iter().map(|r| r.bytes.as_slice()).collect();
        assert_eq!(texts, [b"cert-two".as_slice(), b"key-two".as_slice()]);
    }

    #[test]
    fn a_file_that_keeps_changing_is_named() {
        let changing = TempFile::new("v");
        let path = changing.0.clone();
        let file = SecretFile {
            variable: "REDIS_PASSWORD_FILE",
            path: &path,
        };
        let mut n = 0;
        let err = read_settled_with(&[file], 2, |p| {
            n += 1;
            let bytes = std::fs::read(p)?;
            std::fs::write(p, "v".repeat(n + 1))?;
            Ok(bytes)
        })
        .unwrap_err();
        assert!(matches!(err, SecretError::Changing { .. }), "{err:?}");
        assert!(err.to_string().starts_with("REDIS_PASSWORD_FILE "), "{err}");
        assert_eq!(n, 2, "one read per attempt");
        // A short read (the file did not move, the text is not all of it).
        let err = read_settled_with(&[file], 1, |_| Ok(Vec::new())).unwrap_err();
        assert!(matches!(err, SecretError::Changing { .. }), "{err:?}");
        std::fs::remove_file(&path).unwrap();
        let err = read_settled(&[file], 3).unwrap_err();
        assert!(matches!(err, SecretError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("REDIS_PASSWORD_FILE"), "{err}");
    }
}
