//! `ampora rollout`: staged rollouts of a config version or a package version (an upgrade):
//! create, list, status (once, or
//! watched until the rollout stops), history, and the operator actions (pause, resume,
//! promote, abort, rollback). The status text is a pure function of the API's status view
//! ([`render_status`]), so what a terminal shows is what the tests check.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use shared::rollout::Amount;

use super::client::{label_text, labels, s, Client};
use super::time::format_ms;
use crate::service::rollouts::plan::check_stages;

/// How often `status --watch` asks for the rollout again: the engine moves a rollout every
/// 200 ms at best, and a person reads a soak countdown in seconds.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Cells in a stage's progress bar.
const BAR_WIDTH: usize = 20;

/// Agents named in the "cannot receive" line; the rest are counted.
const NAMED_UNABLE: usize = 3;

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// Start a staged rollout of a config version, or an upgrade to a package version, to a
    /// group, labels or every agent.
    Create(Box<CreateArgs>),
    /// List rollouts, newest first.
    List,
    /// A rollout's state and each stage's progress and gate.
    Status {
        id: i64,
        /// Redraw every second until the rollout succeeds, fails, pauses, is aborted or is
        /// rolled back; the exit status is 0 only if it succeeded.
        #[arg(long)]
        watch: bool,
    },
    /// A rollout's history: stages started, gates passed or failed, operator actions.
    History { id: i64 },
    /// Hold a pending or running rollout where it is.
    Pause { id: i64 },
    /// Continue a paused rollout, or judge a failed stage again after a new soak.
    Resume { id: i64 },
    /// Start the next stage now (or finish), without waiting for the soak or the gate.
    Promote { id: i64 },
    /// Stop a rollout; agents it changed keep its version.
    Abort { id: i64 },
    /// Return every agent the rollout changed to the version it had before.
    Rollback { id: i64 },
}

/// What `rollout create` takes.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The config version to roll out (its id).
    #[arg(long, required_unless_present = "package", conflicts_with = "package")]
    pub config: Option<i64>,
    /// An upgrade: the package to bring to `--version` (`""` for the agent itself).
    #[arg(long, requires = "version")]
    pub package: Option<String>,
    /// The package version of an upgrade (imported with `ampora packages import`).
    #[arg(long, requires = "package")]
    pub version: Option<String>,
    /// Let an upgrade take agents to an older version than they run.
    #[arg(long, requires = "package")]
    pub allow_downgrade: bool,
    /// Roll the config out though it fails its pre-flight check (audited as forced).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub target: RolloutTarget,
    /// Cumulative stage sizes, counts or percentages, the last 100% (server default
    /// `1,5%,25%,100%`).
    #[arg(long, value_parser = stage_list)]
    pub stages: Option<String>,
    /// How long each stage soaks after its members answered, e.g. `0s`, `90s`, `5m`
    /// (server default 60s).
    #[arg(long, value_parser = duration)]
    pub soak: Option<String>,
    /// How long a stage's members have to answer before they count as stragglers
    /// (server default 10m).
    #[arg(long, value_parser = duration)]
    pub deadline: Option<String>,
    /// Failures each stage may have: a count or a percentage of its members (default 0).
    #[arg(long, value_parser = budget)]
    pub budget: Option<String>,
    /// What a failed gate does: `pause` (wait for an operator) or `rollback`.
    #[arg(long, value_parser = ["pause", "rollback"])]
    pub on_failure: Option<String>,
}

/// Whom a rollout targets: exactly one of a group, labels or every agent.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RolloutTarget {
    /// A group by name (see `ampora group`).
    #[arg(long)]
    pub group: Option<String>,
    /// Agents whose attributes match all `key=value` labels (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// Every agent.
    #[arg(long)]
    pub all: bool,
}

/// `--stages`: sizes the server accepts (checked by the server's own rule, before asking it).
fn stage_list(text: &str) -> Result<String, String> {
    let amounts = text
        .split(',')
        .map(str::parse::<Amount>)
        .collect::<Result<Vec<_>, _>>()?;
    check_stages(&amounts)?;
    Ok(text.to_string())
}

/// `--soak`, `--deadline`: a duration as the server reads it (`0s`, `90s`, `5m`).
fn duration(text: &str) -> Result<String, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}`: {e} (e.g. 90s, 5m)"))?;
    Ok(text.to_string())
}

fn budget(text: &str) -> Result<String, String> {
    Amount::parse_budget(text)?;
    Ok(text.to_string())
}

pub(super) async fn run(c: &Client, cmd: RolloutCmd) -> anyhow::Result<()> {
    match cmd {
        RolloutCmd::Create(args) => {
            let CreateArgs {
                config,
                package,
                version,
                allow_downgrade,
                force,
                target,
                stages,
                soak,
                deadline,
                budget,
                on_failure,
            } = *args;
            let mut body = json!({
                "config_id": config, "package": package, "version": version,
                "stages": stages, "soak": soak, "deadline": deadline,
                "budget": budget, "on_failure": on_failure,
                "allow_downgrade": allow_downgrade, "force": force,
            });
            // Clap's group guarantees exactly one of the three.
            if let Some(g) = target.group {
                body["group"] = json!(g);
            } else if target.all {
                body["all"] = json!(true);
            } else {
                body["labels"] = Value::Object(labels(&target.label)?);
            }
            let v = c.post("/api/v1/rollouts", body).await?;
            c.print(&v, |r| println!("{}", created_text(r)))
        }
        RolloutCmd::List => {
            let v = c.get("/api/v1/rollouts", &[]).await?;
            let header = [
                ("ID", 5),
                ("STATE", 12),
                ("STAGE", 5),
                ("ROLLS OUT", 12),
                ("TARGET", 24),
                ("AUTHOR", 16),
                ("REASON", 0),
            ];
            c.table(&v, header, |r| {
                [
                    r["id"].to_string(),
                    s(r, "state"),
                    stage_of(r),
                    payload_short(r),
                    target_text(r),
                    s(r, "author"),
                    s(r, "reason"),
                ]
            })
        }
        RolloutCmd::Status { id, watch: false } => {
            let v = c.get(&format!("/api/v1/rollouts/{id}"), &[]).await?;
            c.print(&v, |v| print!("{}", render_status(v, shared::now_ms())))
        }
        RolloutCmd::Status { id, watch: true } => watch(c, id).await,
        RolloutCmd::History { id } => {
            let v = c.get(&format!("/api/v1/rollouts/{id}/events"), &[]).await?;
            let header = [
                ("AT", 24),
                ("KIND", 16),
                ("STAGE", 5),
                ("ACTOR", 24),
                ("DETAIL", 0),
            ];
            c.table(&v, header, |e| {
                let detail = match &e["detail"] {
                    Value::Null => "-".to_string(),
                    d => d.to_string(),
                };
                [
                    e["at_ms"].as_i64().map_or_else(|| "-".into(), format_ms),
                    s(e, "kind"),
                    e["stage"]
                        .as_u64()
                        .map_or_else(|| "-".into(), |s| (s + 1).to_string()),
                    s(e, "actor"),
                    detail,
                ]
            })
        }
        RolloutCmd::Pause { id } => act(c, id, "pause").await,
        RolloutCmd::Resume { id } => act(c, id, "resume").await,
        RolloutCmd::Promote { id } => act(c, id, "promote").await,
        RolloutCmd::Abort { id } => act(c, id, "abort").await,
        RolloutCmd::Rollback { id } => act(c, id, "rollback").await,
    }
}

/// An operator action; a state that forbids it is the server's 409, mapped by the client.
async fn act(c: &Client, id: i64, action: &str) -> anyhow::Result<()> {
    let v = c
        .post_empty(&format!("/api/v1/rollouts/{id}/{action}"))
        .await?;
    c.print(&v, |r| println!("{}", state_text(r)))
}

/// Polls the rollout every [`WATCH_EVERY`] until it stops moving on its own: a final state,
/// or failed / paused (an operator must act). On a terminal the status is redrawn in place;
/// otherwise (a log, a pipe) one summary line is printed per change and the whole status at
/// the end; with `--json`, the status view as one JSON line per change.
async fn watch(c: &Client, id: i64) -> anyhow::Result<()> {
    let path = format!("/api/v1/rollouts/{id}");
    let tty = !c.json() && std::io::stdout().is_terminal();
    let mut last = String::new();
    let mut drawn = 0;
    loop {
        let v = c.get(&path, &[]).await?;
        let stopped = stops_watch(&v["rollout"]["state"]);
        let mut out = std::io::stdout().lock();
        if tty {
            let text = render_status(&v, shared::now_ms());
            if drawn > 0 {
                // Up over the previous drawing, then clear to the end of the screen.
                write!(out, "\x1b[{drawn}A\x1b[J")?;
            }
            write!(out, "{text}")?;
            drawn = text.lines().count();
        } else {
            let line = if c.json() {
                v.to_string()
            } else {
                summary_line(&v)
            };
            if line != last {
                writeln!(out, "{line}")?;
                last = line;
            }
            if stopped && !c.json() {
                write!(out, "{}", render_status(&v, shared::now_ms()))?;
            }
        }
        out.flush()?;
        drop(out);
        if stopped {
            return outcome(&v["rollout"]);
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// Whether `status --watch` stops at this state: final, or waiting for an operator.
fn stops_watch(state: &Value) -> bool {
    matches!(
        state.as_str(),
        Some("succeeded" | "aborted" | "rolled_back" | "failed" | "paused")
    )
}

/// The end of a watch as the exit status: success only if the rollout succeeded, so a script
/// never continues past a rollout that failed, stopped or was undone.
fn outcome(r: &Value) -> anyhow::Result<()> {
    match r["state"].as_str() {
        Some("succeeded") => Ok(()),
        Some("paused") => bail!("{}: resume, promote, abort or roll it back", state_text(r)),
        _ => bail!("{}", state_text(r)),
    }
}

/// `rollout 7 is paused (paused by api:admin)`.
fn state_text(r: &Value) -> String {
    let mut out = format!("rollout {} is {}", r["id"], s(r, "state"));
    if let Some(why) = r["reason"].as_str() {
        out.push_str(&format!(" ({why})"));
    }
    out
}

/// What a rollout rolls out, in a table cell: `config 3`, `pkg 0.2.0`.
fn payload_short(r: &Value) -> String {
    match r["package"].as_object() {
        Some(p) => format!("pkg {}", p["version"].as_str().unwrap_or_default()),
        None => format!("config {}", r["config_id"]),
    }
}

/// What a rollout rolls out, in a sentence: `config 3 (abcdef012345)`, or
/// `package "otelcol" to 0.2.0`.
fn payload_long(r: &Value) -> String {
    match r["package"].as_object() {
        Some(p) => format!(
            "package {:?} to {}",
            p["name"].as_str().unwrap_or_default(),
            p["version"].as_str().unwrap_or_default()
        ),
        None => format!(
            "config {} ({})",
            r["config_id"],
            s(r, "config_hash").chars().take(12).collect::<String>()
        ),
    }
}

/// What `rollout create` prints: the plan, and how to follow it.
fn created_text(r: &Value) -> String {
    let stages = r["stages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let sizes: Vec<String> = stages.iter().map(|st| amount_text(&st["size"])).collect();
    let planned: Vec<String> = stages.iter().map(|st| st["planned"].to_string()).collect();
    let mut out = format!(
        "rollout {id} created ({state}): {payload} to {target}, stages {sizes} \
         ({planned} agents)\nfollow it: ampora rollout status {id} --watch",
        id = r["id"],
        state = s(r, "state"),
        payload = payload_long(r),
        target = target_long(r),
        sizes = sizes.join(", "),
        planned = planned.join(" + "),
    );
    let unable = r["cannot_receive"].as_u64().unwrap_or(0);
    if unable > 0 && r["package"].is_object() {
        out.push_str(&format!(
            "\n{unable} matching agent(s) cannot upgrade (no AcceptsPackages, or no build for \
             their platform) and are left out"
        ));
    } else if unable > 0 {
        out.push_str(&format!(
            "\n{unable} matching agent(s) do not accept remote config and are left out"
        ));
    }
    out
}

/// A stage size as the record holds it (`{"count": 1}`, `{"basis": 500}`) in the form it was
/// given (`1`, `5%`).
fn amount_text(v: &Value) -> String {
    serde_json::from_value::<Amount>(v.clone()).map_or_else(|_| v.to_string(), |a| a.to_string())
}

/// `2/4`: the rollout's stage, counted from 1.
fn stage_of(r: &Value) -> String {
    let total = r["stages"].as_array().map_or(0, Vec::len);
    let at = r["stage"].as_u64().unwrap_or(0) + 1;
    format!("{at}/{total}")
}

/// The target in a table cell: the group's name, the labels, or `all`.
fn target_text(r: &Value) -> String {
    if let Some(g) = r["group"].as_str() {
        return g.to_string();
    }
    let t = &r["target"];
    if t.as_str() == Some("all") {
        "all".into()
    } else if let Some(uid) = t["agent"].as_str() {
        uid.into()
    } else {
        label_text(&t["labels"])
    }
}

/// The target in a sentence: `group canary`, `labels ring=a`, `every agent`.
fn target_long(r: &Value) -> String {
    if let Some(g) = r["group"].as_str() {
        return format!("group {g}");
    }
    let t = &r["target"];
    if t.as_str() == Some("all") {
        "every agent".into()
    } else if let Some(uid) = t["agent"].as_str() {
        format!("agent {uid}")
    } else {
        format!("labels {}", label_text(&t["labels"]))
    }
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `[#########x----------]`: applied members as `#`, failed as `x`, the rest `-`. A non-zero
/// count shows at least one cell, and the bar is full only when every member applied.
fn bar(applied: u64, failed: u64, members: u64) -> String {
    let cells = |n: u64| -> usize {
        if n == 0 || members == 0 {
            0
        } else {
            let scaled = n.saturating_mul(BAR_WIDTH as u64) / members;
            usize::try_from(scaled)
                .unwrap_or(BAR_WIDTH)
                .clamp(1, BAR_WIDTH)
        }
    };
    let ok = cells(applied);
    let bad = cells(failed).min(BAR_WIDTH - ok);
    format!(
        "[{}{}{}]",
        "#".repeat(ok),
        "x".repeat(bad),
        "-".repeat(BAR_WIDTH - ok - bad)
    )
}

/// Where a stage is: not started, applying, soaking (with the time left while the rollout
/// runs), or its gate's verdict.
fn phase(st: &Value, running: bool, now_ms: Option<i64>) -> String {
    if let Some(passed) = st["gate"]["passed"].as_bool() {
        return if passed { "gate passed" } else { "gate FAILED" }.into();
    }
    match (st["started_ms"].as_i64(), st["settled_ms"].as_i64()) {
        (None, _) => "not started".into(),
        (Some(_), None) => "applying".into(),
        (Some(_), Some(settled)) => {
            let Some(now) = now_ms.filter(|_| running) else {
                return "soaking".into();
            };
            let left_ms = settled + st["soak_ms"].as_i64().unwrap_or(0) - now;
            if left_ms > 0 {
                let secs = u64::try_from(left_ms).unwrap_or(0).div_ceil(1000);
                format!(
                    "soaking {} left",
                    humantime::format_duration(Duration::from_secs(secs))
                )
            } else {
                "judging".into()
            }
        }
    }
}

/// `12/25`: a stage's members that applied, of all.
fn applied_of(st: &Value) -> String {
    let p = &st["progress"];
    format!("{}/{}", count(&p["applied"]), count(&p["members"]))
}

/// `, 1 failed, 3 waiting` after the applied count: failed and waiting only when there are
/// some, waiting only once the stage started.
fn progress_rest(st: &Value) -> String {
    let p = &st["progress"];
    let mut out = String::new();
    if count(&p["failed"]) > 0 {
        out.push_str(&format!(", {} failed", count(&p["failed"])));
    }
    if count(&p["waiting"]) > 0 && !st["started_ms"].is_null() {
        out.push_str(&format!(", {} waiting", count(&p["waiting"])));
    }
    out
}

/// The gate's verdict under its stage: what was judged, what counted against the budget, the
/// reasons and the first failing agents with what they said.
fn gate_lines(g: &Value, out: &mut String) {
    let mut bad = Vec::new();
    for k in [
        "failed",
        "stragglers",
        "disconnected",
        "unhealthy",
        "mismatched",
    ] {
        if count(&g[k]) > 0 {
            bad.push(format!("{} {k}", count(&g[k])));
        }
    }
    let verdict = if g["passed"].as_bool() == Some(true) {
        "passed"
    } else {
        "FAILED"
    };
    let against = if bad.is_empty() {
        "none bad".to_string()
    } else {
        bad.join(", ")
    };
    out.push_str(&format!(
        "      gate {verdict}: {} judged, {} applied, {against} (budget {})\n",
        count(&g["members"]),
        count(&g["applied"]),
        count(&g["budget"]),
    ));
    for r in g["reasons"].as_array().into_iter().flatten() {
        out.push_str(&format!("        - {}\n", r.as_str().unwrap_or("?")));
    }
    for f in g["failures"].as_array().into_iter().flatten() {
        let msg = f["message"].as_str().filter(|m| !m.is_empty());
        out.push_str(&format!(
            "        ! {} {}{}\n",
            s(f, "instance_uid"),
            s(f, "reason"),
            msg.map(|m| format!(": {m}")).unwrap_or_default()
        ));
    }
}

/// The status view (`GET /api/v1/rollouts/{id}`) as text: the state and why, one line per
/// stage with a progress bar (the current one marked `>`), each judged stage's gate, and the
/// agents that cannot receive the config or cannot be judged on health or effective config.
/// `now_ms` is only for the soak countdown.
fn render_status(v: &Value, now_ms: i64) -> String {
    let r = &v["rollout"];
    let state = s(r, "state");
    let stages = v["stages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let current = usize::try_from(r["stage"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX);
    let mut out = format!(
        "rollout {} {state}: {} to {}\n",
        r["id"],
        payload_long(r),
        target_long(r),
    );
    if let Some(why) = r["reason"].as_str() {
        out.push_str(&format!("reason: {why}\n"));
    }
    let width = stages
        .iter()
        .map(|st| applied_of(st).len())
        .max()
        .unwrap_or(0);
    for (i, st) in stages.iter().enumerate() {
        let p = &st["progress"];
        let mark = if i == current { ">" } else { " " };
        out.push_str(&format!(
            "{mark} stage {}/{}  {:<6} {}  {:>width$} applied{}  {}\n",
            i + 1,
            stages.len(),
            st["size"].as_str().unwrap_or("?"),
            bar(
                count(&p["applied"]),
                count(&p["failed"]),
                count(&p["members"])
            ),
            applied_of(st),
            progress_rest(st),
            phase(st, state == "running", Some(now_ms)),
        ));
        if st["gate"].is_object() {
            gate_lines(&st["gate"], &mut out);
        }
    }
    let sample: Vec<&str> = v["cannot_receive_sample"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .take(NAMED_UNABLE)
        .collect();
    let unable = count(&v["cannot_receive"]);
    let named = if sample.is_empty() {
        String::new()
    } else {
        let more = if unable > sample.len() as u64 {
            ", …"
        } else {
            ""
        };
        format!(" ({}{more})", sample.join(", "))
    };
    out.push_str(&format!(
        "cannot receive: {unable}{named}; health unknown: {}; effective config unknown: {}\n",
        count(&v["health_unknown"]),
        count(&v["effective_unknown"]),
    ));
    out
}

/// One line for a log while watching: the state, the current stage and its progress, with
/// nothing that changes with the clock alone (so a line means something changed).
fn summary_line(v: &Value) -> String {
    let r = &v["rollout"];
    let stage = usize::try_from(r["stage"].as_u64().unwrap_or(0)).unwrap_or(0);
    let mut out = format!("rollout {} {}", r["id"], s(r, "state"));
    if let Some(st) = v["stages"].get(stage) {
        out.push_str(&format!(
            ", stage {} {}: {} applied{}, {}",
            stage_of(r),
            st["size"].as_str().unwrap_or("?"),
            applied_of(st),
            progress_rest(st),
            phase(st, false, None),
        ));
    }
    if let Some(why) = r["reason"].as_str() {
        out.push_str(&format!(" ({why})"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status view as the API sends it: rollout 7 at stage 2 of 4, its canary's gate
    /// passed, stage 2 settled 20 s ago with a 60 s soak.
    fn running(now: i64) -> Value {
        let settled = now - 20_000;
        json!({
            "rollout": {
                "id": 7, "config_id": 3, "config_hash": "abcdef0123456789", "group": "canary",
                "target": { "labels": { "ring": "a" } }, "state": "running", "stage": 1,
                "reason": null,
                "stages": [{}, {}, {}, {}],
            },
            "stages": [
                { "size": "1", "planned": 1, "started_ms": now - 90_000,
                  "settled_ms": now - 80_000, "soak_ms": 60_000,
                  "progress": { "members": 1, "applied": 1, "failed": 0, "waiting": 0 },
                  "gate": { "passed": true, "members": 1, "applied": 1, "failed": 0,
                            "stragglers": 0, "disconnected": 0, "unhealthy": 0,
                            "mismatched": 0, "budget": 0, "reasons": [], "failures": [] } },
                { "size": "5%", "planned": 25, "started_ms": now - 30_000,
                  "settled_ms": settled, "soak_ms": 60_000,
                  "progress": { "members": 25, "applied": 12, "failed": 1, "waiting": 12 },
                  "gate": null },
                { "size": "25%", "planned": 70, "started_ms": null, "settled_ms": null,
                  "soak_ms": 60_000,
                  "progress": { "members": 70, "applied": 0, "failed": 0, "waiting": 70 },
                  "gate": null },
                { "size": "100%", "planned": 304, "started_ms": null, "settled_ms": null,
                  "soak_ms": 60_000,
                  "progress": { "members": 304, "applied": 0, "failed": 0, "waiting": 304 },
                  "gate": null },
            ],
            "health_unknown": 2, "effective_unknown": 5, "cannot_receive": 4,
            "cannot_receive_sample": ["u1", "u2", "u3", "u4"],
        })
    }

    #[test]
    fn status_shows_bars_soak_and_counts() {
        let now = 1_750_000_000_000;
        let text = render_status(&running(now), now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "rollout 7 running: config 3 (abcdef012345) to group canary",
                "  stage 1/4  1      [####################]    1/1 applied  gate passed",
                "      gate passed: 1 judged, 1 applied, none bad (budget 0)",
                "> stage 2/4  5%     [#########x----------]  12/25 applied, 1 failed, 12 waiting  soaking 40s left",
                "  stage 3/4  25%    [--------------------]   0/70 applied  not started",
                "  stage 4/4  100%   [--------------------]  0/304 applied  not started",
                "cannot receive: 4 (u1, u2, u3, …); health unknown: 2; effective config unknown: 5",
            ],
            "{text}"
        );
        // Once the soak is over the gate is being judged; the log line has no countdown.
        assert!(render_status(&running(now), now + 41_000)
            .contains("12/25 applied, 1 failed, 12 waiting  judging"));
        assert_eq!(
            summary_line(&running(now)),
            "rollout 7 running, stage 2/4 5%: 12/25 applied, 1 failed, 12 waiting, soaking"
        );
    }

    #[test]
    fn status_shows_a_failed_gate_with_reasons_and_agents() {
        let now = 1_750_000_000_000;
        let mut v = running(now);
        v["rollout"]["state"] = json!("failed");
        v["rollout"]["reason"] = json!("stage 2: 3 bad, budget 1");
        v["stages"][1]["gate"] = json!({
            "passed": false, "members": 25, "applied": 22, "failed": 2, "stragglers": 1,
            "disconnected": 0, "unhealthy": 0, "mismatched": 0, "budget": 1,
            "reasons": ["2 reported FAILED", "1 did not answer by the deadline"],
            "failures": [{ "instance_uid": "u9", "reason": "failed", "message": "bad exporter" },
                         { "instance_uid": "u8", "reason": "straggler", "message": "" }],
        });
        v["cannot_receive"] = json!(0);
        v["cannot_receive_sample"] = json!([]);
        let text = render_status(&v, now);
        for want in [
            "rollout 7 failed: config 3",
            "reason: stage 2: 3 bad, budget 1",
            "> stage 2/4  5%     [#########x----------]  12/25 applied, 1 failed, 12 waiting  gate FAILED",
            "      gate FAILED: 25 judged, 22 applied, 2 failed, 1 stragglers (budget 1)",
            "        - 2 reported FAILED",
            "        - 1 did not answer by the deadline",
            "        ! u9 failed: bad exporter",
            "        ! u8 straggler\n",
            "cannot receive: 0; health unknown: 2; effective config unknown: 5",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            outcome(&v["rollout"]).is_err(),
            "a failed rollout fails the watch"
        );
    }

    #[test]
    fn bars_scale_and_fill_only_when_all_applied() {
        assert_eq!(bar(0, 0, 0), format!("[{}]", "-".repeat(BAR_WIDTH)));
        assert_eq!(bar(1, 0, 1000), format!("[#{}]", "-".repeat(BAR_WIDTH - 1)));
        assert_eq!(
            bar(999, 0, 1000),
            format!("[{}-]", "#".repeat(BAR_WIDTH - 1))
        );
        assert_eq!(
            bar(999, 1, 1000),
            format!("[{}x]", "#".repeat(BAR_WIDTH - 1))
        );
        assert_eq!(
            bar(5, 5, 10),
            format!("[{}{}]", "#".repeat(10), "x".repeat(10))
        );
    }

    #[test]
    fn watch_stops_and_exits_by_state() {
        for (state, stops, ok) in [
            ("pending", false, false),
            ("running", false, false),
            ("rolling_back", false, false),
            ("succeeded", true, true),
            ("failed", true, false),
            ("paused", true, false),
            ("aborted", true, false),
            ("rolled_back", true, false),
        ] {
            assert_eq!(stops_watch(&json!(state)), stops, "{state}");
            if stops {
                let r = json!({ "id": 7, "state": state, "reason": null });
                assert_eq!(outcome(&r).is_ok(), ok, "{state}");
            }
        }
        assert!(
            WATCH_EVERY >= Duration::from_millis(200),
            "no faster than the engine"
        );
    }
}
