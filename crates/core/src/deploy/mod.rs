//! Deployment from node attributes (the ScaleIO Framework's job, done properly).
//!
//! Every node runs `tessera agent`, which reports a [`Node`]: its address, its attributes
//! (Mesos agent attribute files and flags) and its disk inventory, each disk already
//! classified as unused or in use on the node itself. From those reports — replicated in
//! [`crate::ClusterState::nodes`] — and the declarative spec, if one is set, the pure
//! planner ([`plan::plan_layout`]) computes what every node should contribute and consume;
//! [`plan::diff`] turns the difference with the cluster into [`plan::Change`]s. Agents
//! carry out the changes for their own node; `tessera deploy plan` prints them.
//!
//! Three methods, chosen per node in this order:
//! 1. **imperative** — the node has `*-sds-domains` or `*-sdc-domains` attributes
//!    ([`attributes`]); it contributes exactly the devices they list and nothing else;
//! 2. **declarative** — a spec is set ([`spec`]): its pools select nodes and devices by
//!    label;
//! 3. **single global pool** — every unused disk joins one domain/pool (the agent's
//!    `--global-pool`, `default/default` unless changed).

pub mod attributes;
pub mod plan;
pub mod spec;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::error::CoreError;

/// At most this many attributes per node, disks per node, and bytes per attribute value:
/// a report is replicated to every MDM, so it is bounded.
pub const MAX_NODE_ATTRIBUTES: usize = 256;
pub const MAX_NODE_DISKS: usize = 512;
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 4096;
pub const MAX_ATTRIBUTE_NAME_BYTES: usize = 128;
/// At most this many bytes of names, values, paths and reasons per report: every report is
/// replicated and the state machine is persisted whole, so a node may not bloat it.
pub const MAX_NODE_REPORT_BYTES: usize = 64 * 1024;
/// MDMs placed on nodes get ids from here up; `tessera up` and hand-started MDMs use small ids.
pub const FIRST_NODE_MDM_ID: u64 = 101;

/// What an agent reports about its node. Replaced whole by every report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's name: `[A-Za-z0-9_-]`, no dot (the node's SDSs are named `<node>.<pd>`).
    pub name: String,
    pub hostname: String,
    /// IP address the node's daemons listen on.
    pub address: String,
    /// Attribute name → value, values trimmed.
    pub attributes: BTreeMap<String, String>,
    /// Candidate disks, each classified by the agent.
    pub disks: Vec<Disk>,
    /// Where this node's unused disks go under the single-global-pool method; `None` when
    /// the agent runs with `--no-global-pool`.
    pub global_pool: Option<PoolRef>,
    /// Set by `tessera node remove`: the node is drained, then forgotten.
    #[serde(default)]
    pub removing: bool,
    /// What the agent could not read (an unreadable attribute file, a bad flag): the
    /// planner reports them and changes nothing on the node.
    #[serde(default)]
    pub errors: Vec<String>,
    /// The id its MDM runs under, once the MDM plan placed one here. Assigned by the cluster
    /// ([`crate::Command::AssignMdmId`]), kept across reports, never reused.
    #[serde(default)]
    pub mdm_id: Option<u64>,
    /// The port this node's MDM listens on, should the MDM plan place one here.
    #[serde(default)]
    pub mdm_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolRef {
    pub domain: String,
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The path the agent was given or found (`/dev/loop3`, `/dev/xvdf`), matched exactly.
    pub path: String,
    pub size_bytes: u64,
    pub media: Media,
    pub usage: DiskUsage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Media {
    Ssd,
    Hdd,
    Unknown,
}

impl Media {
    pub fn as_str(self) -> &'static str {
        match self {
            Media::Ssd => "ssd",
            Media::Hdd => "hdd",
            Media::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskUsage {
    /// A whole disk with no partition table, no signature, no holders, not mounted, writable
    /// and large enough: the global pool and declarative pools may take it.
    Unused,
    /// Formatted by Tessera for this cluster (a device of one of this node's SDSs, or one
    /// removed from it).
    Tessera { device_id: u64 },
    /// Anything else, with the reason ("holds an ext4 filesystem", "mounted at /mnt").
    InUse { reason: String },
    /// The path does not exist or is not a block device.
    Missing { reason: String },
}

impl Node {
    /// Checks what the state machine must be able to trust: names, bounds.
    pub fn validate(&self) -> Result<(), CoreError> {
        validate_node_name(&self.name)?;
        if self.attributes.len() > MAX_NODE_ATTRIBUTES {
            return Err(CoreError::Invalid(format!(
                "node {} reports {} attributes; at most {MAX_NODE_ATTRIBUTES}",
                self.name,
                self.attributes.len()
            )));
        }
        if self.disks.len() > MAX_NODE_DISKS {
            return Err(CoreError::Invalid(format!(
                "node {} reports {} disks; at most {MAX_NODE_DISKS}",
                self.name,
                self.disks.len()
            )));
        }
        for (k, v) in &self.attributes {
            if k.is_empty() || k.len() > MAX_ATTRIBUTE_NAME_BYTES || v.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return Err(CoreError::Invalid(format!(
                    "node {}: attribute {k:?} exceeds {MAX_ATTRIBUTE_NAME_BYTES} bytes of name or {MAX_ATTRIBUTE_VALUE_BYTES} of value",
                    self.name
                )));
            }
        }
        if self.errors.len() > MAX_NODE_ATTRIBUTES || self.errors.iter().any(|e| e.len() > MAX_ATTRIBUTE_VALUE_BYTES) {
            return Err(CoreError::Invalid(format!("node {}: too many or too long errors", self.name)));
        }
        let text_bytes: usize = self.attributes.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + self.errors.iter().map(String::len).sum::<usize>()
            + self
                .disks
                .iter()
                .map(|d| {
                    d.path.len()
                        + match &d.usage {
                            DiskUsage::InUse { reason } | DiskUsage::Missing { reason } => reason.len(),
                            _ => 0,
                        }
                })
                .sum::<usize>();
        if text_bytes > MAX_NODE_REPORT_BYTES {
            return Err(CoreError::Invalid(format!(
                "node {}: the report holds {text_bytes} bytes of attributes, errors and disks; at most {MAX_NODE_REPORT_BYTES}",
                self.name
            )));
        }
        if self.address.parse::<std::net::IpAddr>().is_err() {
            return Err(CoreError::Invalid(format!(
                "node {}: address {:?} is not an IP address",
                self.name, self.address
            )));
        }
        if self.hostname.len() > 255 || self.address.len() > 64 || self.disks.iter().any(|d| d.path.len() > 4096) {
            return Err(CoreError::Invalid(format!("node {}: hostname, address or disk path too long", self.name)));
        }
        if let Some(g) = &self.global_pool {
            crate::names::validate_name(&g.domain)?;
            crate::names::validate_name(&g.pool)?;
        }
        Ok(())
    }

    pub fn disk(&self, path: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.path == path)
    }
}

/// Node names become SDC names and the first part of SDS names (`<node>.<pd>`), so they
/// are names without dots and leave room for the domain.
pub fn validate_node_name(name: &str) -> Result<(), CoreError> {
    crate::names::validate_name(name)?;
    if name.contains('.') {
        return Err(CoreError::InvalidName {
            name: name.to_string(),
            reason: "a node name may not contain '.' (use the short host name)".into(),
        });
    }
    Ok(())
}

/// The SDS a node runs for one protection domain. An SDS belongs to exactly one domain
/// (as in ScaleIO), so a node contributing to two domains runs two SDSs.
pub fn sds_name(node: &str, domain: &str) -> String {
    format!("{node}.{domain}")
}

/// The node and domain of an SDS named by [`sds_name`]; `None` for SDSs added by hand.
pub fn split_sds_name(sds: &str) -> Option<(&str, &str)> {
    sds.split_once('.')
}
