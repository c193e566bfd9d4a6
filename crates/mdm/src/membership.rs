//! MDM cluster membership as ScaleIO had it: managers and tiebreakers, standby members, and
//! the `1_node` / `3_node` / `5_node` modes. Pure functions: the server asks them what a
//! change should be and whether it is allowed, then hands the result to openraft.
//!
//! In Raft terms every member of the mode is a voter; a tiebreaker is a voter that never
//! campaigns (its election timer is switched off), so it can settle a vote but never lead.
//! Standby members are learners: they replicate the log and can be switched in at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most members (voters and standbys) a cluster may have.
pub const MAX_MEMBERS: usize = 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MdmRole {
    /// Holds the state and may become primary (leader).
    #[default]
    Manager,
    /// Votes but never campaigns.
    Tiebreaker,
}

impl MdmRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MdmRole::Manager => "manager",
            MdmRole::Tiebreaker => "tiebreaker",
        }
    }

    /// `manager`, or `tiebreaker` (also ScaleIO's `tb`).
    pub fn parse(s: &str) -> Result<MdmRole, MembershipError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "manager" => Ok(MdmRole::Manager),
            "tiebreaker" | "tb" => Ok(MdmRole::Tiebreaker),
            other => Err(MembershipError::BadRole(other.to_string())),
        }
    }
}

impl fmt::Display for MdmRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What openraft stores for each member. `role` defaults to manager so that logs written
/// before roles existed (`{"addr": ...}`) still load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdmNode {
    pub addr: String,
    #[serde(default)]
    pub role: MdmRole,
}

impl fmt::Display for MdmNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.addr, self.role)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterMode {
    #[serde(rename = "1_node")]
    OneNode,
    #[serde(rename = "3_node")]
    ThreeNode,
    #[serde(rename = "5_node")]
    FiveNode,
}

impl ClusterMode {
    pub fn parse(s: &str) -> Result<ClusterMode, MembershipError> {
        match s.trim() {
            "1_node" | "1" => Ok(ClusterMode::OneNode),
            "3_node" | "3" => Ok(ClusterMode::ThreeNode),
            "5_node" | "5" => Ok(ClusterMode::FiveNode),
            other => Err(MembershipError::BadMode(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClusterMode::OneNode => "1_node",
            ClusterMode::ThreeNode => "3_node",
            ClusterMode::FiveNode => "5_node",
        }
    }

    pub fn managers(self) -> usize {
        match self {
            ClusterMode::OneNode => 1,
            ClusterMode::ThreeNode => 2,
            ClusterMode::FiveNode => 3,
        }
    }

    pub fn tiebreakers(self) -> usize {
        match self {
            ClusterMode::OneNode => 0,
            ClusterMode::ThreeNode => 1,
            ClusterMode::FiveNode => 2,
        }
    }

    /// The mode a voter set is in, if it matches one.
    pub fn of(voters: &[(u64, MdmRole)]) -> Option<ClusterMode> {
        let managers = voters.iter().filter(|(_, r)| *r == MdmRole::Manager).count();
        let tiebreakers = voters.len() - managers;
        [ClusterMode::OneNode, ClusterMode::ThreeNode, ClusterMode::FiveNode]
            .into_iter()
            .find(|m| m.managers() == managers && m.tiebreakers() == tiebreakers)
    }
}

impl fmt::Display for ClusterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MembershipError {
    #[error("unknown MDM role {0:?}: expected manager or tiebreaker")]
    BadRole(String),
    #[error("unknown cluster mode {0:?}: expected 1_node, 3_node or 5_node")]
    BadMode(String),
    #[error("MDM {id} is already a member (address {addr})")]
    AlreadyMember { id: u64, addr: String },
    #[error("address {addr} is already used by MDM {id}")]
    AddressInUse { id: u64, addr: String },
    #[error("an MDM cluster has at most {MAX_MEMBERS} members")]
    TooManyMembers,
    #[error("MDM {0} is not a member")]
    NotMember(u64),
    #[error("MDM {id} is a {role} of the current {mode} mode; switch to a mode without it first")]
    RemoveVoter { id: u64, role: MdmRole, mode: String },
    #[error("MDM {id} is a {actual}, not a {wanted}")]
    WrongRole { id: u64, actual: MdmRole, wanted: MdmRole },
    #[error("MDM {0} is named twice")]
    Duplicate(u64),
    #[error(
        "{mode} mode needs {managers_needed} manager(s) and {tiebreakers_needed} tiebreaker(s); \
         {managers_available} manager(s) and {tiebreakers_available} tiebreaker(s) are members \
         (add standby MDMs with `tessera mdm add` first)"
    )]
    NotEnoughMembers {
        mode: ClusterMode,
        managers_needed: usize,
        tiebreakers_needed: usize,
        managers_available: usize,
        tiebreakers_available: usize,
    },
    #[error("{mode} mode needs exactly {needed} {role}(s), {given} named")]
    WrongCount { mode: ClusterMode, role: MdmRole, needed: usize, given: usize },
    #[error("MDM {0} is the primary and must stay a manager of the cluster")]
    LeaderLeaves(u64),
    #[error("MDM {id} ({addr}) is not reachable; every member of the new mode must be up and caught up")]
    Unreachable { id: u64, addr: String },
    #[error("only {reachable} of {voters} current voting MDMs are reachable: no quorum to commit a change")]
    NoQuorum { reachable: usize, voters: usize },
}

/// One member as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: MdmNode,
    pub voter: bool,
    /// Answered the leader recently and holds the log (the leader itself counts as reachable).
    pub reachable: bool,
}

/// Checks that a new standby member may join.
pub fn check_add(members: &BTreeMap<u64, Member>, id: u64, node: &MdmNode) -> Result<(), MembershipError> {
    if let Some(m) = members.get(&id) {
        return Err(MembershipError::AlreadyMember { id, addr: m.node.addr.clone() });
    }
    if let Some((other, _)) = members.iter().find(|(_, m)| m.node.addr == node.addr) {
        return Err(MembershipError::AddressInUse { id: *other, addr: node.addr.clone() });
    }
    if members.len() >= MAX_MEMBERS {
        return Err(MembershipError::TooManyMembers);
    }
    Ok(())
}

/// Checks that a member may be removed: only standbys; voters leave by a mode switch.
pub fn check_remove(members: &BTreeMap<u64, Member>, id: u64) -> Result<(), MembershipError> {
    let m = members.get(&id).ok_or(MembershipError::NotMember(id))?;
    if m.voter {
        return Err(MembershipError::RemoveVoter { id, role: m.node.role, mode: mode_name(members) });
    }
    Ok(())
}

/// The current mode's name, or `custom (N voters)` for a voter set that matches none.
pub fn mode_name(members: &BTreeMap<u64, Member>) -> String {
    let voters: Vec<(u64, MdmRole)> =
        members.iter().filter(|(_, m)| m.voter).map(|(id, m)| (*id, m.node.role)).collect();
    match ClusterMode::of(&voters) {
        Some(mode) => mode.as_str().to_string(),
        None => format!("custom ({} voters)", voters.len()),
    }
}

/// The voter set of a switch to `mode`. Named members are used as given; otherwise the
/// current voters of each role are kept (reachable ones first, never dropping the leader)
/// and reachable standbys of that role fill the rest, lowest id first.
///
/// Refused when the current voters have no reachable quorum (the change could not commit),
/// when a new voter is unreachable (the new configuration might have no quorum), or when
/// the leader would leave.
pub fn plan_mode_switch(
    members: &BTreeMap<u64, Member>,
    leader: u64,
    mode: ClusterMode,
    managers: Option<&[u64]>,
    tiebreakers: Option<&[u64]>,
) -> Result<BTreeSet<u64>, MembershipError> {
    let voters: Vec<u64> = members.iter().filter(|(_, m)| m.voter).map(|(id, _)| *id).collect();
    let reachable_voters = voters.iter().filter(|id| members[id].reachable).count();
    if reachable_voters * 2 <= voters.len() {
        return Err(MembershipError::NoQuorum { reachable: reachable_voters, voters: voters.len() });
    }
    let mut chosen = BTreeSet::new();
    for (role, named, needed) in
        [(MdmRole::Manager, managers, mode.managers()), (MdmRole::Tiebreaker, tiebreakers, mode.tiebreakers())]
    {
        let picked = match named {
            Some(ids) => {
                if ids.len() != needed {
                    return Err(MembershipError::WrongCount { mode, role, needed, given: ids.len() });
                }
                for id in ids {
                    let m = members.get(id).ok_or(MembershipError::NotMember(*id))?;
                    if m.node.role != role {
                        return Err(MembershipError::WrongRole { id: *id, actual: m.node.role, wanted: role });
                    }
                }
                ids.to_vec()
            }
            None => pick_role(members, leader, role, needed).ok_or_else(|| {
                let count = |r: MdmRole| members.values().filter(|m| m.node.role == r).count();
                MembershipError::NotEnoughMembers {
                    mode,
                    managers_needed: mode.managers(),
                    tiebreakers_needed: mode.tiebreakers(),
                    managers_available: count(MdmRole::Manager),
                    tiebreakers_available: count(MdmRole::Tiebreaker),
                }
            })?,
        };
        for id in picked {
            if !chosen.insert(id) {
                return Err(MembershipError::Duplicate(id));
            }
        }
    }
    if !chosen.contains(&leader) {
        return Err(MembershipError::LeaderLeaves(leader));
    }
    for id in &chosen {
        let m = &members[id];
        if !m.reachable {
            return Err(MembershipError::Unreachable { id: *id, addr: m.node.addr.clone() });
        }
    }
    Ok(chosen)
}

/// `needed` members of `role`: the leader, then reachable current voters, then reachable
/// standbys, then the rest (which the reachability check refuses with a clear error).
fn pick_role(members: &BTreeMap<u64, Member>, leader: u64, role: MdmRole, needed: usize) -> Option<Vec<u64>> {
    let mut candidates: Vec<(u64, &Member)> =
        members.iter().filter(|(_, m)| m.node.role == role).map(|(id, m)| (*id, m)).collect();
    candidates.sort_by_key(|(id, m)| (*id != leader, !m.reachable, !m.voter, *id));
    (candidates.len() >= needed).then(|| candidates.into_iter().take(needed).map(|(id, _)| id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(role: MdmRole, voter: bool, reachable: bool) -> Member {
        Member { node: MdmNode { addr: String::new(), role }, voter, reachable }
    }

    fn cluster(spec: &[(u64, MdmRole, bool, bool)]) -> BTreeMap<u64, Member> {
        spec.iter()
            .map(|&(id, role, voter, reachable)| {
                let mut m = member(role, voter, reachable);
                m.node.addr = format!("127.0.0.1:{}", 7000 + id);
                (id, m)
            })
            .collect()
    }

    use MdmRole::{Manager as M, Tiebreaker as T};

    #[test]
    fn one_to_three_node_picks_standbys() {
        let c = cluster(&[(1, M, true, true), (2, M, false, true), (3, T, false, true)]);
        let v = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, None, None).unwrap();
        assert_eq!(v, BTreeSet::from([1, 2, 3]));
    }

    #[test]
    fn not_enough_members_is_refused_with_counts() {
        let c = cluster(&[(1, M, true, true), (2, M, false, true)]);
        let e = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, None, None).unwrap_err();
        assert!(matches!(e, MembershipError::NotEnoughMembers { tiebreakers_available: 0, .. }), "{e}");
        assert!(e.to_string().contains("needs 2 manager(s) and 1 tiebreaker(s)"), "{e}");
    }

    #[test]
    fn unreachable_new_voter_is_refused() {
        let c = cluster(&[(1, M, true, true), (2, M, false, false), (3, T, false, true)]);
        let e = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, None, None).unwrap_err();
        assert_eq!(e, MembershipError::Unreachable { id: 2, addr: "127.0.0.1:7002".into() });
    }

    #[test]
    fn shrinking_drops_dead_voters_first_and_keeps_the_leader() {
        // 3_node with manager 2 dead; a spare manager 4 is standing by.
        let c = cluster(&[(1, M, true, true), (2, M, true, false), (3, T, true, true), (4, M, false, true)]);
        let v = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, None, None).unwrap();
        assert_eq!(v, BTreeSet::from([1, 3, 4]), "the dead manager is replaced by the standby");
        let v = plan_mode_switch(&c, 1, ClusterMode::OneNode, None, None).unwrap();
        assert_eq!(v, BTreeSet::from([1]));
    }

    #[test]
    fn no_quorum_among_current_voters_is_refused() {
        let c = cluster(&[(1, M, true, true), (2, M, true, false), (3, T, true, false)]);
        let e = plan_mode_switch(&c, 1, ClusterMode::OneNode, None, None).unwrap_err();
        assert_eq!(e, MembershipError::NoQuorum { reachable: 1, voters: 3 });
    }

    #[test]
    fn named_members_are_checked() {
        let c = cluster(&[(1, M, true, true), (2, M, false, true), (3, T, false, true), (4, T, false, true)]);
        let e = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, Some(&[1, 3]), None).unwrap_err();
        assert_eq!(e, MembershipError::WrongRole { id: 3, actual: T, wanted: M });
        let e = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, Some(&[2]), None).unwrap_err();
        assert!(matches!(e, MembershipError::WrongCount { needed: 2, given: 1, .. }));
        let e = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, Some(&[2, 9]), None).unwrap_err();
        assert_eq!(e, MembershipError::NotMember(9));
        let e = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, Some(&[2, 2]), None).unwrap_err();
        assert_eq!(e, MembershipError::Duplicate(2));
        let e = plan_mode_switch(&c, 1, ClusterMode::OneNode, Some(&[2]), None).unwrap_err();
        assert_eq!(e, MembershipError::LeaderLeaves(1));
        let v = plan_mode_switch(&c, 1, ClusterMode::ThreeNode, None, Some(&[4])).unwrap();
        assert_eq!(v, BTreeSet::from([1, 2, 4]));
    }

    #[test]
    fn five_node_mode_needs_three_managers_and_two_tiebreakers() {
        let c = cluster(&[
            (1, M, true, true),
            (2, M, true, true),
            (3, T, true, true),
            (4, M, false, true),
            (5, T, false, true),
        ]);
        let v = plan_mode_switch(&c, 1, ClusterMode::FiveNode, None, None).unwrap();
        assert_eq!(v.len(), 5);
        let voters: Vec<(u64, MdmRole)> = v.iter().map(|id| (*id, c[id].node.role)).collect();
        assert_eq!(ClusterMode::of(&voters), Some(ClusterMode::FiveNode));
    }

    #[test]
    fn only_standbys_are_removed_and_adds_are_checked() {
        let c = cluster(&[(1, M, true, true), (2, T, false, true)]);
        assert!(check_remove(&c, 2).is_ok());
        assert!(matches!(check_remove(&c, 1), Err(MembershipError::RemoveVoter { id: 1, .. })));
        assert_eq!(check_remove(&c, 7), Err(MembershipError::NotMember(7)));
        let node = MdmNode { addr: "127.0.0.1:7002".into(), role: M };
        assert!(matches!(check_add(&c, 3, &node), Err(MembershipError::AddressInUse { id: 2, .. })));
        assert!(matches!(check_add(&c, 1, &node), Err(MembershipError::AlreadyMember { id: 1, .. })));
        let fresh = MdmNode { addr: "127.0.0.1:7003".into(), role: T };
        assert!(check_add(&c, 3, &fresh).is_ok());
    }

    #[test]
    fn roles_and_modes_parse_strictly() {
        assert_eq!(MdmRole::parse(" TB "), Ok(T));
        assert!(MdmRole::parse("leader").is_err());
        assert_eq!(ClusterMode::parse("3_node"), Ok(ClusterMode::ThreeNode));
        assert!(ClusterMode::parse("4_node").is_err());
        let old: MdmNode = serde_json::from_str(r#"{"addr":"a:1"}"#).unwrap();
        assert_eq!(old.role, M, "nodes logged before roles existed are managers");
    }
}
