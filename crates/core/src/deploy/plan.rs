//! The planner: from the reported nodes (and the spec, if set) to the layout every node
//! should have, and from that layout to the changes that get the cluster there. Pure, so
//! `tessera deploy plan`, every agent and the tests compute the same thing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::attributes::{parse_node, Persona, Problem};
use super::spec::DeploySpec;
use super::{sds_name, split_sds_name, DiskUsage, Node, PoolRef};
use crate::model::{ClusterState, DeviceState, DEFAULT_SPARE_PERCENT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Imperative,
    Declarative,
    GlobalPool,
    /// No method applies (global pool disabled, no spec, no attributes): contributes nothing.
    None,
    /// `tessera node remove`: everything drains off, then the node is forgotten.
    Removing,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Imperative => "imperative",
            Method::Declarative => "declarative",
            Method::GlobalPool => "global-pool",
            Method::None => "none",
            Method::Removing => "removing",
        }
    }
}

/// What one node should run and contribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub method: Method,
    /// Domain → the node's SDS in it.
    pub sds: BTreeMap<String, SdsPlan>,
    /// Pools the node consumes (its `*-sdc-*` attributes); empty means any.
    pub consumes: Vec<PoolRef>,
    /// The fault set of every SDS the node runs (one per node, whatever the domain).
    pub fault_set: Option<String>,
    pub persona: Option<Persona>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdsPlan {
    /// Device path → pool.
    pub devices: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub nodes: BTreeMap<String, NodePlan>,
    /// Pool → (domain, spare percentage) for every pool some node contributes to.
    pub pools: BTreeMap<String, (String, u8)>,
    pub problems: Vec<Problem>,
    /// Nodes whose attributes or disks are in error: nothing changes on them.
    pub blocked_nodes: BTreeSet<String>,
    /// Domains the plan cannot build (too few fault sets): nothing is added to them.
    pub blocked_domains: BTreeSet<String>,
    pub mdm: Option<MdmPlan>,
}

/// Where the MDM cluster's members should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdmPlan {
    pub mode: String,
    /// Node names; the first is the preferred primary.
    pub managers: Vec<String>,
    pub tiebreakers: Vec<String>,
    /// A node's persona pins the primary (`managers[0]`): leadership is moved there.
    pub primary_pinned: bool,
    /// Every slot is filled and no pin conflicts: the agents may carry it out.
    pub complete: bool,
}

/// ScaleIO's rule: a domain with fault sets needs at least three, so that after losing one
/// the two copies of every extent can still be re-mirrored onto two different ones.
pub const MIN_FAULT_SETS: usize = 3;

pub fn plan_layout(state: &ClusterState) -> Layout {
    let spec = state.deploy_spec.as_ref();
    let mut layout = Layout::default();
    let mut personas: Vec<(String, Persona, Option<String>)> = Vec::new();
    for node in state.nodes.values() {
        if node.removing {
            let plan = NodePlan {
                method: Method::Removing,
                sds: BTreeMap::new(),
                consumes: Vec::new(),
                fault_set: None,
                persona: None,
            };
            layout.nodes.insert(node.name.clone(), plan);
            continue;
        }
        if !node.errors.is_empty() {
            layout.problems.extend(node.errors.iter().map(|e| Problem::node(&node.name, e.clone())));
            layout.blocked_nodes.insert(node.name.clone());
            continue;
        }
        let intent = match parse_node(node) {
            Ok(i) => i,
            Err(problems) => {
                layout.problems.extend(problems);
                layout.blocked_nodes.insert(node.name.clone());
                continue;
            }
        };
        let fault_set = match spec.and_then(|s| s.fault_set_key.as_deref()) {
            Some(key) => node.attributes.get(key).map(|v| v.trim().to_string()).or(intent.fault_set.clone()),
            None => intent.fault_set.clone(),
        };
        if let Some(fs) = &fault_set {
            if let Err(e) = crate::names::validate_name(fs) {
                layout.problems.push(Problem::node(&node.name, format!("fault set: {e}")));
                layout.blocked_nodes.insert(node.name.clone());
                continue;
            }
        }
        let mut plan = NodePlan {
            method: Method::None,
            sds: BTreeMap::new(),
            consumes: Vec::new(),
            fault_set: fault_set.clone(),
            persona: intent.persona,
        };
        if let Some(p) = intent.persona {
            personas.push((node.name.clone(), p, fault_set.clone()));
        }
        let mut claimed: BTreeMap<String, String> = BTreeMap::new();
        let mut node_problems = Vec::new();
        if let Some(imp) = &intent.imperative {
            plan.method = Method::Imperative;
            for (domain, pools) in &imp.sds {
                let sds = plan.sds.entry(domain.clone()).or_default();
                for (pool, paths) in pools {
                    note_pool(&mut layout, &mut node_problems, node, domain, pool, None);
                    for path in paths {
                        sds.devices.insert(path.clone(), pool.clone());
                    }
                }
            }
            for (domain, pools) in &imp.sdc {
                for pool in pools {
                    plan.consumes.push(PoolRef { domain: domain.clone(), pool: pool.clone() });
                }
            }
        } else if let Some(spec) = spec {
            plan.method = Method::Declarative;
            for pool in spec.pools.iter().filter(|p| p.selects_node(node)) {
                for disk in node.disks.iter().filter(|d| eligible(state, node, &d.path) && pool.devices.selects(d)) {
                    if let Some(other) = claimed.insert(disk.path.clone(), pool.name.clone()) {
                        node_problems.push(Problem::node(
                            &node.name,
                            format!(
                                "{} is selected by pools {other} and {}; make the selectors exclusive",
                                disk.path, pool.name
                            ),
                        ));
                        continue;
                    }
                    let sds = plan.sds.entry(pool.domain.clone()).or_default();
                    sds.devices.insert(disk.path.clone(), pool.name.clone());
                    note_pool(&mut layout, &mut node_problems, node, &pool.domain, &pool.name, pool.spare_percent);
                }
            }
        } else if let Some(global) = &node.global_pool {
            plan.method = Method::GlobalPool;
            for disk in node.disks.iter().filter(|d| eligible(state, node, &d.path)) {
                let sds = plan.sds.entry(global.domain.clone()).or_default();
                sds.devices.insert(disk.path.clone(), global.pool.clone());
                note_pool(&mut layout, &mut node_problems, node, &global.domain, &global.pool, None);
            }
        }
        for domain in plan.sds.keys() {
            let name = sds_name(&node.name, domain);
            if name.len() > crate::names::MAX_NAME_LEN {
                node_problems.push(Problem::node(
                    &node.name,
                    format!("its SDS in domain {domain} would be named {name}, longer than {} characters; shorten the node name (--name)", crate::names::MAX_NAME_LEN),
                ));
            }
            // An SDS joins a fault set only when it is created (as in ScaleIO).
            if let Some(existing) = state.sds_by_name(&name) {
                let have = existing.fault_set_id.and_then(|id| state.fault_sets.get(&id)).map(|f| f.name.clone());
                if have != fault_set {
                    node_problems.push(Problem::node(
                        &node.name,
                        format!(
                            "SDS {name} is in fault set {} but the node now says {}; an SDS's fault set is fixed when it is added: remove the node (tessera node remove {}) and let it join again",
                            have.as_deref().unwrap_or("(none)"),
                            fault_set.as_deref().unwrap_or("(none)"),
                            node.name
                        ),
                    ));
                }
            }
        }
        if node_problems.is_empty() {
            layout.nodes.insert(node.name.clone(), plan);
        } else {
            layout.problems.extend(node_problems);
            layout.blocked_nodes.insert(node.name.clone());
        }
    }
    check_consumed_pools(state, &mut layout);
    check_pools_keep_room(state, &mut layout);
    check_fault_sets(state, &mut layout);
    layout.mdm = plan_mdms(spec, &personas, &mut layout.problems);
    fill_mdm_slots(&mut layout, state);
    // A node in error may be one that should hold an MDM (its persona unread): moving votes
    // away from it over a typo would be worse than waiting.
    if let Some(mdm) = layout.mdm.as_mut().filter(|m| m.complete && !layout.blocked_nodes.is_empty()) {
        mdm.complete = false;
        let blocked: Vec<&str> = layout.blocked_nodes.iter().map(String::as_str).collect();
        layout.problems.push(Problem::cluster(format!(
            "the MDM placement waits until the attributes of {} are valid",
            blocked.join(", ")
        )));
    }
    layout
}

/// A disk the declarative and global-pool methods may take: unused, already one of this
/// node's devices (so a re-plan keeps it, or moves it), or formatted by this cluster for a
/// device the cluster no longer has (drained and removed, as in the middle of a move: the
/// cluster needs nothing on it). A device of another node is never taken.
fn eligible(state: &ClusterState, node: &Node, path: &str) -> bool {
    match node.disk(path).map(|d| &d.usage) {
        Some(DiskUsage::Unused) => true,
        Some(DiskUsage::Tessera { device_id }) => {
            !state.devices.contains_key(device_id) || current_device(state, &node.name, path).is_some()
        }
        _ => false,
    }
}

/// The device at `path` of one of `node`'s SDSs, with its pool name.
fn current_device<'a>(state: &'a ClusterState, node: &str, path: &str) -> Option<(&'a crate::model::Device, String)> {
    state.devices.values().find_map(|d| {
        let sds = state.sdss.get(&d.sds_id)?;
        let (n, _) = split_sds_name(&sds.name)?;
        (n == node && d.path == path)
            .then(|| (d, state.pools.get(&d.pool_id).map(|p| p.name.clone()).unwrap_or_default()))
    })
}

fn note_pool(
    layout: &mut Layout,
    problems: &mut Vec<Problem>,
    node: &Node,
    domain: &str,
    pool: &str,
    spare_percent: Option<u8>,
) {
    match layout.pools.get(pool) {
        Some((d, _)) if d != domain => problems.push(Problem::node(
            &node.name,
            format!("pool {pool} would be in domain {domain} here but is in domain {d} elsewhere; pool names are unique in the cluster"),
        )),
        Some(_) => {}
        None => {
            layout.pools.insert(pool.to_string(), (domain.to_string(), spare_percent.unwrap_or(DEFAULT_SPARE_PERCENT)));
        }
    }
}

fn check_consumed_pools(state: &ClusterState, layout: &mut Layout) {
    let mut bad = Vec::new();
    for (name, plan) in &layout.nodes {
        for c in &plan.consumes {
            let exists = state
                .pool_by_name(&c.pool)
                .is_some_and(|p| state.protection_domains.get(&p.pd_id).is_some_and(|d| d.name == c.domain))
                || layout.pools.get(&c.pool).is_some_and(|(d, _)| d == &c.domain);
            if !exists {
                bad.push(Problem::node(
                    name,
                    format!("consumes pool {}/{} but no node contributes to it", c.domain, c.pool),
                ));
            }
        }
    }
    // Consuming an unknown pool blocks nothing: the SDC runs either way, and the pool may
    // appear when its nodes join.
    layout.problems.extend(bad);
}

/// A pool holding volumes must keep devices on at least two SDSs, or its copies have
/// nowhere to drain to and the plan would stall half done.
fn check_pools_keep_room(state: &ClusterState, layout: &mut Layout) {
    for pool in state.pools.values() {
        let volumes = state.volumes_of_pool(pool.id).count();
        if volumes == 0 {
            continue;
        }
        let mut sdss: BTreeSet<String> = BTreeSet::new();
        for (node, plan) in &layout.nodes {
            for (domain, sds) in &plan.sds {
                if sds.devices.values().any(|p| *p == pool.name) {
                    sdss.insert(sds_name(node, domain));
                }
            }
        }
        for d in state.devices_of_pool(pool.id) {
            let Some(sds) = state.sdss.get(&d.sds_id) else { continue };
            let owner = split_sds_name(&sds.name).map(|(n, _)| n);
            // SDSs no plan governs (added by hand, or of a node in error) keep their devices.
            if owner.is_none_or(|n| !layout.nodes.contains_key(n)) {
                sdss.insert(sds.name.clone());
            }
        }
        if sdss.len() < 2 {
            layout.problems.push(Problem::cluster(format!(
                "pool {} holds {volumes} volume(s) but the plan leaves it devices on {} SDS(s); its copies would have nowhere to go (keep at least two, or remove its volumes first)",
                pool.name,
                sdss.len()
            )));
        }
    }
}

/// In a domain where any SDS has a fault set, every SDS needs one and there must be at
/// least [`MIN_FAULT_SETS`]. Counts the SDSs the plan keeps and adds, plus SDSs added by
/// hand (not owned by a node).
fn check_fault_sets(state: &ClusterState, layout: &mut Layout) {
    // domain → (fault set → SDS names), and SDSs without one.
    let mut with: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut without: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, plan) in &layout.nodes {
        for domain in plan.sds.keys() {
            let name = sds_name(node, domain);
            match &plan.fault_set {
                Some(fs) => with.entry(domain.clone()).or_default().entry(fs.clone()).or_default().push(name),
                None => without.entry(domain.clone()).or_default().push(name),
            }
        }
    }
    for sds in state.sdss.values() {
        let owner = split_sds_name(&sds.name).map(|(n, _)| n);
        if owner.is_some_and(|n| layout.nodes.contains_key(n) || layout.blocked_nodes.contains(n)) {
            continue;
        }
        let Some(domain) = state.protection_domains.get(&sds.pd_id).map(|d| d.name.clone()) else { continue };
        match sds.fault_set_id.and_then(|id| state.fault_sets.get(&id)) {
            Some(fs) => with.entry(domain).or_default().entry(fs.name.clone()).or_default().push(sds.name.clone()),
            None => without.entry(domain).or_default().push(sds.name.clone()),
        }
    }
    for (domain, sets) in &with {
        let names: Vec<&str> = sets.keys().map(String::as_str).collect();
        if let Some(lacking) = without.get(domain) {
            layout.problems.push(Problem::cluster(format!(
                "domain {domain} uses fault sets ({}) but {} {} none (set the tessera-faultset attribute)",
                names.join(", "),
                lacking.join(", "),
                if lacking.len() == 1 { "has" } else { "have" }
            )));
            layout.blocked_domains.insert(domain.clone());
        }
        if sets.len() < MIN_FAULT_SETS {
            layout.problems.push(Problem::cluster(format!(
                "domain {domain} uses fault sets but has only {} ({}); at least {MIN_FAULT_SETS} are needed so that both copies survive the loss of one fault set and can be re-mirrored",
                sets.len(),
                names.join(", ")
            )));
            layout.blocked_domains.insert(domain.clone());
        }
    }
}

/// MDM placement: personas pin roles; the remaining slots go to nodes on fault sets (then
/// racks) not used yet, by name for determinism. Without a mode in the spec and without
/// personas there is nothing to plan.
fn plan_mdms(
    spec: Option<&DeploySpec>,
    personas: &[(String, Persona, Option<String>)],
    problems: &mut Vec<Problem>,
) -> Option<MdmPlan> {
    let mode = match spec.and_then(|s| s.mdm_mode.clone()) {
        Some(m) => m,
        None if !personas.is_empty() => "3_node".to_string(),
        None => return None,
    };
    let (want_managers, want_tiebreakers) = match mode.as_str() {
        "1_node" => (1, 0),
        "3_node" => (2, 1),
        _ => (3, 2),
    };
    let problems_before = problems.len();
    let mut managers: Vec<String> = Vec::new();
    let mut tiebreakers: Vec<String> = Vec::new();
    let mut sorted = personas.to_vec();
    sorted.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    for (node, persona, _) in &sorted {
        match persona {
            Persona::Primary if managers.is_empty() => managers.push(node.clone()),
            Persona::Primary => problems.push(Problem::attribute(
                node,
                "scaleio-persona",
                "primary",
                format!("{} is already the primary", managers[0]),
            )),
            Persona::Secondary => managers.push(node.clone()),
            Persona::Tiebreaker => tiebreakers.push(node.clone()),
        }
    }
    if managers.len() > want_managers || tiebreakers.len() > want_tiebreakers {
        problems.push(Problem::cluster(format!(
            "{} nodes are pinned as managers and {} as tiebreakers, but {mode} has {want_managers} and {want_tiebreakers}",
            managers.len(),
            tiebreakers.len()
        )));
        managers.truncate(want_managers);
        tiebreakers.truncate(want_tiebreakers);
    }
    let primary_pinned = personas.iter().any(|(_, p, _)| *p == Persona::Primary);
    let complete = problems.len() == problems_before;
    Some(MdmPlan { mode, managers, tiebreakers, primary_pinned, complete })
}

/// Completes an MDM plan with unpinned nodes, preferring fault sets and racks not used yet.
fn fill_mdm_slots(layout: &mut Layout, state: &ClusterState) {
    let Some(mdm) = layout.mdm.as_mut() else { return };
    let (want_managers, want_tiebreakers) = match mdm.mode.as_str() {
        "1_node" => (1, 0),
        "3_node" => (2, 1),
        _ => (3, 2),
    };
    let label = |node: &str, key: &str| -> Option<String> {
        let n = state.nodes.get(node)?;
        n.attributes.get(key).or_else(|| n.attributes.get(&format!("tessera-{key}"))).map(|v| v.trim().to_string())
    };
    let fault_set = |node: &str| layout.nodes.get(node).and_then(|p| p.fault_set.clone());
    let mut chosen: Vec<String> = mdm.managers.iter().chain(&mdm.tiebreakers).cloned().collect();
    let mut candidates: Vec<String> = layout
        .nodes
        .iter()
        .filter(|(n, p)| p.method != Method::Removing && !chosen.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    while mdm.managers.len() + mdm.tiebreakers.len() < want_managers + want_tiebreakers && !candidates.is_empty() {
        let used_fs: BTreeSet<Option<String>> = chosen.iter().map(|n| fault_set(n)).collect();
        let used_racks: BTreeSet<Option<String>> = chosen.iter().map(|n| label(n, "rack")).collect();
        candidates.sort_by_key(|n| {
            let fs = fault_set(n);
            let rack = label(n, "rack");
            (fs.is_some() && used_fs.contains(&fs), rack.is_some() && used_racks.contains(&rack), n.clone())
        });
        let pick = candidates.remove(0);
        if mdm.managers.len() < want_managers {
            mdm.managers.push(pick.clone());
        } else {
            mdm.tiebreakers.push(pick.clone());
        }
        chosen.push(pick);
    }
    if mdm.managers.len() + mdm.tiebreakers.len() < want_managers + want_tiebreakers {
        mdm.complete = false;
        layout.problems.push(Problem::cluster(format!(
            "{} needs {} MDM nodes but only {} can be chosen",
            mdm.mode,
            want_managers + want_tiebreakers,
            mdm.managers.len() + mdm.tiebreakers.len()
        )));
    }
}

/// One step from the cluster as it is towards the layout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    CreateDomain {
        domain: String,
    },
    CreateFaultSet {
        domain: String,
        fault_set: String,
    },
    CreatePool {
        domain: String,
        pool: String,
        spare_percent: u8,
    },
    AddSds {
        node: String,
        sds: String,
        domain: String,
        fault_set: Option<String>,
    },
    AddDevice {
        node: String,
        sds: String,
        path: String,
        pool: String,
    },
    /// Drain from `from_pool` (on `from_sds`), remove, clear the old superblock, add to
    /// `to_pool` on `sds`.
    MoveDevice {
        node: String,
        from_sds: String,
        sds: String,
        path: String,
        from_pool: String,
        to_pool: String,
    },
    /// Drain, then remove.
    RemoveDevice {
        node: String,
        sds: String,
        path: String,
        pool: String,
    },
    /// Drain, then remove (its devices go with it).
    RemoveSds {
        node: String,
        sds: String,
    },
    /// A removed node with nothing left: forget its report.
    ForgetNode {
        node: String,
    },
}

impl Change {
    /// The node that carries the change out; `None` for cluster-wide objects.
    pub fn node(&self) -> Option<&str> {
        match self {
            Change::CreateDomain { .. } | Change::CreateFaultSet { .. } | Change::CreatePool { .. } => None,
            Change::AddSds { node, .. }
            | Change::AddDevice { node, .. }
            | Change::MoveDevice { node, .. }
            | Change::RemoveDevice { node, .. }
            | Change::RemoveSds { node, .. }
            | Change::ForgetNode { node } => Some(node),
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateDomain { domain } => write!(f, "+ protection domain {domain}"),
            Change::CreateFaultSet { domain, fault_set } => write!(f, "+ fault set {domain}/{fault_set}"),
            Change::CreatePool { domain, pool, spare_percent } => {
                write!(f, "+ storage pool {domain}/{pool} ({spare_percent}% spare)")
            }
            Change::AddSds { node, sds, domain, fault_set } => {
                write!(f, "+ SDS {sds} on node {node} in {domain}")?;
                if let Some(fs) = fault_set {
                    write!(f, " (fault set {fs})")?;
                }
                Ok(())
            }
            Change::AddDevice { node, path, pool, .. } => write!(f, "+ device {node}:{path} -> pool {pool}"),
            Change::MoveDevice { node, path, from_pool, to_pool, .. } => {
                write!(f, "~ device {node}:{path} pool {from_pool} -> {to_pool} (drain, remove, re-add)")
            }
            Change::RemoveDevice { node, path, pool, .. } => {
                write!(f, "- device {node}:{path} from pool {pool} (drain first)")
            }
            Change::RemoveSds { node, sds } => write!(f, "- SDS {sds} on node {node} (drain first)"),
            Change::ForgetNode { node } => write!(f, "- node {node} (removed; nothing left on it)"),
        }
    }
}

/// The changes that take the cluster from `state` to `layout`, cluster-wide objects first,
/// then additions, moves, and removals (which drain first) last.
pub fn diff(state: &ClusterState, layout: &Layout) -> Vec<Change> {
    let mut changes = BTreeSet::new();
    let mut creates = BTreeSet::new();
    let mut removals = Vec::new();
    for (node, plan) in &layout.nodes {
        for (domain, sds_plan) in &plan.sds {
            if layout.blocked_domains.contains(domain) {
                continue;
            }
            if state.pd_by_name(domain).is_none() {
                creates.insert(Change::CreateDomain { domain: domain.clone() });
            }
            if let Some(fs) = &plan.fault_set {
                let exists = state.pd_by_name(domain).is_some_and(|pd| state.fault_set_by_name(pd.id, fs).is_some());
                if !exists {
                    creates.insert(Change::CreateFaultSet { domain: domain.clone(), fault_set: fs.clone() });
                }
            }
            let sds = sds_name(node, domain);
            if state.sds_by_name(&sds).is_none() {
                changes.insert(Change::AddSds {
                    node: node.clone(),
                    sds: sds.clone(),
                    domain: domain.clone(),
                    fault_set: plan.fault_set.clone(),
                });
            }
            for (path, pool) in &sds_plan.devices {
                if state.pool_by_name(pool).is_none() {
                    let spare = layout.pools.get(pool).map_or(DEFAULT_SPARE_PERCENT, |(_, s)| *s);
                    creates.insert(Change::CreatePool {
                        domain: domain.clone(),
                        pool: pool.clone(),
                        spare_percent: spare,
                    });
                }
                let current = current_device(state, node, path);
                // On another of the node's SDSs (the disk changes domain): same as a move.
                let same_sds =
                    current.as_ref().is_some_and(|(d, _)| state.sdss.get(&d.sds_id).is_some_and(|s| s.name == sds));
                match current {
                    Some((d, from)) if from == *pool && same_sds && d.state != DeviceState::Draining => {}
                    // Elsewhere, or draining but wanted again (there is no undoing a drain):
                    // it leaves once empty and comes back as a new device.
                    Some((d, from)) => {
                        changes.insert(Change::MoveDevice {
                            node: node.clone(),
                            from_sds: state.sdss.get(&d.sds_id).map(|s| s.name.clone()).unwrap_or_default(),
                            sds: sds.clone(),
                            path: path.clone(),
                            from_pool: from,
                            to_pool: pool.clone(),
                        });
                    }
                    None => {
                        changes.insert(Change::AddDevice {
                            node: node.clone(),
                            sds: sds.clone(),
                            path: path.clone(),
                            pool: pool.clone(),
                        });
                    }
                }
            }
        }
        // What the node has and the plan no longer wants.
        let mut owned = 0;
        for sds in state.sdss.values() {
            let Some((owner, domain)) = split_sds_name(&sds.name) else { continue };
            if owner != node {
                continue;
            }
            owned += 1;
            match plan.sds.get(domain) {
                None => removals.push(Change::RemoveSds { node: node.clone(), sds: sds.name.clone() }),
                Some(sds_plan) => {
                    for d in state.devices_of_sds(sds.id) {
                        if !sds_plan.devices.contains_key(&d.path) {
                            let pool = state.pools.get(&d.pool_id).map(|p| p.name.clone()).unwrap_or_default();
                            removals.push(Change::RemoveDevice {
                                node: node.clone(),
                                sds: sds.name.clone(),
                                path: d.path.clone(),
                                pool,
                            });
                        }
                    }
                }
            }
        }
        if plan.method == Method::Removing && owned == 0 {
            removals.push(Change::ForgetNode { node: node.clone() });
        }
    }
    creates.into_iter().chain(changes).chain(removals).collect()
}
