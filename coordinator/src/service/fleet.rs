//! The fleet as an operator browses it: one pass over the agents this coordinator can see,
//! filtered (labels, health, config state, capability, gateway, connection, an unfinished
//! upgrade, free text),
//! counted per state, and cut into keyset pages by instance uid, so a page costs the same
//! at the first agent and the 100,000th and only the page's records are copied.
//!
//! Embedded (every partition held) the pass reads memory only; a cluster coordinator reads
//! the other coordinators' agents from the store as of their last flush, as `agents()` does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use shared::domain::{AgentRecord, ConfigState};
use shared::ids::InstanceUid;
use shared::store::StoreError;

use super::Coordinator;

/// Health as the console shows it: an agent that never reported health is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    Unhealthy,
    Unknown,
}

impl HealthState {
    pub const ALL: [Self; 3] = [Self::Healthy, Self::Unhealthy, Self::Unknown];

    pub fn of(a: &AgentRecord) -> Self {
        match &a.health {
            Some(h) if h.healthy => Self::Healthy,
            Some(_) => Self::Unhealthy,
            None => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == s)
    }
}

/// Remote-config state as the console shows it: the API's [`ConfigState`], or `CannotReceive`
/// for an agent that does not declare AcceptsRemoteConfig (nothing can be pushed to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigView {
    State(ConfigState),
    CannotReceive,
}

impl ConfigView {
    pub fn all() -> impl Iterator<Item = Self> {
        ConfigState::ALL
            .into_iter()
            .map(Self::State)
            .chain([Self::CannotReceive])
    }

    pub fn of(a: &AgentRecord) -> Self {
        if a.capabilities & proto::agent_caps::ACCEPTS_REMOTE_CONFIG == 0 {
            Self::CannotReceive
        } else {
            Self::State(a.config_state())
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::State(s) => s.as_str(),
            Self::CannotReceive => "cannot_receive",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::all().find(|c| c.as_str() == s)
    }
}

/// What to show; every filter left `None` (or empty) matches everything.
#[derive(Debug, Clone, Default)]
pub struct FleetQuery {
    /// Every `key=value` must be an attribute (identifying or not), as in assignments.
    pub labels: BTreeMap<String, String>,
    pub health: Option<HealthState>,
    pub config: Option<ConfigView>,
    /// A capability bit the agent must declare.
    pub capability: Option<u64>,
    pub gateway: Option<String>,
    pub connected: Option<bool>,
    /// Whether the agent was offered a package set it is not verified on yet.
    pub upgrading: Option<bool>,
    /// Only agents for which a newer build than they run was imported (for their platform).
    pub upgrade_available: bool,
    /// The newest imported build per package name and platform: filled by
    /// [`Coordinator::fleet_page`] when `upgrade_available` asks for it.
    pub newest_builds: Arc<NewestBuilds>,
    /// Only agents dropping data now (their own metrics say items were refused or failed
    /// in their last export interval).
    pub drops: bool,
    /// The time `drops` is judged at: set by [`FleetQuery::prepared`].
    pub now_ms: i64,
    /// Case-insensitive substring of the service name or the instance uid.
    pub text: Option<String>,
    /// Keyset: agents with a greater uid only.
    pub after: Option<InstanceUid>,
    pub limit: usize,
}

impl FleetQuery {
    /// Whether `a` passes every filter. Called for every agent on every page view, so it
    /// allocates nothing: labels compare in place, the text is lowercased once per query
    /// ([`FleetQuery::prepared`]).
    pub fn matches(&self, a: &AgentRecord) -> bool {
        self.connected.is_none_or(|c| a.connected == c)
            && self.health.is_none_or(|h| HealthState::of(a) == h)
            && self.config.is_none_or(|c| ConfigView::of(a) == c)
            && self.capability.is_none_or(|bit| a.capabilities & bit != 0)
            && self.upgrading.is_none_or(|u| upgrading(a) == u)
            && (!self.upgrade_available || self.newest_builds.newer_for(a))
            && (!self.drops || a.throughput.as_ref().is_some_and(|t| t.drops(self.now_ms)))
            && self
                .gateway
                .as_deref()
                .is_none_or(|g| a.gateway.as_deref() == Some(g))
            && self.labels.iter().all(|(k, v)| attribute_is(a, k, v))
            && self.text.as_deref().is_none_or(|t| text_matches(a, t))
    }

    /// The query with its text lowercased, ready for [`FleetQuery::matches`].
    pub fn prepared(&self) -> Self {
        Self {
            text: self.text.as_ref().map(|t| t.to_lowercase()),
            now_ms: shared::now_ms(),
            ..self.clone()
        }
    }
}

/// The newest imported version of each package, per platform, and whether it is the
/// agent's own build (its version is then also the agent's `service.version`).
#[derive(Debug, Default)]
pub struct NewestBuilds(HashMap<(String, String), (String, bool)>);

impl NewestBuilds {
    pub fn of(artifacts: &[shared::packages::Artifact]) -> Self {
        let mut newest: HashMap<(String, String), (String, bool)> = HashMap::new();
        for a in artifacts {
            let key = (a.name.clone(), a.platform.clone());
            let top = a.kind == shared::packages::PackageKind::TopLevel;
            match newest.get(&key) {
                Some((v, _)) if !shared::packages::is_downgrade(&a.version, v) => {}
                _ => {
                    newest.insert(key, (a.version.clone(), top));
                }
            }
        }
        Self(newest)
    }

    /// Whether a build newer than the one `a` runs was imported for its platform: against
    /// the version it reports installed, or, for its own build, its `service.version`.
    fn newer_for(&self, a: &AgentRecord) -> bool {
        let Some(platform) = shared::packages::platform_of(a) else {
            return false;
        };
        self.0
            .iter()
            .filter(|((_, p), _)| *p == platform)
            .any(|((name, _), (newest, top))| {
                let kind = if *top {
                    shared::packages::PackageKind::TopLevel
                } else {
                    shared::packages::PackageKind::Addon
                };
                let installed = shared::package_profile::report_of(a, name, kind)
                    .filter(|r| r.status == shared::packages::InstallStatus::Installed)
                    .map(|r| r.has_version.clone());
                let runs = installed.or_else(|| {
                    top.then(|| a.description.get_str("service.version"))
                        .flatten()
                });
                runs.is_some_and(|v| shared::packages::is_downgrade(newest, &v))
            })
    }
}

/// Whether `a` was offered a package set it is not verified on yet.
fn upgrading(a: &AgentRecord) -> bool {
    a.packages
        .as_deref()
        .is_some_and(shared::packages::AgentPackages::upgrade_unfinished)
}

/// Whether attribute `key` (identifying, else non-identifying) is `value`, as
/// [`shared::domain::Description::matches`] decides, without copying the attribute.
fn attribute_is(a: &AgentRecord, key: &str, value: &str) -> bool {
    let d = &a.description;
    match d
        .identifying
        .get(key)
        .or_else(|| d.non_identifying.get(key))
    {
        Some(serde_json::Value::String(s)) => s == value,
        // Rare (attributes are strings): a number or boolean compared as its JSON text.
        Some(other) => {
            let text = other.to_string();
            text == value
        }
        None => false,
    }
}

/// `lower` (already lowercase) in the service name, ignoring ASCII case, or in the uid.
fn text_matches(a: &AgentRecord, lower: &str) -> bool {
    let name = match a.description.identifying.get("service.name") {
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        _ => match a.description.non_identifying.get("service.name") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            _ => None,
        },
    };
    // Only a query that could be part of a uid (hex digits and dashes) is looked for there.
    let uid_like = lower.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    name.is_some_and(|n| contains_ignoring_ascii_case(n, lower))
        || (uid_like && a.instance_uid.to_string().contains(lower))
}

fn contains_ignoring_ascii_case(haystack: &str, lower: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), lower.as_bytes());
    n.is_empty()
        || h.windows(n.len())
            .any(|w| w.iter().zip(n).all(|(a, b)| a.to_ascii_lowercase() == *b))
}

/// How many of the matching agents are in each state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetCounts {
    pub matched: usize,
    pub connected: usize,
    health: [usize; 3],
    config: [usize; 6],
}

impl FleetCounts {
    fn add(&mut self, a: &AgentRecord) {
        self.matched += 1;
        self.connected += usize::from(a.connected);
        self.health[HealthState::ALL
            .iter()
            .position(|h| *h == HealthState::of(a))
            .unwrap_or(0)] += 1;
        let config = ConfigView::of(a);
        if let Some(i) = ConfigView::all().position(|c| c == config) {
            self.config[i] += 1;
        }
    }

    pub fn health(&self, h: HealthState) -> usize {
        HealthState::ALL
            .iter()
            .position(|x| *x == h)
            .map_or(0, |i| self.health[i])
    }

    pub fn config(&self, c: ConfigView) -> usize {
        ConfigView::all()
            .position(|x| x == c)
            .map_or(0, |i| self.config[i])
    }
}

#[derive(Debug, Clone)]
pub struct FleetPage {
    pub counts: FleetCounts,
    /// The page: matching agents after `query.after`, by uid, at most `query.limit`.
    pub rows: Vec<AgentRecord>,
    /// Where the next page starts, when there is one.
    pub next: Option<InstanceUid>,
}

/// Collects one page while counting: keeps the `limit + 1` smallest uids past `after`.
struct Pager<'q> {
    query: &'q FleetQuery,
    counts: FleetCounts,
    page: Vec<AgentRecord>,
    /// The largest uid kept, once the page is full: only a smaller one gets in.
    largest: Option<InstanceUid>,
}

impl<'q> Pager<'q> {
    fn new(query: &'q FleetQuery) -> Self {
        Self {
            query,
            counts: FleetCounts::default(),
            page: Vec::with_capacity(query.limit + 1),
            largest: None,
        }
    }

    fn offer(&mut self, a: &AgentRecord) {
        if !self.query.matches(a) {
            return;
        }
        self.counts.add(a);
        self.keep(a);
    }

    /// The page part of [`Pager::offer`], for an agent already matched and counted.
    fn keep(&mut self, a: &AgentRecord) {
        if self
            .query
            .after
            .is_some_and(|after| a.instance_uid <= after)
        {
            return;
        }
        if self.page.len() <= self.query.limit {
            self.page.push(a.clone());
            if self.page.len() > self.query.limit {
                self.largest = self.page.iter().map(|r| r.instance_uid).max();
            }
            return;
        }
        let Some(largest) = self.largest else { return };
        if a.instance_uid >= largest {
            return;
        }
        // Rare (a random order replaces about limit × ln(n / limit) times): find it again.
        if let Some(i) = self.page.iter().position(|r| r.instance_uid == largest) {
            self.page[i] = a.clone();
        }
        self.largest = self.page.iter().map(|r| r.instance_uid).max();
    }

    /// Takes in what another pager over other agents found.
    fn absorb(&mut self, counts: FleetCounts, page: Vec<AgentRecord>) {
        self.counts.matched += counts.matched;
        self.counts.connected += counts.connected;
        for (mine, theirs) in self.counts.health.iter_mut().zip(counts.health) {
            *mine += theirs;
        }
        for (mine, theirs) in self.counts.config.iter_mut().zip(counts.config) {
            *mine += theirs;
        }
        for a in &page {
            self.keep(a);
        }
    }

    fn finish(mut self) -> FleetPage {
        self.page.sort_by_key(|r| r.instance_uid);
        let next = (self.page.len() > self.query.limit).then(|| {
            self.page.truncate(self.query.limit);
            self.page.last().map(|r| r.instance_uid)
        });
        FleetPage {
            counts: self.counts,
            rows: self.page,
            next: next.flatten(),
        }
    }
}

impl Coordinator {
    /// One page of the fleet and the counts of everything that matches `query`.
    pub async fn fleet_page(&self, query: &FleetQuery) -> Result<FleetPage, StoreError> {
        let mut query = query.prepared();
        if query.upgrade_available {
            query.newest_builds = Arc::new(self.newest_builds());
        }
        let query = Arc::new(query);
        let everything_here = self.holds_all();
        // The pass is split over the machine's cores, so a view of a large fleet takes a
        // fraction of one pass; each part keeps its own page and counts, merged after.
        let mut slots = self.all_slots();
        let per_part = slots.len().div_ceil(scan_parts()).max(1);
        let mut parts = Vec::new();
        while !slots.is_empty() {
            let rest = slots.split_off(slots.len().saturating_sub(per_part));
            let query = query.clone();
            parts.push(tokio::spawn(async move {
                let mut pager = Pager::new(&query);
                let mut seen = HashSet::new();
                for slot in rest {
                    let entry = slot.lock().await;
                    if !everything_here {
                        seen.insert(entry.state.record.instance_uid);
                    }
                    pager.offer(&entry.state.record);
                }
                (pager.counts, pager.page, seen)
            }));
        }
        let mut pager = Pager::new(&query);
        let mut seen = HashSet::new();
        for part in parts {
            let (counts, page, part_seen) = part
                .await
                .map_err(|e| StoreError::NotApplied(format!("fleet scan: {e}")))?;
            pager.absorb(counts, page);
            seen.extend(part_seen);
        }
        if !everything_here {
            for a in self.store.load_agents().await? {
                if !seen.contains(&a.instance_uid) {
                    pager.offer(&a);
                }
            }
        }
        Ok(pager.finish())
    }
}

/// Parts a fleet view is scanned in: the machine's cores (at most 8).
fn scan_parts() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::Health;

    fn agent(n: u8, name: &str) -> AgentRecord {
        let mut a = AgentRecord::new(InstanceUid([n; 16]), 0);
        a.description
            .identifying
            .insert("service.name".into(), name.into());
        a
    }

    fn page(agents: &[AgentRecord], q: &FleetQuery) -> FleetPage {
        let mut p = Pager::new(q);
        for a in agents.iter().rev() {
            p.offer(a);
        }
        p.finish()
    }

    #[test]
    fn agents_with_an_unfinished_upgrade_are_a_filter() {
        use shared::packages::AgentPackages;
        let with = |n: u8, offered: Option<&str>, verified: Option<&str>| {
            let mut a = agent(n, "otelcol");
            a.packages = Some(Box::new(AgentPackages {
                offered_hash: offered.map(Into::into),
                verified_hash: verified.map(Into::into),
                ..AgentPackages::default()
            }));
            a
        };
        let agents = [
            agent(1, "never offered"),
            with(2, Some("aa"), None),
            with(3, Some("aa"), Some("aa")),
            with(4, Some("bb"), Some("aa")),
        ];
        let uids = |upgrading| {
            let q = FleetQuery {
                upgrading,
                limit: 10,
                ..FleetQuery::default()
            };
            page(&agents, &q)
                .rows
                .iter()
                .map(|r| r.instance_uid.0[0])
                .collect::<Vec<_>>()
        };
        assert_eq!(uids(Some(true)), [2, 4], "offered a set not verified on");
        assert_eq!(uids(Some(false)), [1, 3]);
        assert_eq!(uids(None), [1, 2, 3, 4]);
    }

    #[test]
    fn agents_running_an_older_build_than_imported_are_a_filter() {
        use shared::packages::{Artifact, PackageKind};
        let build = |name: &str, version: &str, platform: &str, kind| Artifact {
            name: name.into(),
            version: version.into(),
            platform: platform.into(),
            kind,
            sha256: "ab".repeat(32),
            size: 1,
            signature: None,
            signer: None,
            url: None,
            author: String::new(),
            created_ms: 0,
        };
        let newest = Arc::new(NewestBuilds::of(&[
            build("", "0.2.0", "linux/amd64", PackageKind::TopLevel),
            build("", "0.1.0", "linux/amd64", PackageKind::TopLevel),
            build("", "0.9.0", "linux/arm64", PackageKind::TopLevel),
        ]));
        let on = |n: u8, version: &str, arch: &str| {
            let mut a = agent(n, "otelcol");
            a.description
                .identifying
                .insert("service.version".into(), version.into());
            a.description
                .non_identifying
                .insert("os.type".into(), "linux".into());
            a.description
                .non_identifying
                .insert("host.arch".into(), arch.into());
            a
        };
        let agents = [
            on(1, "0.1.0", "amd64"),
            on(2, "0.2.0", "x86_64"),
            on(3, "0.3.0", "amd64"),
            on(4, "0.2.0", "riscv64"),
            agent(5, "no platform"),
        ];
        let q = FleetQuery {
            upgrade_available: true,
            newest_builds: newest,
            limit: 10,
            ..FleetQuery::default()
        };
        let got: Vec<u8> = page(&agents, &q)
            .rows
            .iter()
            .map(|r| r.instance_uid.0[0])
            .collect();
        assert_eq!(
            got,
            [1],
            "only the agent below the newest build of its platform"
        );
    }

    #[test]
    fn pages_follow_the_uid_order_and_end() {
        let agents: Vec<_> = (1..=7).map(|n| agent(n, "otelcol")).collect();
        let mut q = FleetQuery {
            limit: 3,
            ..FleetQuery::default()
        };
        let mut seen = Vec::new();
        loop {
            let p = page(&agents, &q);
            assert_eq!(p.counts.matched, 7);
            seen.extend(p.rows.iter().map(|r| r.instance_uid.0[0]));
            match p.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn pages_of_a_shuffled_fleet_are_its_sorted_uids() {
        let mut agents: Vec<_> = (0..1000)
            .map(|_| {
                let mut a = agent(0, "x");
                a.instance_uid = InstanceUid::new_v7();
                a
            })
            .collect();
        let mut want: Vec<_> = agents.iter().map(|a| a.instance_uid).collect();
        want.sort();
        // A fixed shuffle (a stride coprime with the length), so a failure repeats.
        agents = (0..1000)
            .map(|i| agents[(i * 617) % 1000].clone())
            .collect();
        let mut q = FleetQuery {
            limit: 7,
            ..FleetQuery::default()
        };
        let mut got = Vec::new();
        loop {
            let mut p = Pager::new(&q);
            for a in &agents {
                p.offer(a);
            }
            let p = p.finish();
            got.extend(p.rows.iter().map(|r| r.instance_uid));
            match p.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn pages_and_counts_merged_from_parts_equal_one_pass() {
        let agents: Vec<_> = (0..300u32)
            .map(|i| {
                let mut a = agent(0, "x");
                a.instance_uid = InstanceUid::new_v7();
                a.connected = i.is_multiple_of(3);
                a
            })
            .collect();
        let q = FleetQuery {
            limit: 11,
            ..FleetQuery::default()
        };
        let mut whole = Pager::new(&q);
        for a in agents.iter().rev() {
            whole.offer(a);
        }
        let whole = whole.finish();
        let mut merged = Pager::new(&q);
        for part in agents.chunks(70) {
            let mut p = Pager::new(&q);
            for a in part {
                p.offer(a);
            }
            merged.absorb(p.counts, p.page);
        }
        let merged = merged.finish();
        assert_eq!(merged.counts, whole.counts);
        let uids = |p: &FleetPage| p.rows.iter().map(|r| r.instance_uid).collect::<Vec<_>>();
        assert_eq!(uids(&merged), uids(&whole));
        assert_eq!(merged.next, whole.next);
    }

    #[test]
    fn filters_and_counts() {
        let mut a = agent(1, "Gateway-Collector");
        a.connected = true;
        a.capabilities = proto::agent_caps::ACCEPTS_REMOTE_CONFIG;
        a.health = Some(Health {
            healthy: false,
            ..Health::default()
        });
        let b = agent(2, "edge");
        let agents = [a, b];
        let all = page(
            &agents,
            &FleetQuery {
                limit: 10,
                ..FleetQuery::default()
            },
        );
        assert_eq!(all.counts.connected, 1);
        assert_eq!(all.counts.health(HealthState::Unhealthy), 1);
        assert_eq!(all.counts.health(HealthState::Unknown), 1);
        assert_eq!(all.counts.config(ConfigView::State(ConfigState::None)), 1);
        assert_eq!(all.counts.config(ConfigView::CannotReceive), 1);
        for q in [
            FleetQuery {
                text: Some("collector".into()),
                ..FleetQuery::default()
            },
            FleetQuery {
                health: Some(HealthState::Unhealthy),
                ..FleetQuery::default()
            },
            FleetQuery {
                connected: Some(true),
                ..FleetQuery::default()
            },
            FleetQuery {
                capability: Some(proto::agent_caps::ACCEPTS_REMOTE_CONFIG),
                ..FleetQuery::default()
            },
            FleetQuery {
                config: Some(ConfigView::State(ConfigState::None)),
                ..FleetQuery::default()
            },
        ] {
            let q = FleetQuery { limit: 10, ..q }.prepared();
            let p = page(&agents, &q);
            assert_eq!(p.rows.len(), 1, "{q:?}");
            assert_eq!(p.rows[0].instance_uid.0[0], 1, "{q:?}");
        }
    }
}
