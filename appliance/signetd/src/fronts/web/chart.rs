//! The recovery page's chart of the last 24 hours, drawn on the server as SVG: when
//! the token and the agent were away (from the recovery timeline) and how long each
//! signed job took (from the jobs table). Pure: data in, markup out, unit-tested; the
//! page needs no script to show it.

use std::fmt::Write;

/// The chart's window.
pub const WINDOW_MS: u64 = 24 * 3_600_000;

/// One timeline entry, as far as the chart needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub time_ms: u64,
    pub event: String,
    pub duration_ms: Option<u64>,
}

/// What was away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The token (the agent said it was lost or missing).
    Token,
    /// The agent (not reachable).
    Agent,
}

/// A time something was away; `end_ms` `None` while it still is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    pub kind: Kind,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
}

/// A signed job: when it ended and how long its caller waited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub job: String,
    pub finished_ms: u64,
    pub latency_ms: u64,
}

/// Everything the chart shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    pub to_ms: u64,
    pub outages: Vec<Outage>,
    pub signed: Vec<Signed>,
}

impl Data {
    pub fn from_ms(&self) -> u64 {
        self.to_ms.saturating_sub(WINDOW_MS)
    }
}

/// Pairs each loss in `points` (oldest first) with its return: `token_lost` with
/// `token_back`, `agent_unreachable` with `agent_back`. A return whose loss is not in
/// `points` starts `duration_ms` before it; a loss without a return is still going on.
pub fn outages(points: &[Point]) -> Vec<Outage> {
    let mut out = Vec::new();
    let mut open: [Option<u64>; 2] = [None, None];
    for p in points {
        let (kind, lost) = match p.event.as_str() {
            "token_lost" => (Kind::Token, true),
            "token_back" => (Kind::Token, false),
            "agent_unreachable" => (Kind::Agent, true),
            "agent_back" => (Kind::Agent, false),
            _ => continue,
        };
        let slot = &mut open[kind as usize];
        if lost {
            slot.get_or_insert(p.time_ms);
        } else {
            let start = slot
                .take()
                .unwrap_or_else(|| p.time_ms.saturating_sub(p.duration_ms.unwrap_or(0)));
            out.push(Outage {
                kind,
                start_ms: start,
                end_ms: Some(p.time_ms),
            });
        }
    }
    for (kind, slot) in [(Kind::Token, open[0]), (Kind::Agent, open[1])] {
        if let Some(start) = slot {
            out.push(Outage {
                kind,
                start_ms: start,
                end_ms: None,
            });
        }
    }
    out.sort_by_key(|o| o.start_ms);
    out
}

/// The share of the window (0–100 %) in which nothing of `kinds` was away.
pub fn availability(data: &Data, kinds: &[Kind]) -> f64 {
    let (from, to) = (data.from_ms(), data.to_ms);
    let mut spans: Vec<(u64, u64)> = data
        .outages
        .iter()
        .filter(|o| kinds.contains(&o.kind))
        .map(|o| (o.start_ms.max(from), o.end_ms.unwrap_or(to).min(to)))
        .filter(|(s, e)| e > s)
        .collect();
    spans.sort_unstable();
    let mut down = 0;
    let mut reach = from;
    for (s, e) in spans {
        let s = s.max(reach);
        if e > s {
            down += e - s;
            reach = e;
        }
    }
    let window = (to - from).max(1);
    100.0 * (window - down.min(window)) as f64 / window as f64
}

/// A duration for people: `850 ms`, `4.2 s`, `3 min 5 s`, `2 h 10 min`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn hh_mm(ms: u64) -> String {
    super::model::time_ms(ms)
        .get(11..16)
        .unwrap_or_default()
        .to_owned()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The latency axis' top: the smallest of 1, 2, 5, 10, 20, 30 s, 1, 2, 5, 10, 30 min,
/// 1 h … at or above `max_ms`.
pub fn scale_ms(max_ms: u64) -> u64 {
    const STEPS: [u64; 11] = [
        1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000, 120_000, 300_000, 600_000, 1_800_000,
    ];
    STEPS
        .into_iter()
        .find(|s| *s >= max_ms)
        .unwrap_or_else(|| max_ms.div_ceil(3_600_000).max(1) * 3_600_000)
}

const W: f64 = 960.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 16.0;
const LANE_TOKEN: f64 = 14.0;
const LANE_AGENT: f64 = 44.0;
const LANE_H: f64 = 22.0;
const PLOT_TOP: f64 = 96.0;
const PLOT_BOTTOM: f64 = 236.0;
const H: f64 = 262.0;

/// The chart as an `<svg>` element.
pub fn svg(data: &Data) -> String {
    let (from, to) = (data.from_ms(), data.to_ms);
    let span = (to - from).max(1) as f64;
    let x = |ms: u64| LEFT + (ms.clamp(from, to) - from) as f64 / span * (W - LEFT - RIGHT);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {W} {H}" role="img" aria-labelledby="chart-title"><title id="chart-title">Token and agent availability and signing latency, {} to {} UTC</title>"#,
        hh_mm(from),
        hh_mm(to)
    );
    // Hour lines every three hours, labelled at the bottom.
    let first_hour = from.div_ceil(3_600_000) * 3_600_000;
    let mut h = first_hour;
    while h <= to {
        if (h / 3_600_000) % 3 == 0 {
            let hx = x(h);
            let _ = write!(
                s,
                r#"<line class="grid" x1="{hx:.1}" y1="{LANE_TOKEN}" x2="{hx:.1}" y2="{PLOT_BOTTOM}"/><text class="axis" x="{hx:.1}" y="{}" text-anchor="middle">{}</text>"#,
                PLOT_BOTTOM + 18.0,
                hh_mm(h)
            );
        }
        h += 3_600_000;
    }
    // The two availability lanes: up all along, outages on top.
    for (kind, y, label) in [
        (Kind::Token, LANE_TOKEN, "Token"),
        (Kind::Agent, LANE_AGENT, "Agent"),
    ] {
        let _ = write!(
            s,
            r#"<text class="label" x="{}" y="{}" text-anchor="end">{label}</text><rect class="up" x="{LEFT}" y="{y}" width="{:.1}" height="{LANE_H}"><title>{label} available</title></rect>"#,
            LEFT - 8.0,
            y + 15.0,
            W - LEFT - RIGHT
        );
        for o in data.outages.iter().filter(|o| o.kind == kind) {
            let end = o.end_ms.unwrap_or(to);
            if end < from || o.start_ms > to {
                continue;
            }
            let (x0, x1) = (x(o.start_ms), x(end));
            let what = match kind {
                Kind::Token => "Token away",
                Kind::Agent => "Agent unreachable",
            };
            let until = o.end_ms.map_or_else(
                || "still away".to_owned(),
                |e| format!("{} UTC, {}", hh_mm(e), duration(e - o.start_ms)),
            );
            let _ = write!(
                s,
                r#"<rect class="down {}" x="{x0:.1}" y="{y}" width="{:.1}" height="{LANE_H}"><title>{} from {} UTC to {}</title></rect>"#,
                match kind {
                    Kind::Token => "token",
                    Kind::Agent => "agent",
                },
                (x1 - x0).max(2.0),
                what,
                hh_mm(o.start_ms),
                esc(&until)
            );
        }
    }
    // Latency: one dot per signed job, on a scale from 0 to a round top.
    let shown: Vec<&Signed> = data
        .signed
        .iter()
        .filter(|j| j.finished_ms >= from && j.finished_ms <= to)
        .collect();
    let top = scale_ms(shown.iter().map(|j| j.latency_ms).max().unwrap_or(0));
    let y = |ms: u64| PLOT_BOTTOM - ms.min(top) as f64 / top as f64 * (PLOT_BOTTOM - PLOT_TOP);
    let _ = write!(
        s,
        r#"<text class="label" x="{}" y="{}" text-anchor="end">Latency</text>"#,
        LEFT - 8.0,
        PLOT_TOP - 14.0
    );
    for v in [0, top / 2, top] {
        let gy = y(v);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{LEFT}" y1="{gy:.1}" x2="{}" y2="{gy:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 8.0,
            gy + 4.0,
            esc(&duration(v))
        );
    }
    if shown.is_empty() {
        let _ = write!(
            s,
            r#"<text class="empty" x="{:.1}" y="{:.1}" text-anchor="middle">No job signed in these 24 hours</text>"#,
            LEFT + (W - LEFT - RIGHT) / 2.0,
            (PLOT_TOP + PLOT_BOTTOM) / 2.0
        );
    }
    for j in shown {
        let _ = write!(
            s,
            r#"<circle class="job" cx="{:.1}" cy="{:.1}" r="3.5"><title>job {}: {} at {} UTC</title></circle>"#,
            x(j.finished_ms),
            y(j.latency_ms),
            esc(&j.job),
            duration(j.latency_ms),
            hh_mm(j.finished_ms)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_430_520_000; // 2026-11-23 10:42 UTC

    fn p(time_ms: u64, event: &str, duration_ms: Option<u64>) -> Point {
        Point {
            time_ms,
            event: event.into(),
            duration_ms,
        }
    }

    #[test]
    fn losses_pair_with_their_returns_and_an_open_one_goes_on() {
        let o = outages(&[
            p(T0, "token_lost", None),
            p(T0 + 1_000, "token_lost", None),
            p(T0 + 60_000, "token_back", Some(60_000)),
            p(T0 + 70_000, "logged_in", None),
            // A return whose loss is older than the entries read.
            p(T0 + 100_000, "agent_back", Some(30_000)),
            p(T0 + 200_000, "agent_unreachable", None),
        ]);
        assert_eq!(
            o,
            vec![
                Outage {
                    kind: Kind::Token,
                    start_ms: T0,
                    end_ms: Some(T0 + 60_000)
                },
                Outage {
                    kind: Kind::Agent,
                    start_ms: T0 + 70_000,
                    end_ms: Some(T0 + 100_000)
                },
                Outage {
                    kind: Kind::Agent,
                    start_ms: T0 + 200_000,
                    end_ms: None
                },
            ]
        );
    }

    #[test]
    fn availability_counts_overlaps_once_and_clips_to_the_window() {
        let to = T0 + WINDOW_MS;
        let data = Data {
            to_ms: to,
            outages: vec![
                // An hour, half of it before the window.
                Outage {
                    kind: Kind::Token,
                    start_ms: T0 - 1_800_000,
                    end_ms: Some(T0 + 1_800_000),
                },
                // Overlapping the first by 30 min, and an agent outage inside it.
                Outage {
                    kind: Kind::Token,
                    start_ms: T0,
                    end_ms: Some(T0 + 3_600_000),
                },
                Outage {
                    kind: Kind::Agent,
                    start_ms: T0 + 600_000,
                    end_ms: Some(T0 + 1_200_000),
                },
            ],
            signed: vec![],
        };
        let token = availability(&data, &[Kind::Token]);
        assert!((token - 100.0 * 23.0 / 24.0).abs() < 1e-9, "{token}");
        let both = availability(&data, &[Kind::Token, Kind::Agent]);
        assert!((both - token).abs() < 1e-9, "inside the token's outage");
        // Still away: counted to the end of the window.
        let open = Data {
            to_ms: to,
            outages: vec![Outage {
                kind: Kind::Agent,
                start_ms: to - 6 * 3_600_000,
                end_ms: None,
            }],
            signed: vec![],
        };
        assert!((availability(&open, &[Kind::Agent]) - 75.0).abs() < 1e-9);
    }

    #[test]
    fn the_svg_places_outages_and_jobs_on_the_time_axis() {
        let to = T0 + WINDOW_MS;
        let data = Data {
            to_ms: to,
            outages: vec![Outage {
                kind: Kind::Token,
                start_ms: T0 + 12 * 3_600_000,
                end_ms: Some(T0 + 18 * 3_600_000),
            }],
            signed: vec![
                Signed {
                    job: "7".into(),
                    finished_ms: to,
                    latency_ms: 4_200,
                },
                Signed {
                    job: "<x>".into(),
                    finished_ms: T0 - 1,
                    latency_ms: 1,
                },
            ],
        };
        let svg = svg(&data);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>"));
        // Half-way through the window, a quarter of the plot's width (874 px) long.
        assert!(
            svg.contains(r#"<rect class="down token" x="507.0" y="14" width="218.5""#),
            "{svg}"
        );
        assert!(svg.contains("Token away from 22:42 UTC to 04:42 UTC, 6 h 0 min"));
        // The job at the right edge, on the 5 s scale; the one before the window is left out.
        assert!(
            svg.contains(r#"<circle class="job" cx="944.0" cy="118.4""#),
            "{svg}"
        );
        assert!(svg.contains("job 7: 4.2 s at 10:42 UTC"));
        assert!(!svg.contains("<x>") && !svg.contains("&lt;x&gt;"));
        assert!(svg.contains(">5.0 s</text>"));
        assert!(svg.contains(">12:00</text>"), "hour labels: {svg}");
        let empty = super::svg(&Data {
            to_ms: to,
            outages: vec![],
            signed: vec![],
        });
        assert!(empty.contains("No job signed in these 24 hours"));
        assert!(!empty.contains("class=\"down"));
    }

    #[test]
    fn durations_and_scales_read_well() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(4_200), "4.2 s");
        assert_eq!(duration(185_000), "3 min 5 s");
        assert_eq!(duration(7_800_000), "2 h 10 min");
        assert_eq!(scale_ms(0), 1_000);
        assert_eq!(scale_ms(4_200), 5_000);
        assert_eq!(scale_ms(45_000), 60_000);
        assert_eq!(scale_ms(5 * 3_600_000 + 1), 6 * 3_600_000);
    }
}
