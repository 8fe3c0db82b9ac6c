//! Request fingerprints over arbitrary parts, and the content type's
//! canonical form: equivalent media types must fingerprint equally.
#![no_main]

use arbitrary::Arbitrary;
use idempotency_core::FingerprintBuilder;
use idempotency_core::Fingerprint;
use libfuzzer_sys::fuzz_target;

/// RFC 9110 `tchar`s, letters of both cases.
const TCHARS: &[u8] =
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

#[derive(Arbitrary, Debug)]
struct Parts<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    /// Raw, as a client may send it.
    content_type: Option<&'a [u8]>,
    body: &'a [u8],
    /// A media type built from these, mapped into the token alphabet.
    media: Media<'a>,
}

#[derive(Arbitrary, Debug)]
struct Media<'a> {
    type_: &'a [u8],
    subtype: &'a [u8],
    params: Vec<(&'a [u8], &'a [u8], bool)>,
}

/// `bytes` mapped into `tchar`s; never empty.
fn token(bytes: &[u8]) -> Vec<u8> {
    if bytes.is_empty() {
        return b"x".to_vec();
    }
    bytes
        .iter()
        .take(200)
        .map(|&b| TCHARS[b as usize % TCHARS.len()])
        .collect()
}

fn is_tchar(b: u8) -> bool {
    TCHARS.contains(&b)
}

/// `type/subtype`, both non-empty tokens, nothing else.
fn is_simple(ct: &[u8]) -> bool {
    let mut parts = ct.splitn(2, |&b| b == b'/');
    let (Some(t), Some(s)) = (parts.next(), parts.next()) else {
        return false;
    };
    !t.is_empty() && !s.is_empty() && t.iter().all(|&b| is_tchar(b)) && s.iter().all(|&b| is_tchar(b))
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fuzz_target!(|parts: Parts<'_>| {
    let Parts {
        method,
        path,
        query,
        content_type,
        body,
        media,
    } = parts;
    let fp = |ct: Option<&[u8]>| Fingerprint::compute(method, path, query, ct, body);

    // The two entry points agree, a builder clones, and nothing panics.
    let computed = fp(content_type);
    let builder = FingerprintBuilder::new(method, path, query, content_type);
    assert_eq!(builder.clone().finish(body), computed);
    assert_eq!(builder.finish(body), computed);
    assert_eq!(fp(content_type), computed);

    // No Content-Type differs from an empty one; no query from an empty one.
    assert_ne!(fp(None), fp(Some(b"")));
    if query.is_none() {
        assert_ne!(
            computed,
            Fingerprint::compute(method, path, Some(""), content_type, body)
        );
    }

    // A raw content type that is a simple `type/subtype`: case and
    // surrounding white space do not matter (this also compares the
    // canonical fast path with the parser: only lowercase takes it).
    if let Some(ct) = content_type {
        if is_simple(ct) {
            let lower = ct.to_ascii_lowercase();
            let upper = ct.to_ascii_uppercase();
            assert_eq!(computed, fp(Some(&lower)), "{ct:?} vs lowercase");
            assert_eq!(computed, fp(Some(&upper)), "{ct:?} vs uppercase");
            assert_eq!(computed, fp(Some(&join(&[b" \t", ct, b" "]))), "{ct:?} padded");
            assert_eq!(computed, fp(Some(&join(&[ct, b" ; "]))), "{ct:?} empty parameter");
        }
    }

    // A media type built from the parts.
    let (t, s) = (token(media.type_), token(media.subtype));
    let base = join(&[&t, b"/", &s]);
    let params: Vec<(Vec<u8>, Vec<u8>, bool)> = media
        .params
        .iter()
        .take(8)
        .map(|&(n, v, quoted)| (token(n), token(v), quoted))
        .collect();
    let render = |base: &[u8], params: &[(Vec<u8>, Vec<u8>, bool)], sep: &[u8]| {
        let mut out = base.to_vec();
        for (n, v, quoted) in params {
            out.extend_from_slice(sep);
            out.extend_from_slice(n);
            out.push(b'=');
            if *quoted {
                out.push(b'"');
                out.extend_from_slice(v);
                out.push(b'"');
            } else {
                out.extend_from_slice(v);
            }
        }
        out
    };
    let canonical = render(&base, &params, b";");
    let reference = fp(Some(&canonical));
    let variants = [
        // Type, subtype and parameter names case-insensitive (values are not,
        // so only the names are changed).
        render(
            &base.to_ascii_uppercase(),
            &params
                .iter()
                .map(|(n, v, q)| (n.to_ascii_uppercase(), v.clone(), *q))
                .collect::<Vec<_>>(),
            b";",
        ),
        // White space around `;`.
        render(&base, &params, b" \t; "),
        // A token the same as the quoted-string that holds it.
        render(
            &base,
            &params
                .iter()
                .map(|(n, v, q)| (n.clone(), v.clone(), !q))
                .collect::<Vec<_>>(),
            b";",
        ),
        // Empty parameters and trailing `;`.
        join(&[&render(&base, &params, b";;"), b";"]),
    ];
    for variant in &variants {
        assert_eq!(
            fp(Some(variant)),
            reference,
            "{:?} vs {:?}",
            String::from_utf8_lossy(variant),
            String::from_utf8_lossy(&canonical)
        );
    }
    // The order of parameters with different names does not matter: sort
    // them (stably, by lowercased name) and compare.
    let mut sorted = params.clone();
    sorted.sort_by(|a, b| a.0.to_ascii_lowercase().cmp(&b.0.to_ascii_lowercase()));
    assert_eq!(fp(Some(&render(&base, &sorted, b";"))), reference, "sorted");
    // `charset`'s value is case-insensitive; other values are not.
    if let Some((_, v, quoted)) = params.first() {
        let one = |name: &[u8], value: Vec<u8>| render(&base, &[(name.to_vec(), value, *quoted)], b";");
        let (lower, upper) = (v.to_ascii_lowercase(), v.to_ascii_uppercase());
        assert_eq!(
            fp(Some(&one(b"charset", lower.clone()))),
            fp(Some(&one(b"CharSet", upper.clone()))),
            "charset's value"
        );
        if lower != upper {
            assert_ne!(
                fp(Some(&one(b"x", lower))),
                fp(Some(&one(b"x", upper))),
                "a value other than charset's"
            );
        }
    }
    // A parameter is not nothing.
    if !params.is_empty() {
        assert_ne!(fp(Some(&base)), reference, "parameters ignored");
    }
});
