//! Injected I/O errors of one file (pure: no I/O).
//!
//! A rule names an operation class and whether it fires once or on every
//! matching operation. Rules are checked in the order they were added; the
//! first match fires (and a `once` rule is then removed).

use std::fmt;
use std::str::FromStr;

/// Rules a file may hold at a time; `fail` past this is refused rather than
/// growing a list that every I/O scans.
pub const MAX_FAULT_RULES: usize = 16;

/// What kind of I/O the file system is about to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    /// write, and the fallocate modes that change data (punch hole, zero range).
    Write,
    /// fsync and fdatasync: the disk's cache flush.
    Flush,
}

/// Which operations a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
    Any,
}

impl FaultOp {
    fn matches(self, io: IoKind) -> bool {
        matches!(
            (self, io),
            (FaultOp::Any, _)
                | (FaultOp::Read, IoKind::Read)
                | (FaultOp::Write, IoKind::Write)
                | (FaultOp::Flush, IoKind::Flush)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::Flush => "flush",
            FaultOp::Any => "any",
        }
    }
}

impl fmt::Display for FaultOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FaultOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(FaultOp::Read),
            "write" => Ok(FaultOp::Write),
            "flush" => Ok(FaultOp::Flush),
            "any" => Ok(FaultOp::Any),
            other => Err(format!("unknown operation {other:?}: expected read, write, flush or any")),
        }
    }
}

/// Whether a rule fires once or stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultRepeat {
    Once,
    Always,
}

impl FromStr for FaultRepeat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "once" => Ok(FaultRepeat::Once),
            "always" => Ok(FaultRepeat::Always),
            other => Err(format!("unknown repeat {other:?}: expected once or always")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRule {
    pub op: FaultOp,
    pub repeat: FaultRepeat,
}

/// The fault rules of one file.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<FaultRule>,
}

impl Faults {
    pub fn add(&mut self, rule: FaultRule) -> Result<(), String> {
        if self.rules.len() >= MAX_FAULT_RULES {
            return Err(format!("at most {MAX_FAULT_RULES} fault rules per file; heal it first"));
        }
        self.rules.push(rule);
        Ok(())
    }

    pub fn heal(&mut self) {
        self.rules.clear();
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether an operation of kind `io` must fail now; consumes a `once` rule that fires.
    pub fn should_fail(&mut self, io: IoKind) -> bool {
        let Some(index) = self.rules.iter().position(|rule| rule.op.matches(io)) else {
            return false;
        };
        if self.rules[index].repeat == FaultRepeat::Once {
            self.rules.remove(index);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_rule_fires_once_and_only_for_its_op() {
        let mut faults = Faults::default();
        faults.add(FaultRule { op: FaultOp::Flush, repeat: FaultRepeat::Once }).unwrap();
        assert!(!faults.should_fail(IoKind::Write));
        assert!(faults.should_fail(IoKind::Flush));
        assert!(!faults.should_fail(IoKind::Flush));
    }

    #[test]
    fn always_rule_stays_until_healed() {
        let mut faults = Faults::default();
        faults.add(FaultRule { op: FaultOp::Any, repeat: FaultRepeat::Always }).unwrap();
        assert!(faults.should_fail(IoKind::Read));
        assert!(faults.should_fail(IoKind::Write));
        faults.heal();
        assert!(!faults.should_fail(IoKind::Read));
    }

    #[test]
    fn rule_count_is_bounded() {
        let mut faults = Faults::default();
        for _ in 0..MAX_FAULT_RULES {
            faults.add(FaultRule { op: FaultOp::Read, repeat: FaultRepeat::Once }).unwrap();
        }
        assert!(faults.add(FaultRule { op: FaultOp::Read, repeat: FaultRepeat::Once }).is_err());
    }
}
