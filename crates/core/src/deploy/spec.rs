//! The declarative deployment spec (`tessera deploy plan|apply spec.toml`): pools, the labels
//! that select their nodes and devices, the fault-set key, and the MDM mode. The planner
//! ([`super::plan`]) computes the whole layout from it; nothing in the spec names a device.
//!
//! ```toml
//! mdm_mode = "3_node"        # optional: 1_node, 3_node or 5_node
//! fault_set_key = "rack"     # optional: the attribute whose value is a node's fault set
//!
//! [[pool]]
//! domain = "engineering"
//! name = "qe"
//! spare_percent = 34         # optional
//! nodes = { row = "a", rack = ["r1", "r2"] }   # every key must match (one of) the values
//! devices = { media = "ssd", min_size = "1GiB", max_size = "4TiB", paths = ["/dev/sd*"] }
//! ```
//!
//! A node label is one of its attributes (by exact name), or `node` / `hostname`. A device
//! is a candidate only when the agent found it unused (or it is already one of the node's
//! Tessera devices); a device two pools select is an error, never a coin toss.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Disk, Media, Node};
use crate::error::CoreError;
use crate::names::validate_name;
use crate::units::parse_size_bytes;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    #[serde(default)]
    pub mdm_mode: Option<String>,
    #[serde(default)]
    pub fault_set_key: Option<String>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub domain: String,
    pub name: String,
    #[serde(default)]
    pub spare_percent: Option<u8>,
    /// Label → accepted values. Empty selects every node.
    #[serde(default)]
    pub nodes: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    pub devices: DeviceSelector,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a label value: a string or a list of strings")]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn values(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(v) => vec![v.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSelector {
    #[serde(default)]
    pub media: Option<Media>,
    /// Sizes as `10GiB`, `500MB`, or bytes.
    #[serde(default)]
    pub min_size: Option<String>,
    #[serde(default)]
    pub max_size: Option<String>,
    /// Globs (`*`, `?`) on the device path; empty selects every path.
    #[serde(default)]
    pub paths: Vec<String>,
}

pub const MDM_MODES: [&str; 3] = ["1_node", "3_node", "5_node"];
/// Bounds on a spec, which is replicated into the cluster state: ScaleIO's pools per system,
/// and generous room for selectors.
pub const MAX_SPEC_POOLS: usize = 1024;
pub const MAX_SPEC_SELECTOR_VALUES: usize = 256;
pub const MAX_SPEC_TEXT_BYTES: usize = 1024;

impl DeploySpec {
    /// Refuses what the planner cannot act on: bad names, repeated pools, a pool in two
    /// domains, bad sizes, unknown MDM modes.
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |m: String| Err(CoreError::Invalid(format!("deploy spec: {m}")));
        if let Some(m) = &self.mdm_mode {
            if !MDM_MODES.contains(&m.as_str()) {
                return bad(format!("mdm_mode {m:?} must be one of {}", MDM_MODES.join(", ")));
            }
        }
        if let Some(k) = &self.fault_set_key {
            if k.trim().is_empty() {
                return bad("fault_set_key is empty".into());
            }
        }
        if self.pools.len() > MAX_SPEC_POOLS {
            return bad(format!("names {} pools; at most {MAX_SPEC_POOLS}", self.pools.len()));
        }
        let too_long = |t: &str| t.len() > MAX_SPEC_TEXT_BYTES;
        if self.fault_set_key.as_deref().is_some_and(too_long) {
            return bad("fault_set_key is too long".into());
        }
        for p in &self.pools {
            let values = p.nodes.iter().map(|(k, v)| 1 + v.values().len() + usize::from(too_long(k))).sum::<usize>();
            let long_value = p.nodes.values().any(|v| v.values().into_iter().any(too_long))
                || p.devices.paths.iter().any(|g| too_long(g))
                || [&p.devices.min_size, &p.devices.max_size].into_iter().flatten().any(|x| too_long(x));
            if values > MAX_SPEC_SELECTOR_VALUES || p.devices.paths.len() > MAX_SPEC_SELECTOR_VALUES || long_value {
                return bad(format!(
                    "pool {}: selectors are limited to {MAX_SPEC_SELECTOR_VALUES} labels and values of {MAX_SPEC_TEXT_BYTES} bytes",
                    p.name
                ));
            }
        }
        if self.pools.is_empty() {
            return bad("names no [[pool]]".into());
        }
        let mut names = BTreeSet::new();
        for p in &self.pools {
            validate_name(&p.domain)?;
            validate_name(&p.name)?;
            if !names.insert(&p.name) {
                return bad(format!("pool {} is named twice (pool names are unique in the cluster)", p.name));
            }
            if p.spare_percent.is_some_and(|s| s >= 100) {
                return bad(format!("pool {}: spare_percent must be below 100", p.name));
            }
            for (label, values) in &p.nodes {
                if label.is_empty() || values.values().is_empty() {
                    return bad(format!("pool {}: node selector {label:?} needs a value", p.name));
                }
            }
            let (min, max) =
                p.devices.size_range().map_err(|e| CoreError::Invalid(format!("deploy spec: pool {}: {e}", p.name)))?;
            if min > max {
                return bad(format!("pool {}: min_size is above max_size", p.name));
            }
            if p.devices.paths.iter().any(|g| !g.starts_with('/')) {
                return bad(format!("pool {}: device paths must be absolute (globs like /dev/sd*)", p.name));
            }
        }
        Ok(())
    }
}

impl PoolSpec {
    /// True when every node selector matches one of the node's labels.
    pub fn selects_node(&self, node: &Node) -> bool {
        self.nodes.iter().all(|(label, values)| {
            let have = match label.as_str() {
                "node" => Some(node.name.as_str()),
                "hostname" => Some(node.hostname.as_str()),
                other => node.attributes.get(other).map(|v| v.trim()),
            };
            have.is_some_and(|h| values.values().contains(&h))
        })
    }
}

impl DeviceSelector {
    pub fn size_range(&self) -> Result<(u64, u64), String> {
        let min = self.min_size.as_deref().map(parse_size_bytes).transpose()?.unwrap_or(0);
        let max = self.max_size.as_deref().map(parse_size_bytes).transpose()?.unwrap_or(u64::MAX);
        Ok((min, max))
    }

    pub fn selects(&self, disk: &Disk) -> bool {
        let Ok((min, max)) = self.size_range() else { return false };
        self.media.is_none_or(|m| m == disk.media)
            && (min..=max).contains(&disk.size_bytes)
            && (self.paths.is_empty() || self.paths.iter().any(|g| glob_match(g, &disk.path)))
    }
}

/// `*` matches any run of characters (including `/`), `?` one character. Enough for device
/// paths; anything fancier belongs in the node's attributes.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("/dev/loop*", "/dev/loop12"));
        assert!(glob_match("/dev/sd?", "/dev/sdb"));
        assert!(!glob_match("/dev/sd?", "/dev/sdb1"));
        assert!(!glob_match("/dev/xvdf", "/dev/xvdf1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("/a*b*c", "/aXbYbZc"));
    }
}
