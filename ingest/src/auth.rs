//! Agent authentication: the secret alone says who is calling.

use std::sync::Arc;

use agentmeter_runtime::config_watch::ConfigHandle;
use agentmeter_schemas::metering::AgentInstance;
use agentmeter_schemas::WorkspaceSnapshot;
use axum::http::HeaderMap;

/// Header the value-python SDK and REST clients send the agent secret in.
pub const AGENT_SECRET_HEADER: &str = "x-agent-secret";

/// The authenticated caller: an agent instance of one workspace.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub workspace: Arc<WorkspaceSnapshot>,
    pub instance: AgentInstance,
}

/// Display names of the two headers, for messages.
const AGENT_SECRET_HEADER_NAME: &str = "X-Agent-Secret";
const AUTHORIZATION_HEADER_NAME: &str = "Authorization";

/// Why a request is not authenticated; the message is safe to show the caller and says which
/// header is wrong and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing agent secret: send it in the X-Agent-Secret header or as Authorization: Bearer <secret>"
    )]
    Missing,
    /// A header is there but cannot hold a secret: empty, not visible ASCII, or a `Bearer`
    /// without a secret.
    #[error("malformed {header} header: {reason}")]
    Malformed {
        header: &'static str,
        reason: String,
    },
    /// `Authorization` with a scheme other than `Bearer`.
    #[error("Authorization header uses scheme '{scheme}'; send 'Bearer <secret>' (or the secret in the X-Agent-Secret header)")]
    WrongScheme { scheme: String },
    #[error("unknown agent secret (sent in the {header} header): no agent instance has this secret (was it rotated?)")]
    Unknown { header: &'static str },
}

impl AuthError {
    /// The `reason` label of `agentmeter_ingest_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_secret",
            AuthError::Malformed { .. } => "malformed_secret",
            AuthError::WrongScheme { .. } => "wrong_scheme",
            AuthError::Unknown { .. } => "unknown_secret",
        }
    }
}

/// Where a secret was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretSource {
    /// The header's display name.
    pub header: &'static str,
}

/// The secret from `X-Agent-Secret`, else from `Authorization: Bearer <secret>` (the scheme is
/// case-insensitive, RFC 9110 §11.1). An empty `X-Agent-Secret` falls through to
/// `Authorization`; a non-empty one that is not visible ASCII is an error, not a fall-through.
pub fn secret_from_headers(headers: &HeaderMap) -> Result<(&str, SecretSource), AuthError> {
    let agent_secret = headers
        .get(AGENT_SECRET_HEADER)
        .map(|value| visible_secret(AGENT_SECRET_HEADER_NAME, value.as_bytes()))
        .transpose()?
        .flatten();
    if let Some(secret) = agent_secret {
        return Ok((
            secret,
            SecretSource {
                header: AGENT_SECRET_HEADER_NAME,
            },
        ));
    }
    let Some(authorization) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(if headers.contains_key(AGENT_SECRET_HEADER) {
            AuthError::Malformed {
                header: AGENT_SECRET_HEADER_NAME,
                reason: "it is empty; put the agent secret in it (or send Authorization: Bearer <secret>)"
                    .to_string(),
            }
        } else {
            AuthError::Missing
        });
    };
    let text = std::str::from_utf8(authorization.as_bytes())
        .ok()
        .filter(|text| text.is_ascii())
        .ok_or_else(|| AuthError::Malformed {
            header: AUTHORIZATION_HEADER_NAME,
            reason: "it is not ASCII; send 'Bearer <secret>'".to_string(),
        })?
        .trim();
    let (scheme, credentials) = text
        .split_once([' ', '\t'])
        .map_or((text, ""), |(scheme, rest)| (scheme, rest.trim()));
    if scheme.is_empty() {
        return Err(AuthError::Malformed {
            header: AUTHORIZATION_HEADER_NAME,
            reason: "it is empty; send 'Bearer <secret>'".to_string(),
        });
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        // A single word may be the bare secret: it must not be echoed (nor logged).
        if credentials.is_empty() {
            return Err(AuthError::Malformed {
                header: AUTHORIZATION_HEADER_NAME,
                reason: "it holds one word and no scheme; send 'Bearer <secret>'".to_string(),
            });
        }
        let plausible_scheme = scheme.len() <= 20
            && scheme
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
        return Err(AuthError::WrongScheme {
            scheme: if plausible_scheme {
                scheme.to_string()
            } else {
                "(unrecognised)".to_string()
            },
        });
    }
    match visible_secret(AUTHORIZATION_HEADER_NAME, credentials.as_bytes())? {
        Some(secret) => Ok((
            secret,
            SecretSource {
                header: AUTHORIZATION_HEADER_NAME,
            },
        )),
        None => Err(AuthError::Malformed {
            header: AUTHORIZATION_HEADER_NAME,
            reason: "the Bearer scheme has no secret; send 'Bearer <secret>'".to_string(),
        }),
    }
}

/// The secret in a header value: `None` when empty (surrounding spaces and tabs removed), an
/// error when it holds anything but visible ASCII (a non-ASCII byte, a control character, or
/// whitespace inside).
fn visible_secret<'a>(header: &'static str, value: &'a [u8]) -> Result<Option<&'a str>, AuthError> {
    let malformed = |why: &str| AuthError::Malformed {
        header,
        reason: format!(
            "the secret {why}; agent secrets are visible ASCII characters without spaces"
        ),
    };
    let text = std::str::from_utf8(value).map_err(|_| malformed("is not ASCII"))?;
    let secret = text.trim_matches([' ', '\t']);
    if secret.is_empty() {
        return Ok(None);
    }
    if !secret.is_ascii() {
        return Err(malformed("is not ASCII"));
    }
    if secret.bytes().any(|byte| byte == b' ' || byte == b'\t') {
        return Err(malformed("contains a space or tab"));
    }
    if secret.bytes().any(|byte| byte.is_ascii_control()) {
        return Err(malformed("contains a control character"));
    }
    Ok(Some(secret))
}

/// Authenticates a request by its headers against the current configuration.
pub fn authenticate(
    config: &ConfigHandle,
    headers: &HeaderMap,
) -> Result<AgentIdentity, AuthError> {
    let (secret, source) = secret_from_headers(headers)?;
    let (workspace, instance) = config
        .load()
        .authenticate(secret)
        .ok_or(AuthError::Unknown {
            header: source.header,
        })?;
    Ok(AgentIdentity {
        workspace,
        instance,
    })
}

/// Authenticates a gRPC call by its metadata (`x-agent-secret`, or `authorization: Bearer`),
/// with the same rules as [`authenticate`].
pub fn authenticate_grpc(
    config: &ConfigHandle,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<AgentIdentity, AuthError> {
    authenticate(config, metadata.as_ref())
}

/// The Acme Research Agent of `deploy/local/metering.example.toml`, for unit tests.
#[cfg(test)]
pub(crate) fn example_identity() -> AgentIdentity {
    let config = agentmeter_schemas::MeteringConfig::from_toml(include_str!(
        "../../deploy/local/metering.example.toml"
    ))
    .expect("the shipped example is valid");
    let workspace = Arc::new(WorkspaceSnapshot::build(1, config).expect("valid"));
    let instance = workspace
        .instance("inst_acme_research")
        .expect("in the example")
        .clone();
    AgentIdentity {
        workspace,
        instance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmeter_runtime::config_watch::MeteringState;
    use axum::http::HeaderValue;

    /// The demo secret of `inst_acme_research` (deploy/local/demo-secrets.env).
    const SECRET: &str = "am_demo_acme_research_secret";

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_bytes(value).unwrap());
        }
        headers
    }

    fn secret(pairs: &[(&'static str, &[u8])]) -> Result<(String, &'static str), AuthError> {
        secret_from_headers(&headers(pairs))
            .map(|(secret, source)| (secret.to_string(), source.header))
    }

    fn example_config() -> ConfigHandle {
        let config = agentmeter_schemas::MeteringConfig::from_toml(include_str!(
            "../../deploy/local/metering.example.toml"
        ))
        .unwrap();
        ConfigHandle::fixed(MeteringState::from_snapshots([WorkspaceSnapshot::build(
            1, config,
        )
        .unwrap()]))
    }

    #[test]
    fn matches_the_bearer_scheme_case_insensitively() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let value = format!("{scheme} {SECRET}");
            assert_eq!(
                secret(&[("authorization", value.as_bytes())]),
                Ok((SECRET.to_string(), "Authorization")),
                "{scheme}"
            );
        }
        // More than one space, or a tab, between scheme and secret.
        assert_eq!(
            secret(&[("authorization", format!("Bearer \t {SECRET} ").as_bytes())]),
            Ok((SECRET.to_string(), "Authorization"))
        );
    }

    #[test]
    fn an_empty_agent_secret_header_falls_through_to_authorization() {
        let bearer = format!("Bearer {SECRET}");
        for empty in [&b""[..], b"  ", b"\t"] {
            assert_eq!(
                secret(&[
                    ("x-agent-secret", empty),
                    ("authorization", bearer.as_bytes())
                ]),
                Ok((SECRET.to_string(), "Authorization"))
            );
        }
        let error = secret(&[("x-agent-secret", b"")]).unwrap_err();
        assert_eq!(error.reason(), "malformed_secret");
        assert!(
            error
                .to_string()
                .starts_with("malformed X-Agent-Secret header: it is empty"),
            "{error}"
        );
    }

    #[test]
    fn the_agent_secret_header_wins_over_authorization() {
        assert_eq!(
            secret(&[("x-agent-secret", b" s1 "), ("authorization", b"Bearer s2")]),
            Ok(("s1".to_string(), "X-Agent-Secret"))
        );
    }

    #[test]
    fn a_non_ascii_or_non_visible_secret_is_malformed_with_the_header_named() {
        for (name, value, display, why) in [
            (
                "x-agent-secret",
                &b"caf\xc3\xa9"[..],
                "X-Agent-Secret",
                "is not ASCII",
            ),
            (
                "x-agent-secret",
                b"\xff\xfe",
                "X-Agent-Secret",
                "is not ASCII",
            ),
            (
                "x-agent-secret",
                b"two words",
                "X-Agent-Secret",
                "contains a space or tab",
            ),
            (
                "authorization",
                b"Bearer caf\xc3\xa9",
                "Authorization",
                "not ASCII",
            ),
            (
                "authorization",
                b"Bearer two words",
                "Authorization",
                "contains a space or tab",
            ),
        ] {
            let error = secret(&[(name, value)]).unwrap_err();
            assert_eq!(error.reason(), "malformed_secret", "{error}");
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("malformed {display} header: ")),
                "{message}"
            );
            assert!(message.contains(why), "{message}");
        }
        // A malformed X-Agent-Secret is reported, not silently replaced by Authorization.
        let error = secret(&[
            ("x-agent-secret", b"caf\xc3\xa9"),
            ("authorization", b"Bearer good"),
        ])
        .unwrap_err();
        assert!(error.to_string().contains("X-Agent-Secret"), "{error}");
    }

    #[test]
    fn names_the_wrong_scheme_and_an_empty_bearer() {
        let error = secret(&[("authorization", b"Basic dXNlcjpwYXNz")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Authorization header uses scheme 'Basic'; send 'Bearer <secret>' (or the secret in the X-Agent-Secret header)"
        );
        assert_eq!(error.reason(), "wrong_scheme");
        // The secret alone, without a scheme, is not echoed: it would end up in logs.
        let error = secret(&[("authorization", SECRET.as_bytes())]).unwrap_err();
        assert_eq!(error.reason(), "malformed_secret");
        assert!(!error.to_string().contains(SECRET), "{error}");
        assert!(
            error
                .to_string()
                .contains("no scheme; send 'Bearer <secret>'"),
            "{error}"
        );
        let error = secret(&[("authorization", b"am_demo_secret_with_a_long_name x")]).unwrap_err();
        assert!(!error.to_string().contains("am_demo"), "{error}");
        for empty_bearer in [&b"Bearer"[..], b"Bearer   ", b"bearer\t"] {
            let error = secret(&[("authorization", empty_bearer)]).unwrap_err();
            assert_eq!(
                error.to_string(),
                "malformed Authorization header: the Bearer scheme has no secret; send 'Bearer <secret>'"
            );
        }
        let error = secret(&[("authorization", b"")]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("malformed Authorization header: it is empty"),
            "{error}"
        );
        assert_eq!(secret(&[]), Err(AuthError::Missing));
    }

    #[test]
    fn authenticates_by_either_header_and_names_the_header_of_an_unknown_secret() {
        let config = example_config();
        let bearer = format!("bearer {SECRET}");
        let identity = authenticate(
            &config,
            &headers(&[
                ("x-agent-secret", b""),
                ("authorization", bearer.as_bytes()),
            ]),
        )
        .unwrap();
        assert_eq!(identity.instance.id, "inst_acme_research");
        let identity =
            authenticate(&config, &headers(&[("x-agent-secret", SECRET.as_bytes())])).unwrap();
        assert_eq!(identity.instance.id, "inst_acme_research");
        let error = authenticate(
            &config,
            &headers(&[("authorization", b"Bearer not-a-secret")]),
        )
        .unwrap_err();
        assert_eq!(
            error,
            AuthError::Unknown {
                header: "Authorization"
            }
        );
        assert!(
            error
                .to_string()
                .contains("sent in the Authorization header"),
            "{error}"
        );
        assert_eq!(error.reason(), "unknown_secret");
    }
}
