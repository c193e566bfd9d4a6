//! The control protocol (pure: parse and format, no I/O).
//!
//! One command per line, one reply line per command: `ok ...` or
//! `error REASON`. Commands:
//!
//! ```text
//! ping
//! cut *|FILE drop
//! cut *|FILE torn SEED
//! fail FILE read|write|flush|any once|always
//! heal *|FILE
//! hang FILE
//! release *|FILE
//! stats FILE
//! ```

use crate::cache::CutMode;
use crate::faults::{FaultOp, FaultRepeat, FaultRule};

/// Longest command line accepted, newline included; longer lines get an
/// error and the connection is closed (a file name is at most 255 bytes).
pub const MAX_LINE_BYTES: usize = 1024;
/// Longest file name, as in every Linux file system.
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    All,
    File(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ping,
    Cut { target: Target, mode: CutMode },
    Fail { file: String, rule: FaultRule },
    Heal { target: Target },
    Hang { file: String },
    Release { target: Target },
    Stats { file: String },
}

/// Parses one line (without its newline).
pub fn parse(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    match words.as_slice() {
        [] => Err("empty command".to_string()),
        ["ping"] => Ok(Command::Ping),
        ["cut", target, "drop"] => Ok(Command::Cut { target: parse_target(target)?, mode: CutMode::Drop }),
        ["cut", target, "torn", seed] => {
            let seed = seed.parse::<u64>().map_err(|_| format!("bad seed {seed:?}: expected a u64"))?;
            Ok(Command::Cut { target: parse_target(target)?, mode: CutMode::Torn { seed } })
        }
        ["cut", ..] => Err("usage: cut *|FILE drop | cut *|FILE torn SEED".to_string()),
        ["fail", file, op, repeat] => {
            let rule = FaultRule { op: op.parse::<FaultOp>()?, repeat: repeat.parse::<FaultRepeat>()? };
            Ok(Command::Fail { file: parse_file(file)?, rule })
        }
        ["fail", ..] => Err("usage: fail FILE read|write|flush|any once|always".to_string()),
        ["heal", target] => Ok(Command::Heal { target: parse_target(target)? }),
        ["hang", file] => Ok(Command::Hang { file: parse_file(file)? }),
        ["release", target] => Ok(Command::Release { target: parse_target(target)? }),
        ["stats", file] => Ok(Command::Stats { file: parse_file(file)? }),
        [verb @ ("ping" | "heal" | "hang" | "release" | "stats"), ..] => {
            Err(format!("wrong number of arguments for {verb}"))
        }
        [verb, ..] => Err(format!("unknown command {verb:?}: expected ping, cut, fail, heal, hang, release or stats")),
    }
}

fn parse_target(word: &str) -> Result<Target, String> {
    if word == "*" {
        return Ok(Target::All);
    }
    parse_file(word).map(Target::File)
}

/// A file name of the flat mount: no path separators, not `.` or `..`, and
/// not `*`, which means every file where a command allows it.
pub fn parse_file(word: &str) -> Result<String, String> {
    if word == "*" {
        return Err("this command takes one file, not *".to_string());
    }
    if word.is_empty() || word == "." || word == ".." || word.contains('/') || word.contains('\0') {
        return Err(format!("bad file name {word:?}: a plain name in the mount is expected"));
    }
    if word.len() > MAX_NAME_BYTES {
        return Err(format!("file name longer than {MAX_NAME_BYTES} bytes"));
    }
    Ok(word.to_string())
}

/// What `stats FILE` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStats {
    pub pending_ops: u64,
    pub pending_bytes: u64,
    pub syncs: u64,
    pub failed_ops: u64,
    pub destaged_ops: u64,
    pub cuts: u64,
    pub fault_rules: u64,
    pub hung: bool,
    pub parked_ops: u64,
}

impl FileStats {
    /// The text after `ok ` in a `stats` reply.
    pub fn format(&self) -> String {
        format!(
            "pending_ops={} pending_bytes={} syncs={} failed_ops={} destaged_ops={} cuts={} fault_rules={} hung={} \
             parked_ops={}",
            self.pending_ops,
            self.pending_bytes,
            self.syncs,
            self.failed_ops,
            self.destaged_ops,
            self.cuts,
            self.fault_rules,
            self.hung,
            self.parked_ops
        )
    }

    /// Parses what [`FileStats::format`] wrote; unknown keys are ignored so
    /// the daemon may report more than an older client knows.
    pub fn parse(text: &str) -> Result<FileStats, String> {
        let mut stats = FileStats::default();
        for pair in text.split_ascii_whitespace() {
            let (key, value) = pair.split_once('=').ok_or_else(|| format!("bad stats field {pair:?}"))?;
            let number = || value.parse::<u64>().map_err(|_| format!("bad value in {pair:?}"));
            match key {
                "pending_ops" => stats.pending_ops = number()?,
                "pending_bytes" => stats.pending_bytes = number()?,
                "syncs" => stats.syncs = number()?,
                "failed_ops" => stats.failed_ops = number()?,
                "destaged_ops" => stats.destaged_ops = number()?,
                "cuts" => stats.cuts = number()?,
                "fault_rules" => stats.fault_rules = number()?,
                "parked_ops" => stats.parked_ops = number()?,
                "hung" => stats.hung = value == "true",
                _ => {}
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(parse("ping"), Ok(Command::Ping));
        assert_eq!(parse(" cut *  drop "), Ok(Command::Cut { target: Target::All, mode: CutMode::Drop }));
        assert_eq!(
            parse("cut d1 torn 7"),
            Ok(Command::Cut { target: Target::File("d1".into()), mode: CutMode::Torn { seed: 7 } })
        );
        assert_eq!(
            parse("fail d1 flush once"),
            Ok(Command::Fail { file: "d1".into(), rule: FaultRule { op: FaultOp::Flush, repeat: FaultRepeat::Once } })
        );
        assert_eq!(parse("heal *"), Ok(Command::Heal { target: Target::All }));
        assert_eq!(parse("hang d1"), Ok(Command::Hang { file: "d1".into() }));
        assert_eq!(parse("release d1"), Ok(Command::Release { target: Target::File("d1".into()) }));
        assert_eq!(parse("stats d1"), Ok(Command::Stats { file: "d1".into() }));
    }

    #[test]
    fn bad_commands_get_reasons() {
        for line in [
            "",
            "dance",
            "cut",
            "cut * melt",
            "cut * torn -1",
            "fail d1 flush twice",
            "fail d1 sing once",
            "hang *",
            "hang ../etc",
            "stats",
            "ping ping",
        ] {
            let error = parse(line).unwrap_err();
            assert!(!error.is_empty(), "{line:?}");
        }
        assert!(parse(&format!("stats {}", "x".repeat(300))).is_err());
    }

    #[test]
    fn stats_round_trip() {
        let stats = FileStats { pending_ops: 3, pending_bytes: 4096, syncs: 2, hung: true, ..FileStats::default() };
        assert_eq!(FileStats::parse(&stats.format()), Ok(stats));
    }
}
