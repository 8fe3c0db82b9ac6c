//! A record survives a process restart: a child process (the calling test
//! binary, re-run) claims and completes a record and exits; the parent opens
//! a new store and must replay it byte for byte.
//!
//! A test binary that uses it has a test named `restart_child_writes_a_record`
//! (ignored; it calls [`child_writes_a_record`]) and, per backend, a test that
//! calls [`survives_a_process_restart`]; both open their stores with the same
//! `open(backend, url, namespace)`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idempotency_core::{
    Claim, ClaimOutcome, Fingerprint, LeaseToken, RecordId, Store, StoredOutcome, StoredResponse,
    TokenOutcome,
};

const CHILD: &str = "IDEMPOTENCY_RESTART_CHILD";

/// The name of the child's test in every test binary that uses this module.
const CHILD_TEST: &str = "restart_child_writes_a_record";

fn expected() -> StoredOutcome {
    StoredOutcome::response(StoredResponse {
        status: 201,
        headers: vec![
            (
                "location".into(),
                bytes::Bytes::from_static(b"/payments/42"),
            ),
            (
                "x-bin".into(),
                bytes::Bytes::from_static(&[0, 0x80, 0xff, b'\r']),
            ),
            ("location".into(), bytes::Bytes::from_static(b"/again")),
        ],
        body: bytes::Bytes::from((0..=255u8).cycle().take(70_000).collect::<Vec<u8>>()),
    })
}

fn fingerprint() -> Fingerprint {
    Fingerprint::compute("POST", "/payments", None, Some(b"application/json"), b"{}")
}

fn claim(fingerprint: &Fingerprint) -> Claim<'_> {
    Claim {
        fingerprint,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(600),
    }
}

/// Run by the parent as a child process: claims and completes one record in
/// the store `open(backend, url, namespace)` opens. Does nothing outside a
/// child (the test is ignored, but may be run with `--ignored`).
pub async fn child_writes_a_record<F, Fut>(open: F)
where
    F: FnOnce(String, String, String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let parts: Vec<&str> = spec.splitn(4, '|').collect();
    let [backend, namespace, id_hex, url] = parts[..] else {
        panic!("bad child spec");
    };
    let store = open(backend.into(), url.into(), namespace.into()).await;
    let id = RecordId::from_parts(b"restart", id_hex.as_bytes());
    let token = LeaseToken::random();
    let ClaimOutcome::Acquired(_) = store
        .claim(&id, token, claim(&fingerprint()))
        .await
        .expect("claim")
    else {
        panic!("the child did not acquire");
    };
    let done = store
        .complete(&id, token, &expected(), Duration::from_secs(600))
        .await
        .expect("complete");
    assert_eq!(done, TokenOutcome::Applied);
    println!("CHILD-COMPLETED");
}

/// Runs the child on `backend`, then checks, on a new store, that its
/// record replays byte for byte.
pub async fn survives_a_process_restart<F, Fut>(backend: &str, url: &str, namespace: &str, open: F)
where
    F: FnOnce(String, String, String) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let id_hex = format!("{:032x}", rand::random::<u128>());
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .env(CHILD, format!("{backend}|{namespace}|{id_hex}|{url}"))
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD-COMPLETED"),
        "the child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A new process's view: a new store, new connections.
    let store = open(backend.into(), url.into(), namespace.into()).await;
    let id = RecordId::from_parts(b"restart", id_hex.as_bytes());
    match store
        .claim(&id, LeaseToken::random(), claim(&fingerprint()))
        .await
        .expect("claim after the restart")
    {
        ClaimOutcome::Completed {
            fingerprint: f,
            outcome,
        } => {
            assert_eq!(f, fingerprint());
            assert_eq!(
                outcome.encode(),
                expected().encode(),
                "{backend}: not byte for byte"
            );
        }
        other => panic!("{backend}: after the restart the retry got {other:?}"),
    }
}
