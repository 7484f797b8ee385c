//! Postgres backend (placeholder; implemented on the `store` branch).
use super::StoreError;
pub struct PostgresStore;
impl PostgresStore {
    pub async fn connect(_url: &str, _max: u32) -> Result<Self, StoreError> {
        Err(StoreError::Other("not implemented".into()))
    }
}
