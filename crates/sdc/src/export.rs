//! NBD exports: one per volume mapped to this SDC, named after the volume.

use std::sync::Arc;

use tessera_core::Volume;
use tessera_nbd::{BlockBackend, ExportRegistry, IoError};
use tessera_proto::data::kind;

use crate::client::{DataClient, IoFailure};

pub struct SdcExports {
    pub client: Arc<DataClient>,
    pub sdc_id: u64,
}

pub struct VolumeExport {
    client: Arc<DataClient>,
    volume: Volume,
    extent_size_bytes: u32,
}

fn to_nbd(e: IoFailure) -> IoError {
    match e {
        IoFailure::Invalid => IoError::Invalid,
        IoFailure::NoSpace => IoError::NoSpace,
        IoFailure::Io => IoError::Io,
    }
}

impl BlockBackend for VolumeExport {
    fn size_bytes(&self) -> u64 {
        self.volume.size_bytes
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.client.read(&self.volume, self.extent_size_bytes, offset, buf).await.map_err(to_nbd)
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        self.client.write(&self.volume, self.extent_size_bytes, offset, data, fua).await.map_err(to_nbd)
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.client.flush(self.volume.id).await.map_err(to_nbd)
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.client.zero(kind::TRIM, &self.volume, self.extent_size_bytes, offset, len, false).await.map_err(to_nbd)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.client
            .zero(kind::WRITE_ZEROES, &self.volume, self.extent_size_bytes, offset, len, fua)
            .await
            .map_err(to_nbd)
    }

    fn description(&self) -> Option<String> {
        Some(format!("Tessera volume {} (id {})", self.volume.name, self.volume.id))
    }
}

impl SdcExports {
    fn mapped_here(&self, name: &str) -> Option<VolumeExport> {
        let map = self.client.map();
        let volume = map.state.volume_by_name(name)?;
        if !volume.mapped_sdcs.contains(&self.sdc_id) {
            return None;
        }
        let pool = map.state.pools.get(&volume.pool_id)?;
        Some(VolumeExport {
            client: self.client.clone(),
            volume: volume.clone(),
            extent_size_bytes: pool.extent_size_bytes,
        })
    }
}

impl ExportRegistry for SdcExports {
    type Backend = VolumeExport;

    async fn open(&self, name: &str) -> Option<Arc<VolumeExport>> {
        // Always ask the MDM: a volume may have been mapped, unmapped or grown a moment ago,
        // and a handshake is rare next to IO.
        if let Err(e) = self.client.refresh_now().await {
            tracing::warn!("cannot refresh the map for export {name:?}: {e}");
        }
        self.mapped_here(name).map(Arc::new)
    }

    async fn list(&self) -> Vec<String> {
        if let Err(e) = self.client.refresh_now().await {
            tracing::warn!("cannot refresh the map for an export list: {e}");
        }
        let map = self.client.map();
        map.state.volumes.values().filter(|v| v.mapped_sdcs.contains(&self.sdc_id)).map(|v| v.name.clone()).collect()
    }

    fn default_export(&self) -> Option<String> {
        None
    }
}
