//! The PNG chart of the headline comparisons: scenario 1's time per run of
//! every contender, and scenario 2's time to first token against model size,
//! both on log scales (they span three orders of magnitude).

use std::path::Path;

use plotters::prelude::*;

use super::{fmt_ms, Headline};

const MORA: RGBColor = RGBColor(0x2a, 0x6f, 0xdb);
const BASELINE: RGBColor = RGBColor(0x9a, 0x9a, 0x9a);
const PYTHON: RGBColor = RGBColor(0xe0, 0x8a, 0x1e);
const FONT: &str = "sans-serif";

/// One bar: label, value (ms), colour.
type Bar = (String, f64, RGBColor);

/// Draws the chart into `path`; false when there is nothing to draw.
pub fn draw(h: &Headline, path: &Path) -> Result<bool, String> {
    let mut panels: Vec<(String, Vec<Bar>)> = Vec::new();
    if !h.repeat.is_empty() {
        let bars = h
            .repeat
            .iter()
            .map(|(name, ms)| {
                let colour = if name.contains("python") {
                    PYTHON
                } else if name.contains("--no-cache") {
                    BASELINE
                } else {
                    MORA
                };
                (name.clone(), *ms, colour)
            })
            .collect();
        panels.push(("Repeat the MiniLM workflow: median per run".into(), bars));
    }
    if !h.first_token.is_empty() {
        let mut bars = Vec::new();
        for (size, warm, cold) in &h.first_token {
            bars.push((format!("{size}, --no-cache"), *cold, BASELINE));
            bars.push((format!("{size}, warm daemon"), *warm, MORA));
        }
        panels.push(("Time to first token (f32 on the CPU)".into(), bars));
    }
    if panels.is_empty() {
        return Ok(false);
    }
    let err = |e: &dyn std::fmt::Display| {
        let e = e.to_string();
        let hint = if e.contains("Font") || e.contains("font") { " (text needs a system font: scripts/system-packages.sh installs one)" } else { "" };
        format!("chart {}: {e}{hint}", path.display())
    };
    let width = 640 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len()));
    for ((title, bars), area) in panels.iter().zip(&areas) {
        panel(area, title, bars).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, title: &str, bars: &[Bar]) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let lo = bars.iter().map(|b| b.1).fold(f64::INFINITY, f64::min).max(1e-3) / 2.0;
    let hi = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 4.0;
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(4)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..n)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("milliseconds (log scale)")
        .x_label_formatter(&|v| fmt_ms(*v))
        .label_style((FONT, 13))
        .draw()?;
    // The first bar at the top.
    for (i, (name, ms, colour)) in bars.iter().enumerate() {
        let y = n - 1.0 - i as f64;
        chart.draw_series(std::iter::once(Rectangle::new([(lo, y + 0.08), (*ms, y + 0.5)], colour.filled())))?;
        chart.draw_series(std::iter::once(Text::new(format!("{name}: {}", fmt_ms(*ms)), (lo * 1.05, y + 0.92), (FONT, 15))))?;
    }
    Ok(())
}
