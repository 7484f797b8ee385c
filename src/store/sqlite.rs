//! SQLite backend (placeholder; implemented on the `store` branch).
use super::StoreError;
pub struct SqliteStore;
impl SqliteStore {
    pub async fn connect(_url: &str, _max: u32) -> Result<Self, StoreError> {
        Err(StoreError::Other("not implemented".into()))
    }
}
