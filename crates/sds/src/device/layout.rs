//! Encoding and validation of the on-device metadata: the superblock and the slot records.
//!
//! Everything here is pure (bytes in, values or errors out), so every check on what the disk
//! says is made in one place and can be tested without a device. Input from the disk never
//! panics: each field is validated before it is used for arithmetic or allocation.

use super::error::DeviceError;

/// First bytes of every Tessera device. Without them the device is "not formatted".
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"TESSDEV1";
/// Bumped on any incompatible change of the layout below.
pub const LAYOUT_VERSION: u32 = 1;
/// The superblock occupies the first block of the device; the slot table starts right after.
pub const SUPERBLOCK_SIZE_BYTES: u64 = 4096;
/// Size of one slot record. 64 divides 512, so a record never straddles a sector and a
/// torn write cannot leave half of one record behind.
pub const SLOT_RECORD_SIZE_BYTES: u64 = 64;
/// The data area starts on a 1 MiB boundary so that slots are aligned for `O_DIRECT` and to
/// the erase/stripe units of common SSDs and RAID controllers.
pub const DATA_ALIGNMENT_BYTES: u64 = 1 << 20;
/// Device-layer bounds on the extent size. Pools are stricter (see `tessera_core::model`);
/// the device only refuses what it cannot lay out sensibly.
pub const MIN_EXTENT_SIZE_BYTES: u32 = 4096;
pub const MAX_EXTENT_SIZE_BYTES: u32 = 64 << 20;
/// Upper bound on slots per device. Memory is about 56 bytes per slot (lock, owner, free
/// list entry) plus about 60 per allocated extent (index entry), so the cap bounds one
/// device at under 2 GiB; with 1 MiB extents it covers 16 TiB. A bigger device is formatted
/// with this many slots and the rest left unused. The limit also stops an absurd on-disk
/// slot count from allocating unbounded memory on open.
pub const MAX_SLOT_COUNT: u64 = 1 << 24;

/// Generations start at 1 so that 0 can mean "never used" in an all-zero record.
pub const FIRST_GENERATION: u64 = 1;
/// A record claiming a generation above this is corrupt: at a million allocations a second
/// the counter needs 146,000 years to get here, and the bound keeps `+ 1` from overflowing.
pub const MAX_GENERATION: u64 = 1 << 62;

const SB_MAGIC: std::ops::Range<usize> = 0..8;
const SB_VERSION: std::ops::Range<usize> = 8..12;
const SB_CLUSTER_ID: std::ops::Range<usize> = 12..28;
const SB_DEVICE_ID: std::ops::Range<usize> = 28..36;
const SB_EXTENT_SIZE: std::ops::Range<usize> = 36..40;
const SB_SLOT_COUNT: std::ops::Range<usize> = 40..48;
const SB_SLOT_TABLE_OFFSET: std::ops::Range<usize> = 48..56;
const SB_DATA_OFFSET: std::ops::Range<usize> = 56..64;
const SB_CHECKSUM: std::ops::Range<usize> = 64..68;

const REC_STATE: usize = 0;
/// Bit flags of a used record (byte 1, zero in records written before flags existed).
const REC_FLAGS: usize = 1;
/// The slot was written since it was last known durable and in agreement with its partner
/// copies: after a crash its copies may differ, so it is suspect until resynced.
const FLAG_DIRTY: u8 = 1;
const REC_PG_ID: std::ops::Range<usize> = 4..8;
const REC_SLOT_INDEX: std::ops::Range<usize> = 8..16;
const REC_VOLUME_ID: std::ops::Range<usize> = 16..24;
const REC_EXTENT_INDEX: std::ops::Range<usize> = 24..32;
const REC_GENERATION: std::ops::Range<usize> = 32..40;
const REC_CHECKSUM: std::ops::Range<usize> = 60..64;

/// `state` byte values. 0 is deliberately not a valid state: a record is either all zeros
/// (never used since format) or carries one of these and a valid checksum.
const STATE_FREE: u8 = 1;
const STATE_USED: u8 = 2;

/// One extent of one volume: the unit of allocation on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentKey {
    pub volume_id: u64,
    pub extent_index: u64,
}

/// The decoded superblock: the device's identity and geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub cluster_id: [u8; 16],
    pub device_id: u64,
    pub extent_size_bytes: u32,
    pub slot_count: u64,
    pub slot_table_offset: u64,
    pub data_offset: u64,
}

fn le_u32(bytes: &[u8], range: std::ops::Range<usize>) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[range]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], range: std::ops::Range<usize>) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[range]);
    u64::from_le_bytes(b)
}

pub fn extent_size_is_valid(extent_size_bytes: u32) -> bool {
    extent_size_bytes.is_power_of_two() && (MIN_EXTENT_SIZE_BYTES..=MAX_EXTENT_SIZE_BYTES).contains(&extent_size_bytes)
}

fn round_up(value: u64, alignment: u64) -> Option<u64> {
    debug_assert!(alignment.is_power_of_two());
    Some(value.checked_add(alignment - 1)? & !(alignment - 1))
}

impl Superblock {
    /// Chooses the geometry for a device of `device_size_bytes`: as many slots as fit after the
    /// superblock, the slot table and the alignment padding, capped at [`MAX_SLOT_COUNT`].
    /// Returns `None` when not even one slot fits.
    pub fn plan(cluster_id: [u8; 16], device_id: u64, extent_size_bytes: u32, device_size_bytes: u64) -> Option<Self> {
        assert!(extent_size_is_valid(extent_size_bytes), "caller validates the extent size");
        let extent = u64::from(extent_size_bytes);
        let data_offset_for = |slot_count: u64| {
            round_up(SUPERBLOCK_SIZE_BYTES + slot_count * SLOT_RECORD_SIZE_BYTES, DATA_ALIGNMENT_BYTES)
        };
        let fits = |slot_count: u64| match data_offset_for(slot_count) {
            Some(data_offset) => data_offset + slot_count * extent <= device_size_bytes,
            None => false,
        };
        // An upper estimate that ignores the alignment padding; the padding is at most 1 MiB,
        // so the loop below runs at most 1 MiB / extent + 1 times.
        let mut slot_count = (device_size_bytes.saturating_sub(SUPERBLOCK_SIZE_BYTES)
            / (extent + SLOT_RECORD_SIZE_BYTES))
            .min(MAX_SLOT_COUNT);
        while slot_count > 0 && !fits(slot_count) {
            slot_count -= 1;
        }
        if slot_count == 0 {
            return None;
        }
        let sb = Superblock {
            cluster_id,
            device_id,
            extent_size_bytes,
            slot_count,
            slot_table_offset: SUPERBLOCK_SIZE_BYTES,
            data_offset: data_offset_for(slot_count)?,
        };
        debug_assert!(sb.validate(device_size_bytes).is_ok());
        Some(sb)
    }

    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE_BYTES as usize] {
        let mut block = [0u8; SUPERBLOCK_SIZE_BYTES as usize];
        block[SB_MAGIC].copy_from_slice(&SUPERBLOCK_MAGIC);
        block[SB_VERSION].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        block[SB_CLUSTER_ID].copy_from_slice(&self.cluster_id);
        block[SB_DEVICE_ID].copy_from_slice(&self.device_id.to_le_bytes());
        block[SB_EXTENT_SIZE].copy_from_slice(&self.extent_size_bytes.to_le_bytes());
        block[SB_SLOT_COUNT].copy_from_slice(&self.slot_count.to_le_bytes());
        block[SB_SLOT_TABLE_OFFSET].copy_from_slice(&self.slot_table_offset.to_le_bytes());
        block[SB_DATA_OFFSET].copy_from_slice(&self.data_offset.to_le_bytes());
        let checksum = crc32c::crc32c(&block[..SB_CHECKSUM.start]);
        block[SB_CHECKSUM].copy_from_slice(&checksum.to_le_bytes());
        // Pair the checks: what we write must be what `decode` accepts.
        assert_eq!(Self::decode(&block).ok(), Some(*self), "superblock does not round-trip");
        block
    }

    /// True when the block starts with the Tessera magic, valid or not.
    pub fn has_magic(block: &[u8]) -> bool {
        block.len() >= SB_MAGIC.end && block[SB_MAGIC] == SUPERBLOCK_MAGIC
    }

    /// Decodes the first block of a device. Checks magic, checksum and version; geometry is
    /// checked separately by [`Superblock::validate`], which needs the device size.
    pub fn decode(block: &[u8; SUPERBLOCK_SIZE_BYTES as usize]) -> Result<Self, DeviceError> {
        if !Self::has_magic(block) {
            return Err(DeviceError::NotFormatted);
        }
        let stored = le_u32(block, SB_CHECKSUM);
        if crc32c::crc32c(&block[..SB_CHECKSUM.start]) != stored {
            return Err(DeviceError::CorruptSuperblock { reason: "checksum mismatch".into() });
        }
        let version = le_u32(block, SB_VERSION);
        if version != LAYOUT_VERSION {
            return Err(DeviceError::UnsupportedVersion { found: version, supported: LAYOUT_VERSION });
        }
        let mut cluster_id = [0u8; 16];
        cluster_id.copy_from_slice(&block[SB_CLUSTER_ID]);
        Ok(Superblock {
            cluster_id,
            device_id: le_u64(block, SB_DEVICE_ID),
            extent_size_bytes: le_u32(block, SB_EXTENT_SIZE),
            slot_count: le_u64(block, SB_SLOT_COUNT),
            slot_table_offset: le_u64(block, SB_SLOT_TABLE_OFFSET),
            data_offset: le_u64(block, SB_DATA_OFFSET),
        })
    }

    /// Checks that the geometry is sane and lies within a device of `device_size_bytes`.
    /// After this returns Ok, `data_offset + slot_count * extent_size_bytes` cannot overflow,
    /// which the IO paths rely on.
    pub fn validate(&self, device_size_bytes: u64) -> Result<(), DeviceError> {
        let corrupt = |reason: String| Err(DeviceError::CorruptSuperblock { reason });
        if !extent_size_is_valid(self.extent_size_bytes) {
            return corrupt(format!("extent size {} is not a power of two in 4 KiB..=64 MiB", self.extent_size_bytes));
        }
        if self.slot_count == 0 || self.slot_count > MAX_SLOT_COUNT {
            return corrupt(format!("slot count {} outside 1..={MAX_SLOT_COUNT}", self.slot_count));
        }
        if self.slot_table_offset != SUPERBLOCK_SIZE_BYTES {
            return corrupt(format!("slot table offset {} is not {SUPERBLOCK_SIZE_BYTES}", self.slot_table_offset));
        }
        // slot_count <= 2^24, so these products cannot overflow.
        let table_end = self.slot_table_offset + self.slot_count * SLOT_RECORD_SIZE_BYTES;
        if self.data_offset < table_end || !self.data_offset.is_multiple_of(SUPERBLOCK_SIZE_BYTES) {
            return corrupt(format!("data offset {} overlaps the slot table or is unaligned", self.data_offset));
        }
        let data_bytes = self.slot_count * u64::from(self.extent_size_bytes);
        let Some(required_bytes) = self.data_offset.checked_add(data_bytes) else {
            return corrupt(format!("data offset {} overflows", self.data_offset));
        };
        if required_bytes > device_size_bytes {
            return Err(DeviceError::Truncated { required_bytes, actual_bytes: device_size_bytes });
        }
        Ok(())
    }

    pub fn slot_record_offset(&self, slot: u64) -> u64 {
        assert!(slot < self.slot_count, "slot {slot} out of range");
        self.slot_table_offset + slot * SLOT_RECORD_SIZE_BYTES
    }

    pub fn slot_data_offset(&self, slot: u64) -> u64 {
        assert!(slot < self.slot_count, "slot {slot} out of range");
        self.data_offset + slot * u64::from(self.extent_size_bytes)
    }

    pub fn slot_table_bytes(&self) -> u64 {
        self.slot_count * SLOT_RECORD_SIZE_BYTES
    }
}

/// What one slot record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRecord {
    /// All zeros: never used since format. Its checksum is not checked (there is none).
    Blank,
    /// Freed at `generation`. Free records are kept (not zeroed) so that the highest
    /// generation ever handed out survives a restart even after its extent is freed.
    Free { generation: u64 },
    /// Holds `key`, allocated at `generation`; `dirty`: written since last made clean
    /// (see "Write intent" in `device.rs`).
    Used { key: ExtentKey, pg_id: u32, generation: u64, dirty: bool },
}

impl SlotRecord {
    pub fn generation(&self) -> u64 {
        match *self {
            SlotRecord::Blank => 0,
            SlotRecord::Free { generation } | SlotRecord::Used { generation, .. } => generation,
        }
    }

    /// Encodes the record for `slot`. The slot number is stored in the record so that a
    /// record written to the wrong place (a misdirected write) is detected on open.
    pub fn encode(&self, slot: u64) -> [u8; SLOT_RECORD_SIZE_BYTES as usize] {
        let mut rec = [0u8; SLOT_RECORD_SIZE_BYTES as usize];
        match *self {
            SlotRecord::Blank => return rec,
            SlotRecord::Free { generation } => {
                rec[REC_STATE] = STATE_FREE;
                rec[REC_GENERATION].copy_from_slice(&generation.to_le_bytes());
            }
            SlotRecord::Used { key, pg_id, generation, dirty } => {
                rec[REC_STATE] = STATE_USED;
                rec[REC_FLAGS] = if dirty { FLAG_DIRTY } else { 0 };
                rec[REC_PG_ID].copy_from_slice(&pg_id.to_le_bytes());
                rec[REC_VOLUME_ID].copy_from_slice(&key.volume_id.to_le_bytes());
                rec[REC_EXTENT_INDEX].copy_from_slice(&key.extent_index.to_le_bytes());
                rec[REC_GENERATION].copy_from_slice(&generation.to_le_bytes());
            }
        }
        rec[REC_SLOT_INDEX].copy_from_slice(&slot.to_le_bytes());
        let checksum = crc32c::crc32c(&rec[..REC_CHECKSUM.start]);
        rec[REC_CHECKSUM].copy_from_slice(&checksum.to_le_bytes());
        assert_eq!(Self::decode(slot, &rec).ok(), Some(*self), "slot record does not round-trip");
        rec
    }

    pub fn decode(slot: u64, rec: &[u8]) -> Result<Self, DeviceError> {
        assert_eq!(rec.len(), SLOT_RECORD_SIZE_BYTES as usize);
        if rec.iter().all(|&b| b == 0) {
            return Ok(SlotRecord::Blank);
        }
        let corrupt = |reason: String| Err(DeviceError::CorruptSlot { slot, reason });
        if crc32c::crc32c(&rec[..REC_CHECKSUM.start]) != le_u32(rec, REC_CHECKSUM) {
            return corrupt("checksum mismatch".into());
        }
        let recorded_slot = le_u64(rec, REC_SLOT_INDEX);
        if recorded_slot != slot {
            return corrupt(format!("record belongs to slot {recorded_slot} (misdirected write)"));
        }
        let generation = le_u64(rec, REC_GENERATION);
        if !(FIRST_GENERATION..=MAX_GENERATION).contains(&generation) {
            return corrupt(format!("generation {generation} out of range"));
        }
        match rec[REC_STATE] {
            STATE_FREE => Ok(SlotRecord::Free { generation }),
            STATE_USED if rec[REC_FLAGS] & !FLAG_DIRTY != 0 => {
                corrupt(format!("unknown flags {:#04x}", rec[REC_FLAGS]))
            }
            STATE_USED => Ok(SlotRecord::Used {
                key: ExtentKey { volume_id: le_u64(rec, REC_VOLUME_ID), extent_index: le_u64(rec, REC_EXTENT_INDEX) },
                pg_id: le_u32(rec, REC_PG_ID),
                generation,
                dirty: rec[REC_FLAGS] & FLAG_DIRTY != 0,
            }),
            other => corrupt(format!("unknown state {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fits_table_and_slots() {
        let size = 64 << 20;
        let sb = Superblock::plan([1; 16], 7, 1 << 20, size).unwrap();
        assert_eq!(sb.data_offset, DATA_ALIGNMENT_BYTES);
        assert_eq!(sb.slot_count, 63);
        sb.validate(size).unwrap();
        assert!(Superblock::plan([1; 16], 7, 1 << 20, (1 << 20) + 4096).is_none());
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        let key = ExtentKey { volume_id: 3, extent_index: 9 };
        for dirty in [false, true] {
            let rec = SlotRecord::Used { key, pg_id: 5, generation: 42, dirty }.encode(11);
            assert_eq!(
                SlotRecord::decode(11, &rec).unwrap(),
                SlotRecord::Used { key, pg_id: 5, generation: 42, dirty }
            );
        }
        let rec = SlotRecord::Used { key, pg_id: 5, generation: 42, dirty: false }.encode(11);
        assert!(matches!(SlotRecord::decode(12, &rec), Err(DeviceError::CorruptSlot { slot: 12, .. })));
        let mut bad = rec;
        bad[20] ^= 1;
        assert!(matches!(SlotRecord::decode(11, &bad), Err(DeviceError::CorruptSlot { slot: 11, .. })));
        assert_eq!(SlotRecord::decode(0, &[0u8; 64]).unwrap(), SlotRecord::Blank);
    }

    /// Whatever the disk holds, decoding a record returns a value or an error, never a
    /// panic — including records whose checksum is right over arbitrary fields and flags.
    #[test]
    fn arbitrary_records_never_panic() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000u64 {
            let mut rec = [0u8; SLOT_RECORD_SIZE_BYTES as usize];
            for chunk in rec.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_le_bytes());
            }
            if i % 2 == 0 {
                rec[REC_STATE] = (i % 5) as u8;
                rec[REC_SLOT_INDEX].copy_from_slice(&7u64.to_le_bytes());
                let checksum = crc32c::crc32c(&rec[..REC_CHECKSUM.start]);
                rec[REC_CHECKSUM].copy_from_slice(&checksum.to_le_bytes());
            }
            if let Ok(SlotRecord::Used { dirty, .. }) = SlotRecord::decode(7, &rec) {
                assert_eq!(dirty, rec[REC_FLAGS] & FLAG_DIRTY != 0);
                assert_eq!(rec[REC_FLAGS] & !FLAG_DIRTY, 0, "unknown flags are refused");
            }
        }
    }

    #[test]
    fn absurd_geometry_is_an_error() {
        let good = Superblock::plan([0; 16], 1, 4096, 8 << 20).unwrap();
        for bad in [
            Superblock { extent_size_bytes: 3000, ..good },
            Superblock { slot_count: u64::MAX, ..good },
            Superblock { data_offset: u64::MAX - 4095, ..good },
            Superblock { data_offset: 0, ..good },
        ] {
            assert!(matches!(bad.validate(8 << 20), Err(DeviceError::CorruptSuperblock { .. })), "{bad:?}");
        }
        assert!(matches!(good.validate(4 << 20), Err(DeviceError::Truncated { .. })));
    }
}
