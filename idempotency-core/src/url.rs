//! Store and broker URLs in logs and error messages.

/// `url` without its password, for logs and error messages:
/// `scheme://user:***@host/...` when the URL has a password, unchanged
/// otherwise (`postgres://postgres@host/db` stays as it is).
///
/// ```
/// assert_eq!(idempotency_core::redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
/// assert_eq!(idempotency_core::redact("postgres://postgres@h/db"), "postgres://postgres@h/db");
/// ```
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_error_messages() {
        assert_eq!(
            redact("foo://user:secret@host:1/db"),
            "foo://user:***@host:1/db"
        );
        assert_eq!(redact("foo://host/db"), "foo://host/db");
        assert_eq!(redact("nonsense"), "nonsense");
    }

    #[test]
    fn a_url_without_a_password_is_left_as_it_is() {
        assert_eq!(
            redact("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/test"
        );
        assert_eq!(redact("amqp://:pw@h/%2f"), "amqp://:***@h/%2f");
    }
}
