//! The web console: pages rendered on the server (maud), forms that post back (each with the
//! configuration version it was rendered from, so a stale form is refused with 409 like an API
//! write), one small script of our own for Live Data refreshing itself and nothing else.
//! Charts are SVG drawn here (`chart.rs`). Assets are compiled into the binary.
//!
//! * `mod.rs` — routes, sessions, CSRF, login rate limiting.
//! * `pages.rs` — the pages.
//! * `chart.rs` — bar charts as SVG.
//!
//! Sessions: logging in with an admin key (or a workspace, login and password, checked against
//! its Argon2id hash) makes a random session token (256 bits); the browser
//! holds it in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` when `console.secure_cookies`),
//! the process holds only its SHA-256, the workspace and the key id — and re-checks on every
//! request that the key is still active, so revoking a key ends its sessions. Sessions live in
//! memory: a restart logs everyone out. Every form carries the session's CSRF token, compared in
//! constant time; `SameSite=Strict` is the second guard. Failed logins are limited per client
//! address (5 a minute).

mod chart;
mod pages;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmeter_schemas::metering::secret_digest;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::auth::Caller;
use super::ConsoleState;

const SESSION_COOKIE: &str = "am_session";
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const LOGIN_FAILURES_PER_MINUTE: u32 = 5;

/// One logged-in browser.
#[derive(Debug, Clone)]
struct Session {
    workspace_id: String,
    key_id: String,
    csrf: String,
    expires: Instant,
}

/// Sessions and login attempts of this process.
#[derive(Default)]
pub struct WebState {
    /// SHA-256 of the session token → the session.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    /// Client address → (start of its minute, failed logins in it).
    login_failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/metering/live-data") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .route("/metering/live-data", get(pages::live_data))
        .route("/metering/live-data/rows", get(pages::live_data_rows))
        .route(
            "/metering/tagging",
            get(pages::tagging).post(pages::set_tracked),
        )
        .route(
            "/metering/costs",
            get(pages::costs).post(pages::schedule_rate),
        )
        .route(
            "/metering/outcomes",
            get(pages::outcomes).post(pages::set_outcome),
        )
        .route(
            "/accounts",
            get(pages::accounts).post(pages::create_account),
        )
        .route("/accounts/{id}", get(pages::account))
        .route("/agents", get(pages::agents))
        .route("/agents/types", post(pages::create_agent_type))
        .route("/agents/instances", post(pages::create_instance))
        .route("/agents/instances/{id}/rotate", post(pages::rotate_secret))
        .route("/billing", get(pages::billing))
        .route("/billing/products", post(pages::save_product))
        .route("/billing/subscriptions", post(pages::create_subscription))
        .route(
            "/billing/subscriptions/{id}/end",
            post(pages::end_subscription),
        )
        .route("/billing/invoices/{id}", get(pages::invoice))
        .route("/profitability", get(pages::profitability))
        .route("/audit", get(pages::audit))
        .with_state(state)
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
        .into_response()
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
}

/// A logged-in page request: the caller (its key re-checked now) and its CSRF token.
pub struct WebCaller {
    pub caller: Caller,
    pub csrf: String,
}

/// The logged-in caller of a request, or the redirect to the login page.
/// (The refusal is boxed: a `Response` is large, and most calls succeed.)
fn web_caller(state: &ConsoleState, headers: &HeaderMap) -> Result<WebCaller, Box<Response>> {
    let to_login = || Box::new(Redirect::to("/login").into_response());
    let token = session_token(headers).ok_or_else(to_login)?;
    let digest = secret_digest(&token);
    let session = {
        let mut sessions = state.web.sessions.lock().map_err(|_| to_login())?;
        match sessions.get(&digest) {
            Some(session) if session.expires > Instant::now() => session.clone(),
            Some(_) => {
                sessions.remove(&digest);
                return Err(to_login());
            }
            None => return Err(to_login()),
        }
    };
    let (workspace, key) = state
        .config
        .load()
        .admin_key(
            &session.workspace_id,
            &session.key_id,
            time::OffsetDateTime::now_utc(),
        )
        .ok_or_else(to_login)?;
    Ok(WebCaller {
        caller: Caller { workspace, key },
        csrf: session.csrf,
    })
}

/// The caller of a form post whose CSRF token matches its session's.
fn web_writer(
    state: &ConsoleState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<WebCaller, Box<Response>> {
    let caller = web_caller(state, headers)?;
    if !bool::from(caller.csrf.as_bytes().ct_eq(csrf.as_bytes())) {
        return Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                pages::message_page(
                    "Form expired",
                    "This form does not belong to your session (or was sent by another site). Reload the page and try again.",
                ),
            )
                .into_response(),
        ));
    }
    Ok(caller)
}

async fn login_page() -> Response {
    pages::login(None).into_response()
}

/// The login form: an admin key, or a workspace, login and password.
#[derive(Debug, Default, Deserialize)]
struct LoginForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    workspace: String,
    #[serde(default)]
    login: String,
    #[serde(default)]
    password: String,
}

/// The workspace and key (or password login) a login form names, if it is right. A password
/// is checked on a blocking thread (Argon2id is slow on purpose), also for an unknown login.
async fn authenticate(
    state: &ConsoleState,
    form: LoginForm,
) -> Option<(
    std::sync::Arc<agentmeter_schemas::WorkspaceSnapshot>,
    agentmeter_schemas::metering::AdminKey,
)> {
    let now = time::OffsetDateTime::now_utc();
    if !form.key.trim().is_empty() {
        return state.config.load().authenticate_admin(form.key.trim(), now);
    }
    let found = state.config.load().password_login(
        form.workspace.trim(),
        &form.login.trim().to_lowercase(),
        now,
    );
    let password = form.password;
    tokio::task::spawn_blocking(move || {
        let phc = found.as_ref().and_then(|(_, key)| key.password_phc.clone());
        match phc {
            Some(phc) if super::password::verify(&password, &phc) => found,
            Some(_) => None,
            None => {
                super::password::verify_nothing(&password);
                None
            }
        }
    })
    .await
    .ok()
    .flatten()
}

async fn login(
    State(state): State<ConsoleState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let now = Instant::now();
    {
        let Ok(failures) = state.web.login_failures.lock() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if let Some((since, count)) = failures.get(&client.ip()) {
            if now.duration_since(*since) < Duration::from_secs(60)
                && *count >= LOGIN_FAILURES_PER_MINUTE
            {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    pages::login(Some(
                        "Too many failed logins from your address; wait a minute and try again.",
                    )),
                )
                    .into_response();
            }
        }
    }
    let form = form.map(|Form(form)| form).unwrap_or_default();
    let Some((workspace, admin_key)) = authenticate(&state, form).await else {
        if let Ok(mut failures) = state.web.login_failures.lock() {
            // Addresses whose minute is over are forgotten, so the map holds at most the
            // addresses that failed in the last minute.
            failures.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(60));
            let entry = failures.entry(client.ip()).or_insert((now, 0));
            entry.1 += 1;
        }
        return (
            StatusCode::UNAUTHORIZED,
            pages::login(Some("Unknown or revoked admin key, or a wrong workspace, login or password. An admin can make a key or a login with `agentmeter admin-key new --workspace <id> --name <you> [--login <email>]`.")),
        )
            .into_response();
    };
    let token = random_token();
    let session = Session {
        workspace_id: workspace.workspace_id().to_string(),
        key_id: admin_key.id,
        csrf: random_token(),
        expires: now + SESSION_LIFETIME,
    };
    if let Ok(mut sessions) = state.web.sessions.lock() {
        sessions.retain(|_, session| session.expires > now);
        sessions.insert(secret_digest(&token), session);
    }
    let secure = if state.settings.console.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!(
                    "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
                    SESSION_LIFETIME.as_secs()
                ),
            ),
            (header::LOCATION, "/metering/live-data".to_string()),
        ],
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if web_writer(&state, &headers, &form.csrf).is_ok() {
        if let Some(token) = session_token(&headers) {
            if let Ok(mut sessions) = state.web.sessions.lock() {
                sessions.remove(&secret_digest(&token));
            }
        }
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
            ),
            (header::LOCATION, "/login".to_string()),
        ],
    )
        .into_response()
}

pub(crate) type SharedWebState = Arc<WebState>;

/// The page for an unknown path or id (the same whether or not it exists in another workspace).
pub fn not_found_page() -> maud::Markup {
    pages::not_found_page()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_token_is_read_from_any_cookie_header_and_position() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "theme=dark".parse().unwrap());
        headers.append(
            header::COOKIE,
            "other=1; am_session=abc123; last=2".parse().unwrap(),
        );
        assert_eq!(session_token(&headers).as_deref(), Some("abc123"));
        let mut lookalike = HeaderMap::new();
        lookalike.append(
            header::COOKIE,
            "xam_session=abc; am_sessions=def".parse().unwrap(),
        );
        assert_eq!(session_token(&lookalike), None);
    }

    #[test]
    fn tokens_are_256_random_bits_in_hex() {
        let (first, second) = (random_token(), random_token());
        assert_eq!(first.len(), 64);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(first, second);
    }
}
