//! Which targets a FLUSH must reach: the bookkeeping behind "a FLUSH is acknowledged only
//! when every write acknowledged before it was received is durable on every copy".
//!
//! Both the SDC (targets: the PG primaries it wrote to) and the SDS (targets: the copies it
//! forwarded writes to) keep one [`FlushLedger`]. Pure: no I/O, no clocks.
//!
//! # Why sequence numbers, not a set drained when a flush starts
//! A set drained at the start of flush A leaves a concurrent flush B (same or another NBD
//! connection) nothing to do: B returns at once although A, still in flight, has not made
//! the writes B must cover durable yet. Here every completed write takes the next number of
//! one counter and raises its target's `last_completed_seq`; a flush plans from a snapshot
//! and, when a target's flush succeeds, raises that target's `durable_through_seq` to the
//! number it saw. A flush that starts while another is in flight sees the target still
//! owed and flushes it itself. Nothing is ever forgotten by starting a flush, only by
//! finishing one.
//!
//! # Invariants
//! - A write is noted when it *completed* (just before it is acknowledged), never when it
//!   is sent: noting at send time would let a flush planned before the write reached the
//!   target mark it durable.
//! - `durable_through_seq <= last_completed_seq` for every target, and neither goes down.
//! - `owe_everyone` is set by a fresh process: writes acknowledged by an earlier incarnation
//!   of this SDC or SDS may be owed anywhere, so the first flush reaches every live target.
//! - Targets restart. Each acknowledgement names the target's *incarnation* (a random id
//!   per process start); a target whose incarnation changed while it owed a flush may have
//!   lost those writes with its volatile cache, and no flush of the new incarnation can
//!   make them durable. Such writes are *lost*: the next flush that covers them fails
//!   (once, like a write-back error), instead of acknowledging data that may be gone.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TargetSeqs {
    last_completed_seq: u64,
    durable_through_seq: u64,
    /// The incarnation that acknowledged the writes still owed.
    incarnation: u64,
    /// Writes of an earlier incarnation were owed when it changed.
    lost_writes: bool,
}

/// What one flush must do, planned from a snapshot of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushPlan {
    /// Targets that took writes not yet known durable, with the sequence number a
    /// successful flush of that target makes durable.
    pub targets: Vec<(u64, u64)>,
    /// Some target restarted while it owed writes: this flush must fail.
    pub lost_writes: bool,
    /// Writes of an earlier incarnation may be owed by any target: flush every live one.
    pub everyone: bool,
}

impl FlushPlan {
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty() && !self.everyone && !self.lost_writes
    }
}

#[derive(Debug, Clone)]
pub struct FlushLedger {
    next_seq: u64,
    targets: BTreeMap<u64, TargetSeqs>,
    owe_everyone: bool,
}

impl FlushLedger {
    /// A ledger for a process that just started: its first flush reaches every target.
    pub fn new_incarnation() -> FlushLedger {
        FlushLedger { next_seq: 1, targets: BTreeMap::new(), owe_everyone: true }
    }

    /// A ledger that owes nothing (a volume created by this process, tests).
    pub fn empty() -> FlushLedger {
        FlushLedger { next_seq: 1, targets: BTreeMap::new(), owe_everyone: false }
    }

    /// Records a write to `target` that completed (is about to be acknowledged), as
    /// acknowledged by the target's `incarnation`.
    pub fn note_completed_write(&mut self, target: u64, incarnation: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let t = self.targets.entry(target).or_insert(TargetSeqs { incarnation, ..TargetSeqs::default() });
        if t.incarnation != incarnation && t.last_completed_seq > t.durable_through_seq {
            t.lost_writes = true;
        }
        t.incarnation = incarnation;
        t.last_completed_seq = seq;
    }

    /// The targets a flush starting now must make durable.
    pub fn plan(&self) -> FlushPlan {
        let targets = self
            .targets
            .iter()
            .filter(|(_, t)| t.last_completed_seq > t.durable_through_seq)
            .map(|(id, t)| (*id, t.last_completed_seq))
            .collect();
        let lost_writes = self.targets.values().any(|t| t.lost_writes);
        FlushPlan { targets, everyone: self.owe_everyone, lost_writes }
    }

    /// The incarnation that acknowledged `target`'s owed writes.
    pub fn incarnation_of(&self, target: u64) -> Option<u64> {
        self.targets.get(&target).map(|t| t.incarnation)
    }

    /// A flush of `target` was answered by `incarnation`. When that is not the incarnation
    /// that acknowledged the owed writes, they may be lost: marked so, the next flush fails.
    pub fn flush_answered_by(&mut self, target: u64, incarnation: u64) {
        if let Some(t) = self.targets.get_mut(&target) {
            if t.incarnation != incarnation {
                t.lost_writes = true;
            }
        }
    }

    /// The owed writes of `target` may be lost (it died with them, and nothing proves the
    /// other copies kept them): the next flush fails.
    pub fn mark_lost(&mut self, target: u64) {
        if let Some(t) = self.targets.get_mut(&target) {
            if t.last_completed_seq > t.durable_through_seq {
                t.lost_writes = true;
            }
        }
    }

    /// A flush failed because of lost writes and told its caller so: like a write-back
    /// error, the loss is reported once. The targets' owed writes are forgotten (nothing
    /// can make them durable now); later writes are owed afresh.
    pub fn report_lost_writes(&mut self) {
        self.targets.retain(|_, t| !t.lost_writes);
    }

    /// `target` was flushed successfully by a flush planned with `seq` for it.
    pub fn flushed(&mut self, target: u64, seq: u64) {
        if let Some(t) = self.targets.get_mut(&target) {
            if t.lost_writes {
                return; // reported by `report_lost_writes`, never made durable
            }
            assert!(seq <= t.last_completed_seq, "flushed a sequence number never handed out");
            t.durable_through_seq = t.durable_through_seq.max(seq);
            if t.durable_through_seq == t.last_completed_seq {
                // Nothing owed: forget the target so the ledger stays as small as the set
                // of targets with writes in flight.
                self.targets.remove(&target);
            }
        }
    }

    /// A flush planned with `plan.everyone` reached every live target successfully.
    pub fn flushed_everyone(&mut self, plan: &FlushPlan) {
        assert!(plan.everyone);
        self.owe_everyone = false;
        for (target, seq) in &plan.targets {
            self.flushed(*target, *seq);
        }
    }

    /// Whether anything is owed (for tests and status).
    pub fn owes_anything(&self) -> bool {
        !self.plan().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_in_flight_does_not_cover_a_concurrent_one() {
        let mut l = FlushLedger::empty();
        l.note_completed_write(7, 1);
        let first = l.plan();
        assert_eq!(first.targets, vec![(7, 1)]);
        // The first flush has not finished: a second flush must still reach target 7.
        let second = l.plan();
        assert_eq!(second.targets, vec![(7, 1)]);
        l.flushed(7, 1);
        assert!(l.plan().is_empty());
    }

    #[test]
    fn a_write_completed_after_planning_stays_owed() {
        let mut l = FlushLedger::empty();
        l.note_completed_write(7, 1);
        let plan = l.plan();
        l.note_completed_write(7, 1); // seq 2, after the plan
        l.flushed(7, plan.targets[0].1);
        assert_eq!(l.plan().targets, vec![(7, 2)]);
    }

    #[test]
    fn failed_targets_stay_owed_and_successful_ones_are_forgotten() {
        let mut l = FlushLedger::empty();
        l.note_completed_write(1, 1);
        l.note_completed_write(2, 1);
        let plan = l.plan();
        l.flushed(1, plan.targets[0].1);
        assert_eq!(l.plan().targets, vec![(2, 2)]);
    }

    #[test]
    fn an_out_of_order_completion_never_lowers_durability() {
        let mut l = FlushLedger::empty();
        l.note_completed_write(1, 1);
        let early = l.plan();
        l.note_completed_write(1, 1);
        let late = l.plan();
        l.flushed(1, late.targets[0].1);
        l.flushed(1, early.targets[0].1); // the older flush finishing last changes nothing
        assert!(l.plan().is_empty());
    }

    #[test]
    fn a_target_that_restarted_while_owing_writes_fails_the_next_flush_once() {
        let mut l = FlushLedger::empty();
        l.note_completed_write(7, 100);
        // The target restarted (power cut) and acknowledges a new write as incarnation 101.
        l.note_completed_write(7, 101);
        assert!(l.plan().lost_writes, "the writes 100 acknowledged may be gone");
        l.report_lost_writes();
        assert!(!l.plan().lost_writes);
        assert!(l.plan().is_empty(), "reported once, then forgotten");
        // A flush answered by another incarnation than the one that acknowledged.
        l.note_completed_write(7, 101);
        let plan = l.plan();
        l.flush_answered_by(7, 102);
        l.flushed(7, plan.targets[0].1);
        assert!(l.plan().lost_writes);
    }

    #[test]
    fn writes_of_a_dead_target_that_nothing_proves_kept_are_lost() {
        let mut l = FlushLedger::empty();
        l.note_completed_write(4, 1);
        l.mark_lost(4);
        let plan = l.plan();
        assert!(plan.lost_writes);
        l.flushed(4, plan.targets[0].1);
        assert!(l.plan().lost_writes, "a flush never makes lost writes durable");
        l.mark_lost(9); // unknown targets owe nothing
        l.report_lost_writes();
        assert!(l.plan().is_empty());
    }

    #[test]
    fn a_new_incarnation_owes_everyone_until_one_flush_reached_all() {
        let mut l = FlushLedger::new_incarnation();
        assert!(l.plan().everyone);
        l.note_completed_write(3, 1);
        let plan = l.plan();
        assert!(plan.everyone);
        l.flushed_everyone(&plan);
        assert!(l.plan().is_empty());
    }
}
