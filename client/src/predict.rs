//! `fedquic-client predict`: what an edge device does with the federation's result. Runs
//! an ONNX model (exported by `fedquic-aggregator export` or `fedquic-sim
//! --export-onnx`, or any other ONNX classifier) with tract on local data and reports
//! accuracy, or per-example predictions.

use std::path::PathBuf;

use anyhow::{Context, bail};
use fedquic_train::onnx::OnnxRunner;
use fedquic_train::{DataSpec, Dataset};

/// Arguments of `fedquic-client predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// The ONNX model ([batch, features] or [batch, C, H, W] input, one output row of
    /// class scores per example).
    #[arg(long, value_name = "model.onnx")]
    pub model: PathBuf,
    /// Local data: synthetic[:N[:SEED]], mnist:DIR, csv:FILE.
    #[arg(long)]
    pub data: String,
    /// Which part of the data to predict: test, train or all.
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Print the first N per-example predictions (index, predicted class, label, score).
    #[arg(long, default_value_t = 0)]
    pub show: usize,
    /// Examples per inference call.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Test,
    Train,
    All,
}

/// What [`predict`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Predicted class (first highest score) of every example, in order.
    pub classes: Vec<usize>,
    /// Highest score of every example.
    pub scores: Vec<f32>,
    /// Fraction of examples whose prediction equals the label.
    pub accuracy: f64,
}

/// Runs `model` (ONNX bytes) on every example of `data`, `batch` at a time.
pub fn predict(model: &[u8], data: &Dataset, batch: usize) -> anyhow::Result<Prediction> {
    if data.is_empty() {
        bail!("no examples to predict");
    }
    let batch = batch.clamp(1, 65_536).min(data.len());
    let full = OnnxRunner::from_file_shape(model, batch)?;
    if full.example_len() != data.dim {
        bail!(
            "the model takes {} values per example but the data has {} features",
            full.example_len(),
            data.dim
        );
    }
    let remainder = data.len() % batch;
    let tail = match remainder {
        0 => None,
        n => Some(OnnxRunner::from_file_shape(model, n)?),
    };
    let (mut classes, mut scores) = (
        Vec::with_capacity(data.len()),
        Vec::with_capacity(data.len()),
    );
    for chunk in data.features.chunks(batch * data.dim) {
        let runner = if chunk.len() == batch * data.dim {
            &full
        } else {
            tail.as_ref()
                .context("a partial batch without its runner")?
        };
        let (outputs, width) = runner.run(chunk)?;
        if width == 0 {
            bail!("the model outputs nothing per example");
        }
        for row in outputs.chunks(width) {
            let (best, score) =
                row.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |acc, (i, &v)| {
                            if v > acc.1 { (i, v) } else { acc }
                        },
                    );
            classes.push(best);
            scores.push(score);
        }
    }
    let correct = classes
        .iter()
        .zip(&data.labels)
        .filter(|(predicted, label)| **predicted == usize::from(**label))
        .count();
    Ok(Prediction {
        accuracy: correct as f64 / data.len() as f64,
        classes,
        scores,
    })
}

/// The `predict` subcommand: loads the model and data, prints the results.
pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let spec: DataSpec = args.data.parse()?;
    let (train, test) = spec
        .load()
        .with_context(|| format!("loading {}", args.data))?;
    let data = match args.split {
        Split::Test => test,
        Split::Train => train,
        Split::All => {
            let mut all = train;
            all.features.extend_from_slice(&test.features);
            all.labels.extend_from_slice(&test.labels);
            all
        }
    };
    let bytes = fedquic_train::onnx::read_limited(&args.model)?;
    let started = std::time::Instant::now();
    let result = predict(&bytes, &data, args.batch)?;
    let seconds = started.elapsed().as_secs_f64();
    for (index, (class, score)) in result
        .classes
        .iter()
        .zip(&result.scores)
        .enumerate()
        .take(args.show)
    {
        println!(
            "example {index}: predicted {class} (score {score:.4}), label {}",
            data.labels[index]
        );
    }
    println!(
        "{} examples, accuracy {:.2}% ({:.0} examples/s with tract)",
        data.len(),
        100.0 * result.accuracy,
        data.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedquic_train::{FitConfig, Model};

    #[test]
    fn predicts_like_the_model_that_was_exported() {
        let (train, test) = "synthetic:600/150:3"
            .parse::<DataSpec>()
            .unwrap()
            .load()
            .unwrap();
        let mut model = Model::new("mlp:784-32-10".parse().unwrap(), 1);
        let indices: Vec<usize> = (0..train.len()).collect();
        model
            .fit(&train, &indices, &FitConfig::new(2, 16, 0.05, 1))
            .unwrap();
        let expected = model.evaluate_all(&test).unwrap().accuracy;
        let bytes = fedquic_train::onnx::export_model(&model).unwrap();
        // A batch that does not divide the data exercises the partial last batch.
        let result = predict(&bytes, &test, 64).unwrap();
        assert_eq!(result.classes.len(), test.len());
        assert!(
            (result.accuracy - f64::from(expected)).abs() < 1e-6,
            "{} vs {expected}",
            result.accuracy
        );
        assert!(result.accuracy > 0.3);
        let narrow = Dataset::new(vec![0.0; 20], vec![0, 1], 10, 10).unwrap();
        assert!(
            predict(&bytes, &narrow, 8)
                .unwrap_err()
                .to_string()
                .contains("784")
        );
        assert!(predict(b"not onnx", &test, 8).is_err());
    }
}
