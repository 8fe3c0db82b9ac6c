//! The web console: one static page (plain JavaScript, no build chain,
//! embedded with `include_str!`) and its JSON API under `/api/`, served by
//! axum.
//!
//! Every request under `/api/`, whatever its path or method, first shows a
//! bearer token of the token file; without one, or with a wrong one, it is
//! answered `401` and nothing runs. The token's name is the actor of the
//! audit rows its actions write.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /api/whoami` | `{"name": <the token's name>}` |
//! | `GET /api/areas` | the areas, their states and actions |
//! | `GET /api/{area}/items?state=&destination=&consumer=&name=&reason=&limit=` | items |
//! | `GET /api/{area}/groups?state=` | failures grouped by cause, each with its filter |
//! | `GET /api/{area}/item?id=&consumer=` | one item (payload, headers, history, audit) |
//! | `POST /api/{area}/{action}` `{"ids": [..], "consumer": ..}`, `{"filter": {..}}` or `{"older_than": "30d"}` | the report |
//! | `GET /api/audit?limit=` | the latest audit rows |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::{Action, Actor, Admin, AdminError, Area, Filter, Target, DEFAULT_LIMIT};

/// The page.
const PAGE: &str = include_str!("console.html");
/// The shortest token the file may hold.
pub const MIN_TOKEN_LEN: usize = 16;

/// The tokens the console accepts, each with a name for the audit.
#[derive(Clone)]
pub struct Tokens {
    tokens: Arc<Vec<(String, String)>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

impl Tokens {
    /// Reads `path`: one `NAME TOKEN` a line; blank lines and lines that
    /// start with `#` are skipped.
    ///
    /// # Errors
    /// [`AdminError::TokenFile`] when it cannot be read, holds no token, a
    /// line is not `NAME TOKEN`, a token is shorter than
    /// [`MIN_TOKEN_LEN`], or a name or token repeats (no token is quoted).
    pub fn read(path: &FsPath) -> Result<Self, AdminError> {
        let fail = |reason: String| AdminError::TokenFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        Self::parse(&text).map_err(fail)
    }

    /// The tokens of `text` (the token file's format).
    ///
    /// # Errors
    /// What is wrong, naming the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens: Vec<(String, String)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(name), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("line {} is not `NAME TOKEN`", n + 1));
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "the token of {name} (line {}) is shorter than {MIN_TOKEN_LEN} characters",
                    n + 1
                ));
            }
            if tokens.iter().any(|(n2, t2)| n2 == name || t2 == token) {
                return Err(format!("line {} repeats a name or a token", n + 1));
            }
            tokens.push((name.to_owned(), token.to_owned()));
        }
        if tokens.is_empty() {
            return Err("it holds no token (one `NAME TOKEN` a line)".into());
        }
        Ok(Self {
            tokens: Arc::new(tokens),
        })
    }

    /// The name of `token`, comparing in time independent of where a wrong
    /// token differs.
    pub fn name_of(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (name, known) in self.tokens.iter() {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

#[derive(Clone)]
struct App {
    admin: Admin,
    tokens: Tokens,
}

/// The console's router: the page at `/`, the API under `/api/`.
pub fn router(admin: Admin, tokens: Tokens) -> Router {
    let app = App { admin, tokens };
    let api = Router::new()
        .route("/whoami", get(whoami))
        .route("/areas", get(areas))
        .route("/audit", get(audit))
        .route("/{area}/items", get(items))
        .route("/{area}/groups", get(groups))
        .route("/{area}/item", get(item))
        .route("/{area}/{action}", post(act))
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "no such API path".into()) });
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .nest("/api", api)
        .layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app)
}

/// Serves the console on `listen` until `shutdown` resolves.
///
/// # Errors
/// [`AdminError::Usage`] when `listen` cannot be bound.
pub async fn serve(
    admin: Admin,
    tokens: Tokens,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| AdminError::Usage(format!("cannot listen on {listen} (--listen): {e}")))?;
    let addr = listener.local_addr().unwrap_or(listen);
    tracing::info!(%addr, tokens = ?tokens, "messaging-admin console serving");
    eprintln!("messaging-admin: console on http://{addr}/");
    // A client must send its headers within http_serve::HEADER_READ_TIMEOUT:
    // one that never does cannot hold connections of the console open.
    http_serve::serve_axum(vec![listener], router(admin, tokens), shutdown).await;
    Ok(())
}

/// SIGTERM or Ctrl-C.
pub use http_serve::shutdown_signal;

/// Every request under `/api/` shows a token of the file, or is a 401
/// before any handler runs (an unknown path, any method).
async fn authorize(State(app): State<App>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if !(path == "/api" || path.starts_with("/api/")) {
        return next.run(request).await;
    }
    let name = bearer(request.headers()).and_then(|t| app.tokens.name_of(t));
    let Some(name) = name else {
        let mut res = problem(
            StatusCode::UNAUTHORIZED,
            "401 Unauthorized: a valid bearer token is required (Authorization: Bearer <token>)"
                .into(),
        );
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"messaging-admin\""),
        );
        return res;
    };
    let actor = Actor {
        name: name.to_owned(),
        via: "console",
    };
    request.extensions_mut().insert(actor);
    next.run(request).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn problem(status: StatusCode, error: String) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

fn failed(e: &AdminError) -> Response {
    let status = match e {
        AdminError::Usage(_) => StatusCode::BAD_REQUEST,
        AdminError::NotFound { .. } => StatusCode::NOT_FOUND,
        AdminError::Ambiguous { .. } => StatusCode::CONFLICT,
        AdminError::MissingTables { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %crate::cli::chain(e), "messaging-admin console: a request failed");
    }
    problem(status, crate::cli::chain(e))
}

/// The area of a path, or the 404 that names the areas (boxed: a response
/// is large, and it is the rare path).
fn area_of(name: &str) -> Result<Area, Box<Response>> {
    Area::parse(name).ok_or_else(|| {
        Box::new(problem(
            StatusCode::NOT_FOUND,
            format!("no area {name:?}: outbox, inbox, saga, idempotency"),
        ))
    })
}

async fn whoami(axum::Extension(actor): axum::Extension<Actor>) -> Response {
    Json(json!({ "name": actor.name })).into_response()
}

async fn areas() -> Response {
    let areas: Vec<_> = Area::ALL
        .iter()
        .map(|a| {
            json!({
                "area": a.as_str(),
                "item": a.item(),
                "states": a.states(),
                "actions": a.actions().iter().map(|x| x.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(areas).into_response()
}

#[derive(Debug)]
struct ListQuery {
    filter: Filter,
    limit: Option<i64>,
}

async fn items(
    State(app): State<App>,
    Path(area): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let area = match area_of(&area) {
        Ok(a) => a,
        Err(res) => return *res,
    };
    let q: ListQuery = match serde_json::to_value(&q)
        .and_then(serde_json::from_value::<ListQueryText>)
        .map_err(|e| e.to_string())
        .and_then(ListQueryText::parse)
    {
        Ok(q) => q,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    match app
        .admin
        .list(area, &q.filter, q.limit.unwrap_or(DEFAULT_LIMIT))
        .await
    {
        Ok(items) => Json(items).into_response(),
        Err(e) => failed(&e),
    }
}

/// The query string as it comes: every value text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQueryText {
    state: Option<String>,
    destination: Option<String>,
    consumer: Option<String>,
    name: Option<String>,
    reason: Option<String>,
    limit: Option<String>,
}

impl ListQueryText {
    fn parse(self) -> Result<ListQuery, String> {
        let empty = |v: Option<String>| v.filter(|s| !s.is_empty());
        Ok(ListQuery {
            limit: match empty(self.limit) {
                Some(l) => Some(
                    l.parse()
                        .map_err(|_| format!("limit {l:?} is not a number"))?,
                ),
                None => None,
            },
            filter: Filter {
                state: empty(self.state),
                destination: empty(self.destination),
                consumer: empty(self.consumer),
                name: empty(self.name),
                reason: self.reason,
            },
        })
    }
}

#[derive(Debug, Deserialize)]
struct GroupQuery {
    state: Option<String>,
}

async fn groups(
    State(app): State<App>,
    Path(area): Path<String>,
    Query(q): Query<GroupQuery>,
) -> Response {
    let area = match area_of(&area) {
        Ok(a) => a,
        Err(res) => return *res,
    };
    let state = q.state.filter(|s| !s.is_empty());
    match app.admin.groups(area, state.as_deref()).await {
        Ok(groups) => Json(groups).into_response(),
        Err(e) => failed(&e),
    }
}

#[derive(Debug, Deserialize)]
struct ItemQuery {
    id: String,
    consumer: Option<String>,
}

async fn item(
    State(app): State<App>,
    Path(area): Path<String>,
    Query(q): Query<ItemQuery>,
) -> Response {
    let area = match area_of(&area) {
        Ok(a) => a,
        Err(res) => return *res,
    };
    let consumer = q.consumer.filter(|c| !c.is_empty());
    match app.admin.show(area, &q.id, consumer.as_deref()).await {
        Ok(item) => Json(item).into_response(),
        Err(e) => failed(&e),
    }
}

/// An action's body: ids, a filter, or an age (purge).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActBody {
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    filter: Option<Filter>,
    #[serde(default)]
    older_than: Option<String>,
}

impl ActBody {
    fn target(self) -> Result<Target, String> {
        match (self.ids, self.filter, self.older_than) {
            (Some(ids), None, None) => Ok(Target::Ids {
                ids,
                consumer: self.consumer,
            }),
            (None, Some(filter), None) if self.consumer.is_none() => {
                if filter.state.is_none() {
                    return Err("a filter needs its state".into());
                }
                Ok(Target::Filter(filter))
            }
            (None, None, Some(age)) => Ok(Target::OlderThan {
                age: humantime::parse_duration(&age)
                    .map_err(|e| format!("older_than {age:?}: {e}"))?,
                consumer: self.consumer,
            }),
            _ => Err("give exactly one of ids, filter or older_than".into()),
        }
    }
}

async fn act(
    State(app): State<App>,
    axum::Extension(actor): axum::Extension<Actor>,
    Path((area, action)): Path<(String, String)>,
    body: Result<Json<ActBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let area = match area_of(&area) {
        Ok(a) => a,
        Err(res) => return *res,
    };
    let Some(action) = Action::parse(&action) else {
        return problem(
            StatusCode::NOT_FOUND,
            format!("no action {action:?}: retry, discard, purge, resume, compensate"),
        );
    };
    let target = match body
        .map_err(|e| e.body_text())
        .and_then(|Json(b)| b.target())
    {
        Ok(t) => t,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    match app.admin.act(&actor, area, action, &target).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => failed(&e),
    }
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

async fn audit(State(app): State<App>, Query(q): Query<AuditQuery>) -> Response {
    match app.admin.audit(q.limit.unwrap_or(100)).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_is_name_token_lines() {
        let t = Tokens::parse("# ops\nalice 0123456789abcdef\n\n bob  fedcba9876543210 \n")
            .expect("two tokens");
        assert_eq!(t.name_of("0123456789abcdef"), Some("alice"));
        assert_eq!(t.name_of("fedcba9876543210"), Some("bob"));
        assert_eq!(t.name_of("0123456789abcdeX"), None);
        assert_eq!(t.name_of("0123456789abcde"), None);
        assert_eq!(t.name_of(""), None);
        // Nothing of a token shows in Debug.
        assert!(!format!("{t:?}").contains("0123"));
    }

    #[test]
    fn a_bad_token_file_is_said_with_its_line() {
        for (text, says) in [
            ("", "holds no token"),
            ("# only a comment\n", "holds no token"),
            ("alice\n", "line 1 is not `NAME TOKEN`"),
            ("alice short\n", "shorter than 16"),
            ("alice 0123456789abcdef extra\n", "line 1 is not"),
            ("a 0123456789abcdef\nb 0123456789abcdef\n", "line 2 repeats"),
        ] {
            let e = Tokens::parse(text).expect_err(text);
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(!e.contains("0123456789abcdef"), "no token quoted: {e}");
        }
    }

    #[test]
    fn only_a_bearer_token_is_read() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
