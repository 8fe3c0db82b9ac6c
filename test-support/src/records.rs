//! Requests on a store, as the backends' tests make them: a fresh request
//! (claim, then complete), a replay, a record that expires when the test
//! wants, and instances racing on many records.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoredOutcome, StoredResponse,
    TokenOutcome,
};

/// The response a fresh request stores: 1 KiB of JSON.
pub fn outcome() -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![(
            "content-type".into(),
            bytes::Bytes::from_static(b"application/json"),
        )],
        body: bytes::Bytes::from(vec![b'x'; 1024]),
    })
}

/// A claim of `id` (always the same request) with a new token.
pub async fn claim(store: &dyn Store, id: &RecordId) -> ClaimOutcome {
    let fp = Fingerprint::compute("POST", "/rt", None, None, b"body");
    let claim = Claim {
        fingerprint: &fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(300),
    };
    store
        .claim(id, LeaseToken::random(), claim)
        .await
        .expect("claim")
}

/// A fresh request: claim (acquired) then complete.
pub async fn fresh(store: &dyn Store) -> RecordId {
    let id = RecordId::from_parts(b"rt", &rand::random::<[u8; 16]>());
    fresh_on(store, &id).await;
    id
}

/// A fresh request on the record `id`.
pub async fn fresh_on(store: &dyn Store, id: &RecordId) {
    let ClaimOutcome::Acquired(token) = claim(store, id).await else {
        panic!("not acquired");
    };
    let done = store
        .complete(id, token, &outcome(), Duration::from_secs(300))
        .await
        .expect("complete");
    assert_eq!(done, TokenOutcome::Applied);
}

/// A replay of the completed record `id`.
pub async fn replay(store: &dyn Store, id: &RecordId) {
    assert!(matches!(
        claim(store, id).await,
        ClaimOutcome::Completed { .. }
    ));
}

/// A record claimed and completed on `store` (not replayable), kept for
/// `ttl`: expired at once when `ttl` is zero.
pub async fn completed(store: &dyn Store, id: &RecordId, ttl: Duration) {
    let fp = Fingerprint::compute("POST", "/completed", None, None, b"");
    let token = LeaseToken::random();
    let claim = Claim {
        fingerprint: &fp,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
    };
    let ClaimOutcome::Acquired(_) = store.claim(id, token, claim).await.expect("claim") else {
        panic!("not acquired");
    };
    let done = StoredOutcome::NotReplayable { status: 200 };
    let r = store
        .complete(id, token, &done, ttl)
        .await
        .expect("complete");
    assert_eq!(r, TokenOutcome::Applied);
}

/// `claims` claims of each of `ids` at once (after one barrier), alternating
/// between the two `stores` (two instances of one store); how many of each
/// record's claims acquired it.
pub async fn race(
    stores: &[Arc<dyn Store>; 2],
    ids: &[RecordId],
    claims: usize,
) -> HashMap<RecordId, usize> {
    let barrier = Arc::new(tokio::sync::Barrier::new(ids.len() * claims));
    let mut tasks = Vec::new();
    for (n, id) in ids.iter().copied().enumerate() {
        for i in 0..claims {
            let store = Arc::clone(&stores[(n + i) % 2]);
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let fp = Fingerprint::compute("POST", "/race", None, None, b"r");
                let claim = Claim {
                    fingerprint: &fp,
                    lease: Duration::from_secs(30),
                    ttl: Duration::from_secs(60),
                };
                let outcome = store
                    .claim(&id, LeaseToken::random(), claim)
                    .await
                    .expect("claim");
                (id, matches!(outcome, ClaimOutcome::Acquired(_)))
            }));
        }
    }
    let mut acquired = HashMap::<RecordId, usize>::new();
    for t in tasks {
        let (id, won) = t.await.expect("task");
        *acquired.entry(id).or_default() += usize::from(won);
    }
    acquired
}
