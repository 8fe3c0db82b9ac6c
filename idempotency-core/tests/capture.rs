//! What `Execution::capture` stores: the replayable headers in order
//! (repeated and binary values kept), never the hop-by-hop or per-response
//! ones, and the body; a small body is copied into the record's own buffer,
//! a large one kept as the handler's `Bytes`. Replays give back exactly that.

use bytes::Bytes;
use idempotency_core::{Decision, Idempotency, MemoryStore};
use test_support::decide;

#[tokio::test]
async fn capture_keeps_replayable_headers_in_order_and_the_body() {
    let engine = Idempotency::new(MemoryStore::new(), Default::default());
    for body_len in [0, 64, 4096, 4097, 100_000] {
        let key = format!("capture-{body_len}");
        let Decision::Execute(execution) = decide(&engine, &key).await else {
            panic!("not executed");
        };
        let body = Bytes::from(vec![7u8; body_len]);
        let headers: [(&str, &[u8]); 6] = [
            ("content-type", b"application/json"),
            ("set-cookie", b"session=secret"),
            ("link", b"</a>; rel=next"),
            ("content-length", b"12"),
            ("link", b"</b>; rel=prev"),
            ("x-bin", &[0x80, 0xff, 0x09]),
        ];
        let stored = execution.capture(201, headers.into_iter(), body.clone());
        let kept: Vec<(&str, &[u8])> = stored
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), &v[..]))
            .collect();
        assert_eq!(
            kept,
            [
                ("content-type", &b"application/json"[..]),
                ("link", b"</a>; rel=next"),
                ("link", b"</b>; rel=prev"),
                ("x-bin", &[0x80, 0xff, 0x09]),
            ],
            "body of {body_len}"
        );
        assert_eq!(stored.body, body);
        if body_len > 0 {
            assert_eq!(
                stored.body.as_ptr() == body.as_ptr(),
                body_len > 4096,
                "a body of {body_len} bytes is copied iff it is at most 4 KiB"
            );
        }
        execution.complete(stored.clone()).await;
        let Decision::Replay(replay) = decide(&engine, &key).await else {
            panic!("not replayed");
        };
        assert_eq!(*replay, stored, "the replay of a body of {body_len}");
    }
}

#[tokio::test]
async fn capture_keeps_many_headers_in_order() {
    let engine = Idempotency::new(MemoryStore::new(), Default::default());
    let Decision::Execute(execution) = decide(&engine, "many-headers").await else {
        panic!("not executed");
    };
    let names: Vec<String> = (0..40).map(|i| format!("x-h{i}")).collect();
    let values: Vec<Vec<u8>> = (0..40).map(|i| vec![b'a' + (i % 26) as u8; i]).collect();
    let stored = execution.capture(
        200,
        names
            .iter()
            .zip(&values)
            .map(|(n, v)| (n.as_str(), v.as_slice())),
        Bytes::from_static(b"ok"),
    );
    let kept: Vec<(String, Vec<u8>)> = stored
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect();
    let expected: Vec<(String, Vec<u8>)> = names.into_iter().zip(values).collect();
    assert_eq!(kept, expected);
    assert_eq!(stored.body, Bytes::from_static(b"ok"));
}
