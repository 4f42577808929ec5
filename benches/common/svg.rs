//! Two small hand-written SVG charts (no plotting dependency): horizontal bars with labels.

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

const COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2"];

/// Horizontal bars, one row per `(label, value, highlight)`, linear scale from 0.
pub fn bars(title: &str, unit: &str, rows: &[(String, f64, bool)]) -> String {
    let rows: Vec<&(String, f64, bool)> = rows.iter().filter(|r| r.1.is_finite()).collect();
    let (lw, bw, rh, top) = (330.0, 420.0, 24.0, 40.0);
    let h = top + rh * rows.len() as f64 + 30.0;
    let max = rows.iter().map(|r| r.1).fold(0.0f64, f64::max).max(1e-9);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        lw + bw + 80.0,
        esc(title)
    );
    for (i, (label, v, hl)) in rows.iter().enumerate() {
        let y = top + i as f64 * rh;
        let w = bw * v / max;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n<rect x=\"{lw}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\">{v:.2} {}</text>\n",
            lw - 6.0,
            y + 16.0,
            esc(label),
            y + 3.0,
            rh - 6.0,
            if *hl { COLORS[1] } else { COLORS[0] },
            lw + w + 4.0,
            y + 16.0,
            esc(unit)
        );
    }
    s += "</svg>\n";
    s
}

/// Grouped horizontal bars on a log10 axis: one row per label, one bar per series (e.g. p50/p99/max).
pub fn grouped_log(title: &str, unit: &str, series: &[&str], rows: &[(String, Vec<f64>)]) -> String {
    let (lw, bw, bar_h, top) = (330.0, 420.0, 9.0, 56.0);
    let group_h = bar_h * series.len() as f64 + 8.0;
    let h = top + group_h * rows.len() as f64 + 34.0;
    let vals: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.1.iter().copied())
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    // Decades covering the values (1 us .. 10 us when there are none).
    let (lo, hi) = if vals.is_empty() {
        (0.0, 1.0)
    } else {
        let lo = vals
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .max(1.0)
            .log10()
            .floor();
        let hi = vals.iter().copied().fold(1.0f64, f64::max).log10().ceil().max(lo + 1.0);
        (lo, hi.min(lo + 12.0))
    };
    let x = |v: f64| lw + bw * ((v.max(1.0).log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        lw + bw + 90.0,
        esc(title)
    );
    for (i, name) in series.iter().enumerate() {
        s += &format!(
            "<rect x=\"{}\" y=\"32\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"41\">{}</text>\n",
            lw + i as f64 * 80.0,
            COLORS[i % COLORS.len()],
            lw + 14.0 + i as f64 * 80.0,
            esc(name)
        );
    }
    let axis_y = top + group_h * rows.len() as f64;
    let mut d = lo;
    while d <= hi + 1e-9 {
        let xv = x(10f64.powf(d));
        s += &format!(
            "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{axis_y}\" stroke=\"#ddd\"/>\
             <text x=\"{xv:.1}\" y=\"{}\" text-anchor=\"middle\">{} {}</text>\n",
            axis_y + 14.0,
            10f64.powf(d),
            esc(unit)
        );
        d += 1.0;
    }
    for (r, (label, v)) in rows.iter().enumerate() {
        let y0 = top + r as f64 * group_h;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            lw - 6.0,
            y0 + group_h / 2.0 + 2.0,
            esc(label)
        );
        for (i, val) in v.iter().enumerate() {
            if !val.is_finite() {
                continue;
            }
            let y = y0 + i as f64 * bar_h;
            let xe = x(*val);
            s += &format!(
                "<rect x=\"{lw}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\">{val:.0}</text>\n",
                (xe - lw).max(1.0),
                bar_h - 1.0,
                COLORS[i % COLORS.len()],
                xe + 3.0,
                y + bar_h - 1.5
            );
        }
    }
    s += "</svg>\n";
    s
}
