//! Every case of the behaviour suite through `idempotency-tower` on axum.

use adapter_suite::tower_adapter::TowerAdapter;

adapter_suite::adapter_suite!(TowerAdapter, #[tokio::test]);
