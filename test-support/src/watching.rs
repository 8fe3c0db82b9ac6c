//! What the tests of the stores that wake waiting duplicates
//! ([`Store::watch`]) share beyond the conformance suite's watch cases:
//! records in flight, watches on them, and how long to wait for a watch.

use std::time::Duration;

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoredResponse, Watch,
};

/// Long enough for a notification on a loaded machine; a watch that has
/// none never resolves (the fallback poll is the engine's, not the watch's).
pub const NOTIFIED_WITHIN: Duration = Duration::from_secs(5);
/// How long a watch that must stay quiet is given to resolve anyway.
pub const QUIET_FOR: Duration = Duration::from_millis(500);

/// The fingerprint of every request of these tests.
pub fn fp() -> Fingerprint {
    Fingerprint::compute("POST", "/watch", None, None, b"body")
}

/// A fresh record.
pub fn id() -> RecordId {
    RecordId::from_parts(b"watch", &rand::random::<[u8; 16]>())
}

/// Claims `id` on `store`, which must acquire it; its token.
pub async fn acquire(store: &dyn Store, id: &RecordId) -> LeaseToken {
    let fp = fp();
    let token = LeaseToken::random();
    let claim = Claim {
        fingerprint: &fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    };
    match store.claim(id, token, claim).await.expect("claim") {
        ClaimOutcome::Acquired(t) => t,
        other => panic!("not acquired: {other:?}"),
    }
}

/// The response the tests complete with.
pub fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: bytes::Bytes::from_static(b"{\"id\":1}"),
    }
}

/// A watch on `id` from `store`, which must notify.
pub async fn watch(store: &dyn Store, id: &RecordId) -> Watch {
    store
        .watch(id)
        .await
        .expect("watch")
        .unwrap_or_else(|| panic!("the {} store notifies", store.backend()))
}

/// Whether `watch` resolves within [`NOTIFIED_WITHIN`].
pub async fn resolves(watch: Watch) -> bool {
    tokio::time::timeout(NOTIFIED_WITHIN, watch).await.is_ok()
}
