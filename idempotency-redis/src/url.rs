//! The `redis+cluster://` URL: its seed list, and why one is refused.

use idempotency_core::StoreError;

use crate::store::BACKEND;

/// The scheme of a Redis Cluster URL.
pub const CLUSTER_SCHEME: &str = "redis+cluster";

/// A `redis+cluster://` URL that names no usable seed node.
#[derive(Debug)]
struct ClusterUrlError {
    /// The URL, password removed.
    url: String,
    problem: String,
}

impl std::fmt::Display for ClusterUrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bad Redis Cluster URL `{}`: {}; write {CLUSTER_SCHEME}://HOST:PORT[,HOST:PORT...]",
            self.url, self.problem
        )
    }
}

impl std::error::Error for ClusterUrlError {}

/// The seed nodes of a `redis+cluster://[user:password@]HOST[:PORT][,HOST[:PORT]...][/db][?query]`
/// URL, each as a `redis://` URL (`None` for any other URL).
pub(crate) fn cluster_nodes(url: &str) -> Result<Option<Vec<String>>, StoreError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case(CLUSTER_SCHEME) {
        return Ok(None);
    }
    let refuse = |problem: String| {
        StoreError::config(
            BACKEND,
            ClusterUrlError {
                url: idempotency_core::redact(url),
                problem,
            },
        )
    };
    let (list, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (userinfo, hosts) = match list.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), list),
    };
    if hosts.trim().is_empty() {
        return Err(refuse("it names no node".into()));
    }
    let mut nodes = Vec::new();
    for (n, node) in hosts.split(',').enumerate() {
        let node = node.trim();
        if node.is_empty() {
            return Err(refuse(format!("node {} of the list is empty", n + 1)));
        }
        let (host, port) = match node.rsplit_once(':') {
            // An IPv6 address without a port: `[::1]`.
            Some((host, port)) if !port.ends_with(']') => (host, Some(port)),
            _ => (node, None),
        };
        if host.is_empty() {
            return Err(refuse(format!("node `{node}` has no host")));
        }
        let port = match port {
            Some(port) => match port.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    return Err(refuse(format!(
                        "node `{node}` has a bad port `{port}` (1 to 65535)"
                    )))
                }
            },
            None => 6379,
        };
        nodes.push(format!("redis://{userinfo}{host}:{port}{tail}"));
    }
    Ok(Some(nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_give_seed_nodes() {
        let nodes = |url| cluster_nodes(url).expect(url).expect(url);
        assert_eq!(
            nodes("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            nodes("redis+cluster://u:p,w@a:1, b ,[::1]:3,[::1]/?protocol=3"),
            [
                "redis://u:p,w@a:1/?protocol=3",
                "redis://u:p,w@b:6379/?protocol=3",
                "redis://u:p,w@[::1]:3/?protocol=3",
                "redis://u:p,w@[::1]:6379/?protocol=3",
            ]
        );
        assert!(cluster_nodes("redis://127.0.0.1:6379")
            .expect("single")
            .is_none());
    }

    #[test]
    fn bad_cluster_urls_say_what_is_wrong() {
        for (url, says) in [
            ("redis+cluster://", "names no node"),
            ("redis+cluster://u:secret@", "names no node"),
            ("redis+cluster://a:1,,b:2", "node 2 of the list is empty"),
            ("redis+cluster://a:1,", "node 2 of the list is empty"),
            ("redis+cluster://a:x", "bad port `x`"),
            ("redis+cluster://a:0", "bad port `0`"),
            ("redis+cluster://u:secret@a:70000", "bad port `70000`"),
            ("redis+cluster://:7000", "has no host"),
        ] {
            let err = cluster_nodes(url)
                .err()
                .unwrap_or_else(|| panic!("{url} accepted"));
            assert!(
                matches!(
                    err,
                    StoreError::Config {
                        backend: "redis",
                        ..
                    }
                ),
                "{url}"
            );
            let source = std::error::Error::source(&err)
                .expect("a source")
                .to_string();
            assert!(source.contains(says), "{url}: {source}");
            assert!(source.contains("redis+cluster://HOST:PORT"), "{source}");
            assert!(!source.contains("secret"), "{source}");
        }
    }
}
