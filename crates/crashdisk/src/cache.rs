//! The volatile write cache of one file (pure: the backing store is a trait).
//!
//! A file is a disk with a write-back cache. Writes, punches and zeroings are
//! held as pending operations, in the order they arrived; a read sees the
//! backing store with the pending operations laid over it in that order, the
//! way a disk answers reads from its cache. A flush (`fsync`/`fdatasync`)
//! applies them in order, syncs the backing store and empties the list. A
//! power cut throws the list away ([`CutMode::Drop`]) or keeps a seeded random
//! subset of its 512-byte sectors ([`CutMode::Torn`]), which is what a disk
//! that reorders and tears its write-back can leave behind.
//!
//! Invariants:
//! * Pending operations are applied to the backing store only in arrival
//!   order, and each at most once (destage, flush or a torn cut's survivors).
//! * `len()` = max(backing length, end of every pending operation that may
//!   grow the file): pending ops are only appended and popped from the front,
//!   and a popped op's extent is in the backing store by then.
//! * The cache is bounded ([`MAX_PENDING_BYTES`], [`MAX_PENDING_OPS`]): past
//!   a bound the oldest ops are destaged, as a disk writes back when it likes.
//! * A failed flush does not apply the pending ops: they are dropped, like a
//!   write-back error that loses the dirty data.
//! * Size changes (truncate, fallocate mode 0) destage everything first and
//!   are durable at once: a disk's size lives in no cache.

use std::collections::VecDeque;
use std::io;

use crate::faults::{Faults, IoKind};

/// The unit a torn cut keeps or loses: one logical sector.
pub const SECTOR_BYTES: u64 = 512;
/// Data bytes a file may hold pending before its oldest ops are destaged.
pub const MAX_PENDING_BYTES: u64 = 64 << 20;
/// Pending ops a file may hold before its oldest ops are destaged; bounds the
/// cost of a read, which lays every pending op over the backing data.
pub const MAX_PENDING_OPS: usize = 4096;
/// Largest file size the model accepts (16 TiB); past it writes get `EFBIG`.
pub const MAX_FILE_BYTES: u64 = 1 << 44;

/// The durable store under the cache: a real file in the daemon, memory in tests.
// `len` is fallible I/O, not a container size; an `is_empty` would be noise.
#[allow(clippy::len_without_is_empty)]
pub trait Backing {
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; bytes past the end read as zero.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`, growing the store if it ends past the end.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Zeroes `[offset, offset + len)` without changing the size.
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes `[offset, offset + len)`; grows the size to its end unless `keep_size`.
    fn zero_range(&mut self, offset: u64, len: u64, keep_size: bool) -> io::Result<()>;
    /// Reserves space (fallocate mode 0); grows the size to its end unless `keep_size`.
    fn allocate(&mut self, offset: u64, len: u64, keep_size: bool) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroKind {
    /// FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE.
    Punch,
    /// FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE.
    ZeroKeepSize,
    /// FALLOC_FL_ZERO_RANGE: may grow the file.
    ZeroGrow,
}

/// One unsynced operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingOp {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64, kind: ZeroKind },
}

impl PendingOp {
    fn offset(&self) -> u64 {
        match self {
            PendingOp::Write { offset, .. } | PendingOp::Zero { offset, .. } => *offset,
        }
    }

    fn end(&self) -> u64 {
        match self {
            PendingOp::Write { offset, data } => offset + data.len() as u64,
            PendingOp::Zero { offset, len, .. } => offset + len,
        }
    }

    fn data_bytes(&self) -> u64 {
        match self {
            PendingOp::Write { data, .. } => data.len() as u64,
            PendingOp::Zero { .. } => 0,
        }
    }

    /// Where the file ends at least once this op is applied, if it can grow it.
    fn grows_to(&self) -> Option<u64> {
        match self {
            PendingOp::Write { .. } | PendingOp::Zero { kind: ZeroKind::ZeroGrow, .. } => Some(self.end()),
            PendingOp::Zero { .. } => None,
        }
    }

    /// The part of this op over `[start, end)`, which must lie inside it.
    fn piece(&self, start: u64, end: u64) -> PendingOp {
        assert!(self.offset() <= start && start < end && end <= self.end());
        match self {
            PendingOp::Write { offset, data } => {
                let from = (start - offset) as usize;
                let to = (end - offset) as usize;
                PendingOp::Write { offset: start, data: data[from..to].to_vec() }
            }
            PendingOp::Zero { kind, .. } => PendingOp::Zero { offset: start, len: end - start, kind: *kind },
        }
    }

    fn apply<B: Backing>(&self, backing: &mut B) -> io::Result<()> {
        match self {
            PendingOp::Write { offset, data } => backing.write_at(*offset, data),
            PendingOp::Zero { offset, len, kind: ZeroKind::Punch } => backing.punch_hole(*offset, *len),
            PendingOp::Zero { offset, len, kind: ZeroKind::ZeroKeepSize } => backing.zero_range(*offset, *len, true),
            PendingOp::Zero { offset, len, kind: ZeroKind::ZeroGrow } => backing.zero_range(*offset, *len, false),
        }
    }

    /// Lays this op over `buf`, which holds the file's bytes from `buf_offset`.
    fn overlay(&self, buf_offset: u64, buf: &mut [u8]) {
        let start = self.offset().max(buf_offset);
        let end = self.end().min(buf_offset + buf.len() as u64);
        if start >= end {
            return;
        }
        let target = &mut buf[(start - buf_offset) as usize..(end - buf_offset) as usize];
        match self {
            PendingOp::Write { offset, data } => {
                target.copy_from_slice(&data[(start - offset) as usize..(end - offset) as usize])
            }
            PendingOp::Zero { .. } => target.fill(0),
        }
    }
}

/// What a power cut leaves of the pending ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing: every pending op is lost.
    Drop,
    /// Each 512-byte sector of each pending op survives with probability 1/2,
    /// drawn from a generator seeded with `seed`: the same seed over the same
    /// pending ops keeps the same sectors.
    Torn { seed: u64 },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    pub ops_cut: u64,
    pub sectors_kept: u64,
    pub sectors_lost: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub pending_ops: u64,
    pub pending_bytes: u64,
    /// fsync/fdatasync calls received, failed ones included.
    pub syncs: u64,
    /// Operations answered with an injected error.
    pub failed_ops: u64,
    /// Ops written back early because the cache was full.
    pub destaged_ops: u64,
    pub cuts: u64,
}

#[derive(Debug)]
pub enum CacheError {
    /// A fault rule fired.
    Injected,
    /// The range ends past [`MAX_FILE_BYTES`].
    TooLarge,
    Backing(io::Error),
}

impl CacheError {
    pub fn errno(&self) -> i32 {
        match self {
            CacheError::Injected => libc::EIO,
            CacheError::TooLarge => libc::EFBIG,
            CacheError::Backing(error) => error.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl From<io::Error> for CacheError {
    fn from(error: io::Error) -> Self {
        CacheError::Backing(error)
    }
}

/// The bounds of a cache; [`Limits::default`] is what the daemon uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_pending_bytes: u64,
    pub max_pending_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_pending_bytes: MAX_PENDING_BYTES, max_pending_ops: MAX_PENDING_OPS }
    }
}

/// One file: its backing store, its pending ops and its fault rules.
pub struct FileCache<B: Backing> {
    backing: B,
    pending: VecDeque<PendingOp>,
    pending_bytes: u64,
    /// Max end of the pending ops that may grow the file (0 if none).
    pending_extent: u64,
    limits: Limits,
    pub faults: Faults,
    stats: CacheStats,
}

impl<B: Backing> FileCache<B> {
    pub fn new(backing: B) -> Self {
        Self::with_limits(backing, Limits::default())
    }

    pub fn with_limits(backing: B, limits: Limits) -> Self {
        assert!(limits.max_pending_ops > 0);
        FileCache {
            backing,
            pending: VecDeque::new(),
            pending_bytes: 0,
            pending_extent: 0,
            limits,
            faults: Faults::default(),
            stats: CacheStats::default(),
        }
    }

    pub fn backing(&self) -> &B {
        &self.backing
    }

    pub fn pending(&self) -> impl Iterator<Item = &PendingOp> {
        self.pending.iter()
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { pending_ops: self.pending.len() as u64, pending_bytes: self.pending_bytes, ..self.stats }
    }

    /// The size the file has for its users: with the pending ops applied.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.backing.len()?.max(self.pending_extent))
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    fn check_fault(&mut self, io: IoKind) -> Result<(), CacheError> {
        if self.faults.should_fail(io) {
            self.stats.failed_ops += 1;
            return Err(CacheError::Injected);
        }
        Ok(())
    }

    /// Up to `size` bytes from `offset`, fewer at the end of the file.
    pub fn read(&mut self, offset: u64, size: u64) -> Result<Vec<u8>, CacheError> {
        self.check_fault(IoKind::Read)?;
        let len = self.len()?;
        if offset >= len || size == 0 {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(size).min(len);
        let mut buf = vec![0u8; (end - offset) as usize];
        let backing_len = self.backing.len()?;
        if offset < backing_len {
            let from_backing = (end.min(backing_len) - offset) as usize;
            self.backing.read_at(offset, &mut buf[..from_backing])?;
        }
        for op in &self.pending {
            op.overlay(offset, &mut buf);
        }
        Ok(buf)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), CacheError> {
        self.check_fault(IoKind::Write)?;
        check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.push(PendingOp::Write { offset, data: data.to_vec() })
    }

    /// Punch hole or zero range. Ops that keep the size are clipped to the
    /// current end of file, as the kernel does: past it there is nothing to zero.
    pub fn zero(&mut self, offset: u64, len: u64, kind: ZeroKind) -> Result<(), CacheError> {
        self.check_fault(IoKind::Write)?;
        check_range(offset, len)?;
        let end = match kind {
            ZeroKind::ZeroGrow => offset + len,
            ZeroKind::Punch | ZeroKind::ZeroKeepSize => (offset + len).min(self.len()?),
        };
        if end <= offset {
            return Ok(());
        }
        self.push(PendingOp::Zero { offset, len: end - offset, kind })
    }

    fn push(&mut self, op: PendingOp) -> Result<(), CacheError> {
        self.pending_bytes += op.data_bytes();
        if let Some(grows_to) = op.grows_to() {
            self.pending_extent = self.pending_extent.max(grows_to);
        }
        self.pending.push_back(op);
        while self.pending_bytes > self.limits.max_pending_bytes || self.pending.len() > self.limits.max_pending_ops {
            self.stats.destaged_ops += 1;
            self.apply_oldest()?;
        }
        Ok(())
    }

    /// Pops the oldest pending op and applies it. A backing error loses it.
    fn apply_oldest(&mut self) -> io::Result<()> {
        let Some(op) = self.pending.pop_front() else { return Ok(()) };
        self.pending_bytes -= op.data_bytes();
        if self.pending.is_empty() {
            self.pending_extent = 0;
        }
        op.apply(&mut self.backing)
    }

    fn destage_all(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            if let Err(error) = self.apply_oldest() {
                self.clear_pending();
                return Err(error);
            }
        }
        Ok(())
    }

    fn clear_pending(&mut self) -> u64 {
        let dropped = self.pending.len() as u64;
        self.pending.clear();
        self.pending_bytes = 0;
        self.pending_extent = 0;
        dropped
    }

    /// fsync / fdatasync. On an injected failure the pending ops are dropped,
    /// not applied: a write-back error loses the dirty data, and a later flush
    /// has nothing left to fail on, which is why callers must latch the error.
    pub fn flush(&mut self) -> Result<(), CacheError> {
        self.stats.syncs += 1;
        if let Err(error) = self.check_fault(IoKind::Flush) {
            self.clear_pending();
            return Err(error);
        }
        self.destage_all()?;
        self.backing.sync()?;
        Ok(())
    }

    /// Truncate or extend. Durable at once (see the module invariants).
    pub fn set_len(&mut self, len: u64) -> Result<(), CacheError> {
        check_range(0, len)?;
        self.destage_all()?;
        self.backing.set_len(len)?;
        self.backing.sync()?;
        Ok(())
    }

    /// fallocate mode 0 or KEEP_SIZE alone. Durable at once, like `set_len`.
    pub fn allocate(&mut self, offset: u64, len: u64, keep_size: bool) -> Result<(), CacheError> {
        check_range(offset, len)?;
        self.destage_all()?;
        self.backing.allocate(offset, len, keep_size)?;
        self.backing.sync()?;
        Ok(())
    }

    /// The power goes: see [`CutMode`].
    pub fn cut(&mut self, mode: CutMode) -> Result<CutReport, CacheError> {
        self.stats.cuts += 1;
        let mut report = CutReport::default();
        if let CutMode::Torn { seed } = mode {
            let mut rng = SplitMix64::new(seed);
            let ops: Vec<PendingOp> = self.pending.drain(..).collect();
            for op in &ops {
                let outcome = apply_torn(op, &mut rng, &mut self.backing);
                report.sectors_kept += outcome.sectors_kept;
                report.sectors_lost += outcome.sectors_lost;
                if let Err(error) = outcome.result {
                    self.clear_pending();
                    return Err(error.into());
                }
            }
            report.ops_cut = ops.len() as u64;
            self.clear_pending();
            self.backing.sync()?;
        } else {
            report.ops_cut = self.clear_pending();
        }
        Ok(report)
    }
}

fn check_range(offset: u64, len: u64) -> Result<(), CacheError> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_FILE_BYTES => Ok(()),
        _ => Err(CacheError::TooLarge),
    }
}

struct TornOutcome {
    sectors_kept: u64,
    sectors_lost: u64,
    result: io::Result<()>,
}

/// Applies the surviving sectors of `op`: one coin per 512-byte sector it
/// touches (sector boundaries are absolute, so an unaligned op's first and
/// last sectors are partial), adjacent survivors applied as one piece.
fn apply_torn<B: Backing>(op: &PendingOp, rng: &mut SplitMix64, backing: &mut B) -> TornOutcome {
    let mut outcome = TornOutcome { sectors_kept: 0, sectors_lost: 0, result: Ok(()) };
    let mut run_start: Option<u64> = None;
    let mut position = op.offset();
    while position < op.end() {
        let sector_end = ((position / SECTOR_BYTES + 1) * SECTOR_BYTES).min(op.end());
        if rng.coin() {
            outcome.sectors_kept += 1;
            run_start.get_or_insert(position);
        } else {
            outcome.sectors_lost += 1;
            if let Some(start) = run_start.take() {
                if let Err(error) = op.piece(start, position).apply(backing) {
                    outcome.result = Err(error);
                    return outcome;
                }
            }
        }
        position = sector_end;
    }
    if let Some(start) = run_start {
        outcome.result = op.piece(start, op.end()).apply(backing);
    }
    outcome
}

/// A small, fixed pseudo-random generator (SplitMix64). Written out here,
/// not taken from a crate, so a seed keeps meaning the same sectors forever.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// A backing store in memory, for tests of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemBacking {
    pub data: Vec<u8>,
    pub syncs: u64,
}

impl MemBacking {
    fn grow_to(&mut self, end: u64) {
        if end > self.data.len() as u64 {
            self.data.resize(end as usize, 0);
        }
    }
}

impl Backing for MemBacking {
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let len = self.data.len() as u64;
        if offset < len {
            let end = (offset + buf.len() as u64).min(len);
            buf[..(end - offset) as usize].copy_from_slice(&self.data[offset as usize..end as usize]);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.grow_to(offset + data.len() as u64);
        self.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.data.len() as u64;
        let end = (offset + len).min(size);
        if offset < end {
            self.data[offset as usize..end as usize].fill(0);
        }
        Ok(())
    }

    fn zero_range(&mut self, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
        if !keep_size {
            self.grow_to(offset + len);
        }
        self.punch_hole(offset, len)
    }

    fn allocate(&mut self, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
        if !keep_size {
            self.grow_to(offset + len);
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.data.resize(len as usize, 0);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.syncs += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{FaultOp, FaultRepeat, FaultRule};

    fn disk(len: usize, fill: u8) -> FileCache<MemBacking> {
        FileCache::new(MemBacking { data: vec![fill; len], syncs: 0 })
    }

    fn read_all(cache: &mut FileCache<MemBacking>) -> Vec<u8> {
        let len = cache.len().unwrap();
        cache.read(0, len).unwrap()
    }

    #[test]
    fn drop_cut_loses_unsynced_writes() {
        let mut cache = disk(4096, 0xaa);
        cache.write(512, &[0x55; 1024]).unwrap();
        assert_eq!(&cache.read(512, 1024).unwrap()[..], &[0x55; 1024][..], "reads see the cache");
        assert_eq!(cache.backing().data, vec![0xaa; 4096], "the backing store is untouched");
        let report = cache.cut(CutMode::Drop).unwrap();
        assert_eq!(report.ops_cut, 1);
        assert_eq!(read_all(&mut cache), vec![0xaa; 4096]);
        assert_eq!(cache.stats().pending_ops, 0);
    }

    #[test]
    fn flushed_writes_survive_a_cut() {
        let mut cache = disk(4096, 0);
        cache.write(0, &[1; 100]).unwrap();
        cache.write(50, &[2; 100]).unwrap();
        cache.flush().unwrap();
        assert_eq!(cache.backing().syncs, 1);
        cache.write(0, &[3; 10]).unwrap();
        cache.cut(CutMode::Drop).unwrap();
        let data = read_all(&mut cache);
        assert_eq!(&data[..50], &[1; 50][..]);
        assert_eq!(&data[50..150], &[2; 100][..], "ops apply in arrival order");
        assert_eq!(data[150], 0);
        let stats = cache.stats();
        assert_eq!((stats.syncs, stats.pending_ops, stats.cuts), (1, 0, 1));
    }

    #[test]
    fn writes_past_the_end_grow_the_file_until_cut() {
        let mut cache = disk(1000, 7);
        cache.write(2000, &[9; 48]).unwrap();
        assert_eq!(cache.len().unwrap(), 2048);
        let data = read_all(&mut cache);
        assert_eq!(&data[1000..2000], &[0; 1000][..]);
        assert_eq!(&data[2000..], &[9; 48][..]);
        cache.cut(CutMode::Drop).unwrap();
        assert_eq!(cache.len().unwrap(), 1000);
    }

    #[test]
    fn punch_and_zero_overlay_reads_and_apply_on_flush() {
        let mut cache = disk(8192, 0xff);
        cache.zero(1024, 1024, ZeroKind::Punch).unwrap();
        cache.write(1536, &[5; 16]).unwrap();
        cache.zero(4096, 10_000, ZeroKind::ZeroKeepSize).unwrap();
        assert_eq!(cache.len().unwrap(), 8192, "keep-size ops never grow the file");
        let data = read_all(&mut cache);
        assert_eq!(&data[..1024], &[0xff; 1024][..]);
        assert_eq!(&data[1024..1536], &[0; 512][..]);
        assert_eq!(&data[1536..1552], &[5; 16][..]);
        assert_eq!(&data[1552..2048], &[0; 496][..]);
        assert_eq!(&data[2048..4096], &[0xff; 2048][..]);
        assert_eq!(&data[4096..], &[0; 4096][..]);
        cache.flush().unwrap();
        assert_eq!(cache.backing().data, data, "the flushed backing store equals what reads showed");
        cache.zero(8192, 512, ZeroKind::ZeroGrow).unwrap();
        assert_eq!(cache.len().unwrap(), 8704);
    }

    #[test]
    fn torn_cut_keeps_a_deterministic_subset_of_sectors() {
        let run = |seed: u64| {
            let mut cache = disk(64 * 512, 0);
            cache.write(100, &[1; 40 * 512]).unwrap();
            let report = cache.cut(CutMode::Torn { seed }).unwrap();
            (read_all(&mut cache), report)
        };
        let (first, report) = run(42);
        let (again, _) = run(42);
        let (other, _) = run(43);
        assert_eq!(first, again, "one seed, one outcome");
        assert_ne!(first, other, "another seed tears differently");
        // The write touches sectors 0..=40 (first and last partial): 41 coins.
        assert_eq!(report.sectors_kept + report.sectors_lost, 41);
        assert!(report.sectors_kept > 5 && report.sectors_lost > 5, "about half survive: {report:?}");
        // Every sector is all-new or all-old: tearing happens at sector granularity.
        let mut kept = 0;
        for sector in 0..64usize {
            let start = (sector * 512).max(100);
            let end = ((sector + 1) * 512).min(100 + 40 * 512);
            if start >= end {
                assert!(first[sector * 512..(sector + 1) * 512].iter().all(|&b| b == 0));
                continue;
            }
            let bytes = &first[start..end];
            assert!(bytes.iter().all(|&b| b == 1) || bytes.iter().all(|&b| b == 0), "sector {sector} is torn inside");
            kept += u64::from(bytes[0] == 1);
        }
        assert_eq!(kept, report.sectors_kept);
    }

    #[test]
    fn torn_cut_applies_survivors_in_order() {
        // Two writes over one sector: whatever survives, a later op never lands under an earlier one.
        for seed in 0..64 {
            let mut cache = disk(512, 0);
            cache.write(0, &[1; 512]).unwrap();
            cache.write(0, &[2; 512]).unwrap();
            cache.cut(CutMode::Torn { seed }).unwrap();
            let value = read_all(&mut cache)[0];
            assert!([0, 1, 2].contains(&value));
        }
    }

    #[test]
    fn full_cache_destages_its_oldest_ops() {
        let limits = Limits { max_pending_bytes: 4096, max_pending_ops: 3 };
        let mut cache = FileCache::with_limits(MemBacking { data: vec![0; 16384], syncs: 0 }, limits);
        for i in 0..3u8 {
            cache.write(u64::from(i) * 1024, &[i + 1; 1024]).unwrap();
        }
        assert_eq!(cache.stats().destaged_ops, 0);
        cache.write(3 * 1024, &[4; 1024]).unwrap();
        let stats = cache.stats();
        assert_eq!((stats.destaged_ops, stats.pending_ops, stats.pending_bytes), (1, 3, 3072));
        assert_eq!(&cache.backing().data[..1024], &[1; 1024][..], "the oldest op reached the backing store");
        cache.write(8192, &[9; 8192]).unwrap();
        assert!(cache.stats().pending_bytes <= 4096);
        cache.cut(CutMode::Drop).unwrap();
        assert_eq!(&cache.backing().data[..1024], &[1; 1024][..], "destaged data survives a cut");
    }

    #[test]
    fn failed_flush_drops_the_pending_data() {
        let mut cache = disk(4096, 0);
        cache.write(0, &[1; 512]).unwrap();
        cache.flush().unwrap();
        cache.write(0, &[2; 512]).unwrap();
        cache.faults.add(FaultRule { op: FaultOp::Flush, repeat: FaultRepeat::Once }).unwrap();
        assert!(matches!(cache.flush(), Err(CacheError::Injected)));
        assert_eq!(cache.stats().pending_ops, 0);
        assert_eq!(&read_all(&mut cache)[..512], &[1; 512][..], "the failed write-back lost the new data");
        cache.flush().unwrap();
        let stats = cache.stats();
        assert_eq!((stats.syncs, stats.failed_ops), (3, 1));
    }

    #[test]
    fn failed_read_and_write_change_nothing() {
        let mut cache = disk(1024, 3);
        cache.faults.add(FaultRule { op: FaultOp::Any, repeat: FaultRepeat::Always }).unwrap();
        assert_eq!(cache.write(0, &[1; 10]).unwrap_err().errno(), libc::EIO);
        assert_eq!(cache.read(0, 10).unwrap_err().errno(), libc::EIO);
        cache.faults.heal();
        assert_eq!(cache.read(0, 10).unwrap(), vec![3; 10]);
        assert_eq!(cache.stats().failed_ops, 2);
    }

    #[test]
    fn truncate_destages_and_is_durable() {
        let mut cache = disk(4096, 1);
        cache.write(0, &[2; 8]).unwrap();
        cache.set_len(2048).unwrap();
        cache.cut(CutMode::Drop).unwrap();
        assert_eq!(cache.len().unwrap(), 2048);
        assert_eq!(&read_all(&mut cache)[..8], &[2; 8][..]);
    }

    #[test]
    fn ranges_past_the_size_limit_are_refused() {
        let mut cache = disk(0, 0);
        assert!(matches!(cache.write(MAX_FILE_BYTES, &[1]), Err(CacheError::TooLarge)));
        assert!(matches!(cache.zero(u64::MAX, 2, ZeroKind::ZeroGrow), Err(CacheError::TooLarge)));
        assert!(cache.read(u64::MAX, u64::MAX).unwrap().is_empty());
    }
}
