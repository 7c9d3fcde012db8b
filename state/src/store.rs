//! placeholder: being written
pub struct Store;
#[derive(Debug, thiserror::Error)]
pub enum StoreError { #[error("x")] X }
