//! Pre-flight checks of a config before any agent gets it: the YAML parses (errors with file,
//! line and column); a Collector config is well formed (component IDs `type[/name]`, every
//! pipeline names only components the config defines, at least one receiver and exporter);
//! and, per build, every component type the config defines is one the agents' build has.
//! Agents are judged by their components hash, so a fleet of 100,000 agents with a handful
//! of distinct builds costs a handful of set differences. Pure: the caller supplies the
//! config, the agents and the component sets it knows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use shared::domain::{AgentRecord, ConfigMap};
use shared::ids::InstanceUid;
use yaml_rust2::{Yaml, YamlLoader};

/// The component kinds a Collector config defines, as its top-level sections name them.
pub const KINDS: [&str; 5] = [
    "receivers",
    "processors",
    "exporters",
    "connectors",
    "extensions",
];

pub use crate::session::components::ComponentSet;

/// Pre-flight checks by stage (`create`, `push`: an assignment or a config rollout) and
/// outcome (`passed`, `refused`, `forced`).
pub const CHECKS: &str = "ampora_config_preflight_total";

pub fn describe_metrics() {
    metrics::describe_counter!(
        CHECKS,
        "Pre-flight checks of configs, by stage (create, push) and outcome (passed, refused, forced)"
    );
    for stage in ["create", "push"] {
        for outcome in ["passed", "refused", "forced"] {
            metrics::counter!(CHECKS, "stage" => stage, "outcome" => outcome).absolute(0);
        }
    }
}

/// Counts one check.
pub fn count(stage: &'static str, ok: bool, force: bool) {
    let outcome = match (ok, force) {
        (true, _) => "passed",
        (false, false) => "refused",
        (false, true) => "forced",
    };
    metrics::counter!(CHECKS, "stage" => stage, "outcome" => outcome).increment(1);
}

/// What is wrong with a config on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ConfigProblem {
    /// The file (`""` for a single-file config).
    pub file: String,
    /// 1-based, where the parser knows it.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

/// Agents of one build that lack components the config defines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BuildGap {
    pub components_hash: String,
    pub agents: u64,
    /// Up to five of them.
    pub sample: Vec<String>,
    /// "the `kafka` exporter", sorted.
    pub missing: Vec<String>,
}

/// The answer for a config and a set of target agents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Preflight {
    pub problems: Vec<ConfigProblem>,
    pub failing: Vec<BuildGap>,
    /// Agents whose build has every component the config defines.
    pub passing: u64,
    /// Agents whose components are unknown (not reported, or not yet received): not checked,
    /// so not counted as passing.
    pub unchecked: u64,
}

impl Preflight {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.failing.is_empty()
    }

    /// One line an operator reads: what is wrong and on how many agents.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .problems
            .iter()
            .map(|p| match (p.line, p.column) {
                (Some(l), Some(c)) => format!("{}:{l}:{c}: {}", file_label(&p.file), p.message),
                _ => format!("{}: {}", file_label(&p.file), p.message),
            })
            .collect();
        for g in &self.failing {
            let noun = if g.agents == 1 { "agent" } else { "agents" };
            parts.push(format!(
                "would fail on {} {noun}: their build lacks {}",
                g.agents,
                g.missing.join(", ")
            ));
        }
        parts.join("; ")
    }
}

fn file_label(file: &str) -> &str {
    if file.is_empty() {
        "config"
    } else {
        file
    }
}

/// Checks the config on its own; returns its problems and the components it defines
/// (kind → types).
pub fn check_config(files: &ConfigMap) -> (Vec<ConfigProblem>, ComponentSet) {
    let mut problems = Vec::new();
    let mut sections: BTreeMap<String, Vec<(String, Yaml)>> = BTreeMap::new();
    for (name, file) in files {
        if !is_yaml(name, &file.content_type) {
            continue;
        }
        let docs = match YamlLoader::load_from_str(&file.body) {
            Ok(d) => d,
            Err(e) => {
                let m = e.marker();
                problems.push(ConfigProblem {
                    file: name.clone(),
                    line: Some(m.line()),
                    column: Some(m.col() + 1),
                    message: format!("YAML does not parse: {}", e.info()),
                });
                continue;
            }
        };
        // The Collector deep-merges its files; a section split over files is one section.
        for doc in docs {
            if let Yaml::Hash(top) = doc {
                for (k, v) in top {
                    if let Some(k) = k.as_str() {
                        sections
                            .entry(k.to_owned())
                            .or_default()
                            .push((name.clone(), v));
                    }
                }
            }
        }
    }
    let mut defined = ComponentSet::new();
    let mut ids: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for kind in KINDS {
        for (file, v) in sections.get(kind).into_iter().flatten() {
            let Yaml::Hash(h) = v else { continue };
            for id in h.keys() {
                let id = yaml_key(id);
                match component_type(&id) {
                    Some(t) => {
                        defined.entry(kind.into()).or_default().insert(t.to_owned());
                        ids.entry(kind).or_default().insert(id);
                    }
                    None => problems.push(at(
                        file,
                        format!("{kind}: `{id}` is not a component ID (type[/name])"),
                    )),
                }
            }
        }
    }
    check_service(&sections, &ids, &mut problems);
    (problems, defined)
}

/// The `service` section: pipelines and extensions name only defined components.
fn check_service(
    sections: &BTreeMap<String, Vec<(String, Yaml)>>,
    ids: &HashMap<&str, BTreeSet<String>>,
    problems: &mut Vec<ConfigProblem>,
) {
    let has = |kind: &str, id: &str| ids.get(kind).is_some_and(|s| s.contains(id));
    for (file, service) in sections.get("service").into_iter().flatten() {
        for ext in list(&service["extensions"]) {
            if !has("extensions", &ext) {
                problems.push(at(
                    file,
                    format!("service.extensions: `{ext}` is not defined under extensions"),
                ));
            }
        }
        let Yaml::Hash(pipelines) = &service["pipelines"] else {
            continue;
        };
        for (pid, p) in pipelines {
            let pid = yaml_key(pid);
            if component_type(&pid).is_none() {
                problems.push(at(
                    file,
                    format!("service.pipelines: `{pid}` is not a pipeline ID"),
                ));
            }
            for (role, kinds) in [
                ("receivers", &["receivers", "connectors"][..]),
                ("processors", &["processors"][..]),
                ("exporters", &["exporters", "connectors"][..]),
            ] {
                let named = list(&p[role]);
                if named.is_empty() && role != "processors" {
                    problems.push(at(
                        file,
                        format!("pipeline `{pid}` must have at least one of its {role}"),
                    ));
                }
                for id in named {
                    if !kinds.iter().any(|k| has(k, &id)) {
                        problems.push(at(
                            file,
                            format!("pipeline `{pid}` uses {role} `{id}`, which the config does not define"),
                        ));
                    }
                }
            }
        }
    }
}

fn at(file: &str, message: String) -> ConfigProblem {
    ConfigProblem {
        file: file.to_owned(),
        line: None,
        column: None,
        message,
    }
}

fn is_yaml(name: &str, content_type: &str) -> bool {
    content_type.contains("yaml") || name.ends_with(".yaml") || name.ends_with(".yml")
}

fn yaml_key(k: &Yaml) -> String {
    match k {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Real(r) => r.clone(),
        Yaml::Boolean(b) => b.to_string(),
        _ => String::new(),
    }
}

/// The strings of a YAML list (anything else is none).
fn list(v: &Yaml) -> Vec<String> {
    v.as_vec()
        .map(|items| items.iter().map(yaml_key).collect())
        .unwrap_or_default()
}

/// The type of a component ID `type[/name]`: a letter, then up to 62 letters, digits or
/// underscores; the name, if any, non-empty.
pub fn component_type(id: &str) -> Option<&str> {
    let (t, name) = match id.split_once('/') {
        Some((t, n)) => (t, Some(n)),
        None => (id, None),
    };
    let mut chars = t.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = t.len() <= 63 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    let name_ok = name.is_none_or(|n| !n.is_empty() && !n.contains('/'));
    (first_ok && rest_ok && name_ok).then_some(t)
}

/// "the `kafka` exporter": one missing component as an operator reads it.
fn describe(kind: &str, t: &str) -> String {
    let singular = kind.strip_suffix('s').unwrap_or(kind);
    format!("the `{t}` {singular}")
}

/// The whole answer: the config's own problems, then per build of the `agents` whose
/// components are known (`sets`, by components hash) which components it lacks.
pub fn check(
    files: &ConfigMap,
    agents: &[&AgentRecord],
    sets: &HashMap<String, std::sync::Arc<ComponentSet>>,
) -> Preflight {
    let (problems, defined) = check_config(files);
    let mut out = Preflight {
        problems,
        ..Default::default()
    };
    let mut by_build: BTreeMap<&str, Vec<InstanceUid>> = BTreeMap::new();
    for a in agents {
        match a
            .components_hash
            .as_deref()
            .filter(|h| sets.contains_key(*h))
        {
            Some(h) => by_build.entry(h).or_default().push(a.instance_uid),
            None => out.unchecked += 1,
        }
    }
    for (hash, uids) in by_build {
        let has = &sets[hash];
        let missing: Vec<String> = defined
            .iter()
            .flat_map(|(kind, types)| types.iter().map(move |t| (kind, t)))
            .filter(|(kind, t)| !has.get(*kind).is_some_and(|s| s.contains(*t)))
            .map(|(kind, t)| describe(kind, t))
            .collect();
        if missing.is_empty() {
            out.passing += uids.len() as u64;
        } else {
            out.failing.push(BuildGap {
                components_hash: hash.to_owned(),
                agents: uids.len() as u64,
                sample: uids.iter().take(5).map(|u| u.to_string()).collect(),
                missing,
            });
        }
    }
    out.failing.sort_by_key(|g| std::cmp::Reverse(g.agents));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::ConfigFile;

    fn config(body: &str) -> ConfigMap {
        ConfigMap::from([(
            "".to_owned(),
            ConfigFile {
                body: body.into(),
                content_type: "text/yaml".into(),
            },
        )])
    }

    const GOOD: &str = "\
receivers:
  otlp: {}
processors:
  batch: {}
exporters:
  kafka/primary: {}
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [kafka/primary, debug]
";

    #[test]
    fn malformed_yaml_is_reported_with_its_line_and_column() {
        let (problems, _) = check_config(&config("receivers:\n  otlp: {}\nexporters: [\n"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, Some(4), "{problems:?}");
        assert!(problems[0].message.starts_with("YAML does not parse"));
    }

    #[test]
    fn pipelines_name_only_defined_components_with_well_formed_ids() {
        let (problems, defined) = check_config(&config(GOOD));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(defined["exporters"].contains("kafka"));
        let bad = GOOD
            .replace(
                "exporters: [kafka/primary, debug]",
                "exporters: [kafka/secondary]",
            )
            .replace("  debug: {}", "  9debug: {}");
        let (problems, _) = check_config(&config(&bad));
        let text: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            text.iter()
                .any(|m| m.contains("`9debug` is not a component ID")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|m| m.contains("`kafka/secondary`, which the config does not define")),
            "{text:?}"
        );
        let (problems, _) = check_config(&config("service:\n  pipelines:\n    logs: {}\n"));
        assert_eq!(problems.len(), 2, "no receiver, no exporter: {problems:?}");
    }

    #[test]
    fn agents_are_judged_by_build_and_unknown_builds_are_unchecked() {
        let full: ComponentSet = [
            ("receivers", &["otlp"][..]),
            ("processors", &["batch"]),
            ("exporters", &["kafka", "debug"]),
        ]
        .into_iter()
        .map(|(k, ts)| (k.to_owned(), ts.iter().map(|t| t.to_string()).collect()))
        .collect();
        let mut lean = full.clone();
        lean.get_mut("exporters").map(|e| e.remove("kafka"));
        let sets = HashMap::from([
            ("full".to_owned(), std::sync::Arc::new(full)),
            ("lean".to_owned(), std::sync::Arc::new(lean)),
        ]);
        let agent = |n: u8, hash: Option<&str>| {
            let mut a = AgentRecord::new(InstanceUid([n; 16]), 0);
            a.components_hash = hash.map(str::to_owned);
            a
        };
        let agents = [
            agent(1, Some("full")),
            agent(2, Some("lean")),
            agent(3, Some("lean")),
            agent(4, None),
            agent(5, Some("never-sent")),
        ];
        let refs: Vec<&AgentRecord> = agents.iter().collect();
        let p = check(&config(GOOD), &refs, &sets);
        assert_eq!((p.passing, p.unchecked), (1, 2));
        assert_eq!(p.failing.len(), 1);
        assert_eq!(p.failing[0].agents, 2);
        assert_eq!(p.failing[0].missing, ["the `kafka` exporter"]);
        assert_eq!(
            p.summary(),
            "would fail on 2 agents: their build lacks the `kafka` exporter"
        );
        assert!(!p.ok());
    }
}
