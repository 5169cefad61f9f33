//! Reader for simple numeric CSV files: `label,f1,f2,...` per line.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use rand::seq::SliceRandom;

use super::Dataset;
use crate::error::{Result, TrainError};
use crate::rng::seeded;

/// Seed of the shuffle that splits a CSV file into train and test rows; fixed so that
/// every process (aggregator, clients, simulator) derives the same split.
pub const CSV_SPLIT_SEED: u64 = 0x5EED_C5F0;

/// Loads `label,f1,f2,...` rows and splits them into `(train, test)`.
///
/// - Labels are integers `0..=255`; `classes` is the largest label plus one.
/// - Features are finite numbers, used as they are; every row has the same width.
/// - Blank lines are ignored; a first line that does not parse as numbers is taken for
///   a header and skipped.
/// - The split shuffles the rows with [`CSV_SPLIT_SEED`] and puts the last 20% (at least
///   one row when there are two or more) into the test set.
pub fn load_csv(path: &Path) -> Result<(Dataset, Dataset)> {
    let file = File::open(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let table = parse_csv(path, BufReader::new(file))?;
    split(table)
}

/// Parsed rows: features row-major, one label per row.
#[derive(Debug)]
struct Table {
    features: Vec<f32>,
    labels: Vec<u8>,
    dim: usize,
}

fn parse_csv(path: &Path, reader: impl BufRead) -> Result<Table> {
    let bad = |line: usize, reason: String| TrainError::BadFile {
        path: path.to_path_buf(),
        reason: format!("line {line}: {reason}"),
    };
    let mut features = Vec::new();
    let mut labels = Vec::new();
    // Width (label included) and the line that set it, once known.
    let mut width: Option<(usize, usize)> = None;
    let mut seen_content = false;
    for (line_index, line) in reader.lines().enumerate() {
        let line_number = line_index + 1;
        let line = line.map_err(|error| match error.kind() {
            io::ErrorKind::InvalidData => bad(line_number, "not valid UTF-8 text".to_string()),
            _ => TrainError::Io {
                path: path.to_path_buf(),
                source: error,
            },
        })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let is_first_content = !seen_content;
        seen_content = true;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let row = match parse_row(&fields) {
            Ok(row) => row,
            // A header names its columns: some field is not a number at all. A
            // first row of numbers that fails (a label of 300, a NaN) is an error.
            Err(_) if is_first_content && fields.iter().any(|f| f.parse::<f64>().is_err()) => {
                continue;
            }
            Err(reason) => return Err(bad(line_number, reason)),
        };
        match width {
            None => {
                if fields.len() < 2 {
                    return Err(bad(
                        line_number,
                        "a row needs a label and at least one feature".to_string(),
                    ));
                }
                width = Some((fields.len(), line_number));
            }
            Some((expected, first_line)) if expected != fields.len() => {
                return Err(bad(
                    line_number,
                    format!(
                        "{} fields, but line {first_line} has {expected}",
                        fields.len()
                    ),
                ));
            }
            Some(_) => {}
        }
        labels.push(row.0);
        features.extend_from_slice(&row.1);
    }
    match width {
        Some((width, _)) => Ok(Table {
            features,
            labels,
            dim: width - 1,
        }),
        None => Err(TrainError::BadFile {
            path: path.to_path_buf(),
            reason: "no data rows".to_string(),
        }),
    }
}

/// Parses one row's label and features.
fn parse_row(fields: &[&str]) -> std::result::Result<(u8, Vec<f32>), String> {
    let (label_text, feature_texts) = fields
        .split_first()
        .ok_or_else(|| "empty row".to_string())?;
    let label = match label_text.parse::<u8>() {
        Ok(label) => label,
        Err(_) if label_text.parse::<i64>().is_ok() => {
            return Err(format!("label {label_text} is outside 0..=255"));
        }
        Err(_) => return Err(format!("label {label_text:?} is not a whole number")),
    };
    let features = feature_texts
        .iter()
        .enumerate()
        .map(|(column, text)| match text.parse::<f32>() {
            Ok(value) if value.is_finite() => Ok(value),
            _ => Err(format!(
                "feature {} ({text:?}) is not a finite number",
                column + 1
            )),
        })
        .collect::<std::result::Result<Vec<f32>, String>>()?;
    Ok((label, features))
}

/// Deterministic shuffle, then the last 20% (at least one row if n >= 2) become the test set.
fn split(table: Table) -> Result<(Dataset, Dataset)> {
    let rows = table.labels.len();
    let classes = table
        .labels
        .iter()
        .copied()
        .max()
        .map_or(1, |max| usize::from(max) + 1);
    let all = Dataset::new(table.features, table.labels, table.dim, classes)?;
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut seeded(CSV_SPLIT_SEED));
    let test_rows = if rows >= 2 { (rows / 5).max(1) } else { 0 };
    let (train_order, test_order) = order.split_at(rows - test_rows);
    Ok((all.subset(train_order)?, all.subset(test_order)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Table> {
        parse_csv(Path::new("test.csv"), text.as_bytes())
    }

    fn error_text(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_rows_and_skips_header_and_blank_lines() {
        let table = parse("label,a,b\n1, 0.5,2\n\n0,-1,3e2\r\n3,0,0\n").unwrap();
        assert_eq!(table.dim, 2);
        assert_eq!(table.labels, vec![1, 0, 3]);
        assert_eq!(table.features, vec![0.5, 2.0, -1.0, 300.0, 0.0, 0.0]);
    }

    #[test]
    fn errors_name_the_line() {
        assert!(error_text("1,2,3\n1,2\n").contains("line 2: 2 fields, but line 1 has 3"));
        assert!(error_text("1,2\n2,x\n").contains("line 2: feature 1"));
        assert!(error_text("1,2\n2,nan\n").contains("not a finite number"));
        assert!(error_text("1,2\n256,1\n").contains("line 2: label 256 is outside"));
        assert!(error_text("1,2\n1.5,1\n").contains("line 2: label \"1.5\""));
        assert!(error_text("x,y\n1,2\n-1,1\n").contains("line 3: label -1"));
        assert!(error_text("7\n").contains("line 1: a row needs a label"));
        assert!(error_text("a,b\n\n").contains("no data rows"));
        assert!(error_text("").contains("no data rows"));
    }

    #[test]
    fn only_the_first_line_may_be_a_header() {
        assert!(error_text("1,2\nlabel,x\n").contains("line 2"));
        // A first line of numbers is data, even when it is bad data: never
        // dropped as if it were a header.
        assert!(error_text("300,1,2\n1,2,3\n").contains("line 1: label 300"));
        assert!(error_text("1,nan,2\n1,2,3\n").contains("line 1: feature 1"));
    }

    #[test]
    fn split_is_deterministic_80_20() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.csv");
        let text: String = (0..50)
            .map(|i| format!("{},{i},{}\n", i % 4, i * 2))
            .collect();
        std::fs::write(&path, text).unwrap();
        let (train, test) = load_csv(&path).unwrap();
        assert_eq!((train.len(), test.len()), (40, 10));
        assert_eq!((train.dim, train.classes, test.classes), (2, 4, 4));
        // Every row lands in exactly one split, with its own label.
        let mut seen: Vec<u32> = train
            .features
            .chunks(2)
            .chain(test.features.chunks(2))
            .map(|row| row[0] as u32)
            .collect();
        for (row, label) in train.features.chunks(2).zip(&train.labels) {
            assert_eq!(row[0] as u8 % 4, *label);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<u32>>());
        let (train_again, test_again) = load_csv(&path).unwrap();
        assert_eq!((train, test), (train_again, test_again));
    }

    #[test]
    fn tiny_files_split_sensibly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.csv");
        std::fs::write(&path, "0,1\n1,2\n").unwrap();
        let (train, test) = load_csv(&path).unwrap();
        assert_eq!((train.len(), test.len()), (1, 1));
        std::fs::write(&path, "0,1\n").unwrap();
        let (train, test) = load_csv(&path).unwrap();
        assert_eq!((train.len(), test.len()), (1, 0));
    }

    #[test]
    fn missing_file_is_an_io_error() {
        assert!(matches!(
            load_csv(Path::new("/nonexistent/fedquic.csv")),
            Err(TrainError::Io { .. })
        ));
    }
}
