//! Checkpoints of the global model, written atomically after each round.
//!
//! File `round-NNNNNN.ckpt`: magic `FQCK`, a u32 format version, a u32
//! header length, the postcard [`CheckpointHeader`] (run id, round, model
//! spec, the engine's state, and the round's metrics line), the model as
//! little-endian f32, the strategy's state (opaque bytes: server momentum,
//! moments), and a CRC-32 of everything before it. Writes go to a
//! temporary file that is fsynced, renamed into place, and followed by an
//! fsync of the directory, so a crash leaves either the old set or the new
//! one. A torn or corrupt file fails its checksum and is skipped on resume.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::engine::EngineState;

const MAGIC: &[u8; 4] = b"FQCK";
/// Version 2 added the run id, the engine and strategy state, and the
/// round's metrics line; version 1 files are refused with an explanation.
pub const FORMAT_VERSION: u32 = 2;
const MAX_HEADER: usize = 16 << 20;

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
    /// The run this checkpoint belongs to (fixed when a fresh run starts).
    pub run_id: String,
    /// Rounds completed when this was written.
    pub round: u64,
    pub model_spec: String,
    pub values: u64,
    pub unix_time: u64,
    /// Task counter, seeds and gate state as of this round's commit.
    pub engine: EngineState,
    /// Name of the strategy, and the length of its state after the model
    /// (server optimizer moments and the like; 0 for plain FedAvg).
    pub strategy: String,
    pub strategy_bytes: u64,
    /// This round's metrics line (JSON), so a crash between the checkpoint
    /// and the metrics file loses nothing.
    pub metrics_line: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub model: Vec<f32>,
    /// The strategy's state, as [`crate::strategy::Strategy::state`] made it.
    pub strategy: Vec<u8>,
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

    /// Writes the checkpoint for `header.round` atomically, then prunes
    /// older checkpoints of the same run beyond `keep` (never the file just
    /// written, never another run's files).
    pub fn save(
        &self,
        header: &CheckpointHeader,
        model: &[f32],
        strategy: &[u8],
    ) -> Result<PathBuf, CheckpointError> {
        let round = header.round;
        let mut header = header.clone();
        header.values = model.len() as u64;
        header.strategy_bytes = strategy.len() as u64;
        let header_bytes = postcard::to_stdvec(&header).map_err(|e| CheckpointError::Corrupt {
            path: self.path_for(round),
            reason: format!("cannot encode header: {e}"),
        })?;
        if header_bytes.len() > MAX_HEADER {
            return Err(CheckpointError::Corrupt {
                path: self.path_for(round),
                reason: format!("header of {} bytes is too large", header_bytes.len()),
            });
        }
        let mut bytes =
            Vec::with_capacity(12 + header_bytes.len() + model.len() * 4 + strategy.len() + 4);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(header_bytes.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header_bytes);
        fedquic_protocol::encode_f32_body(model, &mut bytes);
        bytes.extend_from_slice(strategy);
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
        self.prune(&header.run_id, &path)?;
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

    fn prune(&self, run_id: &str, just_written: &Path) -> Result<(), CheckpointError> {
        let ours: Vec<PathBuf> = self
            .list()?
            .into_iter()
            .map(|(_, path)| path)
            .filter(|path| {
                path != just_written && read_header(path).is_ok_and(|h| h.run_id == run_id)
            })
            .collect();
        // `ours` is oldest first and excludes the new file, which counts as one.
        let excess = (ours.len() + 1).saturating_sub(self.keep);
        for path in &ours[..excess.min(ours.len())] {
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
    let (header, header_len) = parse_header(path, body)?;
    let data = &body[12 + header_len..];
    let model_bytes = header.values.checked_mul(4);
    let total = model_bytes.and_then(|m| m.checked_add(header.strategy_bytes));
    if total != Some(data.len() as u64) {
        return Err(corrupt(
            "model and strategy lengths do not match the header",
        ));
    }
    let (data, strategy) = data.split_at(header.values as usize * 4);
    let model: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if fedquic_protocol::first_non_finite(&model).is_some() {
        return Err(corrupt("non-finite parameter"));
    }
    Ok(Checkpoint {
        header,
        model,
        strategy: strategy.to_vec(),
    })
}

/// The header at the start of `bytes` (which need not hold the whole file),
/// and its encoded length.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<(CheckpointHeader, usize), CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 12 || &bytes[..4] != MAGIC {
        return Err(corrupt("not a fedquic checkpoint".into()));
    }
    let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if version == 1 {
        return Err(corrupt(
            "format version 1 was written by an older fedquic (no run id or engine state) \
             and cannot be resumed exactly; start a new run with --fresh"
                .into(),
        ));
    }
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "unsupported format version {version} (this build reads version {FORMAT_VERSION})"
        )));
    }
    let header_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if header_len > MAX_HEADER || 12 + header_len > bytes.len() {
        return Err(corrupt("bad header length".into()));
    }
    let header: CheckpointHeader = postcard::from_bytes(&bytes[12..12 + header_len])
        .map_err(|e| corrupt(format!("bad header: {e}")))?;
    Ok((header, header_len))
}

/// Reads only a checkpoint's header (no checksum: for deciding what to
/// prune, not for resuming).
pub fn read_header(path: &Path) -> Result<CheckpointHeader, CheckpointError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut prefix = [0u8; 12];
    f.read_exact(&mut prefix).map_err(io_err(path))?;
    let header_len = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]) as usize;
    if header_len > MAX_HEADER {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: "bad header length".into(),
        });
    }
    let mut bytes = prefix.to_vec();
    bytes.resize(12 + header_len, 0);
    f.read_exact(&mut bytes[12..]).map_err(io_err(path))?;
    parse_header(path, &bytes).map(|(h, _)| h)
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

    pub(crate) fn header(run_id: &str, round: u64) -> CheckpointHeader {
        CheckpointHeader {
            run_id: run_id.into(),
            round,
            model_spec: "logreg:10-10".into(),
            values: 0,
            unix_time: 0,
            engine: EngineState {
                completed_rounds: round,
                next_task_id: round * 10 + 1,
                selection_seed: 1,
                fit_seed: 2,
                median_update_norm: Some(0.5),
            },
            strategy: "fedavgm".into(),
            strategy_bytes: 0,
            metrics_line: format!("{{\"round\":{round}}}"),
        }
    }

    #[test]
    fn save_load_prune_and_skip_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), 2).unwrap();
        for round in 1..=3u64 {
            let model: Vec<f32> = (0..100).map(|i| i as f32 * round as f32).collect();
            store
                .save(&header("run-a", round), &model, &[1, 2, 3])
                .unwrap();
        }
        let rounds: Vec<u64> = store.list().unwrap().into_iter().map(|(r, _)| r).collect();
        assert_eq!(rounds, vec![2, 3], "keeps only the newest two");
        let latest = store
            .latest_valid(|_, _| panic!("nothing is corrupt"))
            .unwrap()
            .unwrap();
        assert_eq!(latest.header.round, 3);
        assert_eq!(latest.header.engine.next_task_id, 31);
        assert_eq!(latest.strategy, vec![1, 2, 3]);
        assert_eq!(latest.header.strategy_bytes, 3);
        assert_eq!(latest.header.metrics_line, "{\"round\":3}");
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

    #[test]
    fn pruning_never_touches_the_new_file_or_another_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), 2).unwrap();
        // An older run that got further than the new one will.
        for round in 5..=7u64 {
            store
                .save(&header("old-run", round), &[1.0; 4], &[])
                .unwrap();
        }
        for round in 1..=3u64 {
            let path = store
                .save(&header("new-run", round), &[2.0; 4], &[])
                .unwrap();
            assert!(path.exists(), "round {round} survives its own save");
        }
        let rounds: Vec<u64> = store.list().unwrap().into_iter().map(|(r, _)| r).collect();
        assert_eq!(rounds, vec![2, 3, 6, 7]);
    }

    #[test]
    fn old_and_foreign_files_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("round-000001.ckpt");
        let mut bytes = b"FQCK".to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 12]);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("version 1") && e.contains("--fresh"), "{e}");
        let mut foreign = b"PK\x03\x04 a zip file, not ours".to_vec();
        let crc = crc32fast::hash(&foreign);
        foreign.extend_from_slice(&crc.to_le_bytes());
        fs::write(&path, &foreign).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("not a fedquic checkpoint"), "{e}");
    }
}
