//! Preemption fences the node a volume is taken from: `volume map --preempt` maps it to the
//! new SDC alone and moves the volume's mapping epoch on, so the SDSs refuse IO that still
//! carries the old one. The old node here keeps the volume open through `nbdfuse` (as a
//! kernel would keep a block device open), and its writes fail instead of landing.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use common::*;

/// An NBD export exposed as a file by `nbdfuse`; unmounted on drop.
struct FuseFile {
    mount: PathBuf,
    path: PathBuf,
    child: Child,
}

impl FuseFile {
    fn new(dir: &Path, label: &str, uri: &str, size: u64) -> FuseFile {
        let mount = dir.join(label);
        std::fs::create_dir_all(&mount).expect("mount point");
        let path = mount.join("disk");
        let child = tool("nbdfuse")
            .arg(&path)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nbdfuse (run scripts/test.sh to install it)");
        poll("the nbdfuse file", POLL_TIMEOUT, || {
            std::fs::metadata(&path).ok().filter(|m| m.len() == size).map(|_| ())
        });
        FuseFile { mount, path, child }
    }

    /// Writes `data` at `offset` and fsyncs: the fsync reports the export's answer.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(data)?;
        f.sync_all()
    }

    fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::OpenOptions::new().read(true).open(&self.path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        unmount_fuse(&self.mount);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn preempted_node_can_no_longer_write() {
    let c = Cluster::start(3);
    let size = 64 * MIB;
    let uri_a = c.volume("shared", "64MiB");
    let a = FuseFile::new(&c.dir, "node-a", &uri_a, size);
    a.write_at(0, &vec![0xA1; 64 * 1024]).expect("node A writes while it holds the volume");

    // Node B: a second SDC.
    let socket_b = c.dir.join("sdc-2.sock");
    c.spawn_daemon("sdc-2", &["sdc", "--name", "sdc-2", "--socket", socket_b.to_str().unwrap()]);
    poll("sdc-2 to register", POLL_TIMEOUT, || {
        let sdcs = c.json(&["sdc", "ls"]);
        sdcs.as_array().is_some_and(|l| l.iter().any(|s| s["name"] == "sdc-2")).then_some(())
    });

    // Without preempt, B cannot take a volume A holds.
    let out = c.cli(&["volume", "map", "shared", "--sdc", "sdc-2"]);
    assert!(!out.status.success(), "mapped a volume held elsewhere without preempt: {}", describe(&out));

    let uri_b = c.ok(&["volume", "map", "shared", "--sdc", "sdc-2", "--preempt"]).trim().to_string();
    let table = c.ok(&["volume", "ls"]);
    let row = table.lines().find(|l| l.starts_with("shared ")).expect("the volume is listed");
    assert!(row.trim_end().ends_with(" sdc-2"), "the volume is not mapped to sdc-2 alone: {table}");

    // A still has the export open; its writes are now refused, not applied.
    let refused = a.write_at(1024 * 1024, &vec![0xBA; 64 * 1024]);
    assert!(refused.is_err(), "the preempted node could still write");
    eprintln!("write from the preempted node: {refused:?}");

    // B sees A's acknowledged data, not the refused write, and writes its own.
    let b = FuseFile::new(&c.dir, "node-b", &uri_b, size);
    assert_eq!(b.read_at(0, 64 * 1024).expect("B reads"), vec![0xA1; 64 * 1024]);
    assert_eq!(b.read_at(1024 * 1024, 64 * 1024).expect("B reads"), vec![0; 64 * 1024], "a refused write landed");
    b.write_at(1024 * 1024, &vec![0xB2; 64 * 1024]).expect("B writes");
    assert_eq!(b.read_at(1024 * 1024, 64 * 1024).expect("B reads"), vec![0xB2; 64 * 1024]);
    // A keeps failing.
    assert!(a.write_at(0, &vec![0xCC; 64 * 1024]).is_err(), "the preempted node wrote later");
    assert_eq!(b.read_at(0, 64 * 1024).expect("B reads"), vec![0xA1; 64 * 1024]);
    drop(b);
    drop(a);
    c.verify("shared");
}
