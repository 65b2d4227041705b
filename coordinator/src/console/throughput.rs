//! The agent page's Own telemetry section: where the agent's group has it send its own
//! telemetry, whether it confirmed the settings, and, when it sends its own metrics to Ampora,
//! the last hour of its throughput as small server-drawn bar charts, a bar a minute (inline
//! SVG: no script, and nothing agent-written in them but numbers).

use maud::{html, Markup};
use shared::domain::AgentRecord;
use shared::own_telemetry::{Point, Rates, WINDOW_POINTS};

use crate::api::own_telemetry::telemetry_view;
use crate::service::Coordinator;

const W: f64 = 240.0;
const H: f64 = 40.0;

/// A per-second figure as the Fleet page and the charts print it.
pub(super) fn per_second(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}/s")
    } else if x >= 1.0 {
        format!("{x:.1}/s")
    } else if x > 0.0 {
        format!("{x:.2}/s")
    } else {
        "0/s".into()
    }
}

/// One series as a bar a minute over the hour ending at the last point (minutes without a
/// point stay empty). `unit` follows the latest value in the caption.
fn chart(
    id: &str,
    title: &str,
    unit: &str,
    points: &[&Point],
    value: impl Fn(&Point) -> u64,
) -> Markup {
    let Some(last) = points.last() else {
        return html! {};
    };
    let slots = WINDOW_POINTS as i64;
    let bar = W / slots as f64;
    let max = points.iter().map(|p| value(p)).max().unwrap_or(0).max(1) as f64;
    html! {
        figure.spark id=(id) {
            figcaption { (title) ": " strong { (value(last)) } " " (unit) ", at most " (max as u64) }
            svg viewBox={"0 0 " (W) " " (H)} width=(W) height=(H) role="img" aria-label=(title) {
                @for p in points {
                    @let slot = slots - 1 - (last.minute - p.minute);
                    @let h = value(p) as f64 / max * (H - 2.0);
                    @if slot >= 0 && h > 0.0 {
                        rect x=(format!("{:.1}", slot as f64 * bar)) y=(format!("{:.1}", H - h))
                            width=(format!("{:.1}", (bar - 0.5).max(0.5))) height=(format!("{h:.1}"))
                            fill="currentColor" {}
                    }
                }
            }
        }
    }
}

pub(super) fn section(c: &Coordinator, agent: &AgentRecord) -> Markup {
    let v = telemetry_view(c, agent);
    let points: Vec<&Point> = agent
        .throughput
        .as_deref()
        .map(|t| t.points.iter().collect())
        .unwrap_or_default();
    html! {
        div #own-telemetry {
            @match &v.group {
                None => p.muted { "No group of this agent has own-telemetry settings." },
                Some(g) => {
                    p {
                        "Settings of group " a href={"/ui/groups#" (g)} { (g) } ": "
                        @for (i, o) in v.offered.iter().enumerate() {
                            @if i > 0 { "; " }
                            (o.signal) " → " code { (o.endpoint) }
                            @if !o.declared { span.muted { " (not offered: the agent does not report its own " (o.signal) ")" } }
                        }
                        @if v.settings_confirmed { " · confirmed by the agent" }
                        @if let Some(e) = &v.settings_error {
                            " · " span.bad { "the agent failed to apply them: " (e) }
                        }
                    }
                }
            }
            @match v.rates {
                Some(Rates { in_per_s, out_per_s, dropped_per_s }) => {
                    p #throughput-rates {
                        "In " strong { (per_second(in_per_s)) } " · out " strong { (per_second(out_per_s)) }
                        " · dropped " strong.(if dropped_per_s > 0.0 { "bad" } else { "" }) { (per_second(dropped_per_s)) }
                    }
                }
                None if points.is_empty() => p.muted { "No own metrics received from this agent." },
                None => p.muted { "No recent own metrics: the last export is more than three minutes old." },
            }
            @if !points.is_empty() {
                p.muted { "The last hour, a bar a minute." }
                div.sparks {
                    (chart("chart-in", "Accepted by receivers", "in the last minute", &points, Point::accepted))
                    (chart("chart-out", "Sent by exporters", "in the last minute", &points, Point::sent))
                    (chart("chart-dropped", "Refused or failed", "in the last minute", &points, Point::dropped))
                    (chart("chart-queue", "Exporter queue", "items now", &points, |p| u64::from(p.queue)))
                }
            }
        }
    }
}
