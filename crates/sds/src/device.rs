//! The extent store of one SDS device (a regular file or a raw block device).
//!
//! A device holds extents of volumes in fixed-size *slots*. A slot is taken on an extent's
//! first write (thin provisioning) and given back when the whole extent is zeroed, trimmed
//! or its volume removed. The API is synchronous (`pread`/`pwrite`) and every method takes
//! `&self`: the SDS calls it from a pool of blocking threads.
//!
//! # On-disk layout (version 1; all integers little-endian, fixed width)
//!
//! | region      | offset                                  | size                        |
//! |-------------|-----------------------------------------|-----------------------------|
//! | superblock  | 0                                       | 4 KiB                       |
//! | slot table  | `slot_table_offset` (= 4096)            | `slot_count` × 64 bytes     |
//! | padding     | end of table                            | up to the next 1 MiB        |
//! | data slots  | `data_offset` (1 MiB-aligned)           | `slot_count` × extent size  |
//!
//! Slot `i`'s record is at `slot_table_offset + 64 i`; its data at `data_offset + i × extent`.
//!
//! Superblock (bytes 68..4096 are zero and not checksummed):
//!
//! | bytes  | field               | type       | meaning                                   |
//! |--------|---------------------|------------|-------------------------------------------|
//! | 0..8   | magic               | `[u8; 8]`  | `b"TESSDEV1"`                             |
//! | 8..12  | layout version      | u32        | 1                                         |
//! | 12..28 | cluster_id          | `[u8; 16]` | the cluster this device belongs to        |
//! | 28..36 | device_id           | u64        | the MDM's id for this device              |
//! | 36..40 | extent_size_bytes   | u32        | power of two, 4 KiB ..= 64 MiB            |
//! | 40..48 | slot_count          | u64        | 1 ..= 2^24                                |
//! | 48..56 | slot_table_offset   | u64        | 4096                                      |
//! | 56..64 | data_offset         | u64        | ≥ end of table, 1 MiB-aligned when formatted here |
//! | 64..68 | checksum            | u32        | crc32c of bytes 0..64                     |
//!
//! Slot record (64 bytes; an all-zero record is a never-used free slot and has no checksum):
//!
//! | bytes  | field        | type | meaning                                                    |
//! |--------|--------------|------|------------------------------------------------------------|
//! | 0      | state        | u8   | 1 = free, 2 = used (0 only in an all-zero record)          |
//! | 1      | flags        | u8   | bit 0 = dirty (used records; see "Write intent")           |
//! | 2..4   | reserved     |      | zero                                                       |
//! | 4..8   | pg_id        | u32  | placement group of the extent (used)                       |
//! | 8..16  | slot_index   | u64  | this record's own slot number: catches misdirected writes  |
//! | 16..24 | volume_id    | u64  | (used)                                                     |
//! | 24..32 | extent_index | u64  | (used)                                                     |
//! | 32..40 | generation   | u64  | device-wide counter value taken when allocated or freed    |
//! | 40..60 | reserved     |      | zero                                                       |
//! | 60..64 | checksum     | u32  | crc32c of bytes 0..60                                      |
//!
//! # Generations
//! Every allocation and every free takes the next value of one device-wide counter and
//! stores it in the slot's record. Freed slots keep a checksummed free record (not zeros)
//! carrying their free generation, so the highest value ever handed out stays on disk and
//! `max(record generations) + 1` on open never goes backwards. Delta rebuild relies on that.
//!
//! # Durability and zeroing
//! Allocation: zero the slot's data area → fdatasync → write the used record → fdatasync →
//! write the data. The record is durable before the data write (and so before any ack),
//! so an acknowledged write never lives in a slot that a restart would consider free.
//! The zeroing is durable before the record, so after a crash at any point an allocated
//! slot reads as zeros except where acknowledged (or in-flight) writes landed — never as a
//! previous occupant's data, which could belong to another volume.
//!
//! Why zero on allocation rather than on free/format: it needs no assumption about what the
//! device held before (reused disks, forced reformat), costs a metadata-only hole punch on
//! files and WRITE ZEROES on capable block devices, and is paid once per extent lifetime.
//! Zeroing at format would instead write a whole disk that lacks WRITE ZEROES (hours on a
//! large HDD) before it could be used. Frees punch holes too, but only best-effort, to
//! return space; correctness never depends on it.
//!
//! Data writes are not durable until `flush` (or `durable = true`, FUA), matching the
//! block-device contract the SDC exports.
//!
//! # Write intent (why the copies agree after a crash)
//! A write may sit in the disk's volatile cache until a flush, on each copy independently,
//! so a power cut can leave the two copies of an extent holding different subsets of the
//! unflushed writes. Every used record therefore carries a *dirty* bit, md's write-intent
//! bitmap at extent granularity: before the first write into a clean slot the record is
//! rewritten dirty and made durable (allocation writes it dirty to begin with, at no extra
//! cost). A slot becomes clean again only when [`Device::clean_idle_slots`] finds it
//! unwritten for a whole cleaning round and covered by a completed flush, under the slot's
//! exclusive lock (so no write is in flight). After a crash, the slots found dirty on open
//! are exactly those whose copies may disagree ([`Device::suspect_pgs`]); the SDS reports
//! their PGs before it serves the device, and the MDM has them back-filled from one
//! authoritative copy (`tessera_core::Command::ReportSuspectCopies`).
//!
//! Cost on the write path: one record write and fdatasync on the first write into an extent
//! after it went idle — amortised over every later write while it stays hot, and none at
//! all for a new extent, whose allocation already syncs a record.
//!
//! # Concurrency and lock order
//! - `index` (RwLock): extent → slot map, free list, generation counter. Held only for
//!   in-memory work, never across IO.
//! - `slots[i]` (one RwLock per slot, holding the slot's current owner): data IO holds it
//!   shared; allocation and free hold it exclusively across their metadata IO. IO to
//!   different extents therefore never waits on a common lock, and a slot can never be
//!   freed or reused under an IO that is still reading or writing it.
//! - Order: a thread holding slot locks may take `index`. A thread holding `index` may take
//!   only the lock of a slot it has just popped from the free list; nobody holding a free
//!   slot's lock waits for anything, so there is no cycle. Several slot locks are taken in
//!   ascending slot order.
//! - Invariant: while `index` maps key K to slot S, either S's owner is K, or S's lock is
//!   held exclusively by the thread that is allocating or freeing K. So a reader that finds
//!   S's owner is not K after locking S saw a completed free, and simply looks again.
//! - Every slot is in exactly one of: the free list, the index, or (only after a failed
//!   metadata write, which fails the device) quarantined until reopen.

mod error;
pub mod identity;
mod layout;
mod sys;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use error::DeviceError;
use layout::{extent_size_is_valid, SlotRecord, Superblock, FIRST_GENERATION};
pub use layout::{
    ExtentKey, LAYOUT_VERSION, MAX_EXTENT_SIZE_BYTES, MAX_SLOT_COUNT, MIN_EXTENT_SIZE_BYTES, SLOT_RECORD_SIZE_BYTES,
    SUPERBLOCK_MAGIC, SUPERBLOCK_SIZE_BYTES,
};
use sys::io_error;

/// How much of the slot table `open` reads per call; bounds its memory on big devices.
const TABLE_READ_CHUNK_BYTES: usize = 1 << 20;
/// How many slots one step of `remove_volume` frees under a single pair of fdatasyncs.
/// Bounds the slot locks held at once and the memory of a step.
const FREE_BATCH_SLOTS: usize = 1024;
/// Buffer size `extent_checksum` reads with.
const CHECKSUM_READ_CHUNK_BYTES: usize = 1 << 20;

/// What `format` writes into the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatParams {
    pub cluster_id: [u8; 16],
    pub device_id: u64,
    pub extent_size_bytes: u32,
}

/// Who holds a slot, as the slot's own lock sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotOwner {
    key: ExtentKey,
    pg_id: u32,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    slot: u64,
    pg_id: u32,
    generation: u64,
    /// False while the allocating thread is still making the record durable. Listings
    /// skip such extents; IO to them waits on the slot lock the allocator holds.
    durable: bool,
}

#[derive(Debug)]
struct Index {
    /// Ordered, so a volume's extents are one range (listings, removal).
    by_key: BTreeMap<ExtentKey, Mapping>,
    /// Used as a stack; filled in descending order so the lowest slots are used first.
    free_slots: Vec<u64>,
    next_generation: u64,
    /// Slots with a durable used record.
    used_extents: u64,
}

impl Index {
    fn take_generation(&mut self) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        generation
    }
}

/// What `load_slot_table` builds: the index, each slot's owner, and each slot's dirty bit.
type LoadedTable = (Index, Vec<Option<SlotOwner>>, Vec<bool>);

/// One open device. Dropping it closes the file and releases its lock.
#[derive(Debug)]
pub struct Device {
    path: PathBuf,
    file: File,
    is_block_device: bool,
    superblock: Superblock,
    index: RwLock<Index>,
    /// Lock and current owner of each slot, indexed by slot number.
    slots: Box<[RwLock<Option<SlotOwner>>]>,
    /// Per slot: the slot's durable record says dirty (see "Write intent"). Set only after
    /// the dirty record is durable; cleared only under the slot's exclusive lock.
    dirty: Box<[AtomicBool]>,
    /// Per slot: `write_seq` of the last write that completed into it, stored before the
    /// writer releases the slot lock.
    last_write_seq: Box<[AtomicU64]>,
    /// Counts completed writes. A flush that read value `s` before its fdatasync makes every
    /// write numbered `<= s` durable.
    write_seq: AtomicU64,
    /// Highest `s` a completed flush made durable.
    durable_seq: AtomicU64,
    /// `write_seq` when the previous cleaning round began: only slots written no later
    /// than that are idle enough to clean, so hot extents are not cleaned and re-marked.
    clean_watermark: AtomicU64,
    /// Serialises the record writes that mark slots dirty.
    intent_lock: Mutex<()>,
    /// Held across a flush's fdatasync (group commit, see `flush`).
    sync_lock: Mutex<()>,
    /// Extents whose record was dirty when the device was opened, with their PGs: their
    /// copies may disagree after the crash that left them so.
    suspect_at_open: Vec<(ExtentKey, u32)>,
    /// Set by any IO error (read, write, sync) or a missed deadline, and never cleared:
    /// after a failed metadata write memory and disk may disagree, and after a failed data
    /// write or sync the device may have lost acknowledged data that no later sync brings
    /// back. A failed device refuses all work; the MDM moves its copies elsewhere.
    failed: AtomicBool,
}

fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().expect("device lock poisoned: a thread panicked on a device invariant")
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().expect("device lock poisoned: a thread panicked on a device invariant")
}

fn volume_range(volume_id: u64) -> std::ops::RangeInclusive<ExtentKey> {
    ExtentKey { volume_id, extent_index: 0 }..=ExtentKey { volume_id, extent_index: u64::MAX }
}

impl Device {
    /// Writes a fresh superblock and an empty slot table. The target must exist (create and
    /// size a file first); its size is the file length or the block device size.
    ///
    /// Refuses with `AlreadyFormatted` if the target starts with the Tessera magic — valid
    /// superblock or damaged one, since a damaged device may still hold data someone wants —
    /// unless `force`. Refuses with `Busy` if the target is mounted or open elsewhere.
    pub fn format(path: &Path, params: &FormatParams, force: bool) -> Result<(), DeviceError> {
        if !extent_size_is_valid(params.extent_size_bytes) {
            return Err(DeviceError::InvalidExtentSize { extent_size_bytes: params.extent_size_bytes });
        }
        let file = sys::open_exclusive(path)?;
        let size_bytes = sys::size_bytes(&file).map_err(io_error(path, "measure device"))?;
        let superblock = Superblock::plan(params.cluster_id, params.device_id, params.extent_size_bytes, size_bytes)
            .ok_or(DeviceError::TooSmall { size_bytes, extent_size_bytes: params.extent_size_bytes })?;
        if superblock.slot_count == MAX_SLOT_COUNT {
            tracing::warn!(path = %path.display(), slot_count = MAX_SLOT_COUNT, "device larger than the slot limit; the rest stays unused");
        }

        let mut old = [0u8; SUPERBLOCK_SIZE_BYTES as usize];
        file.read_exact_at(&mut old, 0).map_err(io_error(path, "read old superblock"))?;
        let had_superblock = Superblock::has_magic(&old);
        if had_superblock && !force {
            return Err(DeviceError::AlreadyFormatted);
        }
        let sync = |context| file.sync_data().map_err(io_error(path, context));

        // Invalidate the old superblock first: a crash part-way through then leaves an
        // unformatted device, never an old superblock above a half-cleared slot table.
        if had_superblock {
            file.write_all_at(&[0u8; SUPERBLOCK_SIZE_BYTES as usize], 0)
                .map_err(io_error(path, "erase old superblock"))?;
            sync("sync erased superblock")?;
        }
        sys::zero_range(&file, superblock.slot_table_offset, superblock.slot_table_bytes())
            .map_err(io_error(path, "clear slot table"))?;
        if !file.metadata().map_err(io_error(path, "stat device"))?.file_type().is_block_device() {
            // A reformatted file becomes sparse again. Skipped on block devices, where a
            // whole-disk discard can be slow; allocation zeroes slots anyway.
            let data_bytes = size_bytes - superblock.data_offset;
            if let Err(e) = sys::punch_hole(&file, superblock.data_offset, data_bytes) {
                tracing::debug!(path = %path.display(), error = %e, "could not punch the data area; continuing");
            }
        }
        sync("sync slot table")?;
        file.write_all_at(&superblock.encode(), 0).map_err(io_error(path, "write superblock"))?;
        sync("sync superblock")?;
        tracing::info!(
            path = %path.display(),
            device_id = params.device_id,
            slot_count = superblock.slot_count,
            extent_size_bytes = params.extent_size_bytes,
            "formatted device"
        );
        Ok(())
    }

    /// Opens a formatted device of cluster `expected_cluster_id`: checks the superblock,
    /// reads and checks every slot record, and builds the index. Any record that fails its
    /// checks is an error naming the slot — corrupt metadata is never served or dropped.
    pub fn open(path: &Path, expected_cluster_id: [u8; 16]) -> Result<Device, DeviceError> {
        let file = sys::open_exclusive(path)?;
        let is_block_device = file.metadata().map_err(io_error(path, "stat device"))?.file_type().is_block_device();
        let size_bytes = sys::size_bytes(&file).map_err(io_error(path, "measure device"))?;
        if size_bytes < SUPERBLOCK_SIZE_BYTES {
            return Err(DeviceError::NotFormatted);
        }
        let mut block = [0u8; SUPERBLOCK_SIZE_BYTES as usize];
        file.read_exact_at(&mut block, 0).map_err(io_error(path, "read superblock"))?;
        let superblock = Superblock::decode(&block)?;
        if superblock.cluster_id != expected_cluster_id {
            return Err(DeviceError::WrongCluster { expected: expected_cluster_id, found: superblock.cluster_id });
        }
        superblock.validate(size_bytes)?;

        let (index, owners, dirty_flags) = Self::load_slot_table(path, &file, &superblock)?;
        let suspect_at_open: Vec<(ExtentKey, u32)> = owners
            .iter()
            .zip(&dirty_flags)
            .filter(|(_, d)| **d)
            .filter_map(|(o, _)| o.map(|o| (o.key, o.pg_id)))
            .collect();
        tracing::info!(
            path = %path.display(),
            device_id = superblock.device_id,
            slot_count = superblock.slot_count,
            used_extents = index.used_extents,
            suspect_extents = suspect_at_open.len(),
            "opened device"
        );
        let slot_count = owners.len();
        let slots = owners.into_iter().map(RwLock::new).collect();
        Ok(Device {
            path: path.to_path_buf(),
            file,
            is_block_device,
            superblock,
            index: RwLock::new(index),
            slots,
            dirty: dirty_flags.into_iter().map(AtomicBool::new).collect(),
            last_write_seq: (0..slot_count).map(|_| AtomicU64::new(0)).collect(),
            // 1, not 0: the first flush of a process always syncs, covering whatever an
            // earlier process left in the page cache.
            write_seq: AtomicU64::new(1),
            durable_seq: AtomicU64::new(0),
            clean_watermark: AtomicU64::new(0),
            intent_lock: Mutex::new(()),
            sync_lock: Mutex::new(()),
            suspect_at_open,
            failed: AtomicBool::new(false),
        })
    }

    fn load_slot_table(path: &Path, file: &File, superblock: &Superblock) -> Result<LoadedTable, DeviceError> {
        // validate() bounded slot_count by MAX_SLOT_COUNT, so these allocations are bounded.
        let slot_count = superblock.slot_count as usize;
        let mut owners = vec![None; slot_count];
        let mut dirty_flags = vec![false; slot_count];
        let mut by_key: BTreeMap<ExtentKey, Mapping> = BTreeMap::new();
        let mut max_generation = 0u64;
        let table_bytes = superblock.slot_table_bytes();
        let mut chunk = vec![0u8; (table_bytes as usize).min(TABLE_READ_CHUNK_BYTES)];
        let mut slot = 0u64;
        let mut read_bytes = 0u64;
        while read_bytes < table_bytes {
            let len = (table_bytes - read_bytes).min(chunk.len() as u64) as usize;
            let buf = &mut chunk[..len];
            file.read_exact_at(buf, superblock.slot_table_offset + read_bytes)
                .map_err(io_error(path, "read slot table"))?;
            for raw in buf.chunks_exact(SLOT_RECORD_SIZE_BYTES as usize) {
                let record = SlotRecord::decode(slot, raw)?;
                max_generation = max_generation.max(record.generation());
                if let SlotRecord::Used { key, pg_id, generation, dirty } = record {
                    dirty_flags[slot as usize] = dirty;
                    let mapping = Mapping { slot, pg_id, generation, durable: true };
                    if let Some(first) = by_key.insert(key, mapping) {
                        return Err(DeviceError::DuplicateExtent { key, first_slot: first.slot, second_slot: slot });
                    }
                    owners[slot as usize] = Some(SlotOwner { key, pg_id });
                }
                slot += 1;
            }
            read_bytes += len as u64;
        }
        assert_eq!(slot, superblock.slot_count);
        let free_slots: Vec<u64> = (0..superblock.slot_count).rev().filter(|&s| owners[s as usize].is_none()).collect();
        let used_extents = by_key.len() as u64;
        // Each slot is in the free list xor the index.
        assert_eq!(free_slots.len() as u64 + used_extents, superblock.slot_count);
        let index =
            Index { by_key, free_slots, next_generation: (max_generation + 1).max(FIRST_GENERATION), used_extents };
        Ok((index, owners, dirty_flags))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device_id(&self) -> u64 {
        self.superblock.device_id
    }

    pub fn extent_size_bytes(&self) -> u32 {
        self.superblock.extent_size_bytes
    }

    pub fn capacity_extents(&self) -> u64 {
        self.superblock.slot_count
    }

    pub fn used_extents(&self) -> u64 {
        read_lock(&self.index).used_extents
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Reads `buf.len()` bytes at `offset_in_extent`. An unallocated extent reads as zeros.
    pub fn read(&self, key: ExtentKey, offset_in_extent: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check_usable()?;
        self.check_range(offset_in_extent, buf.len() as u64)?;
        loop {
            let Some(mapping) = self.lookup(key) else {
                buf.fill(0);
                return Ok(());
            };
            let owner = read_lock(&self.slots[mapping.slot as usize]);
            if owner.map(|o| o.key) != Some(key) {
                continue; // freed since the lookup (see the index invariant): look again
            }
            let position = self.data_position(mapping.slot, offset_in_extent, buf.len() as u64);
            return self.file.read_exact_at(buf, position).map_err(self.io_error("read data"));
        }
    }

    /// [`Device::read`] if it can be done without waiting: the extent is unallocated or
    /// its data is in the page cache, and no lock is held by a writer. `None` means "would
    /// wait": read the ordinary way, on the device's IO threads. Lets the async worker serve
    /// cached reads itself, with no hand-off, while a hung disk can never block it.
    pub fn try_read_nowait(
        &self,
        key: ExtentKey,
        offset_in_extent: u32,
        buf: &mut [u8],
    ) -> Option<Result<(), DeviceError>> {
        if let Err(e) = self.check_usable().and_then(|()| self.check_range(offset_in_extent, buf.len() as u64)) {
            return Some(Err(e));
        }
        let mapping = self.index.try_read().ok()?.by_key.get(&key).copied();
        let Some(mapping) = mapping else {
            buf.fill(0);
            return Some(Ok(()));
        };
        let owner = self.slots[mapping.slot as usize].try_read().ok()?;
        if owner.map(|o| o.key) != Some(key) {
            return None; // freed or being allocated: the ordinary path sorts it out
        }
        let position = self.data_position(mapping.slot, offset_in_extent, buf.len() as u64);
        match sys::pread_nowait(&self.file, buf, position) {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(self.io_error("read data")(e))),
        }
    }

    /// Writes `data` at `offset_in_extent`, allocating the extent's slot on its first write.
    /// With `durable` (FUA) the data is on stable storage before this returns. Returns
    /// whether this write allocated the slot. `pg_id` is recorded on allocation; a later
    /// write naming another PG is refused, since the caller's map then disagrees with disk.
    pub fn write(
        &self,
        key: ExtentKey,
        pg_id: u32,
        offset_in_extent: u32,
        data: &[u8],
        durable: bool,
    ) -> Result<bool, DeviceError> {
        self.check_usable()?;
        self.check_range(offset_in_extent, data.len() as u64)?;
        if data.is_empty() {
            // Nothing to store: do not take a slot for it.
            return Ok(false);
        }
        loop {
            if let Some(mapping) = self.lookup(key) {
                let slot_guard = read_lock(&self.slots[mapping.slot as usize]);
                match *slot_guard {
                    Some(owner) if owner.key == key && owner.pg_id != pg_id => {
                        return Err(DeviceError::PgMismatch { key, recorded: owner.pg_id, requested: pg_id });
                    }
                    Some(owner) if owner.key == key => {
                        // The shared slot lock is held across the data IO: the slot cannot be
                        // freed or reused under this write.
                        self.mark_dirty(mapping.slot, owner, mapping.generation)?;
                        self.write_data(mapping.slot, offset_in_extent, data, durable)?;
                        return Ok(false);
                    }
                    _ => continue, // freed (and maybe reused) since the lookup: look again
                }
            }
            if self.allocate_and_write(key, pg_id, offset_in_extent, data, durable)? {
                return Ok(true);
            }
            // Another thread allocated this extent between our lookup and our allocation.
        }
    }

    /// Allocates a slot for `key` and writes `data` into it. Returns false, doing nothing,
    /// if `key` is already mapped (a concurrent first write won the race).
    fn allocate_and_write(
        &self,
        key: ExtentKey,
        pg_id: u32,
        offset_in_extent: u32,
        data: &[u8],
        durable: bool,
    ) -> Result<bool, DeviceError> {
        let mut index = write_lock(&self.index);
        if index.by_key.contains_key(&key) {
            return Ok(false);
        }
        let slot = index.free_slots.pop().ok_or(DeviceError::Full)?;
        let generation = index.take_generation();
        // Lock order: holding the index we may lock only a slot just taken from the free
        // list. Taking it before publishing the mapping keeps the index invariant: IO that
        // finds the new mapping waits here until the record is durable.
        let mut owner = write_lock(&self.slots[slot as usize]);
        assert!(owner.is_none(), "slot {slot} is in the free list but has an owner");
        index.by_key.insert(key, Mapping { slot, pg_id, generation, durable: false });
        drop(index);

        let persisted = self.persist_allocation(slot, key, pg_id, generation);
        let mut index = write_lock(&self.index);
        if let Err(e) = persisted {
            // The record may or may not be on disk. Reusing the slot could leave two records
            // for one extent; fail the device and let a reopen read what the disk says.
            index.by_key.remove(&key);
            drop(index);
            self.fail(&e);
            return Err(e);
        }
        *owner = Some(SlotOwner { key, pg_id });
        let mapping = index.by_key.get_mut(&key).expect("allocating thread owns the mapping");
        assert_eq!((mapping.slot, mapping.durable), (slot, false));
        mapping.durable = true;
        index.used_extents += 1;
        drop(index);
        self.dirty[slot as usize].store(true, Ordering::Release);
        // Still holding the slot exclusively: concurrent writers of this extent wait, and
        // see the data in order after ours.
        self.write_data(slot, offset_in_extent, data, durable)?;
        Ok(true)
    }

    /// Zero the slot, then make the used record durable; see "Durability and zeroing".
    fn persist_allocation(&self, slot: u64, key: ExtentKey, pg_id: u32, generation: u64) -> Result<(), DeviceError> {
        let extent_bytes = u64::from(self.superblock.extent_size_bytes);
        sys::zero_range(&self.file, self.superblock.slot_data_offset(slot), extent_bytes)
            .map_err(self.io_error("zero new slot"))?;
        self.file.sync_data().map_err(self.io_error("sync zeroed slot"))?;
        // Written dirty: the first data write follows at once, and costs no second sync.
        let record = SlotRecord::Used { key, pg_id, generation, dirty: true }.encode(slot);
        self.file
            .write_all_at(&record, self.superblock.slot_record_offset(slot))
            .map_err(self.io_error("write slot record"))?;
        self.file.sync_data().map_err(self.io_error("sync slot record"))
    }

    /// Writes into a slot the caller holds (shared or exclusive) for its current owner,
    /// whose record is already dirty.
    fn write_data(&self, slot: u64, offset_in_extent: u32, data: &[u8], durable: bool) -> Result<(), DeviceError> {
        debug_assert!(self.dirty[slot as usize].load(Ordering::Acquire), "write into a clean slot");
        let position = self.data_position(slot, offset_in_extent, data.len() as u64);
        self.file.write_all_at(data, position).map_err(self.io_error("write data"))?;
        if durable {
            self.file.sync_data().map_err(self.io_error("sync data (FUA)"))?;
        }
        self.note_write(slot);
        Ok(())
    }

    /// Records a completed write into `slot`; the caller still holds the slot's lock.
    fn note_write(&self, slot: u64) {
        let seq = self.write_seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.last_write_seq[slot as usize].fetch_max(seq, Ordering::AcqRel);
    }

    /// Makes `slot`'s record durably dirty before a write into it (see "Write intent"). The
    /// caller holds the slot lock shared, so the cleaner (which takes it exclusively) cannot
    /// clean it again before the write lands.
    fn mark_dirty(&self, slot: u64, owner: SlotOwner, generation: u64) -> Result<(), DeviceError> {
        let flag = &self.dirty[slot as usize];
        if flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let _intent = self.intent_lock.lock().unwrap_or_else(|p| p.into_inner());
        if flag.load(Ordering::Acquire) {
            return Ok(());
        }
        let record = SlotRecord::Used { key: owner.key, pg_id: owner.pg_id, generation, dirty: true }.encode(slot);
        self.file
            .write_all_at(&record, self.superblock.slot_record_offset(slot))
            .map_err(self.io_error("mark slot dirty"))?;
        self.file.sync_data().map_err(self.io_error("sync dirty mark"))?;
        flag.store(true, Ordering::Release);
        Ok(())
    }

    /// PGs with an extent that was dirty when the device was opened: their copies may
    /// disagree, and must be reported before this device serves anything.
    pub fn suspect_pgs(&self) -> BTreeSet<u32> {
        self.suspect_at_open.iter().map(|(_, pg)| *pg).collect()
    }

    /// How many slots are dirty now.
    pub fn dirty_extents(&self) -> u64 {
        self.dirty.iter().filter(|d| d.load(Ordering::Relaxed)).count() as u64
    }

    /// One cleaning round: flushes the device, then marks clean (durably) up to
    /// `max_slots` dirty slots that no write touched since the previous round and that the
    /// flush covered. Slots in use by a write are skipped (their lock is only tried), so this
    /// never waits on IO. Returns how many slots it cleaned.
    pub fn clean_idle_slots(&self, max_slots: usize) -> Result<u64, DeviceError> {
        self.clean_slots(max_slots, true)
    }

    /// At an orderly stop: flushes, then marks clean every dirty slot no write is in flight
    /// on, idle or not, so that a restart has nothing to resync. (A write that comes later
    /// marks its slot dirty again first, as always.)
    pub fn clean_for_shutdown(&self) -> Result<u64, DeviceError> {
        self.clean_slots(usize::MAX, false)
    }

    fn clean_slots(&self, max_slots: usize, only_idle: bool) -> Result<u64, DeviceError> {
        self.check_usable()?;
        let idle_through = self.clean_watermark.swap(self.write_seq.load(Ordering::Acquire), Ordering::AcqRel);
        self.flush()?;
        let durable = self.durable_seq.load(Ordering::Acquire);
        let limit = if only_idle { idle_through.min(durable) } else { durable };
        let candidates: Vec<(u64, u64)> = {
            let index = read_lock(&self.index);
            index
                .by_key
                .values()
                .filter(|m| m.durable && self.dirty[m.slot as usize].load(Ordering::Acquire))
                .filter(|m| self.last_write_seq[m.slot as usize].load(Ordering::Acquire) <= limit)
                .map(|m| (m.slot, m.generation))
                .take(max_slots)
                .collect()
        };
        let mut held = Vec::with_capacity(candidates.len());
        for (slot, generation) in candidates {
            let Ok(guard) = self.slots[slot as usize].try_write() else { continue };
            let Some(owner) = *guard else { continue };
            // Re-checked under the exclusive lock: no write can start or be in flight now.
            if self.dirty[slot as usize].load(Ordering::Acquire)
                && self.last_write_seq[slot as usize].load(Ordering::Acquire) <= limit
            {
                held.push((slot, owner, generation, guard));
            }
        }
        if held.is_empty() {
            return Ok(0);
        }
        for (slot, owner, generation, _) in &held {
            let record = SlotRecord::Used { key: owner.key, pg_id: owner.pg_id, generation: *generation, dirty: false }
                .encode(*slot);
            self.file
                .write_all_at(&record, self.superblock.slot_record_offset(*slot))
                .map_err(self.io_error("mark slot clean"))?;
        }
        self.file.sync_data().map_err(self.io_error("sync clean marks"))?;
        for (slot, _, _, _) in &held {
            self.dirty[*slot as usize].store(false, Ordering::Release);
        }
        Ok(held.len() as u64)
    }

    /// Makes a range read as zeros. Zeroing a whole extent frees its slot (durably).
    /// Not durable until `flush` otherwise, like any write.
    pub fn write_zeroes(&self, key: ExtentKey, offset_in_extent: u32, len: u32) -> Result<(), DeviceError> {
        self.check_usable()?;
        self.check_range(offset_in_extent, u64::from(len))?;
        if offset_in_extent == 0 && len == self.superblock.extent_size_bytes {
            self.free_extents(&[key], |owner| owner == key)?;
            return Ok(());
        }
        loop {
            let Some(mapping) = self.lookup(key) else {
                return Ok(()); // unallocated: already reads as zeros
            };
            let guard = read_lock(&self.slots[mapping.slot as usize]);
            let Some(owner) = *guard else { continue };
            if owner.key != key {
                continue;
            }
            self.mark_dirty(mapping.slot, owner, mapping.generation)?;
            let position = self.data_position(mapping.slot, offset_in_extent, u64::from(len));
            sys::zero_range(&self.file, position, u64::from(len)).map_err(self.io_error("zero range"))?;
            self.note_write(mapping.slot);
            return Ok(());
        }
    }

    /// Discards a range. Our contract is that trimmed ranges read as zeros, so this is
    /// `write_zeroes`: a whole-extent trim frees the slot, a partial one punches a hole.
    pub fn trim(&self, key: ExtentKey, offset_in_extent: u32, len: u32) -> Result<(), DeviceError> {
        self.write_zeroes(key, offset_in_extent, len)
    }

    /// Health probe: rewrites the (unchanged) superblock and writes just that range back to
    /// the device, so a device that has started failing is noticed even when no IO reaches
    /// it. The bytes written equal the bytes on disk, so even a torn probe leaves the
    /// superblock intact. Only the superblock's range is synced (`sync_file_range`), not the
    /// whole file: a probe must not flush everyone's dirty data every few seconds.
    pub fn probe(&self) -> Result<(), DeviceError> {
        use std::os::fd::AsRawFd;
        self.check_usable()?;
        self.file.write_all_at(&self.superblock.encode(), 0).map_err(self.io_error("probe superblock"))?;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // Safety: a plain syscall on a descriptor this Device owns.
        let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, SUPERBLOCK_SIZE_BYTES as i64, flags) };
        if rc != 0 {
            return Err(self.io_error("probe sync")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Everything written before this call is durable when it returns.
    ///
    /// Group commit: fdatasyncs run one at a time, and a flush whose writes a sync that
    /// started after them already covered returns without one of its own. Concurrent
    /// flushes (a client's, and the forwarded ones of the copies' primaries) then share one
    /// fdatasync instead of queueing three.
    pub fn flush(&self) -> Result<(), DeviceError> {
        self.check_usable()?;
        let covered = self.write_seq.load(Ordering::Acquire);
        if self.durable_seq.load(Ordering::Acquire) >= covered {
            return Ok(());
        }
        let _one_sync_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_usable()?;
        if self.durable_seq.load(Ordering::Acquire) >= covered {
            return Ok(());
        }
        // Cover every write completed up to now, not just ours: the flushes waiting behind
        // this one find themselves covered.
        let covering = self.write_seq.load(Ordering::Acquire);
        self.file.sync_data().map_err(self.io_error("flush"))?;
        self.durable_seq.fetch_max(covering, Ordering::AcqRel);
        Ok(())
    }

    /// Allocated extent indexes of a volume, ascending.
    pub fn extents_of_volume(&self, volume_id: u64) -> Vec<u64> {
        let index = read_lock(&self.index);
        index.by_key.range(volume_range(volume_id)).filter(|(_, m)| m.durable).map(|(k, _)| k.extent_index).collect()
    }

    /// Whether the extent has a durable slot on this device.
    pub fn is_allocated(&self, key: ExtentKey) -> bool {
        read_lock(&self.index).by_key.get(&key).is_some_and(|m| m.durable)
    }

    /// Allocated extents of one PG, in key order (back-fill works PG by PG).
    pub fn extents_of_pg(&self, pg_id: u32) -> Vec<ExtentKey> {
        read_lock(&self.index).by_key.iter().filter(|(_, m)| m.durable && m.pg_id == pg_id).map(|(k, _)| *k).collect()
    }

    /// Every allocated extent with its PG and allocation generation, in key order.
    pub fn allocated_extents(&self) -> Vec<(ExtentKey, u32, u64)> {
        let index = read_lock(&self.index);
        index.by_key.iter().filter(|(_, m)| m.durable).map(|(k, m)| (*k, m.pg_id, m.generation)).collect()
    }

    /// Frees every extent of a volume, durably. Returns how many were freed.
    pub fn remove_volume(&self, volume_id: u64) -> Result<u64, DeviceError> {
        self.check_usable()?;
        let keys: Vec<ExtentKey> =
            read_lock(&self.index).by_key.range(volume_range(volume_id)).map(|(k, _)| *k).collect();
        let mut freed = 0;
        for batch in keys.chunks(FREE_BATCH_SLOTS) {
            freed += self.free_extents(batch, |owner| owner.volume_id == volume_id)?;
        }
        Ok(freed)
    }

    /// crc32c of an extent's full contents (zeros if unallocated), for copy verification.
    pub fn extent_checksum(&self, key: ExtentKey) -> Result<u32, DeviceError> {
        self.check_usable()?;
        let extent_bytes = self.superblock.extent_size_bytes as usize;
        loop {
            let Some(mapping) = self.lookup(key) else {
                return Ok(zeros_checksum(extent_bytes));
            };
            let owner = read_lock(&self.slots[mapping.slot as usize]);
            if owner.map(|o| o.key) != Some(key) {
                continue;
            }
            // Not the IO path: one buffer per call is fine, and bounded.
            let mut buf = vec![0u8; extent_bytes.min(CHECKSUM_READ_CHUNK_BYTES)];
            let mut crc = 0u32;
            let mut done = 0usize;
            while done < extent_bytes {
                let len = (extent_bytes - done).min(buf.len());
                let position = self.data_position(mapping.slot, done as u32, len as u64);
                self.file.read_exact_at(&mut buf[..len], position).map_err(self.io_error("read data for checksum"))?;
                crc = crc32c::crc32c_append(crc, &buf[..len]);
                done += len;
            }
            return Ok(crc);
        }
    }

    /// Frees the slots of `keys` whose current owner satisfies `belongs` (a key may have
    /// been freed, or its slot reused, since the caller listed it). One generation, record
    /// and hole punch per slot; one fdatasync for the whole batch.
    fn free_extents(&self, keys: &[ExtentKey], belongs: impl Fn(ExtentKey) -> bool) -> Result<u64, DeviceError> {
        let mut slots: Vec<u64> = {
            let index = read_lock(&self.index);
            keys.iter().filter_map(|k| index.by_key.get(k)).map(|m| m.slot).collect()
        };
        // Ascending order: two threads freeing overlapping sets cannot deadlock.
        slots.sort_unstable();
        slots.dedup();
        let mut held: Vec<(u64, ExtentKey, RwLockWriteGuard<'_, Option<SlotOwner>>)> = Vec::with_capacity(slots.len());
        for slot in slots {
            let guard = write_lock(&self.slots[slot as usize]);
            if let Some(owner) = *guard {
                if belongs(owner.key) {
                    held.push((slot, owner.key, guard));
                }
            }
        }
        if held.is_empty() {
            return Ok(0);
        }

        let first_generation = {
            let mut index = write_lock(&self.index);
            let first = index.next_generation;
            index.next_generation += held.len() as u64;
            first
        };
        let persisted = (|| {
            for (i, (slot, _, _)) in held.iter().enumerate() {
                let record = SlotRecord::Free { generation: first_generation + i as u64 }.encode(*slot);
                self.file
                    .write_all_at(&record, self.superblock.slot_record_offset(*slot))
                    .map_err(self.io_error("write free slot record"))?;
            }
            self.file.sync_data().map_err(self.io_error("sync free slot records"))
        })();
        if let Err(e) = persisted {
            // Some records may be on disk and some not: stop, and let a reopen decide.
            self.fail(&e);
            return Err(e);
        }

        let extent_bytes = u64::from(self.superblock.extent_size_bytes);
        for (slot, _, _) in &held {
            // Best effort, to return space (thin files, SSDs): allocation zeroes the slot
            // again before reuse. Done while we hold the slot, so it cannot hit new data.
            if let Err(e) = sys::punch_hole(&self.file, self.superblock.slot_data_offset(*slot), extent_bytes) {
                tracing::trace!(slot, error = %e, "could not punch freed slot");
            }
        }

        let mut index = write_lock(&self.index);
        for (slot, key, guard) in held.iter_mut() {
            let removed = index.by_key.remove(key);
            assert!(matches!(removed, Some(m) if m.slot == *slot && m.durable), "index disagrees with slot {slot}");
            **guard = None;
            // The free record is durable: nothing of this slot can disagree any more.
            self.dirty[*slot as usize].store(false, Ordering::Release);
            index.free_slots.push(*slot);
            index.used_extents -= 1;
        }
        Ok(held.len() as u64)
    }

    fn lookup(&self, key: ExtentKey) -> Option<Mapping> {
        read_lock(&self.index).by_key.get(&key).copied()
    }

    fn check_usable(&self) -> Result<(), DeviceError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(DeviceError::Failed);
        }
        Ok(())
    }

    fn fail(&self, cause: &DeviceError) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(path = %self.path.display(), error = %cause, "device failed: it serves nothing more");
        }
    }

    /// Fails the device because an operation on it missed its deadline (`what` names it).
    /// A hung device is failed like one that returned an error: its PGs move to their
    /// other copies, and nothing is served from it again (the hung call may still finish,
    /// but nobody waits for it).
    pub fn fail_hung(&self, what: &str) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(path = %self.path.display(), operation = what, "device missed its deadline: failed");
        }
    }

    /// Whether the device has failed (an IO error or a missed deadline). Latched: a failed
    /// device never serves again in this process, and the MDM never lets it back in.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn check_range(&self, offset_in_extent: u32, len: u64) -> Result<(), DeviceError> {
        let extent_size_bytes = self.superblock.extent_size_bytes;
        let offset = u64::from(offset_in_extent);
        if offset + len > u64::from(extent_size_bytes) {
            return Err(DeviceError::OutOfRange { offset, len, extent_size_bytes });
        }
        Ok(())
    }

    /// Device offset of `offset_in_extent` within `slot`. Asserts that IO stays inside the
    /// slot: callers check ranges first, so a violation here is a bug that would corrupt a
    /// neighbouring extent.
    fn data_position(&self, slot: u64, offset_in_extent: u32, len: u64) -> u64 {
        assert!(u64::from(offset_in_extent) + len <= u64::from(self.superblock.extent_size_bytes), "IO exceeds slot");
        self.superblock.slot_data_offset(slot) + u64::from(offset_in_extent)
    }

    /// The error for a failed IO on this open device — and the latch: any read, write or
    /// sync error fails the device for good. A write-back error is reported by the kernel
    /// once (the PostgreSQL fsync lesson): after it, the page cache may have dropped the
    /// dirty pages, so a later fdatasync that succeeds proves nothing about data written
    /// before. Failing the device is the only answer that never acknowledges lost data.
    fn io_error(&self, context: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
        move |source| {
            let e = DeviceError::Io { path: self.path.clone(), context, source };
            self.fail(&e);
            e
        }
    }
}

/// crc32c of `len` zero bytes, without allocating.
fn zeros_checksum(len: usize) -> u32 {
    let zeros = sys::zero_chunk();
    let mut crc = 0u32;
    let mut done = 0usize;
    while done < len {
        let chunk = (len - done).min(zeros.len());
        crc = crc32c::crc32c_append(crc, &zeros[..chunk]);
        done += chunk;
    }
    crc
}
