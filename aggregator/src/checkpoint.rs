//! Checkpoints of the global model, written atomically after each round.
//!
//! File `round-NNNNNN.ckpt`: magic `FQCK`, a u32 format version, a u32
//! header length, the postcard [`CheckpointHeader`], the model as
//! little-endian f32, and a CRC-32 of everything before it. Writes go to a
//! temporary file that is fsynced, renamed into place, and followed by an
//! fsync of the directory, so a crash leaves either the old set or the new
//! one. A torn or corrupt file fails its checksum and is skipped on resume.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

const MAGIC: &[u8; 4] = b"FQCK";
const FORMAT_VERSION: u32 = 1;
const MAX_HEADER: usize = 1 << 16;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CheckpointHeader {
    /// Rounds completed when this was written.
    pub round: u64,
    pub model_spec: String,
    pub values: u64,
    pub unix_time: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub model: Vec<f32>,
}

/// A directory of checkpoints, keeping the newest `keep`.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CheckpointStore {
    pub fn open(dir: impl Into<PathBuf>, keep: usize) -> Result<Self, CheckpointError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(CheckpointStore {
            dir,
            keep: keep.max(1),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round-{round:06}.ckpt"))
    }

    /// Writes the checkpoint for `round` atomically and prunes old ones.
    pub fn save(
        &self,
        round: u64,
        model_spec: &str,
        model: &[f32],
    ) -> Result<PathBuf, CheckpointError> {
        let header = CheckpointHeader {
            round,
            model_spec: model_spec.to_string(),
            values: model.len() as u64,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let header_bytes = postcard::to_stdvec(&header).map_err(|e| CheckpointError::Corrupt {
            path: self.path_for(round),
            reason: format!("cannot encode header: {e}"),
        })?;
        let mut bytes = Vec::with_capacity(12 + header_bytes.len() + model.len() * 4 + 4);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(header_bytes.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header_bytes);
        fedquic_protocol::encode_f32_body(model, &mut bytes);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());

        let path = self.path_for(round);
        let tmp = self.dir.join(format!(".round-{round:06}.ckpt.tmp"));
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.prune()?;
        Ok(path)
    }

    /// Checkpoint files, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(round) = name
                .strip_prefix("round-")
                .and_then(|r| r.strip_suffix(".ckpt"))
                .and_then(|r| r.parse::<u64>().ok())
            {
                found.push((round, entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    fn prune(&self) -> Result<(), CheckpointError> {
        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep);
        for (_, path) in &all[..excess] {
            fs::remove_file(path).map_err(io_err(path))?;
        }
        Ok(())
    }

    /// The newest checkpoint that passes its checksum; corrupt ones are
    /// reported through `skipped` (path, reason) and passed over.
    pub fn latest_valid(
        &self,
        mut skipped: impl FnMut(&Path, &CheckpointError),
    ) -> Result<Option<Checkpoint>, CheckpointError> {
        for (_, path) in self.list()?.into_iter().rev() {
            match load(&path) {
                Ok(ckpt) => return Ok(Some(ckpt)),
                Err(e) => skipped(&path, &e),
            }
        }
        Ok(None)
    }
}

/// Reads and verifies one checkpoint file.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let corrupt = |reason: &str| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    if bytes.len() < 16 {
        return Err(corrupt("file too short"));
    }
    let (body, crc_bytes) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    if crc32fast::hash(body) != stored {
        return Err(corrupt("checksum mismatch (torn or damaged file)"));
    }
    if &body[..4] != MAGIC {
        return Err(corrupt("not a fedquic checkpoint"));
    }
    let version = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
    if version != FORMAT_VERSION {
        return Err(corrupt(&format!("unsupported format version {version}")));
    }
    let header_len = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
    if header_len > MAX_HEADER || 12 + header_len > body.len() {
        return Err(corrupt("bad header length"));
    }
    let header: CheckpointHeader = postcard::from_bytes(&body[12..12 + header_len])
        .map_err(|e| corrupt(&format!("bad header: {e}")))?;
    let data = &body[12 + header_len..];
    if data.len() as u64 != header.values.saturating_mul(4) {
        return Err(corrupt("model length does not match the header"));
    }
    let model: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if model.iter().any(|v| !v.is_finite()) {
        return Err(corrupt("non-finite parameter"));
    }
    Ok(Checkpoint { header, model })
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Makes the rename itself durable. Directories can be opened read-only
    // and fsynced on Unix; elsewhere this is a no-op.
    #[cfg(unix)]
    OpenOptions::new()
        .read(true)
        .open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    #[cfg(not(unix))]
    let _ = (dir, OpenOptions::new());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_prune_and_skip_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), 2).unwrap();
        for round in 1..=3u64 {
            let model: Vec<f32> = (0..100).map(|i| i as f32 * round as f32).collect();
            store.save(round, "logreg:10-10", &model).unwrap();
        }
        let rounds: Vec<u64> = store.list().unwrap().into_iter().map(|(r, _)| r).collect();
        assert_eq!(rounds, vec![2, 3], "keeps only the newest two");
        let latest = store
            .latest_valid(|_, _| panic!("nothing is corrupt"))
            .unwrap()
            .unwrap();
        assert_eq!(latest.header.round, 3);
        assert_eq!(latest.model[10], 30.0);

        // Tear the newest file: resume must fall back to round 2 and say why.
        let newest = store.path_for(3);
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let mut skipped = Vec::new();
        let latest = store
            .latest_valid(|p, e| skipped.push((p.to_path_buf(), e.to_string())))
            .unwrap()
            .unwrap();
        assert_eq!(latest.header.round, 2);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].1.contains("checksum"), "{}", skipped[0].1);

        // A flipped bit is caught too.
        let mid = store.path_for(2);
        let mut bytes = fs::read(&mid).unwrap();
        bytes[40] ^= 0x10;
        fs::write(&mid, &bytes).unwrap();
        assert!(store.latest_valid(|_, _| {}).unwrap().is_none());
    }
}
