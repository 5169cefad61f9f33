//! Reader for the IDX files of MNIST (and anything else in that format), raw or gzipped.
//!
//! Header sizes are checked against the file (raw) or a hard cap (gzip) before any
//! buffer of the claimed size exists, so a lying header is an error, not an allocation.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;

use super::Dataset;
use crate::error::{Result, TrainError};

/// Magic number of an unsigned-byte IDX file with 3 dimensions (images).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an unsigned-byte IDX file with 1 dimension (labels).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;
/// Largest payload accepted from one IDX file (full MNIST training images are 47 MB).
pub const MAX_IDX_PAYLOAD: u64 = 1 << 30;

/// MNIST has ten digit classes.
const MNIST_CLASSES: usize = 10;

/// The contents of an IDX image file: `count` images of `rows x cols` bytes, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Loads MNIST from `dir`: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each raw or with `.gz`
/// appended. Pixels are scaled to `[0, 1]`; labels must be below 10.
pub fn load_mnist(dir: &Path) -> Result<(Dataset, Dataset)> {
    let train = load_split(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = load_split(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    if train.dim != test.dim {
        return Err(TrainError::BadFile {
            path: dir.to_path_buf(),
            reason: format!(
                "training images have {} pixels but test images have {}",
                train.dim, test.dim
            ),
        });
    }
    Ok((train, test))
}

/// One images + labels pair as a dataset.
fn load_split(dir: &Path, images_name: &str, labels_name: &str) -> Result<Dataset> {
    let images_path = find_file(dir, images_name)?;
    let labels_path = find_file(dir, labels_name)?;
    let images = read_idx_images(&images_path)?;
    let labels = read_idx_labels(&labels_path)?;
    if images.count == 0 {
        return Err(bad(&images_path, "the file holds no images"));
    }
    if images.count != labels.len() {
        return Err(bad(
            &labels_path,
            format!(
                "{} labels, but {} has {} images",
                labels.len(),
                images_path.display(),
                images.count
            ),
        ));
    }
    if let Some(index) = labels
        .iter()
        .position(|&label| usize::from(label) >= MNIST_CLASSES)
    {
        return Err(bad(
            &labels_path,
            format!(
                "label {} of example {index} is not a digit 0-9",
                labels[index]
            ),
        ));
    }
    let features = images
        .pixels
        .iter()
        .map(|&pixel| f32::from(pixel) / 255.0)
        .collect();
    Dataset::new(features, labels, images.rows * images.cols, MNIST_CLASSES)
}

/// `dir/name`, or `dir/name.gz` if only that exists.
fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok(raw);
    }
    let gzipped = dir.join(format!("{name}.gz"));
    if gzipped.is_file() {
        return Ok(gzipped);
    }
    Err(TrainError::Io {
        path: raw,
        source: io::Error::new(io::ErrorKind::NotFound, "not found (nor with .gz appended)"),
    })
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::BadFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads an IDX image file (magic 2051), raw or gzipped (detected from the content).
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let (dims, pixels) = read_idx(path, IDX_IMAGES_MAGIC, 3)?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(bad(path, format!("image size {rows}x{cols} is empty")));
    }
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels,
    })
}

/// Reads an IDX label file (magic 2049), raw or gzipped (detected from the content).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    read_idx(path, IDX_LABELS_MAGIC, 1).map(|(_, labels)| labels)
}

/// Reads the header (checking `magic`, which encodes `dimensions`) and the payload.
fn read_idx(path: &Path, magic: u32, dimensions: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let io_error = |source: io::Error| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let file_len = file.metadata().map_err(io_error)?.len();
    let mut buffered = BufReader::new(file);
    // IDX files start with two zero bytes, so the gzip magic 1f 8b is unambiguous.
    let gzipped = buffered
        .fill_buf()
        .map_err(io_error)?
        .starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> = if gzipped {
        Box::new(MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let describe = |error: io::Error, what: &str| -> TrainError {
        match error.kind() {
            io::ErrorKind::UnexpectedEof => bad(path, format!("file ends inside the {what}")),
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData if gzipped => {
                bad(path, format!("corrupt gzip data in the {what}: {error}"))
            }
            _ => io_error(error),
        }
    };

    let header_len = 4 * (1 + dimensions);
    let mut header = vec![0u8; header_len];
    reader
        .read_exact(&mut header)
        .map_err(|error| describe(error, "header"))?;
    let words: Vec<u32> = header
        .chunks_exact(4)
        .map(|word| u32::from_be_bytes([word[0], word[1], word[2], word[3]]))
        .collect();
    if words[0] != magic {
        return Err(bad(
            path,
            format!(
                "magic number {} (0x{:08x}) is not the expected {magic} (0x{magic:08x})",
                words[0], words[0]
            ),
        ));
    }
    let dims: Vec<usize> = words[1..].iter().map(|&dim| dim as usize).collect();
    let payload_len = words[1..]
        .iter()
        .try_fold(1u64, |total, &dim| total.checked_mul(u64::from(dim)))
        .filter(|&len| len <= MAX_IDX_PAYLOAD)
        .ok_or_else(|| {
            bad(
                path,
                format!("header dimensions {dims:?} exceed the {MAX_IDX_PAYLOAD}-byte limit"),
            )
        })?;

    if !gzipped {
        // The exact size is known: compare before allocating anything.
        let actual = file_len.saturating_sub(header_len as u64);
        if actual != payload_len {
            let problem = if actual < payload_len {
                "truncated"
            } else {
                "too long"
            };
            return Err(bad(
                path,
                format!(
                    "file is {problem}: header dimensions {dims:?} need {payload_len} bytes of data, found {actual}"
                ),
            ));
        }
    }
    // Read at most one byte more than claimed (to detect trailing data); the vector grows
    // with the data actually present, never to a size the header merely claims.
    let mut payload = Vec::new();
    reader
        .take(payload_len + 1)
        .read_to_end(&mut payload)
        .map_err(|error| describe(error, "data"))?;
    let actual = payload.len() as u64;
    if actual != payload_len {
        let problem = if actual < payload_len {
            format!(
                "data is truncated: header dimensions {dims:?} need {payload_len} bytes, found {actual}"
            )
        } else {
            format!(
                "data continues past the {payload_len} bytes that header dimensions {dims:?} describe"
            )
        };
        return Err(bad(path, problem));
    }
    Ok((dims, payload))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    /// Bytes of an IDX image file with the given header numbers and pixels.
    pub(crate) fn idx_images_bytes(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [IDX_IMAGES_MAGIC, count, rows, cols] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        bytes.extend_from_slice(pixels);
        bytes
    }

    pub(crate) fn idx_labels_bytes(count: u32, labels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [IDX_LABELS_MAGIC, count] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        bytes.extend_from_slice(labels);
        bytes
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Writes a tiny MNIST-layout directory: `train` and `test` images of 3x2 pixels.
    fn write_mnist(dir: &Path, gzipped: bool, train: usize, test: usize) {
        for (prefix, count, offset) in [("train", train, 0u8), ("t10k", test, 100u8)] {
            let pixels: Vec<u8> = (0..count * 6)
                .map(|i| (i as u8).wrapping_mul(37).wrapping_add(offset))
                .collect();
            let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
            let images = idx_images_bytes(count as u32, 3, 2, &pixels);
            let labels = idx_labels_bytes(count as u32, &labels);
            let (images, labels, suffix) = if gzipped {
                (gzip(&images), gzip(&labels), ".gz")
            } else {
                (images, labels, "")
            };
            std::fs::write(
                dir.join(format!("{prefix}-images-idx3-ubyte{suffix}")),
                images,
            )
            .unwrap();
            std::fs::write(
                dir.join(format!("{prefix}-labels-idx1-ubyte{suffix}")),
                labels,
            )
            .unwrap();
        }
    }

    #[test]
    fn mnist_round_trip_raw_and_gzip() {
        for gzipped in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_mnist(dir.path(), gzipped, 12, 5);
            let (train, test) = load_mnist(dir.path()).unwrap();
            assert_eq!((train.len(), train.dim, train.classes), (12, 6, 10));
            assert_eq!(test.len(), 5);
            assert_eq!(train.labels[11], 1);
            // Pixel i of the training set is (i * 37) mod 256, scaled to [0, 1].
            assert_eq!(train.features[3], f32::from(3u8 * 37) / 255.0);
            assert_eq!(train.features[7], f32::from(7u8.wrapping_mul(37)) / 255.0);
            assert_eq!(test.features[0], 100.0 / 255.0);
            assert!(train.features.iter().all(|&v| (0.0..=1.0).contains(&v)));
        }
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_mnist(dir.path(), false, 3, 3);
        std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).unwrap();
        let message = load_mnist(dir.path()).unwrap_err().to_string();
        assert!(message.contains("t10k-labels-idx1-ubyte"), "{message}");
    }

    fn write_and_read_images(bytes: &[u8]) -> Result<IdxImages> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images");
        std::fs::write(&path, bytes).unwrap();
        read_idx_images(&path)
    }

    fn expect_bad(result: Result<IdxImages>, needle: &str) {
        match result {
            Err(TrainError::BadFile { reason, .. }) => assert!(reason.contains(needle), "{reason}"),
            other => panic!("expected BadFile containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_images_are_errors() {
        let good = idx_images_bytes(2, 2, 2, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            write_and_read_images(&good).unwrap().pixels,
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        );

        // Wrong magic (a label file's).
        let mut wrong_magic = good.clone();
        wrong_magic[3] = 0x01;
        expect_bad(write_and_read_images(&wrong_magic), "magic");
        // Truncated data and truncated header, raw and gzipped.
        expect_bad(write_and_read_images(&good[..good.len() - 1]), "truncated");
        expect_bad(
            write_and_read_images(&gzip(&good[..good.len() - 1])),
            "truncated",
        );
        expect_bad(write_and_read_images(&good[..10]), "header");
        expect_bad(write_and_read_images(&gzip(&good[..10])), "header");
        expect_bad(write_and_read_images(&[]), "header");
        // Trailing bytes.
        let mut long = good.clone();
        long.push(9);
        expect_bad(write_and_read_images(&long), "too long");
        expect_bad(write_and_read_images(&gzip(&long)), "past");
        // Empty image size.
        expect_bad(
            write_and_read_images(&idx_images_bytes(2, 0, 2, &[])),
            "empty",
        );
    }

    #[test]
    fn oversized_claims_are_errors_not_allocations() {
        // 2^31 images of 28x28 claimed in a tiny file: over the cap before reading anything.
        let huge = idx_images_bytes(1 << 31, 28, 28, &[0; 100]);
        expect_bad(write_and_read_images(&huge), "limit");
        expect_bad(write_and_read_images(&gzip(&huge)), "limit");
        // A claim under the cap but far beyond the data: raw is refused by size, gzip
        // reads what is there and reports truncation.
        let big = idx_images_bytes(1_000_000, 28, 28, &[0; 100]);
        expect_bad(write_and_read_images(&big), "truncated");
        expect_bad(write_and_read_images(&gzip(&big)), "truncated");
        // All dimensions at u32::MAX overflow u64 arithmetic.
        let overflow = idx_images_bytes(u32::MAX, u32::MAX, u32::MAX, &[]);
        expect_bad(write_and_read_images(&overflow), "limit");
    }

    #[test]
    fn corrupt_gzip_stream_is_an_error() {
        let mut compressed = gzip(&idx_images_bytes(50, 4, 4, &[7; 800]));
        let middle = compressed.len() / 2;
        for byte in &mut compressed[middle..middle + 8] {
            *byte ^= 0xA5;
        }
        assert!(write_and_read_images(&compressed).is_err());
    }

    #[test]
    fn mismatched_or_invalid_labels_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write_mnist(dir.path(), false, 4, 4);
        // Three labels for four images.
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx_labels_bytes(3, &[0, 1, 2]),
        )
        .unwrap();
        let message = load_mnist(dir.path()).unwrap_err().to_string();
        assert!(message.contains("3 labels"), "{message}");
        // A label that is not a digit.
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx_labels_bytes(4, &[0, 1, 12, 3]),
        )
        .unwrap();
        let message = load_mnist(dir.path()).unwrap_err().to_string();
        assert!(message.contains("label 12"), "{message}");
        // Labels file with the images magic.
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx_images_bytes(4, 1, 1, &[0; 4]),
        )
        .unwrap();
        assert!(matches!(
            load_mnist(dir.path()),
            Err(TrainError::BadFile { .. })
        ));
    }

    #[test]
    fn train_and_test_image_sizes_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        write_mnist(dir.path(), false, 4, 4);
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx_images_bytes(4, 2, 2, &[0; 16]),
        )
        .unwrap();
        let message = load_mnist(dir.path()).unwrap_err().to_string();
        assert!(message.contains("pixels"), "{message}");
    }
}
