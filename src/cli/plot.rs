//! A small hand-written SVG line chart (GB/s against size, size on a log axis): enough for
//! `ckptstore bench --plot`, without a plotting crate to build.

use std::fmt::Write as _;

/// One line of the chart: its legend label, whether it is a limit (drawn dashed), and its
/// `(x, y)` points in any order.
pub struct Series {
    pub label: String,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The chart as an SVG document. `x` is drawn on a log2 axis and labelled with `x_label(x)`.
pub fn line_chart(
    title: &str,
    y_title: &str,
    series: &[Series],
    x_label: impl Fn(f64) -> String,
) -> String {
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (70.0, 230.0, 40.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| *x > 0.0)
        .collect();
    let (x_min, x_max) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max);
    let y_top = nice_ceiling(y_max.max(0.1));
    let (lx_min, lx_max) = (x_min.log2(), x_max.log2());
    let px = |x: f64| {
        if lx_max > lx_min {
            left + (x.log2() - lx_min) / (lx_max - lx_min) * pw
        } else {
            left + pw / 2.0
        }
    };
    let py = |y: f64| top + ph - y / y_top * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    // Axes, grid and ticks.
    for k in 0..=5 {
        let y = y_top * k as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            py(y),
            left + pw,
            left - 6.0,
            py(y) + 4.0,
            trim(y)
        );
    }
    let mut ticks = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{1:.1}" stroke="#eee"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
            px(x),
            top + ph,
            top + ph + 18.0,
            escape(&x_label(x))
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{0:.1}" transform="rotate(-90 18 {0:.1})" text-anchor="middle">{1}</text>"#,
        top + ph / 2.0,
        escape(y_title)
    );
    // Lines, points, legend.
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts = se.points.clone();
        pts.retain(|p| p.0 > 0.0 && p.1.is_finite());
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let dash = if se.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for &(x, y) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{}: {:.2}</title></circle>"#,
                px(x),
                py(y),
                escape(&se.label),
                y
            );
        }
        let ly = top + 10.0 + 20.0 * i as f64;
        let lx = left + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            escape(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The smallest of 1, 2, 5 × 10^k at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_draws_every_series_and_point() {
        let series = vec![
            Series {
                label: "raw <write>".into(),
                dashed: true,
                points: vec![(1.0, 1.0), (4.0, 2.0)],
            },
            Series {
                label: "save".into(),
                dashed: false,
                points: vec![(4.0, 1.5), (1.0, 0.5), (2.0, 1.0)],
            },
        ];
        let svg = line_chart("t", "GB/s", &series, |x| format!("{x}"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.contains("raw &lt;write&gt;"));
        assert!(svg.contains("stroke-dasharray"));
    }

    #[test]
    fn y_axis_tops_at_a_round_number() {
        assert_eq!(nice_ceiling(3.7), 5.0);
        assert_eq!(nice_ceiling(0.42), 0.5);
        assert_eq!(nice_ceiling(1.0), 1.0);
    }
}
