//! What a client keeps between tasks of one federated run: its SCAFFOLD
//! control variate `c_i` and its error-feedback residual (the part of its
//! last updates a lossy codec did not send). In memory (the simulator's
//! virtual clients, 4 bytes a parameter each once selected) or as files in
//! the client's state directory (`--state-dir`).
//!
//! Each vector belongs to one federated run (the aggregator's run id): a
//! task from another run starts from zero. A file is written atomically
//! (temporary file, fsync, rename, directory fsync) and checked on load: size
//! bounded by the model before it is read, magic, run id, value count, every
//! value finite, and a checksum.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// One kind of per-run vector a client keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateVector {
    /// SCAFFOLD's `c_i`.
    ScaffoldControl,
    /// Error feedback's residual `e` (Karimireddy et al. 2019).
    Residual,
}

impl StateVector {
    /// The vector's file in the state directory.
    pub fn file_name(self) -> &'static str {
        match self {
            StateVector::ScaffoldControl => CONTROL_FILE,
            StateVector::Residual => RESIDUAL_FILE,
        }
    }
}

/// The control variate's file in the state directory.
pub const CONTROL_FILE: &str = "scaffold-control.bin";
/// The error-feedback residual's file in the state directory.
pub const RESIDUAL_FILE: &str = "error-feedback.bin";
const MAGIC: &[u8; 8] = b"FQCV0001";
/// Longest run id stored (as `fedquic_protocol::MAX_RUN_LEN`).
const MAX_RUN_LEN: usize = 64;

#[derive(Debug, Error)]
pub enum StateStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid client state file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// One client's state store.
#[derive(Debug)]
pub enum StateStore {
    /// Kept in memory for the life of the client (run id, values).
    Memory(HashMap<StateVector, (String, Vec<f32>)>),
    /// Kept in `DIR/<file name>`.
    Dir(PathBuf),
}

impl Default for StateStore {
    fn default() -> Self {
        StateStore::Memory(HashMap::new())
    }
}

impl StateStore {
    /// A store in `dir`, created if missing.
    pub fn in_dir(dir: &Path) -> Result<StateStore, StateStoreError> {
        fs::create_dir_all(dir).map_err(|source| StateStoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(StateStore::Dir(dir.to_path_buf()))
    }

    /// `which` for `run` with `len` values: what was saved for this run, or
    /// zeros when nothing was (or it belongs to another run, or has another
    /// length: a new model is a new start). A damaged file is an error.
    pub fn load(
        &self,
        which: StateVector,
        run: &str,
        len: usize,
    ) -> Result<Vec<f32>, StateStoreError> {
        match self {
            StateStore::Memory(map) => match map.get(&which) {
                Some((stored_run, values)) if stored_run == run && values.len() == len => {
                    Ok(values.clone())
                }
                _ => Ok(vec![0.0; len]),
            },
            StateStore::Dir(dir) => {
                let path = dir.join(which.file_name());
                match read_file(&path, len)? {
                    Some((stored_run, values)) if stored_run == run && values.len() == len => {
                        Ok(values)
                    }
                    _ => Ok(vec![0.0; len]),
                }
            }
        }
    }

    /// Stores `values` as `which` for `run`, replacing what was there.
    pub fn save(
        &mut self,
        which: StateVector,
        run: &str,
        values: Vec<f32>,
    ) -> Result<(), StateStoreError> {
        match self {
            StateStore::Memory(map) => {
                map.insert(which, (run.to_string(), values));
                Ok(())
            }
            StateStore::Dir(dir) => write_atomically(&dir.join(which.file_name()), run, &values),
        }
    }
}

impl StateStore {
    /// Removes `which`: the next load starts from zero. Done before an update
    /// that supersedes it goes out, so that a failed save (or a crash) after
    /// the aggregator has the update never makes the next one repeat the old
    /// vector.
    pub fn forget(&mut self, which: StateVector) -> Result<(), StateStoreError> {
        match self {
            StateStore::Memory(map) => {
                map.remove(&which);
                Ok(())
            }
            StateStore::Dir(dir) => {
                let path = dir.join(which.file_name());
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(StateStoreError::Io { path, source: e })
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// FNV-1a, 64 bits: catches torn and damaged files (not an attacker, who
/// could rewrite the whole file anyway).
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn encode(run: &str, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 2 + run.len() + 8 + values.len() * 4 + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(run.len() as u16).to_le_bytes());
    out.extend_from_slice(run.as_bytes());
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Reads the file if there is one; `None` when it is absent or holds a
/// different number of values than `len` (another model).
fn read_file(path: &Path, len: usize) -> Result<Option<(String, Vec<f32>)>, StateStoreError> {
    let corrupt = |reason: String| StateStoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| StateStoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    // Bounded before reading: the largest file this model can have.
    let max = (8 + 2 + MAX_RUN_LEN + 8 + 8) as u64 + len as u64 * 4;
    if size > max {
        return Err(corrupt(format!(
            "{size} bytes, more than a control variate of {len} values takes ({max})"
        )));
    }
    let bytes = fs::read(path).map_err(io)?;
    if bytes.len() < 8 + 2 + 8 + 8 || &bytes[..8] != MAGIC {
        return Err(corrupt("bad magic or truncated".into()));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let mut sum_bytes = [0u8; 8];
    sum_bytes.copy_from_slice(sum);
    if checksum(body) != u64::from_le_bytes(sum_bytes) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let run_len = u16::from_le_bytes([body[8], body[9]]) as usize;
    if run_len > MAX_RUN_LEN || body.len() < 10 + run_len + 8 {
        return Err(corrupt(format!("run id of {run_len} bytes")));
    }
    let run = std::str::from_utf8(&body[10..10 + run_len])
        .map_err(|_| corrupt("run id is not UTF-8".into()))?
        .to_string();
    let mut count = [0u8; 8];
    count.copy_from_slice(&body[10 + run_len..18 + run_len]);
    let count = u64::from_le_bytes(count);
    let data = &body[18 + run_len..];
    if count != data.len() as u64 / 4 || data.len() % 4 != 0 {
        return Err(corrupt(format!(
            "says {count} values but holds {} bytes",
            data.len()
        )));
    }
    if count != len as u64 {
        return Ok(None);
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if fedquic_protocol::first_non_finite(&values).is_some() {
        return Err(corrupt("holds a non-finite value".into()));
    }
    Ok(Some((run, values)))
}

fn write_atomically(path: &Path, run: &str, values: &[f32]) -> Result<(), StateStoreError> {
    fedquic_net::files::replace_file(path, &encode(run, values)).map_err(|source| {
        StateStoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "fedquic-control-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn memory_store_is_keyed_to_the_run() {
        let mut store = StateStore::default();
        let c = StateVector::ScaffoldControl;
        assert_eq!(store.load(c, "a", 2).unwrap(), vec![0.0, 0.0]);
        store.save(c, "a", vec![1.0, 2.0]).unwrap();
        assert_eq!(store.load(c, "a", 2).unwrap(), vec![1.0, 2.0]);
        assert_eq!(store.load(c, "b", 2).unwrap(), vec![0.0, 0.0], "new run");
        assert_eq!(store.load(c, "a", 3).unwrap(), vec![0.0; 3], "new model");
        let r = StateVector::Residual;
        assert_eq!(store.load(r, "a", 2).unwrap(), vec![0.0; 2], "its own slot");
        store.save(r, "a", vec![3.0, 4.0]).unwrap();
        assert_eq!(store.load(c, "a", 2).unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn a_forgotten_vector_loads_as_zeros_in_either_store() {
        let dir = temp_dir("forget");
        for mut store in [StateStore::default(), StateStore::in_dir(&dir).unwrap()] {
            let r = StateVector::Residual;
            store.forget(r).expect("forgetting nothing is fine");
            store.save(r, "run-1", vec![1.0, 2.0]).unwrap();
            store
                .save(StateVector::ScaffoldControl, "run-1", vec![3.0, 4.0])
                .unwrap();
            store.forget(r).unwrap();
            assert_eq!(store.load(r, "run-1", 2).unwrap(), vec![0.0; 2]);
            assert_eq!(
                store
                    .load(StateVector::ScaffoldControl, "run-1", 2)
                    .unwrap(),
                vec![3.0, 4.0],
                "the other vector is kept"
            );
        }
        assert!(!dir.join(RESIDUAL_FILE).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_store_round_trips_survives_a_restart_and_refuses_damage() {
        let dir = temp_dir("file");
        let mut store = StateStore::in_dir(&dir).unwrap();
        let c = StateVector::ScaffoldControl;
        assert_eq!(
            store.load(c, "run-1", 3).unwrap(),
            vec![0.0; 3],
            "no file yet"
        );
        store.save(c, "run-1", vec![0.5, -1.0, 2.0]).unwrap();
        store
            .save(StateVector::Residual, "run-1", vec![9.0; 3])
            .unwrap();
        // A restarted client (a new store on the same directory) finds it.
        let again = StateStore::in_dir(&dir).unwrap();
        assert_eq!(again.load(c, "run-1", 3).unwrap(), vec![0.5, -1.0, 2.0]);
        assert_eq!(
            again.load(StateVector::Residual, "run-1", 3).unwrap(),
            vec![9.0; 3]
        );
        assert_eq!(
            again.load(c, "run-2", 3).unwrap(),
            vec![0.0; 3],
            "other run"
        );
        assert_eq!(
            again.load(c, "run-1", 4).unwrap(),
            vec![0.0; 4],
            "other model"
        );
        assert!(!dir.join("scaffold-control.bin.tmp").exists());

        let path = dir.join(CONTROL_FILE);
        let good = fs::read(&path).unwrap();
        // A flipped bit, a truncation, garbage and an oversized file are errors.
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        for (what, bytes) in [
            ("flipped", flipped),
            ("truncated", good[..good.len() - 3].to_vec()),
            ("garbage", b"not a control variate".to_vec()),
            ("oversized", vec![0u8; 1 << 16]),
        ] {
            fs::write(&path, &bytes).unwrap();
            let err = again.load(c, "run-1", 3).unwrap_err();
            assert!(
                matches!(err, StateStoreError::Corrupt { .. }),
                "{what}: {err}"
            );
        }
        // A non-finite value with a valid checksum is refused too.
        fs::write(&path, encode("run-1", &[0.0, f32::NAN, 1.0])).unwrap();
        assert!(again.load(c, "run-1", 3).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
