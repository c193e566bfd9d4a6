//! The operations every face (Docker plugin, dvdcli, the CLI, the DVDI launcher) maps onto,
//! with Docker's volume-plugin semantics: a volume is known by name; `mount` is called once
//! per caller (Docker's `ID`) and the volume stays mounted until the last caller unmounts.

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Options given at creation (`docker volume create -o k=v`, dvdcli `--volumeopts=k=v`).
pub type Opts = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    /// Where the caller finds the data (`<mount path>/<name>/<root path>`), when mounted on
    /// this node.
    pub mountpoint: Option<String>,
    /// Free-form details (size, pool, attached node, ...), shown by Docker's `Get`.
    pub status: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApiError {
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

/// Implemented by the volume service; the faces are generic over it so they can be tested
/// against a fake.
pub trait VolumeApi: Send + Sync + 'static {
    /// Creates the volume (idempotent when it exists with compatible options).
    fn create(&self, name: &str, opts: &Opts) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn remove(&self, name: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Mounts for `caller_id` (empty when the caller gives none); returns the path.
    fn mount(&self, name: &str, caller_id: &str) -> impl Future<Output = Result<String, ApiError>> + Send;
    fn unmount(&self, name: &str, caller_id: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// The path when mounted on this node.
    fn path(&self, name: &str) -> impl Future<Output = Result<Option<String>, ApiError>> + Send;
    fn get(&self, name: &str) -> impl Future<Output = Result<VolumeInfo, ApiError>> + Send;
    fn list(&self) -> impl Future<Output = Result<Vec<VolumeInfo>, ApiError>> + Send;
}
