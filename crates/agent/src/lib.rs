//! `tessera agent`: runs on every node, reports the node (attributes, disks) to the MDM and
//! brings the node's SDSs, devices and SDC in line with the deployment plan.

pub mod agent;
pub mod attributes;
pub mod disks;
pub mod mdm;
pub mod process;
