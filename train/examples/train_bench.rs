//! Central (non-federated) training run for checking accuracy and measuring speed.
//!
//! ```text
//! cargo run --release -p fedquic-train --example train_bench -- \
//!     [DATA_SPEC] [MODEL_SPEC] [EPOCHS] [BATCH] [LEARNING_RATE]
//! ```
//! Defaults: `synthetic mlp:784-200-200-10 5 64 0.05`.

use std::time::Instant;

use fedquic_train::{DataSpec, FitConfig, Model, ModelSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |index: usize, default: &str| {
        args.get(index)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let data: DataSpec = arg(0, "synthetic").parse()?;
    let spec: ModelSpec = arg(1, "mlp:784-200-200-10").parse()?;
    let epochs: u32 = arg(2, "5").parse()?;
    let batch_size: usize = arg(3, "64").parse()?;
    let learning_rate: f32 = arg(4, "0.05").parse()?;

    let started = Instant::now();
    let (train, test) = data.load()?;
    println!(
        "data {data}: {} train / {} test, loaded in {:.3} s",
        train.len(),
        test.len(),
        started.elapsed().as_secs_f64()
    );
    let mut model = Model::try_new(spec.clone(), 1)?;
    let indices: Vec<usize> = (0..train.len()).collect();
    for epoch in 1..=epochs {
        let config = FitConfig::new(1, batch_size, learning_rate, u64::from(epoch));
        let started = Instant::now();
        let fit = model.fit(&train, &indices, &config)?;
        let seconds = started.elapsed().as_secs_f64();
        let eval = model.evaluate_all(&test)?;
        println!(
            "{spec} epoch {epoch}: train loss {:.4} acc {:.4} | test loss {:.4} acc {:.4} | {:.0} samples/s",
            fit.loss,
            fit.accuracy,
            eval.loss,
            eval.accuracy,
            fit.examples as f64 / seconds
        );
    }
    Ok(())
}
