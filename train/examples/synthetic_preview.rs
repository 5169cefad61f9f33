//! Writes a grid of synthetic digits as a binary PGM image (rows = classes) for eyeballing.
//!
//! ```text
//! cargo run --release -p fedquic-train --example synthetic_preview -- preview.pgm [SEED]
//! ```

use std::io::Write;

use fedquic_train::synthetic::{CLASSES, IMAGE_SIDE, generate};

/// Images shown per class.
const COLUMNS: usize = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().map_or("synthetic-preview.pgm", String::as_str);
    let seed: u64 = args.get(1).map_or(Ok(7), |text| text.parse())?;
    let data = generate(COLUMNS * CLASSES * 4, seed);
    let (width, height) = (COLUMNS * IMAGE_SIDE, CLASSES * IMAGE_SIDE);
    let mut canvas = vec![0u8; width * height];
    let mut shown = [0usize; CLASSES];
    for index in 0..data.len() {
        let class = usize::from(data.labels[index]);
        if shown[class] == COLUMNS {
            continue;
        }
        let (top, left) = (class * IMAGE_SIDE, shown[class] * IMAGE_SIDE);
        for (pixel, value) in data.example(index).iter().enumerate() {
            let (row, col) = (pixel / IMAGE_SIDE, pixel % IMAGE_SIDE);
            canvas[(top + row) * width + left + col] = (value * 255.0).round() as u8;
        }
        shown[class] += 1;
    }
    let mut file = std::fs::File::create(path)?;
    write!(file, "P5\n{width} {height}\n255\n")?;
    file.write_all(&canvas)?;
    println!("wrote {path}");
    Ok(())
}
