//! The daemon's state: the files of the backing directory, their caches,
//! their hung-op queues, and what each control command does to them.
//!
//! One mutex guards all of it (see `fs`): the FUSE session thread and the
//! control threads each hold it for one short step, and never across a wait.
//!
//! A parked op has not reached the disk: a cut leaves parked ops alone, and
//! they run (against the fault rules of that moment) on `release`.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::backing::FileBacking;
use crate::cache::{CutMode, CutReport, FileCache};
use crate::control::{Command, FileStats, Target};

/// Ops a hung file may park; past it an op is answered `EIO` at once, since
/// the session loop must never wait and memory must stay bounded.
pub const MAX_PARKED_OPS: usize = 1024;
/// Write payload bytes a hung file may park (same reason).
pub const MAX_PARKED_BYTES: u64 = 256 << 20;
/// Files the mount serves; a bigger backing directory is refused.
pub const MAX_FILES: usize = 4096;
/// Inode of the mount's root directory (FUSE fixes it at 1).
pub const ROOT_INO: u64 = 1;

/// An operation held while its file hangs. Dropping it unanswered makes
/// fuser answer `EIO`, so a discarded op never leaves the kernel waiting.
pub type Parked = Box<dyn FnOnce(&mut Node) + Send>;

pub struct Node {
    pub name: String,
    pub ino: u64,
    pub cache: FileCache<FileBacking>,
    hung: bool,
    parked: VecDeque<(u64, Parked)>,
    parked_bytes: u64,
}

impl Node {
    /// Runs `op` now, or parks it behind the ops already parked if the file hangs.
    pub fn submit(&mut self, payload_bytes: u64, op: Parked) {
        if !self.hung {
            op(self);
            return;
        }
        if self.parked.len() >= MAX_PARKED_OPS || self.parked_bytes + payload_bytes > MAX_PARKED_BYTES {
            eprintln!("tessera-crashdisk: {}: hung-op queue full; answering EIO", self.name);
            drop(op);
            return;
        }
        self.parked_bytes += payload_bytes;
        self.parked.push_back((payload_bytes, op));
    }

    /// Stops hanging and runs the parked ops in arrival order. The caller holds
    /// the state lock throughout, so an op arriving meanwhile queues behind them.
    fn release(&mut self) -> usize {
        self.hung = false;
        let mut released = 0;
        while let Some((bytes, op)) = self.parked.pop_front() {
            self.parked_bytes -= bytes;
            op(self);
            released += 1;
        }
        released
    }

    fn stats(&self) -> FileStats {
        let cache = self.cache.stats();
        FileStats {
            pending_ops: cache.pending_ops,
            pending_bytes: cache.pending_bytes,
            syncs: cache.syncs,
            failed_ops: cache.failed_ops,
            destaged_ops: cache.destaged_ops,
            cuts: cache.cuts,
            fault_rules: self.cache.faults.len() as u64,
            hung: self.hung,
            parked_ops: self.parked.len() as u64,
        }
    }

    fn cut(&mut self, mode: CutMode, run_seed: u64) -> Result<CutReport, String> {
        let mode = match mode {
            // Each file tears by its own stream, so `cut * torn S` and `cut F torn S` agree on F.
            CutMode::Torn { seed } => CutMode::Torn { seed: seed ^ run_seed ^ fnv1a(self.name.as_bytes()) },
            CutMode::Drop => CutMode::Drop,
        };
        self.cache.cut(mode).map_err(|error| format!("{}: cut: errno {}", self.name, error.errno()))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

pub struct State {
    dir: PathBuf,
    nodes: HashMap<u64, Node>,
    inos: HashMap<String, u64>,
    next_ino: u64,
    /// `--seed`, mixed into every torn cut.
    run_seed: u64,
}

impl State {
    /// Serves the regular files of `dir` (not its subdirectories).
    pub fn new(dir: &Path, run_seed: u64) -> io::Result<State> {
        let mut state =
            State { dir: dir.to_path_buf(), nodes: HashMap::new(), inos: HashMap::new(), next_ino: 2, run_seed };
        state.scan()?;
        Ok(state)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Picks up regular files that appeared in the backing directory.
    pub fn scan(&mut self) -> io::Result<()> {
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Some(name) = entry.file_name().to_str() {
                self.lookup(name)?;
            }
        }
        Ok(())
    }

    pub fn node_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    pub fn files(&self) -> Vec<(u64, String)> {
        let mut files: Vec<(u64, String)> = self.nodes.values().map(|node| (node.ino, node.name.clone())).collect();
        files.sort();
        files
    }

    /// The inode of `name`, loading it from the backing directory if it is a
    /// regular file there; `None` if there is no such file.
    pub fn lookup(&mut self, name: &str) -> io::Result<Option<u64>> {
        if let Some(&ino) = self.inos.get(name) {
            return Ok(Some(ino));
        }
        if crate::control::parse_file(name).is_err() {
            return Ok(None);
        }
        let path = self.dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_file() => {}
            Ok(_) => return Ok(None),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        self.insert(name, file).map(Some)
    }

    fn insert(&mut self, name: &str, file: File) -> io::Result<u64> {
        if self.nodes.len() >= MAX_FILES {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = Node {
            name: name.to_string(),
            ino,
            cache: FileCache::new(FileBacking::new(file)),
            hung: false,
            parked: VecDeque::new(),
            parked_bytes: 0,
        };
        self.nodes.insert(ino, node);
        self.inos.insert(name.to_string(), ino);
        Ok(ino)
    }

    pub fn create(&mut self, name: &str, mode: u32, exclusive: bool) -> io::Result<u64> {
        if crate::control::parse_file(name).is_err() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(ino) = self.lookup(name)? {
            if exclusive {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            return Ok(ino);
        }
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).mode(mode & 0o7777).open(self.dir.join(name))?;
        self.insert(name, file)
    }

    /// Removes the file; its parked ops are dropped (answered `EIO`).
    pub fn unlink(&mut self, name: &str) -> io::Result<()> {
        let Some(ino) = self.lookup(name)? else {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        };
        fs::remove_file(self.dir.join(name))?;
        self.inos.remove(name);
        self.nodes.remove(&ino);
        Ok(())
    }

    /// Drops every parked op (each answered `EIO`): at shutdown, so no
    /// process stays blocked on a mount that is going away.
    pub fn drop_parked(&mut self) {
        for node in self.nodes.values_mut() {
            node.hung = false;
            node.parked.clear();
            node.parked_bytes = 0;
        }
    }

    fn file_node(&mut self, name: &str) -> Result<&mut Node, String> {
        match self.lookup(name) {
            Ok(Some(ino)) => Ok(self.nodes.get_mut(&ino).expect("lookup returns loaded inodes")),
            Ok(None) => Err(format!("no such file {name:?}")),
            Err(error) => Err(format!("{name}: {error}")),
        }
    }

    fn target_nodes(&mut self, target: &Target) -> Result<Vec<&mut Node>, String> {
        match target {
            Target::All => {
                let mut nodes: Vec<&mut Node> = self.nodes.values_mut().collect();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(nodes)
            }
            Target::File(name) => Ok(vec![self.file_node(name)?]),
        }
    }

    /// Carries out one control command; `Ok` is the text after `ok`.
    pub fn execute(&mut self, command: Command) -> Result<String, String> {
        match command {
            Command::Ping => Ok(String::new()),
            Command::Cut { target, mode } => {
                let mut total = CutReport::default();
                let run_seed = self.run_seed;
                for node in self.target_nodes(&target)? {
                    let report = node.cut(mode, run_seed)?;
                    total.ops_cut += report.ops_cut;
                    total.sectors_kept += report.sectors_kept;
                    total.sectors_lost += report.sectors_lost;
                }
                Ok(format!(
                    "ops_cut={} sectors_kept={} sectors_lost={}",
                    total.ops_cut, total.sectors_kept, total.sectors_lost
                ))
            }
            Command::Fail { file, rule } => {
                self.file_node(&file)?.cache.faults.add(rule)?;
                Ok(String::new())
            }
            Command::Heal { target } => {
                for node in self.target_nodes(&target)? {
                    node.cache.faults.heal();
                }
                Ok(String::new())
            }
            Command::Hang { file } => {
                self.file_node(&file)?.hung = true;
                Ok(String::new())
            }
            Command::Release { target } => {
                let mut released = 0;
                for node in self.target_nodes(&target)? {
                    released += node.release();
                }
                Ok(format!("released={released}"))
            }
            Command::Stats { file } => Ok(self.file_node(&file)?.stats().format()),
        }
    }
}
