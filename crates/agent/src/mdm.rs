//! Carrying out the MDM placement: the MDMs of the plan's nodes join the MDM cluster and
//! become its voters, with leadership moved onto the pinned primary.
//!
//! The agent of every planned node runs an MDM (`--standby`, its role from the plan, its id
//! from the cluster). The agent of the plan's first manager coordinates, one step per tick,
//! each step decided by [`next_step`] from the members as they are — so a step that failed
//! or a coordinator that restarted simply goes on from there. MDMs that are not on planned
//! nodes are never removed, only left out of the voters: they stay as standbys and keep
//! answering clients configured with their address.

use std::collections::{BTreeMap, BTreeSet};

use tessera_core::deploy::plan::MdmPlan;
use tessera_core::ClusterState;
use tessera_proto::control::MdmClusterStatus;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MdmStep {
    /// Add the node's standby MDM to the cluster.
    Add { id: u64, address: String },
    /// Make exactly these the voters, in the plan's mode.
    Switch { mode: String, managers: Vec<u64>, tiebreakers: Vec<u64> },
    /// Ask this MDM (a voting manager) to take the lead.
    Campaign { id: u64, address: String },
}

/// The MDM id and address of every planned node that has both.
pub fn planned_nodes(plan: &MdmPlan, state: &ClusterState) -> BTreeMap<String, (u64, String)> {
    let mut nodes = BTreeMap::new();
    for n in plan.managers.iter().chain(&plan.tiebreakers) {
        let Some(node) = state.nodes.get(n) else { continue };
        if let (Some(id), Some(port)) = (node.mdm_id, node.mdm_port) {
            nodes.insert(n.clone(), (id, format!("{}:{port}", node.address)));
        }
    }
    nodes
}

/// The next step towards `plan`, `Ok(None)` when the MDM cluster matches it, or why it has
/// to wait. `nodes` maps a planned node to its MDM id and address.
pub fn next_step(
    plan: &MdmPlan,
    nodes: &BTreeMap<String, (u64, String)>,
    status: &MdmClusterStatus,
) -> Result<Option<MdmStep>, String> {
    let id_of = |node: &String| nodes.get(node).cloned().ok_or_else(|| format!("node {node} has no MDM yet"));
    let managers: Vec<(u64, String)> = plan.managers.iter().map(id_of).collect::<Result<_, _>>()?;
    let tiebreakers: Vec<(u64, String)> = plan.tiebreakers.iter().map(id_of).collect::<Result<_, _>>()?;
    if managers.is_empty() {
        return Err("the plan names no manager".into());
    }
    let members: BTreeSet<u64> = status.members.iter().map(|m| m.id).collect();
    if let Some((id, address)) = managers.iter().chain(&tiebreakers).find(|(id, _)| !members.contains(id)) {
        return Ok(Some(MdmStep::Add { id: *id, address: address.clone() }));
    }
    let manager_ids: Vec<u64> = managers.iter().map(|(id, _)| *id).collect();
    let tiebreaker_ids: Vec<u64> = tiebreakers.iter().map(|(id, _)| *id).collect();
    let planned: BTreeSet<u64> = manager_ids.iter().chain(&tiebreaker_ids).copied().collect();
    let voters: BTreeSet<u64> = status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    let leader = status.leader_id.ok_or("no MDM leads right now")?;
    let voter_manager = |id: u64| status.members.iter().any(|m| m.id == id && m.voter && m.role == "manager");
    let campaign = |(id, address): &(u64, String)| Some(MdmStep::Campaign { id: *id, address: address.clone() });
    if voters == planned && status.mode == plan.mode {
        if plan.primary_pinned && leader != manager_ids[0] && voter_manager(manager_ids[0]) {
            return Ok(campaign(&managers[0]));
        }
        return Ok(None);
    }
    if manager_ids.contains(&leader) {
        return Ok(Some(MdmStep::Switch {
            mode: plan.mode.clone(),
            managers: manager_ids,
            tiebreakers: tiebreaker_ids,
        }));
    }
    // The leader is not a planned MDM, and a mode switch may not drop the leader: first hand
    // the lead to a planned manager that votes, making one a voter if none does.
    if let Some(m) = managers.iter().find(|(id, _)| voter_manager(*id)) {
        return Ok(campaign(m));
    }
    if manager_ids.len() < 2 {
        return Err(format!(
            "moving the MDM cluster onto node {} needs a step through 3_node; use mdm_mode = \"3_node\" or more",
            plan.managers[0]
        ));
    }
    let mut bridge = vec![leader];
    bridge.extend(&manager_ids[..manager_ids.len() - 1]);
    Ok(Some(MdmStep::Switch { mode: plan.mode.clone(), managers: bridge, tiebreakers: tiebreaker_ids }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::control::MdmMember;

    fn member(id: u64, role: &str, voter: bool, leader: bool) -> MdmMember {
        MdmMember {
            id,
            address: format!("127.0.0.1:{}", 7000 + id),
            role: role.into(),
            is_leader: leader,
            status: String::new(),
            voter,
            reachable: true,
            matched_index: None,
        }
    }

    fn status(mode: &str, leader: u64, members: Vec<MdmMember>) -> MdmClusterStatus {
        MdmClusterStatus {
            mode: mode.into(),
            state: "normal".into(),
            leader_id: Some(leader),
            voters: members.iter().filter(|m| m.voter).count(),
            voters_reachable: 0,
            members,
        }
    }

    /// Applies a step the way the MDM cluster would.
    fn apply(s: &mut MdmClusterStatus, step: &MdmStep, roles: &BTreeMap<u64, &str>) {
        match step {
            MdmStep::Add { id, .. } => s.members.push(member(*id, roles[id], false, false)),
            MdmStep::Switch { mode, managers, tiebreakers } => {
                assert!(managers.contains(&s.leader_id.unwrap()), "a switch never drops the leader");
                for m in &mut s.members {
                    m.voter = managers.contains(&m.id) || tiebreakers.contains(&m.id);
                }
                s.mode = mode.clone();
            }
            MdmStep::Campaign { id, .. } => {
                assert!(s.members.iter().any(|m| m.id == *id && m.voter), "only voters campaign");
                s.leader_id = Some(*id);
            }
        }
    }

    #[test]
    fn from_the_local_mdm_to_three_pinned_nodes() {
        let plan = MdmPlan {
            mode: "3_node".into(),
            managers: vec!["a".into(), "b".into()],
            tiebreakers: vec!["c".into()],
            primary_pinned: true,
            complete: true,
        };
        let nodes: BTreeMap<String, (u64, String)> = [("a", 101), ("b", 102), ("c", 103)]
            .iter()
            .map(|(n, id)| (n.to_string(), (*id, format!("{n}:1"))))
            .collect();
        let roles: BTreeMap<u64, &str> =
            [(1, "manager"), (101, "manager"), (102, "manager"), (103, "tiebreaker")].into();
        let mut s = status("1_node", 1, vec![member(1, "manager", true, true)]);
        let mut steps = Vec::new();
        while let Some(step) = next_step(&plan, &nodes, &s).unwrap() {
            apply(&mut s, &step, &roles);
            steps.push(step);
            assert!(steps.len() < 10, "{steps:?}");
        }
        assert_eq!(s.leader_id, Some(101));
        let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
        assert_eq!(voters, [101, 102, 103]);
        assert!(matches!(steps[3], MdmStep::Switch { ref managers, .. } if managers == &[1, 101]), "{steps:?}");
        assert!(s.members.iter().any(|m| m.id == 1 && !m.voter), "the old MDM stays, as a standby");
    }

    #[test]
    fn waits_for_ids_and_refuses_a_one_node_move() {
        let plan = MdmPlan {
            mode: "1_node".into(),
            managers: vec!["a".into()],
            tiebreakers: vec![],
            primary_pinned: false,
            complete: true,
        };
        let s = status("1_node", 1, vec![member(1, "manager", true, true)]);
        assert!(next_step(&plan, &BTreeMap::new(), &s).unwrap_err().contains("no MDM yet"));
        let nodes = BTreeMap::from([("a".to_string(), (101, "a:1".to_string()))]);
        let mut s2 = s.clone();
        s2.members.push(member(101, "manager", false, false));
        assert!(next_step(&plan, &nodes, &s2).unwrap_err().contains("3_node"));
    }
}
