//! Bar charts as inline SVG, drawn on the server: no script, nothing to load, printable. The
//! amounts are exact decimals everywhere else; here they become bar heights (pixels) only, and
//! each bar's exact value is in its tooltip and in the table beside the chart.

use maud::{html, Markup};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 180.0;
const LABEL_SPACE: f64 = 22.0;
/// Room above the tallest bar for its value.
const TOP_SPACE: f64 = 18.0;
const WIDEST_BAR: f64 = 48.0;
/// Up to this many bars, each shows its value above it.
const VALUES_SHOWN_UP_TO: usize = 16;

/// One bar: its label under the axis, its value, and the text shown on hover.
pub struct Bar {
    pub label: String,
    pub value: Decimal,
    pub title: String,
}

/// A bar chart of `bars` (at most a few dozen), scaled to the largest value.
pub fn bars(caption: &str, bars: &[Bar]) -> Markup {
    let largest = bars
        .iter()
        .map(|bar| bar.value)
        .max()
        .filter(|largest| *largest > Decimal::ZERO)
        .unwrap_or(Decimal::ONE);
    let slot = WIDTH / bars.len().max(1) as f64;
    let bar_width = (slot * 0.7).clamp(2.0, WIDEST_BAR);
    let plot_height = HEIGHT - LABEL_SPACE;
    // Every `n`-th label counted from the last bar (the latest, in a time series), so labels
    // never overlap.
    let label_every = (bars.len() / 12).max(1);
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(caption) {
                line x1="0" y1=(plot_height) x2=(WIDTH) y2=(plot_height) class="axis" {}
                @for (index, bar) in bars.iter().enumerate() {
                    @let share = (bar.value / largest).to_f64().unwrap_or(0.0).clamp(0.0, 1.0);
                    @let height = (share * (plot_height - TOP_SPACE)).max(if bar.value > Decimal::ZERO { 1.0 } else { 0.0 });
                    @let x = index as f64 * slot + (slot - bar_width) / 2.0;
                    rect x=(format!("{x:.1}")) y=(format!("{:.1}", plot_height - height))
                         width=(format!("{bar_width:.1}")) height=(format!("{height:.1}")) class="bar" {
                        title { (bar.title) }
                    }
                    @if bars.len() <= VALUES_SHOWN_UP_TO && bar.value > Decimal::ZERO {
                        text x=(format!("{:.1}", x + bar_width / 2.0)) y=(format!("{:.1}", plot_height - height - 5.0))
                             text-anchor="middle" class="value" { (bar.value.normalize()) }
                    }
                    @if (bars.len() - 1 - index).is_multiple_of(label_every) {
                        text x=(format!("{:.1}", x + bar_width / 2.0)) y=(format!("{:.1}", HEIGHT - 6.0))
                             text-anchor="middle" class="label" { (bar.label) }
                    }
                }
            }
            figcaption { (caption) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(label: &str, value: &str) -> Bar {
        Bar {
            label: label.to_string(),
            value: value.parse().unwrap(),
            title: format!("{label}: {value}"),
        }
    }

    fn heights(svg: &str) -> Vec<f64> {
        svg.split("<rect ")
            .skip(1)
            .map(|rect| {
                let start = rect.find("height=\"").unwrap() + 8;
                let end = rect[start..].find('"').unwrap() + start;
                rect[start..end].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn bars_are_scaled_to_the_largest_value_and_carry_the_exact_value() {
        let svg = bars("Cost", &[bar("a", "0.5"), bar("b", "2"), bar("c", "0")]).into_string();
        let heights = heights(&svg);
        assert_eq!(heights.len(), 3);
        assert!(
            (heights[1] - (HEIGHT - LABEL_SPACE - TOP_SPACE)).abs() < 0.1,
            "{heights:?}"
        );
        assert!((heights[0] * 4.0 - heights[1]).abs() < 0.5, "{heights:?}");
        assert_eq!(heights[2], 0.0);
        assert!(svg.contains("<title>b: 2</title>"));
    }

    #[test]
    fn an_empty_or_all_zero_chart_draws_no_bar_and_escapes_its_labels() {
        assert!(heights(&bars("Nothing", &[]).into_string()).is_empty());
        let svg = bars("<script>", &[bar("<b>", "0")]).into_string();
        assert_eq!(heights(&svg), [0.0]);
        assert!(!svg.contains("<script>") && !svg.contains("<b>"));
    }
}
