//! Reference counts per (volume, caller id), kept on disk so a restart of the service
//! forgets nothing (REX-Ray kept them in memory and lost them), and an exclusive lock that
//! serialises mount and unmount across every process using the same state directory (the
//! Docker plugin, the CLI, dvdcli, the DVDI launcher).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// volume name -> caller ids holding it mounted.
pub type Refs = BTreeMap<String, BTreeSet<String>>;

pub struct RefStore {
    path: PathBuf,
}

impl RefStore {
    pub fn new(state_dir: &Path) -> RefStore {
        RefStore { path: state_dir.join("refs.json") }
    }

    pub fn load(&self) -> std::io::Result<Refs> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| std::io::Error::other(format!("{}: corrupt reference counts: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Refs::new()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, refs: &Refs) -> std::io::Result<()> {
        let mut clean = refs.clone();
        clean.retain(|_, callers| !callers.is_empty());
        write_atomically(&self.path, &serde_json::to_vec_pretty(&clean).map_err(std::io::Error::other)?)
    }
}

/// Replaces `path` with `bytes` durably: temp file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Held while one mount or unmount runs; released on drop.
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Waits (on the blocking pool) for the exclusive lock on `<state_dir>/lock`.
    pub async fn acquire(state_dir: &Path) -> std::io::Result<StateLock> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join("lock");
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(StateLock { _file: file })
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_reload_and_empty_entries_are_dropped() {
        let dir = std::env::temp_dir().join(format!("tessera-refs-{}", std::process::id()));
        let store = RefStore::new(&dir);
        assert!(store.load().unwrap().is_empty());
        let mut refs = Refs::new();
        refs.entry("a".into()).or_default().insert("c1".into());
        refs.entry("a".into()).or_default().insert("c2".into());
        refs.entry("b".into()).or_default();
        store.save(&refs).unwrap();
        let back = store.load().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back["a"].len(), 2);
        std::fs::write(dir.join("refs.json"), b"{not json").unwrap();
        assert!(store.load().unwrap_err().to_string().contains("corrupt"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
