//! Test fixtures: an in-memory backend and registry (test-only: the real
//! backends live in other crates), a temp dir that cleans up, and a server
//! running `serve_unix` on a socket inside it.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_nbd::{BlockBackend, ExportRegistry, IoError, ServerConfig};

/// Reads at this offset panic (see `backend_panic_costs_one_request`).
pub const PANIC_OFFSET: u64 = 3 * 4096 + 7;

/// A RAM disk. One mutex: correct under any concurrency, which is all
/// these tests need (and it makes CAN_MULTI_CONN truthful).
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    /// Delay before each write completes, to keep requests in flight.
    write_delay: Duration,
    pub flushes: AtomicU64,
}

impl MemBackend {
    pub fn new(size_bytes: usize) -> Self {
        MemBackend {
            data: Mutex::new(vec![0; size_bytes]),
            read_only: false,
            write_delay: Duration::ZERO,
            flushes: AtomicU64::new(0),
        }
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    pub fn with_write_delay(mut self, delay: Duration) -> Self {
        self.write_delay = delay;
        self
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().expect("test backend lock").clone()
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, IoError> {
        let start = usize::try_from(offset).map_err(|_| IoError::Invalid)?;
        let len = usize::try_from(len).map_err(|_| IoError::Invalid)?;
        let end = start.checked_add(len).ok_or(IoError::Invalid)?;
        Ok(start..end)
    }
}

impl BlockBackend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.data.lock().expect("test backend lock").len() as u64
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        // A deliberately buggy backend path, to test panic containment.
        assert!(offset != PANIC_OFFSET, "test backend asked to panic");
        let r = self.range(offset, buf.len() as u64)?;
        let data = self.data.lock().map_err(|_| IoError::Io)?;
        buf.copy_from_slice(data.get(r).ok_or(IoError::Invalid)?);
        Ok(())
    }

    async fn write(&self, offset: u64, src: &[u8], _fua: bool) -> Result<(), IoError> {
        if !self.write_delay.is_zero() {
            tokio::time::sleep(self.write_delay).await;
        }
        let r = self.range(offset, src.len() as u64)?;
        let mut data = self.data.lock().map_err(|_| IoError::Io)?;
        data.get_mut(r).ok_or(IoError::Invalid)?.copy_from_slice(src);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
        let r = self.range(offset, len)?;
        let mut data = self.data.lock().map_err(|_| IoError::Io)?;
        data.get_mut(r).ok_or(IoError::Invalid)?.fill(0);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> Option<String> {
        Some("in-memory test disk".to_owned())
    }
}

pub struct MemRegistry {
    pub exports: BTreeMap<String, Arc<MemBackend>>,
    pub default: Option<String>,
}

impl MemRegistry {
    pub fn new() -> Self {
        MemRegistry { exports: BTreeMap::new(), default: None }
    }

    pub fn with(mut self, name: &str, backend: MemBackend) -> Self {
        self.exports.insert(name.to_owned(), Arc::new(backend));
        self
    }

    pub fn with_default(mut self, name: &str) -> Self {
        self.default = Some(name.to_owned());
        self
    }

    pub fn get(&self, name: &str) -> Arc<MemBackend> {
        self.exports.get(name).cloned().expect("export exists in test registry")
    }
}

impl ExportRegistry for MemRegistry {
    type Backend = MemBackend;

    async fn open(&self, name: &str) -> Option<Arc<MemBackend>> {
        self.exports.get(name).cloned()
    }

    async fn list(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    fn default_export(&self) -> Option<String> {
        self.default.clone()
    }
}

/// A unique directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("tessera-nbd-{label}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `serve_unix` running on `<tempdir>/nbd.sock`; stopped on drop.
pub struct TestServer {
    pub registry: Arc<MemRegistry>,
    pub socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
    // Last: removed after the server task is aborted.
    pub dir: TempDir,
}

impl TestServer {
    pub fn start(label: &str, registry: MemRegistry, cfg: ServerConfig) -> Self {
        let dir = TempDir::new(label);
        let socket = dir.path.join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind unix socket");
        let registry = Arc::new(registry);
        let task = tokio::spawn({
            let registry = registry.clone();
            async move {
                let _never = tessera_nbd::serve_unix(listener, registry, cfg).await;
            }
        });
        TestServer { registry, socket, task, dir }
    }

    /// libnbd / qemu URI for an export on this server.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so tests need no rand.
pub fn pseudo_random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs a real client binary to completion. Panics (fails the test) if the
/// binary is missing or it exceeds the timeout: these tests never skip.
pub async fn run_client(program: &str, args: &[&str], timeout: Duration) -> std::process::Output {
    let child = tokio::process::Command::new(program).args(args).kill_on_drop(true).output();
    match tokio::time::timeout(timeout, child).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {program} (is it installed?): {e}"),
        Err(_) => panic!("{program} {args:?} did not finish within {timeout:?}"),
    }
}

pub fn describe(out: &std::process::Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
