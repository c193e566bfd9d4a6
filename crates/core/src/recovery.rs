//! Re-peering after failures: which copies a PG drops, who becomes primary, and which
//! device receives the new copy. Pure functions of the replicated state, applied as
//! commands so every MDM makes the same choice.
//!
//! Rules (each enforced here and checked by the tests below):
//! - **Never drop the last complete copy.** A PG whose only in-sync copy is lost keeps it:
//!   the PG is unavailable until that SDS returns, and nothing stale is ever promoted.
//! - **Promote only in-sync copies.** A copy still being back-filled (`syncing`) is never
//!   made primary.
//! - **Replacement follows placement rules**: a device in service, on a live SDS that holds no
//!   other copy of the PG, in another fault set when the domain has fault sets, least loaded
//!   by capacity.
//! - **Every change of the replica set bumps the epoch**, fencing whoever acts on the old map.

use crate::command::{Applied, CommandOutcome};
use crate::error::CoreError;
use crate::layout::mix64;
use crate::lease::LeaseStatus;
use crate::model::*;

/// Bound on one `ReportSuspectCopies`: more PGs than any pool set holds is a bad request.
pub const MAX_SUSPECT_PGS_PER_REPORT: usize = 1 << 20;

impl ClusterState {
    fn pd_uses_fault_sets(&self, pd_id: u64) -> bool {
        self.fault_sets.values().any(|f| f.pd_id == pd_id)
    }

    /// The device that should take a new copy of `pg` besides `current`, if any qualifies.
    pub fn choose_replacement(&self, pool_id: u64, pg_id: u32, current: &[Replica]) -> Option<Replica> {
        let pool = self.pools.get(&pool_id)?;
        let use_fault_sets = self.pd_uses_fault_sets(pool.pd_id);
        let fault_set_of = |sds_id: u64| self.sdss.get(&sds_id).and_then(|s| s.fault_set_id);
        let mut load: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for pg in &pool.pgs {
            for r in &pg.replicas {
                *load.entry(r.device_id).or_default() += 1;
            }
        }
        self.devices_of_pool(pool_id)
            // Draining SDSs and devices are in service but take no new copies.
            .filter(|d| d.state == DeviceState::Normal && d.capacity_bytes > 0)
            .filter(|d| self.sdss.get(&d.sds_id).is_some_and(|s| s.state == SdsState::Normal))
            .filter(|d| current.iter().all(|r| r.sds_id != d.sds_id))
            .filter(|d| !use_fault_sets || current.iter().all(|r| fault_set_of(r.sds_id) != fault_set_of(d.sds_id)))
            .min_by(|a, b| {
                let (la, lb) = (load.get(&a.id).copied().unwrap_or(0), load.get(&b.id).copied().unwrap_or(0));
                let lhs = u128::from(la + 1) * u128::from(b.capacity_bytes);
                let rhs = u128::from(lb + 1) * u128::from(a.capacity_bytes);
                let jitter = |d: u64| mix64((u64::from(pg_id) << 32) ^ d);
                lhs.cmp(&rhs).then(jitter(a.id).cmp(&jitter(b.id)))
            })
            .map(|d| Replica { sds_id: d.sds_id, device_id: d.id })
    }

    /// Drops the copies `lost` selects from one PG, promotes an in-sync survivor if the
    /// primary went, and adds a syncing replacement. Returns whether the PG changed.
    ///
    /// A survivor must be complete and on an SDS believed alive: in service (`Normal`) and
    /// not in `unresponsive` (SDSs the leader saw expire but has not declared yet). If no
    /// such survivor exists the lost copies are all kept — when two copies die together,
    /// whichever returns first brings the data back, and no copy that might have missed
    /// writes is ever promoted.
    fn drop_replicas(
        &mut self,
        pool_id: u64,
        pg_id: u32,
        lost: &dyn Fn(&Replica) -> bool,
        unresponsive: &[u64],
    ) -> bool {
        let Some(pg) = self.pools.get(&pool_id).and_then(|p| p.pgs.get(pg_id as usize)) else { return false };
        if !pg.replicas.iter().any(lost) {
            return false;
        }
        let believed_alive = |r: &Replica| {
            !unresponsive.contains(&r.sds_id)
                && self.sdss.get(&r.sds_id).is_some_and(|s| matches!(s.state, SdsState::Normal | SdsState::Draining))
        };
        let survivors_in_sync: Vec<Replica> = pg.in_sync().filter(|r| !lost(r) && believed_alive(r)).copied().collect();
        if survivors_in_sync.is_empty() {
            // The lost copy may be the last complete one: keep it, so the data comes back with it.
            return false;
        }
        // Complete copies on SDSs not believed alive stay members (after the live ones) until
        // their own SDS is declared down; they were complete when last seen.
        let survivors_in_sync: Vec<Replica> = survivors_in_sync
            .into_iter()
            .chain(pg.in_sync().filter(|r| !lost(r) && !believed_alive(r)).copied())
            .collect();
        let survivors_syncing: Vec<Replica> =
            pg.replicas.iter().filter(|r| !lost(r) && pg.syncing.contains(&r.sds_id)).copied().collect();
        let mut replicas: Vec<Replica> = survivors_in_sync.into_iter().chain(survivors_syncing).collect();
        let mut syncing: std::collections::BTreeSet<u64> =
            pg.syncing.iter().copied().filter(|s| replicas.iter().any(|r| r.sds_id == *s)).collect();
        while replicas.len() < REPLICA_COUNT {
            match self.choose_replacement(pool_id, pg_id, &replicas) {
                Some(r) => {
                    syncing.insert(r.sds_id);
                    replicas.push(r);
                }
                None => break,
            }
        }
        let Some(pg) = self.pools.get_mut(&pool_id).and_then(|p| p.pgs.get_mut(pg_id as usize)) else { return false };
        assert!(!syncing.contains(&replicas[0].sds_id), "a syncing copy must never be primary");
        // A move is over when its leaving copy is gone, or when its new copy is (nothing is
        // syncing any more): the remaining copies simply stay.
        if pg.leaving.is_some_and(|l| !replicas.iter().any(|r| r.sds_id == l)) || syncing.is_empty() {
            pg.leaving = None;
        }
        pg.replicas = replicas;
        pg.syncing = syncing;
        pg.epoch += 1;
        true
    }

    fn drop_everywhere(&mut self, lost: &dyn Fn(&Replica) -> bool, unresponsive: &[u64]) -> u64 {
        let pgs: Vec<(u64, u32)> =
            self.pools.values().flat_map(|p| p.pgs.iter().map(move |pg| (p.id, pg.id))).collect();
        pgs.into_iter().filter(|&(pool, pg)| self.drop_replicas(pool, pg, lost, unresponsive)).count() as u64
    }

    /// Drops copies on declared-dead SDSs and failed devices wherever a live complete copy
    /// now exists (after an SDS returned, say), then tops up short PGs.
    fn repair_all(&mut self, unresponsive: &[u64]) {
        let down: Vec<u64> = self.sdss.values().filter(|s| s.state == SdsState::Down).map(|s| s.id).collect();
        let failed: Vec<u64> = self.devices.values().filter(|d| d.state == DeviceState::Failed).map(|d| d.id).collect();
        self.drop_everywhere(&|r| down.contains(&r.sds_id) || failed.contains(&r.device_id), unresponsive);
        self.top_up_short_pgs();
    }

    pub(crate) fn declare_sds_down(&mut self, sds_id: u64, unresponsive: &[u64]) -> CommandOutcome {
        let sds = self.sdss.get_mut(&sds_id).ok_or_else(|| CoreError::not_found("SDS", &sds_id.to_string()))?;
        sds.state = SdsState::Down;
        self.repair_all(unresponsive);
        Ok(Applied { id: sds_id })
    }

    pub(crate) fn declare_sds_up(&mut self, sds_id: u64, unresponsive: &[u64]) -> CommandOutcome {
        let sds = self.sdss.get_mut(&sds_id).ok_or_else(|| CoreError::not_found("SDS", &sds_id.to_string()))?;
        sds.state = SdsState::Normal;
        // Its complete copies may let PGs drop dead ones; short PGs may take a copy here.
        self.repair_all(unresponsive);
        Ok(Applied { id: sds_id })
    }

    pub(crate) fn fail_device(&mut self, device_id: u64) -> CommandOutcome {
        let d =
            self.devices.get_mut(&device_id).ok_or_else(|| CoreError::not_found("device", &device_id.to_string()))?;
        d.state = DeviceState::Failed;
        self.repair_all(&[]);
        Ok(Applied { id: device_id })
    }

    pub(crate) fn remove_replica(&mut self, pool_id: u64, pg_id: u32, epoch: u64, sds_id: u64) -> CommandOutcome {
        let pg = self
            .pools
            .get(&pool_id)
            .and_then(|p| p.pgs.get(pg_id as usize))
            .ok_or_else(|| CoreError::not_found("PG", &format!("{pool_id}/{pg_id}")))?;
        if pg.epoch != epoch {
            return Err(CoreError::Invalid(format!("PG {pool_id}/{pg_id} is at epoch {}, not {epoch}", pg.epoch)));
        }
        if pg.primary().is_some_and(|p| p.sds_id == sds_id) {
            return Err(CoreError::Invalid("the primary cannot be removed by this request".into()));
        }
        if !self.drop_replicas(pool_id, pg_id, &|r| r.sds_id == sds_id, &[]) {
            return Err(CoreError::Invalid(format!("SDS {sds_id} is not a removable copy of PG {pool_id}/{pg_id}")));
        }
        Ok(Applied { id: sds_id })
    }

    pub(crate) fn sync_complete(&mut self, pool_id: u64, pg_id: u32, epoch: u64, sds_id: u64) -> CommandOutcome {
        let pg = self
            .pools
            .get_mut(&pool_id)
            .and_then(|p| p.pgs.get_mut(pg_id as usize))
            .ok_or_else(|| CoreError::not_found("PG", &format!("{pool_id}/{pg_id}")))?;
        if pg.epoch != epoch || !pg.syncing.remove(&sds_id) {
            return Err(CoreError::Invalid(format!(
                "PG {pool_id}/{pg_id} has no syncing copy on SDS {sds_id} at epoch {epoch}"
            )));
        }
        self.finish_move(pool_id, pg_id);
        Ok(Applied { id: sds_id })
    }

    /// See [`Command::ReportSuspectCopies`]. A suspect copy is demoted to syncing — moved
    /// behind the complete copies, so it is neither primary nor ever read — when another
    /// complete copy lives on an SDS believed alive; that copy is then the truth and the
    /// primary back-fills the suspect one. When no such copy exists (both copies restarted
    /// after a site-wide power cut, say), the suspect copy is the best there is and stays:
    /// its partner, demoted by its own report, is made equal to it. Either way, once both
    /// have reported, each PG has one authoritative copy and the rest are back-filled from
    /// it, so a block reads the same before and after any failover.
    pub(crate) fn report_suspect_copies(&mut self, sds_id: u64, pgs: &[(u64, u32)]) -> CommandOutcome {
        if !self.sdss.contains_key(&sds_id) {
            return Err(CoreError::not_found("SDS", &sds_id.to_string()));
        }
        if pgs.len() > MAX_SUSPECT_PGS_PER_REPORT {
            return Err(CoreError::Invalid(format!(
                "{} suspect PGs in one report; at most {MAX_SUSPECT_PGS_PER_REPORT}",
                pgs.len()
            )));
        }
        let believed_alive = |s: &ClusterState, id: u64| {
            s.sdss.get(&id).is_some_and(|s| matches!(s.state, SdsState::Normal | SdsState::Draining))
        };
        let mut demoted = 0u64;
        for &(pool_id, pg_id) in pgs {
            let Some(pg) = self.pools.get(&pool_id).and_then(|p| p.pgs.get(pg_id as usize)) else { continue };
            if !pg.replicas.iter().any(|r| r.sds_id == sds_id) || pg.syncing.contains(&sds_id) {
                continue; // not a member, or already being back-filled
            }
            let other_complete_alive = pg.in_sync().any(|r| r.sds_id != sds_id && believed_alive(self, r.sds_id));
            if !other_complete_alive {
                continue; // the best copy there is: it wins
            }
            let Some(pg) = self.pools.get_mut(&pool_id).and_then(|p| p.pgs.get_mut(pg_id as usize)) else { continue };
            // Complete copies first (live before others, as they stand), then the demoted
            // one, then the copies already syncing.
            let (mut complete, mut rest): (Vec<Replica>, Vec<Replica>) =
                pg.replicas.iter().partition(|r| r.sds_id != sds_id && !pg.syncing.contains(&r.sds_id));
            let (me, syncing): (Vec<Replica>, Vec<Replica>) = rest.drain(..).partition(|r| r.sds_id == sds_id);
            complete.extend(me);
            complete.extend(syncing);
            pg.replicas = complete;
            pg.syncing.insert(sds_id);
            assert!(!pg.syncing.contains(&pg.replicas[0].sds_id), "a syncing copy must never be primary");
            pg.epoch += 1;
            demoted += 1;
        }
        Ok(Applied { id: demoted })
    }

    /// Adds a syncing copy to every placed PG that has fewer than `REPLICA_COUNT` copies.
    pub(crate) fn top_up_short_pgs(&mut self) {
        let short: Vec<(u64, u32)> = self
            .pools
            .values()
            .flat_map(|p| p.pgs.iter().filter(|pg| pg.replicas.len() < REPLICA_COUNT).map(move |pg| (p.id, pg.id)))
            .collect();
        for (pool_id, pg_id) in short {
            let Some(current) =
                self.pools.get(&pool_id).and_then(|p| p.pgs.get(pg_id as usize)).map(|pg| pg.replicas.clone())
            else {
                continue;
            };
            if current.is_empty() {
                continue;
            }
            if let Some(r) = self.choose_replacement(pool_id, pg_id, &current) {
                if let Some(pg) = self.pools.get_mut(&pool_id).and_then(|p| p.pgs.get_mut(pg_id as usize)) {
                    pg.replicas.push(r);
                    pg.syncing.insert(r.sds_id);
                    pg.epoch += 1;
                }
            }
        }
    }
}

/// What the MDM leader's failure detector should commit, given each SDS's lease status.
/// Pure: liveness is an input. An SDS is declared down only once its lease has expired, so
/// it has stopped serving before anyone replaces its copies. Each command names the other
/// SDSs without a lease, so no copy on one of them is promoted.
pub fn liveness_commands(state: &ClusterState, lease: impl Fn(u64) -> LeaseStatus) -> Vec<crate::Command> {
    // A new leader knows nothing of the leases yet (`Unknown` until it has waited a whole
    // lease). Re-peering then would count every SDS it has not heard from as unresponsive and
    // could promote no survivor at all, so nothing is declared — not even an SDS proved dead —
    // until every live SDS's lease status is known.
    if state.sdss.values().any(|s| s.state != SdsState::Down && lease(s.id) == LeaseStatus::Unknown) {
        return Vec::new();
    }
    let unresponsive: Vec<u64> =
        state.sdss.values().filter(|s| lease(s.id) != LeaseStatus::Held).map(|s| s.id).collect();
    let mut out = Vec::new();
    for sds in state.sdss.values() {
        let others = || unresponsive.iter().copied().filter(|&x| x != sds.id).collect::<Vec<u64>>();
        match (sds.state, lease(sds.id)) {
            (SdsState::Normal | SdsState::Draining, LeaseStatus::Expired) => {
                out.push(crate::Command::DeclareSdsDown { sds_id: sds.id, unresponsive: others() })
            }
            (SdsState::Down, LeaseStatus::Held) => {
                out.push(crate::Command::DeclareSdsUp { sds_id: sds.id, unresponsive: others() })
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::cluster;
    use crate::Command;

    fn check_invariants(s: &ClusterState) {
        for pool in s.pools.values() {
            let use_fs = s.pd_uses_fault_sets(pool.pd_id);
            for pg in &pool.pgs {
                let mut sdss: Vec<u64> = pg.replicas.iter().map(|r| r.sds_id).collect();
                sdss.sort();
                sdss.dedup();
                assert_eq!(sdss.len(), pg.replicas.len(), "two copies on one SDS: {pg:?}");
                if use_fs {
                    let mut fss: Vec<_> = pg.replicas.iter().map(|r| s.sdss[&r.sds_id].fault_set_id).collect();
                    fss.sort();
                    fss.dedup();
                    assert_eq!(fss.len(), pg.replicas.len(), "two copies in one fault set: {pg:?}");
                }
                if let Some(p) = pg.primary() {
                    assert!(!pg.syncing.contains(&p.sds_id), "syncing primary: {pg:?}");
                }
                assert!(pg.in_sync().count() >= 1, "PG without a complete copy: {pg:?}");
            }
        }
    }

    fn sds_id(s: &ClusterState, name: &str) -> u64 {
        s.sds_by_name(name).unwrap().id
    }

    #[test]
    fn sds_down_promotes_and_replaces() {
        let mut s = cluster(4, false);
        let dead = sds_id(&s, "s0");
        let before = s.pool_by_name("p").unwrap().pgs.clone();
        s.apply(&Command::DeclareSdsDown { sds_id: dead, unresponsive: vec![] }).unwrap();
        check_invariants(&s);
        let after = &s.pool_by_name("p").unwrap().pgs;
        for (b, a) in before.iter().zip(after) {
            if b.replicas.iter().any(|r| r.sds_id == dead) {
                assert_eq!(a.epoch, b.epoch + 1);
                assert!(a.replicas.iter().all(|r| r.sds_id != dead));
                let survivor = b.replicas.iter().find(|r| r.sds_id != dead).unwrap();
                assert_eq!(a.replicas[0], *survivor, "the surviving copy becomes primary");
                assert_eq!(a.replicas.len(), 2);
                assert!(a.syncing.contains(&a.replicas[1].sds_id));
            } else {
                assert_eq!(a, b, "PGs without the dead SDS are untouched");
            }
        }
    }

    #[test]
    fn rebuild_is_spread_over_many_sdss() {
        let mut s = cluster(8, false);
        let dead = sds_id(&s, "s3");
        s.apply(&Command::DeclareSdsDown { sds_id: dead, unresponsive: vec![] }).unwrap();
        let pool = s.pool_by_name("p").unwrap();
        let sources: std::collections::BTreeSet<u64> =
            pool.pgs.iter().filter(|pg| !pg.syncing.is_empty()).map(|pg| pg.replicas[0].sds_id).collect();
        let targets: std::collections::BTreeSet<u64> =
            pool.pgs.iter().flat_map(|pg| pg.syncing.iter().copied()).collect();
        assert!(sources.len() >= 6, "sources {sources:?}");
        assert!(targets.len() >= 6, "targets {targets:?}");
    }

    fn pgs_of(s: &ClusterState, sds: u64) -> Vec<(u64, u32)> {
        let pool = s.pool_by_name("p").unwrap();
        pool.pgs.iter().filter(|pg| pg.replicas.iter().any(|r| r.sds_id == sds)).map(|pg| (pool.id, pg.id)).collect()
    }

    #[test]
    fn a_suspect_copy_is_back_filled_from_a_live_complete_one() {
        let mut s = cluster(3, false);
        let a = sds_id(&s, "s0");
        let before = s.pool_by_name("p").unwrap().pgs.clone();
        let suspect = pgs_of(&s, a);
        s.apply(&Command::ReportSuspectCopies { sds_id: a, pgs: suspect.clone() }).unwrap();
        check_invariants(&s);
        for (b, pg) in before.iter().zip(&s.pool_by_name("p").unwrap().pgs) {
            if suspect.iter().any(|(_, id)| *id == b.id) {
                assert_eq!(pg.epoch, b.epoch + 1, "every change of the replica set bumps the epoch");
                assert!(pg.syncing.contains(&a), "the suspect copy no longer counts as complete");
                assert_ne!(pg.replicas[0].sds_id, a, "and is never primary");
                assert_eq!(pg.replicas.len(), b.replicas.len(), "no copy is dropped");
            } else {
                assert_eq!(pg, b);
            }
        }
        // Reporting again changes nothing: the copies are already being back-filled.
        let snapshot = s.pool_by_name("p").unwrap().pgs.clone();
        s.apply(&Command::ReportSuspectCopies { sds_id: a, pgs: suspect }).unwrap();
        assert_eq!(s.pool_by_name("p").unwrap().pgs, snapshot);
    }

    #[test]
    fn after_a_site_wide_cut_the_later_report_wins_and_one_copy_stays_complete() {
        let mut s = cluster(2, false);
        let (a, b) = (sds_id(&s, "s0"), sds_id(&s, "s1"));
        s.apply(&Command::ReportSuspectCopies { sds_id: a, pgs: pgs_of(&s, a) }).unwrap();
        s.apply(&Command::ReportSuspectCopies { sds_id: b, pgs: pgs_of(&s, b) }).unwrap();
        check_invariants(&s);
        for pg in &s.pool_by_name("p").unwrap().pgs {
            assert_eq!(pg.in_sync().count(), 1, "exactly one authoritative copy: {pg:?}");
            assert_eq!(pg.in_sync().next().unwrap().sds_id, b);
            assert!(pg.syncing.contains(&a));
        }
    }

    #[test]
    fn a_suspect_copy_whose_partner_is_down_stays_complete() {
        let mut s = cluster(2, false);
        let (a, b) = (sds_id(&s, "s0"), sds_id(&s, "s1"));
        s.apply(&Command::DeclareSdsDown { sds_id: b, unresponsive: vec![] }).unwrap();
        let before = s.pool_by_name("p").unwrap().pgs.clone();
        s.apply(&Command::ReportSuspectCopies { sds_id: a, pgs: pgs_of(&s, a) }).unwrap();
        assert_eq!(s.pool_by_name("p").unwrap().pgs, before, "the only complete copy is never demoted");
        assert!(s.apply(&Command::ReportSuspectCopies { sds_id: 999, pgs: vec![] }).is_err());
    }

    #[test]
    fn last_complete_copy_is_never_dropped() {
        let mut s = cluster(3, false);
        let (a, b) = (sds_id(&s, "s0"), sds_id(&s, "s1"));
        s.apply(&Command::DeclareSdsDown { sds_id: a, unresponsive: vec![] }).unwrap();
        // Now some PGs are [survivor, syncing]. Losing the survivor must keep it.
        s.apply(&Command::DeclareSdsDown { sds_id: b, unresponsive: vec![] }).unwrap();
        check_invariants(&s);
        let pool = s.pool_by_name("p").unwrap();
        assert!(pool.pgs.iter().any(|pg| pg.in_sync().all(|r| r.sds_id == b || r.sds_id == a)));
        // With only one live SDS nothing can be replaced; no PG may lose its last copy.
        for pg in &pool.pgs {
            assert!(pg.in_sync().next().is_some());
        }
    }

    #[test]
    fn fault_sets_respected_on_replacement() {
        let mut s = cluster(6, true);
        s.apply(&Command::DeclareSdsDown { sds_id: sds_id(&s, "s1"), unresponsive: vec![] }).unwrap();
        check_invariants(&s);
        s.apply(&Command::DeclareSdsDown { sds_id: sds_id(&s, "s2"), unresponsive: vec![] }).unwrap();
        check_invariants(&s);
    }

    #[test]
    fn remove_replica_is_conditional_on_epoch() {
        let mut s = cluster(3, false);
        let pool_id = s.pool_by_name("p").unwrap().id;
        let pg = s.pools[&pool_id].pgs[0].clone();
        let secondary = pg.replicas[1].sds_id;
        assert!(s
            .apply(&Command::RemoveReplica { pool_id, pg_id: 0, epoch: pg.epoch + 5, sds_id: secondary })
            .is_err());
        assert!(s
            .apply(&Command::RemoveReplica { pool_id, pg_id: 0, epoch: pg.epoch, sds_id: pg.replicas[0].sds_id })
            .is_err());
        s.apply(&Command::RemoveReplica { pool_id, pg_id: 0, epoch: pg.epoch, sds_id: secondary }).unwrap();
        let now = &s.pools[&pool_id].pgs[0];
        assert_eq!(now.epoch, pg.epoch + 1);
        assert_eq!(now.replicas[0], pg.replicas[0]);
        assert!(now.replicas.iter().all(|r| r.sds_id != secondary));
        check_invariants(&s);
        // Completing the sync of the new copy.
        let target = now.replicas[1].sds_id;
        assert!(s.apply(&Command::SyncComplete { pool_id, pg_id: 0, epoch: pg.epoch, sds_id: target }).is_err());
        s.apply(&Command::SyncComplete { pool_id, pg_id: 0, epoch: pg.epoch + 1, sds_id: target }).unwrap();
        assert!(s.pools[&pool_id].pgs[0].syncing.is_empty());
    }

    #[test]
    fn returning_sds_refills_short_pgs() {
        let mut s = cluster(2, false);
        let a = sds_id(&s, "s0");
        s.apply(&Command::DeclareSdsDown { sds_id: a, unresponsive: vec![] }).unwrap();
        // Only one SDS left: PGs keep one copy (nothing to replace with).
        let pool_id = s.pool_by_name("p").unwrap().id;
        assert!(s.pools[&pool_id].pgs.iter().all(|pg| pg.replicas.len() == 1));
        s.apply(&Command::DeclareSdsUp { sds_id: a, unresponsive: vec![] }).unwrap();
        check_invariants(&s);
        assert!(s.pools[&pool_id].pgs.iter().all(|pg| pg.replicas.len() == 2 && pg.syncing.contains(&a)));
    }

    #[test]
    fn two_copies_lost_together_are_both_kept_and_either_brings_data_back() {
        for returning_first in [0, 1] {
            let mut s = cluster(4, false);
            let pool_id = s.pool_by_name("p").unwrap().id;
            let pg = s.pools[&pool_id].pgs[0].clone();
            let (a, b) = (pg.replicas[0].sds_id, pg.replicas[1].sds_id);
            // Both expire before either is declared: each declaration names the other.
            s.apply(&Command::DeclareSdsDown { sds_id: a, unresponsive: vec![b] }).unwrap();
            s.apply(&Command::DeclareSdsDown { sds_id: b, unresponsive: vec![] }).unwrap();
            check_invariants(&s);
            let now = &s.pools[&pool_id].pgs[0];
            assert_eq!(now.in_sync().map(|r| r.sds_id).collect::<Vec<_>>(), vec![a, b], "both complete copies kept");
            let back = [a, b][returning_first];
            let other = [a, b][1 - returning_first];
            s.apply(&Command::DeclareSdsUp { sds_id: back, unresponsive: vec![] }).unwrap();
            check_invariants(&s);
            let now = &s.pools[&pool_id].pgs[0];
            assert_eq!(now.replicas[0].sds_id, back, "the returned copy serves");
            assert!(now.replicas.iter().all(|r| r.sds_id != other), "the still-dead copy is dropped");
            assert_eq!(now.replicas.len(), 2, "and replaced");
        }
    }

    #[test]
    fn a_copy_dropped_while_its_partner_lived_never_comes_back() {
        let mut s = cluster(4, false);
        let pool_id = s.pool_by_name("p").unwrap().id;
        let pg = s.pools[&pool_id].pgs[0].clone();
        let (a, b) = (pg.replicas[0].sds_id, pg.replicas[1].sds_id);
        s.apply(&Command::DeclareSdsDown { sds_id: a, unresponsive: vec![] }).unwrap();
        // b served alone (and may have acked writes a lacks); then b dies too.
        s.apply(&Command::DeclareSdsDown { sds_id: b, unresponsive: vec![] }).unwrap();
        s.apply(&Command::DeclareSdsUp { sds_id: a, unresponsive: vec![b] }).unwrap();
        check_invariants(&s);
        let now = &s.pools[&pool_id].pgs[0];
        assert_eq!(now.in_sync().map(|r| r.sds_id).collect::<Vec<_>>(), vec![b], "only b is complete");
    }

    #[test]
    fn liveness_commands_follow_leases() {
        let mut s = cluster(3, false);
        let a = sds_id(&s, "s0");
        let lease_of =
            |dead: u64, status: LeaseStatus| move |id: u64| if id == dead { status } else { LeaseStatus::Held };
        assert!(liveness_commands(&s, lease_of(a, LeaseStatus::Unknown)).is_empty(), "unknown is not dead");
        // A new leader that has not heard from b yet declares nothing, not even a proved death:
        // b would otherwise count as unresponsive and a's PGs could lose their survivor.
        let b = sds_id(&s, "s1");
        let new_leader = |id: u64| match id {
            x if x == a => LeaseStatus::Expired,
            x if x == b => LeaseStatus::Unknown,
            _ => LeaseStatus::Held,
        };
        assert!(liveness_commands(&s, new_leader).is_empty());
        let cmds = liveness_commands(&s, lease_of(a, LeaseStatus::Expired));
        assert_eq!(cmds, vec![Command::DeclareSdsDown { sds_id: a, unresponsive: vec![] }]);
        s.apply(&cmds[0]).unwrap();
        assert!(liveness_commands(&s, lease_of(a, LeaseStatus::Expired)).is_empty());
        assert!(liveness_commands(&s, lease_of(a, LeaseStatus::Unknown)).is_empty());
        assert_eq!(
            liveness_commands(&s, |_| LeaseStatus::Held),
            vec![Command::DeclareSdsUp { sds_id: a, unresponsive: vec![] }]
        );
    }
}
