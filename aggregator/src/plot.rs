//! PNG plots of a run: test accuracy and loss against rounds and wall time,
//! and bytes moved per round. One module so that the simulator (`--out`) and
//! `fedquic-aggregator plot` (from a daemon's `metrics.jsonl`) draw the same
//! pictures.
//!
//! Files written, each into the chosen directory:
//! - `accuracy.png`: test accuracy by round (left) and by wall seconds (right);
//! - `loss.png`: test loss, the same two panels;
//! - `bytes.png`: bytes down (server to clients) and up per round, one line each.
//!
//! Text is drawn with the DejaVu Sans font compiled into the binary, so no
//! system font library (fontconfig, freetype) is needed.

use std::io::BufRead;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use serde::Deserialize;
use thiserror::Error;

use crate::server::RoundRecord;

/// The file name the daemon writes its round records to, in its state directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const ACCURACY_PNG: &str = "accuracy.png";
pub const LOSS_PNG: &str = "loss.png";
pub const BYTES_PNG: &str = "bytes.png";

/// The font family name the plots ask for; the embedded DejaVu Sans is
/// registered under it.
const FONT: &str = "sans-serif";

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PlotError {
    #[error("no metrics file at {0}: is this the state directory of a run?")]
    Missing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no rounds: has a round completed?")]
    Empty(PathBuf),
    #[error("{path}, line {line}: not a round record: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("the embedded DejaVu font could not be registered")]
    Font,
}

/// One round, reduced to what the plots show.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RoundPoint {
    /// Required: a line without it is not a round record.
    pub round: u64,
    #[serde(default)]
    pub elapsed_seconds: f64,
    /// `None` when the round had no central evaluation: such points are skipped.
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    #[serde(default)]
    pub test_loss: Option<f64>,
    #[serde(default)]
    pub bytes_up: u64,
    #[serde(default)]
    pub bytes_down: u64,
}

impl From<&RoundRecord> for RoundPoint {
    fn from(r: &RoundRecord) -> Self {
        Self {
            round: r.outcome.round,
            elapsed_seconds: r.elapsed_seconds,
            test_accuracy: r.test_accuracy,
            test_loss: r.test_loss,
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
        }
    }
}

/// The rounds of one run, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub points: Vec<RoundPoint>,
}

impl Series {
    pub fn from_records(records: &[RoundRecord]) -> Self {
        Self {
            points: records.iter().map(RoundPoint::from).collect(),
        }
    }

    /// Parses `metrics.jsonl` text (one JSON object per line; fields other
    /// than those of [`RoundPoint`] are ignored, blank lines skipped). `path`
    /// only names the source in errors. Zero rounds is not an error here.
    pub fn parse_jsonl(reader: impl BufRead, path: &Path) -> Result<Self, PlotError> {
        let mut points = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|source| PlotError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let point = serde_json::from_str(&line).map_err(|source| PlotError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?;
            points.push(point);
        }
        Ok(Self { points })
    }

    /// Reads a metrics file; a missing file or one without rounds is an error,
    /// as there is nothing to draw.
    pub fn read_metrics(path: &Path) -> Result<Self, PlotError> {
        let file = std::fs::File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                PlotError::Missing(path.to_path_buf())
            } else {
                PlotError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let series = Self::parse_jsonl(std::io::BufReader::new(file), path)?;
        if series.points.is_empty() {
            return Err(PlotError::Empty(path.to_path_buf()));
        }
        Ok(series)
    }

    /// Wall seconds per point on one continuous clock. A daemon restarted with
    /// `--resume` counts from zero again; later points are shifted to continue
    /// from the last one before the restart (the downtime is not shown).
    fn wall_seconds(&self) -> Vec<f64> {
        let mut offset = 0.0;
        let mut previous = 0.0;
        self.points
            .iter()
            .map(|p| {
                if p.elapsed_seconds + offset < previous {
                    offset = previous;
                }
                previous = p.elapsed_seconds + offset;
                previous
            })
            .collect()
    }
}

/// What [`write_plots`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlotReport {
    pub written: Vec<PathBuf>,
    /// Plots not drawn, and why (e.g. no round had a test accuracy).
    pub skipped: Vec<String>,
}

/// Draws every plot the series allows into `dir` (created if needed). A
/// series without rounds writes nothing and says so in `skipped`.
pub fn write_plots(series: &Series, dir: &Path) -> Result<PlotReport, PlotError> {
    let mut report = PlotReport::default();
    if series.points.is_empty() {
        report
            .skipped
            .push("no rounds completed: no plots written".into());
        return Ok(report);
    }
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|source| PlotError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let wall = series.wall_seconds();

    let metric_plots: [(&str, &str, &str, PointValue, Metric); 2] = [
        (
            ACCURACY_PNG,
            "Test accuracy",
            "test accuracy",
            |p| p.test_accuracy,
            Metric::Accuracy,
        ),
        (
            LOSS_PNG,
            "Test loss",
            "test loss",
            |p| p.test_loss,
            Metric::Loss,
        ),
    ];
    for (file, title, y_desc, value, metric) in metric_plots {
        let by_round: Vec<(u64, f64)> = series
            .points
            .iter()
            .filter_map(|p| value(p).filter(|v| v.is_finite()).map(|v| (p.round, v)))
            .collect();
        if by_round.is_empty() {
            report
                .skipped
                .push(format!("{file}: no round has a {y_desc}"));
            continue;
        }
        let by_time: Vec<(f64, f64)> = wall
            .iter()
            .zip(&series.points)
            .filter_map(|(&x, p)| value(p).filter(|v| v.is_finite()).map(|v| (x, v)))
            .collect();
        let path = dir.join(file);
        draw_metric(&path, title, y_desc, metric, &by_round, &by_time).map_err(|message| {
            PlotError::Draw {
                path: path.clone(),
                message,
            }
        })?;
        report.written.push(path);
    }

    let path = dir.join(BYTES_PNG);
    draw_bytes(&path, series).map_err(|message| PlotError::Draw {
        path: path.clone(),
        message,
    })?;
    report.written.push(path);
    Ok(report)
}

/// One comparison chart of test accuracy by round, a line per labelled
/// series (a sweep's configurations, each the mean over its seeds), written
/// to `path`.
pub fn write_comparison(path: &Path, lines: &[(String, Vec<(u64, f64)>)]) -> Result<(), PlotError> {
    let drawn: Vec<&(String, Vec<(u64, f64)>)> =
        lines.iter().filter(|(_, p)| !p.is_empty()).collect();
    if drawn.is_empty() {
        return Err(PlotError::Draw {
            path: path.to_path_buf(),
            message: "no configuration has a test accuracy to compare".into(),
        });
    }
    register_font()?;
    let draw = || -> Result<(), String> {
        let root = BitMapBackend::new(path, (WIDTH, HEIGHT + 160)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let points: Vec<&(u64, f64)> = drawn.iter().flat_map(|(_, p)| p.iter()).collect();
        let palette: Vec<RGBColor> = (0..drawn.len())
            .map(|i| {
                let c = Palette99::pick(i).to_rgba();
                RGBColor(c.0, c.1, c.2)
            })
            .collect();
        let series: Vec<Line<'_, u64>> = drawn
            .iter()
            .zip(&palette)
            .map(|((label, points), color)| Line {
                label,
                color: *color,
                points,
            })
            .collect();
        draw_panel(
            &root,
            &Axes {
                title: "Test accuracy by round, per configuration (mean over seeds)",
                x_desc: "round",
                y_desc: "test accuracy",
                x: round_axis(points.iter().map(|p| p.0)),
                x_format: &whole,
                y: padded_range(points.iter().map(|p| p.1), Some((0.0, 1.0))),
                y_format: &percent,
            },
            &series,
        )?;
        root.present().map_err(|e| e.to_string())
    };
    draw().map_err(|message| PlotError::Draw {
        path: path.to_path_buf(),
        message,
    })
}

/// Registers the embedded font once per process; plotters keeps it in a
/// global table.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// Picks one plotted value out of a round.
type PointValue = fn(&RoundPoint) -> Option<f64>;
/// Formats a y-axis tick label.
type YFormat<'a> = &'a dyn Fn(&f64) -> String;

#[derive(Clone, Copy)]
enum Metric {
    Accuracy,
    Loss,
}

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 480;
const BLUE_LINE: RGBColor = RGBColor(31, 119, 180);
const ORANGE_LINE: RGBColor = RGBColor(230, 110, 10);
/// Past this many points, markers would only clutter the line.
const MAX_MARKERS: usize = 60;

struct Line<'a, X> {
    /// Empty for a panel's only line: a legend then says nothing the title does not.
    label: &'a str,
    color: RGBColor,
    points: &'a [(X, f64)],
}

struct Axes<'a, X> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x: Range<X>,
    x_format: &'a dyn Fn(&X) -> String,
    y: Range<f64>,
    y_format: YFormat<'a>,
}

fn percent(v: &f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn plain(v: &f64) -> String {
    format_number(*v)
}

fn whole(v: &u64) -> String {
    v.to_string()
}

fn draw_metric(
    path: &Path,
    title: &str,
    y_desc: &str,
    metric: Metric,
    by_round: &[(u64, f64)],
    by_time: &[(f64, f64)],
) -> Result<(), String> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    let values = by_round.iter().map(|&(_, v)| v);
    let (y, y_format): (Range<f64>, YFormat<'_>) = match metric {
        Metric::Accuracy => (padded_range(values, Some((0.0, 1.0))), &percent),
        Metric::Loss => (padded_range(values, Some((0.0, f64::INFINITY))), &plain),
    };
    draw_panel(
        &left,
        &Axes {
            title: &format!("{title} by round"),
            x_desc: "round",
            y_desc,
            x: round_axis(by_round.iter().map(|&(r, _)| r)),
            x_format: &whole,
            y: y.clone(),
            y_format,
        },
        &[Line {
            label: "",
            color: BLUE_LINE,
            points: by_round,
        }],
    )?;
    draw_panel(
        &right,
        &Axes {
            title: &format!("{title} by wall time"),
            x_desc: "seconds since start",
            y_desc,
            x: time_axis(by_time.iter().map(|&(t, _)| t)),
            x_format: &plain,
            y,
            y_format,
        },
        &[Line {
            label: "",
            color: BLUE_LINE,
            points: by_time,
        }],
    )?;
    root.present().map_err(|e| e.to_string())
}

fn draw_bytes(path: &Path, series: &Series) -> Result<(), String> {
    let down: Vec<(u64, f64)> = series
        .points
        .iter()
        .map(|p| (p.round, p.bytes_down as f64))
        .collect();
    let up: Vec<(u64, f64)> = series
        .points
        .iter()
        .map(|p| (p.round, p.bytes_up as f64))
        .collect();
    let max = down.iter().chain(&up).map(|&(_, b)| b).fold(0.0, f64::max);
    let (unit, scale) = byte_unit(max);
    let root = BitMapBackend::new(path, (WIDTH * 3 / 4, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let y_format = move |v: &f64| format_number(v / scale);
    draw_panel(
        &root,
        &Axes {
            title: "Bytes per round",
            x_desc: "round",
            y_desc: &format!("{unit} per round"),
            x: round_axis(series.points.iter().map(|p| p.round)),
            x_format: &whole,
            // Headroom at the top for the legend.
            y: 0.0..if max > 0.0 { max * 1.3 } else { scale },
            y_format: &y_format,
        },
        &[
            Line {
                label: "down (server to clients)",
                color: BLUE_LINE,
                points: &down,
            },
            Line {
                label: "up (clients to server)",
                color: ORANGE_LINE,
                points: &up,
            },
        ],
    )?;
    root.present().map_err(|e| e.to_string())
}

/// One chart: caption, labelled axes, the lines (with dots while they are
/// few enough to tell apart), and a legend when there is more than one line.
fn draw_panel<DB, X>(
    area: &DrawingArea<DB, Shift>,
    axes: &Axes<'_, X>,
    lines: &[Line<'_, X>],
) -> Result<(), String>
where
    DB: DrawingBackend,
    X: Copy + 'static,
    Range<X>: AsRangedCoord<Value = X>,
    <Range<X> as AsRangedCoord>::CoordDescType: ValueFormatter<X>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(axes.title, (FONT, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(axes.x.clone(), axes.y.clone())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(axes.x_desc)
        .y_desc(axes.y_desc)
        .x_labels(10)
        .y_labels(8)
        .x_label_style((FONT, 15))
        .y_label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(axes.x_format)
        .y_label_formatter(axes.y_format)
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    let markers = lines.iter().all(|l| l.points.len() <= MAX_MARKERS);
    for (i, line) in lines.iter().enumerate() {
        let color = line.color;
        // Earlier lines are wider, so that equal values (bytes up and down
        // with the same codec) still show both colours; a comparison of many
        // lines keeps them all thin.
        let width = match lines.len() {
            1 | 2 => 2 + 3 * (lines.len() - 1 - i) as u32,
            _ => 2,
        };
        let drawn = chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                color.stroke_width(width),
            ))
            .map_err(err)?;
        if !line.label.is_empty() {
            drawn.label(line.label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(width + 1))
            });
        }
        if markers {
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )
                .map_err(err)?;
        }
    }
    if lines.iter().filter(|l| !l.label.is_empty()).count() > 1 {
        chart
            .configure_series_labels()
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// The round axis: first to last round, a lone round with one either side
/// so that it is not squeezed onto the frame.
fn round_axis(rounds: impl Iterator<Item = u64>) -> Range<u64> {
    let (lo, hi) = rounds.fold((u64::MAX, 0), |(lo, hi), r| (lo.min(r), hi.max(r)));
    if lo > hi {
        return 0..1;
    }
    if lo == hi {
        return lo.saturating_sub(1)..hi + 1;
    }
    lo..hi
}

/// Wall time from zero (the server's start) to just past the last point.
fn time_axis(seconds: impl Iterator<Item = f64>) -> Range<f64> {
    let max = seconds.fold(0.0, f64::max);
    0.0..if max > 0.0 { max * 1.03 } else { 1.0 }
}

/// The values' range widened by 8% each side (so lines do not sit on the
/// frame), kept within `bounds`; a flat series gets a small band around it.
fn padded_range(values: impl Iterator<Item = f64>, bounds: Option<(f64, f64)>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.08
    } else {
        (hi.abs() * 0.05).max(0.01)
    };
    let (mut lo, mut hi) = (lo - pad, hi + pad);
    if let Some((min, max)) = bounds {
        lo = lo.max(min);
        hi = hi.min(max);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    lo..hi
}

/// The unit for a byte axis whose largest value is `max`, and its size.
fn byte_unit(max: f64) -> (&'static str, f64) {
    match max {
        m if m >= 1e9 => ("GB", 1e9),
        m if m >= 1e6 => ("MB", 1e6),
        m if m >= 1e3 => ("kB", 1e3),
        _ => ("bytes", 1.0),
    }
}

/// Axis labels: no trailing zeros, a few significant digits.
fn format_number(v: f64) -> String {
    let a = v.abs();
    let text = if a == 0.0 {
        return "0".into();
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

    /// The width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.len() > 1000,
            "{} is only {} bytes",
            path.display(),
            bytes.len()
        );
        assert_eq!(bytes[..8], PNG_SIGNATURE, "{} is not a PNG", path.display());
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    fn synthetic(rounds: u64) -> Series {
        Series {
            points: (1..=rounds)
                .map(|r| RoundPoint {
                    round: r,
                    elapsed_seconds: 0.8 + 1.3 * r as f64,
                    // Round 3 had no central evaluation.
                    test_accuracy: (r != 3).then(|| 0.9 - 0.6 / r as f64),
                    test_loss: (r != 3).then(|| 2.3 / r as f64),
                    bytes_up: 400_000 + 10_000 * r,
                    bytes_down: 1_600_000,
                })
                .collect(),
        }
    }

    #[test]
    fn plots_are_pngs_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plots");
        let report = write_plots(&synthetic(6), &out).unwrap();
        assert_eq!(report.skipped, Vec::<String>::new());
        let names: Vec<_> = report
            .written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, [ACCURACY_PNG, LOSS_PNG, BYTES_PNG]);
        assert_eq!(png_size(&out.join(ACCURACY_PNG)), (WIDTH, HEIGHT));
        assert_eq!(png_size(&out.join(LOSS_PNG)), (WIDTH, HEIGHT));
        assert_eq!(png_size(&out.join(BYTES_PNG)), (WIDTH * 3 / 4, HEIGHT));
    }

    #[test]
    fn a_single_round_and_many_rounds_both_draw() {
        for rounds in [1, 250] {
            let dir = tempfile::tempdir().unwrap();
            let report = write_plots(&synthetic(rounds), dir.path()).unwrap();
            assert_eq!(report.written.len(), 3, "{rounds} rounds");
        }
    }

    #[test]
    fn rounds_without_evaluation_skip_only_their_plots() {
        let mut series = synthetic(4);
        for p in &mut series.points {
            p.test_accuracy = None;
            p.test_loss = None;
        }
        let dir = tempfile::tempdir().unwrap();
        let report = write_plots(&series, dir.path()).unwrap();
        assert_eq!(report.written, [dir.path().join(BYTES_PNG)]);
        assert_eq!(report.skipped.len(), 2, "{:?}", report.skipped);
        assert!(!dir.path().join(ACCURACY_PNG).exists());
    }

    #[test]
    fn zero_rounds_write_nothing_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let report = write_plots(&Series::default(), dir.path()).unwrap();
        assert!(report.written.is_empty());
        assert_eq!(report.skipped, ["no rounds completed: no plots written"]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn metrics_lines_parse_ignoring_other_fields() {
        let text = concat!(
            r#"{"round":1,"attempts":1,"test_loss":2.1,"test_accuracy":0.31,"bytes_down":10,"bytes_up":5,"elapsed_seconds":1.5,"client_traffic":{}}"#,
            "\n\n",
            r#"{"round":2,"test_loss":null,"test_accuracy":null}"#,
            "\n",
        );
        let series = Series::parse_jsonl(text.as_bytes(), Path::new("m.jsonl")).unwrap();
        assert_eq!(
            series.points,
            [
                RoundPoint {
                    round: 1,
                    elapsed_seconds: 1.5,
                    test_accuracy: Some(0.31),
                    test_loss: Some(2.1),
                    bytes_up: 5,
                    bytes_down: 10,
                },
                RoundPoint {
                    round: 2,
                    ..RoundPoint::default()
                },
            ]
        );
    }

    #[test]
    fn bad_metrics_lines_are_errors_naming_the_line() {
        for (text, line) in [
            ("{\"round\":1}\nnot json\n", 2),
            ("{\"round\":1}\n\n{\"test_accuracy\":0.5}\n", 3),
            ("{\"round\":\"one\"}\n", 1),
        ] {
            let err = Series::parse_jsonl(text.as_bytes(), Path::new("m.jsonl")).unwrap_err();
            match &err {
                PlotError::Parse { line: l, path, .. } => {
                    assert_eq!(
                        (*l, path.as_path()),
                        (line, Path::new("m.jsonl")),
                        "{text:?}"
                    )
                }
                other => panic!("{text:?}: {other:?}"),
            }
            assert!(
                err.to_string()
                    .starts_with(&format!("m.jsonl, line {line}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_and_empty_metrics_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let err = Series::read_metrics(&path).unwrap_err();
        assert!(
            matches!(err, PlotError::Missing(ref p) if *p == path),
            "{err:?}"
        );
        std::fs::write(&path, "\n").unwrap();
        let err = Series::read_metrics(&path).unwrap_err();
        assert!(
            matches!(err, PlotError::Empty(ref p) if *p == path),
            "{err:?}"
        );
        assert!(err.to_string().contains("holds no rounds"), "{err}");
    }

    #[test]
    fn a_resumed_daemon_clock_continues() {
        let series = Series {
            points: [3.0, 6.0, 2.0, 4.0]
                .into_iter()
                .enumerate()
                .map(|(i, t)| RoundPoint {
                    round: i as u64 + 1,
                    elapsed_seconds: t,
                    ..RoundPoint::default()
                })
                .collect(),
        };
        assert_eq!(series.wall_seconds(), [3.0, 6.0, 8.0, 10.0]);
    }

    #[test]
    fn axis_helpers() {
        assert_eq!(round_axis([1, 2].into_iter()), 1..2);
        assert_eq!(round_axis([5].into_iter()), 4..6);
        assert_eq!(round_axis(std::iter::empty()), 0..1);
        assert_eq!(format_number(0.25), "0.25");
        assert_eq!(format_number(1.5), "1.5");
        assert_eq!(format_number(120.0), "120");
        assert_eq!(byte_unit(2.5e6), ("MB", 1e6));
    }
}
