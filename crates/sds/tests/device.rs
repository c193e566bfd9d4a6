//! Specs of the on-device extent store, run against real files (sparse, in a unique temp
//! dir) and a real loop device.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_sds::device::{
    Device, DeviceError, ExtentKey, FormatParams, SLOT_RECORD_SIZE_BYTES, SUPERBLOCK_SIZE_BYTES,
};

const CLUSTER: [u8; 16] = *b"tessera-test-clu";
const EXTENT: u32 = 1 << 20;
const MIB: u64 = 1 << 20;

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "tessera-device-{name}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A sparse file of `size_bytes`.
    fn file(&self, name: &str, size_bytes: u64) -> PathBuf {
        let path = self.0.join(name);
        File::create(&path).unwrap().set_len(size_bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn params(device_id: u64, extent_size_bytes: u32) -> FormatParams {
    FormatParams { cluster_id: CLUSTER, device_id, extent_size_bytes }
}

fn key(volume_id: u64, extent_index: u64) -> ExtentKey {
    ExtentKey { volume_id, extent_index }
}

/// A formatted 64 MiB file with 1 MiB extents (63 slots).
fn formatted(dir: &TempDir) -> PathBuf {
    let path = dir.file("dev", 64 * MIB);
    Device::format(&path, &params(7, EXTENT), false).unwrap();
    path
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

fn read_vec(device: &Device, k: ExtentKey, offset: u32, len: usize) -> Vec<u8> {
    let mut buf = vec![0xEE; len];
    device.read(k, offset, &mut buf).unwrap();
    buf
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x40;
    file.write_all_at(&byte, offset).unwrap();
}

/// Slot numbers whose records are not all zero, read straight from the file.
fn nonblank_slots(path: &Path, slot_count: u64) -> Vec<u64> {
    let file = File::open(path).unwrap();
    let mut table = vec![0u8; (slot_count * SLOT_RECORD_SIZE_BYTES) as usize];
    file.read_exact_at(&mut table, SUPERBLOCK_SIZE_BYTES).unwrap();
    table
        .chunks(SLOT_RECORD_SIZE_BYTES as usize)
        .enumerate()
        .filter(|(_, r)| r.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn format_then_open_round_trip() {
    let dir = TempDir::new("roundtrip");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(device.device_id(), 7);
    assert_eq!(device.extent_size_bytes(), EXTENT);
    // 1 MiB of superblock + table + padding, then 63 one-MiB slots.
    assert_eq!(device.capacity_extents(), 63);
    assert_eq!(device.used_extents(), 0);
    assert!(device.allocated_extents().is_empty());
    assert!(!device.is_block_device());
}

#[test]
fn data_survives_reopen() {
    let dir = TempDir::new("reopen");
    let path = formatted(&dir);
    let a = pattern(1, 8192);
    let b = pattern(2, EXTENT as usize);
    {
        let device = Device::open(&path, CLUSTER).unwrap();
        assert!(device.write(key(1, 0), 3, 4096, &a, false).unwrap());
        assert!(device.write(key(2, 5), 4, 0, &b, true).unwrap());
        assert!(!device.write(key(1, 0), 3, 4096, &a, false).unwrap(), "second write does not allocate");
        device.flush().unwrap();
    }
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(device.used_extents(), 2);
    assert_eq!(read_vec(&device, key(1, 0), 4096, 8192), a);
    assert_eq!(read_vec(&device, key(1, 0), 0, 4096), vec![0; 4096], "rest of a new slot reads zeros");
    assert_eq!(read_vec(&device, key(2, 5), 0, EXTENT as usize), b);
    let listed: Vec<(ExtentKey, u32)> = device.allocated_extents().iter().map(|(k, pg, _)| (*k, *pg)).collect();
    assert_eq!(listed, vec![(key(1, 0), 3), (key(2, 5), 4)]);
}

#[test]
fn thin_allocation_takes_space_only_where_written() {
    let dir = TempDir::new("thin");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    let blocks_after_format = std::fs::metadata(&path).unwrap().blocks();

    // Reading unallocated extents allocates nothing and returns zeros.
    for extent in 0..10 {
        assert_eq!(read_vec(&device, key(9, extent), 0, 65536), vec![0; 65536]);
    }
    assert_eq!(device.used_extents(), 0);
    device.flush().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().blocks(), blocks_after_format);

    device.write(key(9, 3), 0, 0, &pattern(5, 4096), false).unwrap();
    device.write(key(9, 40), 0, 512 * 1024, &pattern(6, 4096), false).unwrap();
    device.flush().unwrap();
    assert_eq!(device.used_extents(), 2);
    assert_eq!(device.extents_of_volume(9), vec![3, 40]);
    // Two 4 KiB data blocks and the slot table's first block, plus file-system slack —
    // far below even one whole 1 MiB extent (2048 sectors of 512 bytes).
    let grown_sectors = std::fs::metadata(&path).unwrap().blocks() - blocks_after_format;
    assert!(grown_sectors > 0 && grown_sectors < 256, "grew by {grown_sectors} sectors");
}

#[test]
fn allocation_record_is_durable_without_flush() {
    let dir = TempDir::new("durable");
    let path = formatted(&dir);
    {
        let device = Device::open(&path, CLUSTER).unwrap();
        device.write(key(4, 2), 11, 0, &pattern(9, 4096), false).unwrap();
        // No flush: the record was synced before the data write, so it is on disk. (Cutting
        // power is not possible here; a reopen sees what the record says.)
    }
    let slots = nonblank_slots(&path, 63);
    assert_eq!(slots, vec![0], "exactly one record written, in the lowest slot");
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(
        device.allocated_extents().iter().map(|(k, pg, _)| (*k, *pg)).collect::<Vec<_>>(),
        vec![(key(4, 2), 11)]
    );
}

#[test]
fn corrupt_superblock_byte_fails_open() {
    let dir = TempDir::new("corrupt-sb");
    let path = formatted(&dir);
    flip_byte(&path, 30); // inside device_id
    assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::CorruptSuperblock { .. })));
    flip_byte(&path, 30);
    Device::open(&path, CLUSTER).unwrap();
    flip_byte(&path, 0); // the magic
    assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::NotFormatted)));
}

/// Rewrites the superblock with a valid checksum but the given field bytes.
fn forge_superblock(path: &Path, field: std::ops::Range<usize>, value: &[u8]) {
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut block = [0u8; 4096];
    file.read_exact_at(&mut block, 0).unwrap();
    block[field].copy_from_slice(value);
    let crc = crc32c::crc32c(&block[..64]);
    block[64..68].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&block, 0).unwrap();
}

#[test]
fn absurd_geometry_with_valid_checksum_is_an_error_not_a_panic() {
    let dir = TempDir::new("absurd");
    let cases: [(std::ops::Range<usize>, Vec<u8>); 5] = [
        (36..40, 3000u32.to_le_bytes().to_vec()),      // extent size not a power of two
        (36..40, (1u32 << 31).to_le_bytes().to_vec()), // extent size too big
        (40..48, u64::MAX.to_le_bytes().to_vec()),     // slot count
        (40..48, 20_000u64.to_le_bytes().to_vec()),    // table overlaps the data area
        (56..64, (u64::MAX - 4095).to_le_bytes().to_vec()), // data offset overflows
    ];
    for (i, (field, value)) in cases.into_iter().enumerate() {
        let path = dir.file(&format!("dev{i}"), 64 * MIB);
        Device::format(&path, &params(1, EXTENT), false).unwrap();
        forge_superblock(&path, field, &value);
        match Device::open(&path, CLUSTER) {
            Err(DeviceError::CorruptSuperblock { .. }) => {}
            other => panic!("case {i}: expected CorruptSuperblock, got {other:?}"),
        }
    }
    let path = dir.file("version", 64 * MIB);
    Device::format(&path, &params(1, EXTENT), false).unwrap();
    forge_superblock(&path, 8..12, &9u32.to_le_bytes());
    assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::UnsupportedVersion { found: 9, .. })));
}

#[test]
fn truncated_device_fails_open() {
    let dir = TempDir::new("truncated");
    let path = formatted(&dir);
    OpenOptions::new().write(true).open(&path).unwrap().set_len(32 * MIB).unwrap();
    assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::Truncated { .. })));
    OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
    assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::NotFormatted)));
}

#[test]
fn corrupt_slot_record_fails_open_naming_the_slot() {
    let dir = TempDir::new("corrupt-slot");
    let path = formatted(&dir);
    {
        let device = Device::open(&path, CLUSTER).unwrap();
        device.write(key(1, 0), 0, 0, b"a", false).unwrap(); // slot 0
        device.write(key(1, 1), 0, 0, b"b", false).unwrap(); // slot 1
    }
    let record = |slot: u64| SUPERBLOCK_SIZE_BYTES + slot * SLOT_RECORD_SIZE_BYTES;
    flip_byte(&path, record(1) + 17); // volume id of slot 1
    match Device::open(&path, CLUSTER) {
        Err(DeviceError::CorruptSlot { slot: 1, .. }) => {}
        other => panic!("expected CorruptSlot {{ slot: 1 }}, got {other:?}"),
    }
    flip_byte(&path, record(1) + 17);
    Device::open(&path, CLUSTER).unwrap();
    // A never-used (all-zero) record that is no longer all zeros is corrupt too.
    flip_byte(&path, record(30) + 40);
    match Device::open(&path, CLUSTER) {
        Err(e @ DeviceError::CorruptSlot { slot: 30, .. }) => assert!(e.to_string().contains("30"), "{e}"),
        other => panic!("expected CorruptSlot {{ slot: 30 }}, got {other:?}"),
    }
    flip_byte(&path, record(30) + 40);
    // A valid record copied into the wrong slot (a misdirected write) is caught by the
    // slot number inside it.
    let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut rec = [0u8; SLOT_RECORD_SIZE_BYTES as usize];
    file.read_exact_at(&mut rec, record(0)).unwrap();
    file.write_all_at(&rec, record(5)).unwrap();
    assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::CorruptSlot { slot: 5, .. })));
    // The same record made valid for slot 5: two slots now claim one extent.
    rec[8..16].copy_from_slice(&5u64.to_le_bytes());
    let crc = crc32c::crc32c(&rec[..60]);
    rec[60..64].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&rec, record(5)).unwrap();
    match Device::open(&path, CLUSTER) {
        Err(DeviceError::DuplicateExtent { key: k, first_slot: 0, second_slot: 5 }) => assert_eq!(k, key(1, 0)),
        other => panic!("expected DuplicateExtent, got {other:?}"),
    }
}

#[test]
fn wrong_cluster_id_fails_open() {
    let dir = TempDir::new("cluster");
    let path = formatted(&dir);
    let other = *b"another-cluster!";
    match Device::open(&path, other) {
        Err(DeviceError::WrongCluster { expected, found }) => {
            assert_eq!((expected, found), (other, CLUSTER));
        }
        other => panic!("expected WrongCluster, got {other:?}"),
    }
}

#[test]
fn format_refuses_a_formatted_device_without_force() {
    let dir = TempDir::new("refuse");
    let path = formatted(&dir);
    {
        let device = Device::open(&path, CLUSTER).unwrap();
        device.write(key(1, 0), 0, 0, &pattern(3, 4096), true).unwrap();
        // Open elsewhere: even a forced format is refused.
        assert!(matches!(Device::format(&path, &params(8, EXTENT), true), Err(DeviceError::Busy)));
        assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::Busy)));
    }
    assert!(matches!(Device::format(&path, &params(8, EXTENT), false), Err(DeviceError::AlreadyFormatted)));
    assert_eq!(Device::open(&path, CLUSTER).unwrap().used_extents(), 1, "refused format changed nothing");
    Device::format(&path, &params(8, 4 * EXTENT), true).unwrap();
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!((device.device_id(), device.extent_size_bytes(), device.used_extents()), (8, 4 * EXTENT, 0));
    assert_eq!(read_vec(&device, key(1, 0), 0, 4096), vec![0; 4096]);
}

#[test]
fn format_rejects_bad_parameters_and_tiny_devices() {
    let dir = TempDir::new("params");
    let path = dir.file("dev", 64 * MIB);
    for bad in [0, 1000, 2048, 3 * 4096, 128 << 20] {
        assert!(matches!(Device::format(&path, &params(1, bad), false), Err(DeviceError::InvalidExtentSize { .. })));
    }
    let tiny = dir.file("tiny", MIB + 4096);
    assert!(matches!(Device::format(&tiny, &params(1, EXTENT), false), Err(DeviceError::TooSmall { .. })));
    assert!(matches!(Device::open(&path, CLUSTER), Err(DeviceError::NotFormatted)));
}

#[test]
fn out_of_range_io_is_an_error() {
    let dir = TempDir::new("range");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    let mut buf = vec![0u8; 8192];
    assert!(matches!(device.read(key(1, 0), EXTENT - 4096, &mut buf), Err(DeviceError::OutOfRange { .. })));
    assert!(matches!(device.write(key(1, 0), 0, EXTENT - 1, &buf[..2], false), Err(DeviceError::OutOfRange { .. })));
    assert!(matches!(device.write(key(1, 0), 0, u32::MAX, &buf[..1], false), Err(DeviceError::OutOfRange { .. })));
    assert!(matches!(device.write_zeroes(key(1, 0), 4096, EXTENT), Err(DeviceError::OutOfRange { .. })));
    assert!(matches!(device.trim(key(1, 0), u32::MAX, u32::MAX), Err(DeviceError::OutOfRange { .. })));
    assert_eq!(device.used_extents(), 0, "a refused write allocates nothing");
    // Exactly up to the end is fine.
    device.write(key(1, 0), 0, EXTENT - 8192, &buf, false).unwrap();
    device.read(key(1, 0), EXTENT - 8192, &mut buf).unwrap();
}

#[test]
fn write_naming_another_pg_is_refused_and_empty_write_allocates_nothing() {
    let dir = TempDir::new("pg");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    assert!(!device.write(key(1, 0), 3, 0, &[], false).unwrap());
    assert_eq!(device.used_extents(), 0);
    device.write(key(1, 0), 3, 0, b"a", false).unwrap();
    match device.write(key(1, 0), 4, 0, b"b", false) {
        Err(DeviceError::PgMismatch { recorded: 3, requested: 4, .. }) => {}
        other => panic!("expected PgMismatch, got {other:?}"),
    }
    assert_eq!(read_vec(&device, key(1, 0), 0, 1), b"a");
}

#[test]
fn full_device_reports_full() {
    let dir = TempDir::new("full");
    // 1 MiB of metadata and padding, then exactly four 64 KiB slots.
    let path = dir.file("dev", MIB + 4 * 65536);
    Device::format(&path, &params(1, 65536), false).unwrap();
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(device.capacity_extents(), 4);
    for extent in 0..4 {
        device.write(key(1, extent), 0, 0, &pattern(extent as u8, 4096), false).unwrap();
    }
    assert!(matches!(device.write(key(1, 4), 0, 0, b"x", false), Err(DeviceError::Full)));
    // Existing extents still take writes; freeing one makes room again.
    device.write(key(1, 0), 0, 4096, b"y", false).unwrap();
    device.write_zeroes(key(1, 2), 0, 65536).unwrap();
    assert!(device.write(key(1, 4), 0, 0, b"x", false).unwrap());
    assert_eq!(device.used_extents(), 4);
}

#[test]
fn concurrent_writers_to_distinct_and_shared_extents() {
    let dir = TempDir::new("concurrent");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    const THREADS: u64 = 8;
    const BLOCK: usize = 4096;
    let allocations = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (device, allocations) = (&device, &allocations);
            scope.spawn(move || {
                // All threads race for the first write of extent (5, 0), each into its own
                // block: if it were allocated twice, some thread's data would be lost.
                if device.write(key(5, 0), 1, (t as usize * BLOCK) as u32, &pattern(t as u8, BLOCK), false).unwrap() {
                    allocations.fetch_add(1, Ordering::Relaxed);
                }
                // And each thread owns some extents of its own.
                for round in 0..20u64 {
                    let k = key(6, t * 4 + round % 4);
                    let offset = ((round * 7919) % 256) as u32 * BLOCK as u32;
                    device.write(k, 2, offset, &pattern((t * 31 + round) as u8, BLOCK), round % 5 == 0).unwrap();
                    assert_eq!(read_vec(device, k, offset, BLOCK), pattern((t * 31 + round) as u8, BLOCK));
                }
            });
        }
    });
    assert_eq!(allocations.load(Ordering::Relaxed), 1, "the shared extent was allocated once");
    assert_eq!(device.used_extents(), 1 + THREADS * 4);
    for t in 0..THREADS {
        assert_eq!(read_vec(&device, key(5, 0), (t as usize * BLOCK) as u32, BLOCK), pattern(t as u8, BLOCK));
    }
    drop(device);
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(device.used_extents(), 1 + THREADS * 4);
    assert_eq!(device.extents_of_volume(6), (0..THREADS * 4).collect::<Vec<_>>());
}

#[test]
fn concurrent_allocate_and_free_of_the_same_extents_leaves_consistent_metadata() {
    let dir = TempDir::new("churn");
    let path = dir.file("dev", MIB + 16 * 65536);
    Device::format(&path, &params(1, 65536), false).unwrap();
    let device = Device::open(&path, CLUSTER).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let device = &device;
            scope.spawn(move || {
                for round in 0..50u64 {
                    let k = key(1, (t + round) % 6);
                    match round % 3 {
                        0 | 1 => {
                            device.write(k, 0, 4096, &pattern(t as u8, 4096), false).unwrap();
                        }
                        _ => device.write_zeroes(k, 0, 65536).unwrap(),
                    }
                    if round % 10 == 0 {
                        device.remove_volume(1).unwrap();
                    }
                }
            });
        }
    });
    let listed = device.extents_of_volume(1);
    let used = device.used_extents();
    assert_eq!(used, listed.len() as u64);
    drop(device);
    // No duplicate or corrupt records: reopen agrees with memory.
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(device.extents_of_volume(1), listed);
    assert_eq!(device.used_extents(), used);
}

#[test]
fn write_zeroes_of_a_whole_extent_frees_its_slot() {
    let dir = TempDir::new("zeroes");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    device.write(key(1, 0), 0, 0, &pattern(1, EXTENT as usize), false).unwrap();
    device.write(key(1, 1), 0, 0, &pattern(2, EXTENT as usize), false).unwrap();

    // Partial: the slot stays, the range reads as zeros, the rest is untouched.
    device.write_zeroes(key(1, 0), 4096, 8192).unwrap();
    assert_eq!(device.used_extents(), 2);
    let expected = {
        let mut v = pattern(1, EXTENT as usize);
        v[4096..12288].fill(0);
        v
    };
    assert_eq!(read_vec(&device, key(1, 0), 0, EXTENT as usize), expected);

    // Whole: the slot is freed, durably.
    device.write_zeroes(key(1, 0), 0, EXTENT).unwrap();
    device.trim(key(1, 1), 0, EXTENT).unwrap();
    assert_eq!(device.used_extents(), 0);
    assert_eq!(read_vec(&device, key(1, 0), 0, 4096), vec![0; 4096]);
    // Zeroing an unallocated extent allocates nothing.
    device.write_zeroes(key(1, 7), 0, 4096).unwrap();
    assert_eq!(device.used_extents(), 0);

    // A reused slot reads as zeros outside what its new owner wrote.
    device.write(key(2, 0), 0, 0, b"new", false).unwrap();
    assert_eq!(read_vec(&device, key(2, 0), 0, 8), b"new\0\0\0\0\0");
    assert_eq!(read_vec(&device, key(2, 0), 4096, 65536), vec![0; 65536]);
    drop(device);
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(device.extents_of_volume(1), Vec::<u64>::new());
    assert_eq!(device.extents_of_volume(2), vec![0]);
}

#[test]
fn generations_only_grow_across_frees_and_reopens() {
    let dir = TempDir::new("generation");
    let path = formatted(&dir);
    let last = {
        let device = Device::open(&path, CLUSTER).unwrap();
        device.write(key(1, 0), 0, 0, b"a", false).unwrap();
        device.write(key(1, 1), 0, 0, b"b", false).unwrap();
        let generations: Vec<u64> = device.allocated_extents().iter().map(|e| e.2).collect();
        assert!(generations[0] < generations[1]);
        // Free the newest extent: its generation must not be handed out again.
        device.write_zeroes(key(1, 1), 0, EXTENT).unwrap();
        generations[1]
    };
    let device = Device::open(&path, CLUSTER).unwrap();
    device.write(key(1, 2), 0, 0, b"c", false).unwrap();
    let generation = device.allocated_extents().iter().find(|e| e.0 == key(1, 2)).unwrap().2;
    assert!(generation > last + 1, "generation {generation} after freeing generation {last}");
}

#[test]
fn remove_volume_frees_all_its_extents() {
    let dir = TempDir::new("remove");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    for extent in [0, 3, 9, 17] {
        device.write(key(10, extent), 0, 0, &pattern(1, 4096), false).unwrap();
    }
    device.write(key(11, 3), 0, 0, &pattern(2, 4096), false).unwrap();
    assert_eq!(device.extents_of_volume(10), vec![0, 3, 9, 17]);
    assert_eq!(device.remove_volume(10).unwrap(), 4);
    assert_eq!(device.remove_volume(10).unwrap(), 0);
    assert_eq!(device.extents_of_volume(10), Vec::<u64>::new());
    assert_eq!(device.used_extents(), 1);
    assert_eq!(read_vec(&device, key(10, 3), 0, 4096), vec![0; 4096]);
    assert_eq!(read_vec(&device, key(11, 3), 0, 4096), pattern(2, 4096));
    drop(device);
    let device = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(device.extents_of_volume(10), Vec::<u64>::new());
    assert_eq!(device.extents_of_volume(11), vec![3]);
}

#[test]
fn extent_checksum_is_equal_for_equal_contents() {
    let dir = TempDir::new("checksum");
    let path = formatted(&dir);
    let device = Device::open(&path, CLUSTER).unwrap();
    let zeros = crc32c::crc32c(&vec![0u8; EXTENT as usize]);
    assert_eq!(device.extent_checksum(key(1, 0)).unwrap(), zeros, "unallocated = zeros");

    device.write(key(1, 0), 0, 8192, &pattern(4, 4096), false).unwrap();
    device.write(key(2, 0), 0, 0, &vec![0u8; 8192], false).unwrap();
    device.write(key(2, 0), 0, 8192, &pattern(4, 4096), false).unwrap();
    let a = device.extent_checksum(key(1, 0)).unwrap();
    assert_eq!(a, device.extent_checksum(key(2, 0)).unwrap());
    let mut full = vec![0u8; EXTENT as usize];
    full[8192..12288].copy_from_slice(&pattern(4, 4096));
    assert_eq!(a, crc32c::crc32c(&full));
    device.write(key(2, 0), 0, 100, b"!", false).unwrap();
    assert_ne!(a, device.extent_checksum(key(2, 0)).unwrap());
}

/// Detaches the loop device when dropped, also when the test fails.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup must be installed for this test");
        assert!(output.status.success(), "losetup failed: {}", String::from_utf8_lossy(&output.stderr));
        let path = String::from_utf8(output.stdout).unwrap().trim().to_string();
        assert!(path.starts_with("/dev/loop"), "unexpected losetup output {path:?}");
        LoopDevice(PathBuf::from(path))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let status = Command::new("losetup").arg("-d").arg(&self.0).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not detach {}: {status:?}", self.0.display());
        }
    }
}

#[test]
fn loop_device_holds_extents() {
    let dir = TempDir::new("loop");
    let backing = dir.file("backing", 48 * MIB);
    // Garbage everywhere, as on a reused disk: new slots must still read as zeros.
    {
        let file = OpenOptions::new().write(true).open(&backing).unwrap();
        let junk = vec![0xA5u8; MIB as usize];
        for i in 0..48 {
            file.write_all_at(&junk, i * MIB).unwrap();
        }
        file.sync_all().unwrap();
    }
    let loop_device = LoopDevice::attach(&backing);
    let dev = &loop_device.0;

    Device::format(dev, &params(21, EXTENT), false).unwrap();
    assert!(matches!(Device::format(dev, &params(21, EXTENT), false), Err(DeviceError::AlreadyFormatted)));
    let data = pattern(8, 12288);
    {
        let device = Device::open(dev, CLUSTER).unwrap();
        assert!(device.is_block_device());
        assert_eq!(device.capacity_extents(), 47);
        assert_eq!(read_vec(&device, key(1, 0), 0, 4096), vec![0; 4096]);
        assert!(device.write(key(1, 0), 2, 4096, &data, true).unwrap());
        assert_eq!(read_vec(&device, key(1, 0), 0, 4096), vec![0; 4096], "garbage under a new slot is zeroed");
        assert_eq!(read_vec(&device, key(1, 0), 16384, 65536), vec![0; 65536]);
        device.write(key(1, 1), 2, 0, &pattern(9, EXTENT as usize), false).unwrap();
        device.write_zeroes(key(1, 1), 1000, 3000).unwrap(); // unaligned: the pwrite fallback
        device.flush().unwrap();
        assert!(matches!(Device::open(dev, CLUSTER), Err(DeviceError::Busy)));
    }
    let device = Device::open(dev, CLUSTER).unwrap();
    assert_eq!(device.extents_of_volume(1), vec![0, 1]);
    assert_eq!(read_vec(&device, key(1, 0), 4096, data.len()), data);
    let mut expected = pattern(9, EXTENT as usize);
    expected[1000..4000].fill(0);
    assert_eq!(read_vec(&device, key(1, 1), 0, EXTENT as usize), expected);
    assert_eq!(device.remove_volume(1).unwrap(), 2);
    assert_eq!(device.used_extents(), 0);
}

// ---------------------------------------------------------------------------------------
// Write intent: which extents may disagree with their partner copies after a crash.

#[test]
fn extents_written_since_their_last_clean_are_suspect_after_reopen() {
    let dir = TempDir::new("intent");
    let path = formatted(&dir);
    let dev = Device::open(&path, CLUSTER).unwrap();
    dev.write(key(1, 0), 3, 0, &[7u8; 4096], false).unwrap();
    dev.write(key(1, 1), 5, 0, &[8u8; 4096], false).unwrap();
    drop(dev); // a crash as far as the records are concerned: nothing was cleaned
    let dev = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(dev.suspect_pgs().into_iter().collect::<Vec<_>>(), vec![3, 5]);
    assert_eq!(dev.dirty_extents(), 2);
}

#[test]
fn cleaning_needs_a_whole_idle_round_and_a_later_write_marks_the_extent_again() {
    let dir = TempDir::new("clean");
    let path = formatted(&dir);
    let dev = Device::open(&path, CLUSTER).unwrap();
    dev.write(key(1, 0), 3, 0, &[7u8; 4096], false).unwrap();
    // First round only sets the watermark: the extent was written during it.
    assert_eq!(dev.clean_idle_slots(1024).unwrap(), 0);
    dev.write(key(1, 1), 5, 0, &[8u8; 4096], false).unwrap();
    // Second round: extent 0 was idle a whole round, extent 1 was not.
    assert_eq!(dev.clean_idle_slots(1024).unwrap(), 1);
    drop(dev);
    let dev = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(dev.suspect_pgs().into_iter().collect::<Vec<_>>(), vec![5], "only the recently written extent");
    // Untouched since the open, the suspect extent is idle at once. (The SDS cleans a
    // device only after its suspects were reported, so nothing is forgotten.)
    assert_eq!(dev.clean_idle_slots(1024).unwrap(), 1);
    // A write into the cleaned extent marks it dirty (durably) before it lands.
    dev.write(key(1, 0), 3, 4096, &[9u8; 512], false).unwrap();
    drop(dev);
    let dev = Device::open(&path, CLUSTER).unwrap();
    assert_eq!(dev.suspect_pgs().into_iter().collect::<Vec<_>>(), vec![3]);
    let mut buf = [0u8; 512];
    dev.read(key(1, 0), 4096, &mut buf).unwrap();
    assert_eq!(buf, [9u8; 512]);
}

#[test]
fn a_freed_extent_is_not_suspect() {
    let dir = TempDir::new("intent-free");
    let path = formatted(&dir);
    let dev = Device::open(&path, CLUSTER).unwrap();
    dev.write(key(1, 0), 3, 0, &[7u8; 4096], false).unwrap();
    dev.write_zeroes(key(1, 0), 0, EXTENT).unwrap();
    drop(dev);
    let dev = Device::open(&path, CLUSTER).unwrap();
    assert!(dev.suspect_pgs().is_empty());
}
