//! The node attributes that drive deployment, parsed strictly.
//!
//! The ScaleIO Framework's keys are accepted verbatim, and the same keys with a `tessera-`
//! prefix (`P` below is either):
//!
//! | key | value |
//! |---|---|
//! | `P-sds-domains` | domains this node contributes storage to |
//! | `P-sds-<domain>` | pools of that domain |
//! | `P-sds-<pool>` | devices given to that pool |
//! | `P-sdc-domains` | domains this node consumes from |
//! | `P-sdc-<domain>` | pools consumed |
//! | `P-faultset` | the node's fault set |
//! | `P-persona` | `primary`, `secondary` or `tiebreaker`: pins an MDM role |
//!
//! Unlike the framework, lists are trimmed and validated, SDC keys mean consumption only,
//! and a key no list refers to (a typo such as `scaleio-sds-mydomain1`) is an error rather
//! than silently ignored. Every error names the node, the attribute and the value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{DiskUsage, Node};
use crate::names::validate_name;

pub const PREFIXES: [&str; 2] = ["scaleio-", "tessera-"];

/// Something wrong with a node's attributes, disks or the plan, said so the operator can
/// find it: which node, which attribute, which value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub node: Option<String>,
    pub attribute: Option<String>,
    pub value: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn node(node: &str, message: impl Into<String>) -> Problem {
        Problem { node: Some(node.into()), attribute: None, value: None, message: message.into() }
    }
    pub fn attribute(node: &str, attribute: &str, value: &str, message: impl Into<String>) -> Problem {
        Problem {
            node: Some(node.into()),
            attribute: Some(attribute.into()),
            value: Some(value.into()),
            message: message.into(),
        }
    }
    pub fn cluster(message: impl Into<String>) -> Problem {
        Problem { node: None, attribute: None, value: None, message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.node {
            write!(f, "node {n}: ")?;
        }
        if let Some(a) = &self.attribute {
            write!(f, "attribute {a}")?;
            if let Some(v) = &self.value {
                write!(f, " = {v:?}")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Persona {
    Primary,
    Secondary,
    Tiebreaker,
}

/// What a node's attributes ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIntent {
    /// Present when the node uses the imperative method (it has a `*-domains` key).
    pub imperative: Option<Imperative>,
    pub fault_set: Option<String>,
    pub persona: Option<Persona>,
}

/// Imperative layout: exactly what the node contributes and consumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imperative {
    /// domain → pool → device paths. Each path appears once in the whole map.
    pub sds: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// domain → pools consumed.
    pub sdc: BTreeMap<String, Vec<String>>,
}

/// One attribute looked up under both prefixes. The two spellings may both be present only
/// if they agree.
struct Lookup<'a> {
    node: &'a Node,
    /// Keys (full attribute names) some list referred to; the rest are reported as unknown.
    used: BTreeSet<String>,
}

impl<'a> Lookup<'a> {
    fn has(&self, suffix: &str) -> bool {
        PREFIXES.iter().any(|p| self.node.attributes.contains_key(&format!("{p}{suffix}")))
    }

    fn get(&mut self, suffix: &str, problems: &mut Vec<Problem>) -> Option<(String, &'a str)> {
        let mut found: Option<(String, &'a str)> = None;
        for p in PREFIXES {
            let key = format!("{p}{suffix}");
            if let Some(v) = self.node.attributes.get(&key) {
                self.used.insert(key.clone());
                match &found {
                    Some((k0, v0)) if v0.trim() != v.trim() => problems.push(Problem::attribute(
                        &self.node.name,
                        &key,
                        v,
                        format!("disagrees with {k0} = {v0:?}; set one of them"),
                    )),
                    Some(_) => {}
                    None => found = Some((key, v.as_str())),
                }
            }
        }
        found
    }

    /// A comma list of names: trimmed, no empty items, no duplicates, each a valid name.
    fn names(&mut self, suffix: &str, problems: &mut Vec<Problem>) -> Option<(String, Vec<String>)> {
        let (key, value) = self.get(suffix, problems)?;
        let items = split_list(&self.node.name, &key, value, problems)?;
        let mut ok = true;
        for item in &items {
            if let Err(e) = validate_name(item) {
                problems.push(Problem::attribute(&self.node.name, &key, value, e.to_string()));
                ok = false;
            }
        }
        ok.then_some((key, items))
    }
}

/// Splits a comma list, trimming each item. Empty items and repeats are errors: they are
/// always typos, and the old framework turned them into bogus names.
fn split_list(node: &str, key: &str, value: &str, problems: &mut Vec<Problem>) -> Option<Vec<String>> {
    let items: Vec<String> = value.split(',').map(|s| s.trim().to_string()).collect();
    if items.iter().any(|s| s.is_empty()) {
        problems.push(Problem::attribute(node, key, value, "empty item in the comma list"));
        return None;
    }
    let mut seen = BTreeSet::new();
    for item in &items {
        if !seen.insert(item) {
            problems.push(Problem::attribute(node, key, value, format!("{item} is listed twice")));
            return None;
        }
    }
    Some(items)
}

/// Parses a node's deployment attributes. Any problem makes the whole node's intent
/// unusable (the caller leaves the node as it is) — a half-understood attribute set must
/// not move data.
pub fn parse_node(node: &Node) -> Result<NodeIntent, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut l = Lookup { node, used: BTreeSet::new() };
    let mut intent = NodeIntent::default();

    if let Some((key, value)) = l.get("faultset", &mut problems) {
        let v = value.trim();
        match validate_name(v) {
            Ok(()) => intent.fault_set = Some(v.to_string()),
            Err(e) => problems.push(Problem::attribute(&node.name, &key, value, e.to_string())),
        }
    }
    if let Some((key, value)) = l.get("persona", &mut problems) {
        intent.persona = match value.trim() {
            "primary" => Some(Persona::Primary),
            "secondary" => Some(Persona::Secondary),
            "tiebreaker" => Some(Persona::Tiebreaker),
            _ => {
                problems.push(Problem::attribute(&node.name, &key, value, "must be primary, secondary or tiebreaker"));
                None
            }
        };
    }

    let sds_domains = l.names("sds-domains", &mut problems);
    let sdc_domains = l.names("sdc-domains", &mut problems);
    if l.has("sds-domains") || l.has("sdc-domains") {
        let mut imp = Imperative::default();
        let mut seen_paths: BTreeMap<String, String> = BTreeMap::new();
        // Pool names share one key space per node (`P-sds-<pool>`) with domain names
        // (`P-sds-<domain>`) and with `domains` itself; a clash would make a key mean two things.
        let mut sds_names: BTreeMap<String, &str> = BTreeMap::new();
        sds_names.insert("domains".into(), "the domain list");
        for (dkey, domains) in sds_domains.iter() {
            for domain in domains {
                if let Some(what) = sds_names.insert(domain.clone(), "a domain") {
                    problems.push(Problem::attribute(
                        &node.name,
                        dkey,
                        &domains.join(","),
                        format!("{domain} is also {what}: its attribute key would mean both"),
                    ));
                    continue;
                }
                if !l.has(&format!("sds-{domain}")) {
                    problems.push(Problem::attribute(
                        &node.name,
                        dkey,
                        &domains.join(","),
                        format!(
                            "domain {domain} has no pool list (attribute scaleio-sds-{domain} or tessera-sds-{domain})"
                        ),
                    ));
                    continue;
                }
                let Some((pkey, pools)) = l.names(&format!("sds-{domain}"), &mut problems) else { continue };
                let mut pools_of_domain = BTreeMap::new();
                for pool in pools.iter() {
                    if let Some(what) = sds_names.insert(pool.clone(), "a pool") {
                        problems.push(Problem::attribute(
                            &node.name,
                            &pkey,
                            &pools.join(","),
                            format!("{pool} is also {what}: its attribute key would mean both"),
                        ));
                        continue;
                    }
                    let Some((devkey, devvalue)) = l.get(&format!("sds-{pool}"), &mut problems) else {
                        problems.push(Problem::attribute(
                            &node.name,
                            &pkey,
                            &pools.join(","),
                            format!(
                                "pool {pool} has no device list (attribute scaleio-sds-{pool} or tessera-sds-{pool})"
                            ),
                        ));
                        continue;
                    };
                    let Some(paths) = split_list(&node.name, &devkey, devvalue, &mut problems) else { continue };
                    for path in &paths {
                        if let Some(other) = seen_paths.insert(path.clone(), devkey.clone()) {
                            problems.push(Problem::attribute(
                                &node.name,
                                &devkey,
                                devvalue,
                                format!("{path} is also listed in {other}"),
                            ));
                        }
                        check_device(node, &devkey, devvalue, path, &mut problems);
                    }
                    pools_of_domain.insert(pool.clone(), paths);
                }
                imp.sds.insert(domain.clone(), pools_of_domain);
            }
        }
        if let Some((_, domains)) = &sdc_domains {
            for domain in domains {
                let Some((_, pools)) = l.names(&format!("sdc-{domain}"), &mut problems) else {
                    // Consuming a whole domain: REX-Ray then needs a pool per volume.
                    imp.sdc.insert(domain.clone(), Vec::new());
                    continue;
                };
                imp.sdc.insert(domain.clone(), pools);
            }
        }
        intent.imperative = Some(imp);
    }

    for (key, value) in &node.attributes {
        let Some(rest) = PREFIXES.iter().find_map(|p| key.strip_prefix(p)) else { continue };
        let deploy_key = rest.starts_with("sds-") || rest.starts_with("sdc-");
        if deploy_key && !l.used.contains(key) {
            problems.push(Problem::attribute(
                &node.name,
                key,
                value,
                "no domain or pool list refers to this attribute (a typo, or a name missing from *-sds-domains / *-sdc-domains?)",
            ));
        }
    }

    if problems.is_empty() {
        Ok(intent)
    } else {
        Err(problems)
    }
}

/// A device named in an imperative attribute must exist on the node and be free for us:
/// unused, or already Tessera's.
fn check_device(node: &Node, key: &str, value: &str, path: &str, problems: &mut Vec<Problem>) {
    if !path.starts_with('/') {
        problems.push(Problem::attribute(&node.name, key, value, format!("{path} is not an absolute device path")));
        return;
    }
    match node.disk(path).map(|d| &d.usage) {
        None => problems.push(Problem::attribute(
            &node.name,
            key,
            value,
            format!("{path} was not found among the node's disks (is it in --disk-candidates?)"),
        )),
        Some(DiskUsage::Missing { reason }) => {
            problems.push(Problem::attribute(&node.name, key, value, format!("{path} {reason}")))
        }
        Some(DiskUsage::InUse { reason }) => {
            problems.push(Problem::attribute(&node.name, key, value, format!("{path} is in use: {reason}")))
        }
        Some(DiskUsage::Unused | DiskUsage::Tessera { .. }) => {}
    }
}
