//! Authentication at the HTTP edge: the credential of a request, and the 401, 403 and 429
//! answers, in the error body every Switchboard API uses.
//!
//! Each route names what it needs in its signature, `Caller<need::Read>`, so a handler cannot
//! forget to check, and the check runs before the path and body are even looked at: a caller
//! without the right gets 401 or 403, never a validation error that would tell it anything.

use std::{marker::PhantomData, num::NonZeroU32, sync::Arc, time::Duration};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};

use super::{AuthError, Keys, Principal, settings::AuthMode, settings::AuthSettings};
use crate::{
    Permission,
    http::{ErrorBody, ErrorResponse},
};

/// Checks credentials and per-key rates for a service. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    keys: Keys,
    packets: Option<Arc<DefaultKeyedRateLimiter<i64>>>,
    requests: Option<Arc<DefaultKeyedRateLimiter<i64>>>,
}

/// Which per-key budget a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateClass {
    Packets,
    Requests,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, keys: Keys) -> Self {
        let limiter = |per_sec: u32, burst_secs: u32| {
            NonZeroU32::new(per_sec).map(|rate| {
                let burst = NonZeroU32::new(per_sec.saturating_mul(burst_secs)).unwrap_or(rate);
                Arc::new(RateLimiter::keyed(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            })
        };
        Self {
            mode: settings.mode,
            keys,
            packets: limiter(settings.packets_per_sec, 1),
            requests: limiter(settings.requests_per_sec, 2),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The principal behind `credential` (a key or a token), with `permission`, within its
    /// rate. `credential` is `None` when the request carried none.
    pub async fn authorize(
        &self,
        credential: Option<&str>,
        permission: Permission,
        class: RateClass,
    ) -> Result<Arc<Principal>, AuthRejection> {
        if self.mode == AuthMode::Off {
            return Ok(Arc::new(Principal::unauthenticated()));
        }
        let secret = credential.ok_or(AuthRejection::Missing)?;
        let principal = self.keys.authenticate(secret).await.map_err(|e| match e {
            AuthError::Invalid => AuthRejection::Invalid,
            AuthError::Unavailable(e) => {
                tracing::warn!(error.message = %e, "API keys cannot be checked");
                AuthRejection::Unavailable
            }
        })?;
        if !principal.allows(permission) {
            return Err(AuthRejection::Forbidden {
                role: principal.role,
            });
        }
        let limiter = match class {
            RateClass::Packets => &self.packets,
            RateClass::Requests => &self.requests,
        };
        if let Some(limiter) = limiter
            && let Err(not_until) = limiter.check_key(&principal.root_key_id)
        {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            metrics::counter!("switchboard_rate_limited_total", "class" => class.as_str())
                .increment(1);
            return Err(AuthRejection::RateLimited { retry_after: wait });
        }
        Ok(principal)
    }
}

impl RateClass {
    fn as_str(self) -> &'static str {
        match self {
            RateClass::Packets => "packets",
            RateClass::Requests => "requests",
        }
    }
}

/// The key or token of `Authorization: Bearer <secret>`; `Err` when the header is there but
/// is not a bearer credential.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthRejection> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| AuthRejection::Malformed)?;
    match value.split_once(' ') {
        Some((scheme, secret))
            if scheme.eq_ignore_ascii_case("bearer") && !secret.trim().is_empty() =>
        {
            Ok(Some(secret.trim()))
        }
        _ => Err(AuthRejection::Malformed),
    }
}

/// Why a request was not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRejection {
    /// No credential: 401.
    Missing,
    /// `Authorization` that is not `Bearer <key>`: 401.
    Malformed,
    /// Unknown, revoked or expired: 401.
    Invalid,
    /// A valid key whose role may not do this: 403.
    Forbidden { role: crate::Role },
    /// Over the key's rate: 429 with `Retry-After`.
    RateLimited { retry_after: Duration },
    /// Keys cannot be checked (Postgres down): 503 with `Retry-After`.
    Unavailable,
}

impl AuthRejection {
    /// The answer's status, code and message.
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            AuthRejection::Missing => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API key is required: send `Authorization: Bearer <key>`".to_owned(),
            ),
            AuthRejection::Malformed => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the Authorization header must be `Bearer <key>`".to_owned(),
            ),
            AuthRejection::Invalid => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the API key is not valid (unknown, revoked or expired)".to_owned(),
            ),
            AuthRejection::Forbidden { role } => (
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("a `{role}` key may not do this"),
            ),
            AuthRejection::RateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this key is over its rate limit; retry in {} ms",
                    retry_after.as_millis()
                ),
            ),
            AuthRejection::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "API keys cannot be checked right now (the database is unavailable); retry"
                    .to_owned(),
            ),
        }
    }
}

/// The message alone, for protocols that answer with something else than a response (the
/// telephony adapters' close frames).
impl std::fmt::Display for AuthRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (_, code, message) = self.parts();
        write!(f, "{code}: {message}")
    }
}

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        let mut body = ErrorBody::new(code, message);
        if matches!(self, AuthRejection::Missing | AuthRejection::Malformed) {
            body.error.field = Some("Authorization".into());
        }
        let mut response = body.into_response_with(status);
        let headers = response.headers_mut();
        match self {
            AuthRejection::Missing | AuthRejection::Malformed | AuthRejection::Invalid => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AuthRejection::RateLimited { retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            AuthRejection::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            AuthRejection::Forbidden { .. } => {}
        }
        response
    }
}

/// What a route needs: a permission and the rate budget it spends.
pub trait Need: Send + Sync + 'static {
    const PERMISSION: Permission;
    const CLASS: RateClass;
}

/// The markers routes name in [`Caller`].
pub mod need {
    use super::{Need, Permission, RateClass};

    /// Sending a packet.
    pub struct Packets;
    /// Completing a call (and other PBX requests).
    pub struct Stream;
    /// Reading calls, the live view.
    pub struct Read;
    /// Re-driving a failed call.
    pub struct Retry;
    /// `/metrics` and other operational reads.
    pub struct Operate;

    impl Need for Packets {
        const PERMISSION: Permission = Permission::Stream;
        const CLASS: RateClass = RateClass::Packets;
    }
    impl Need for Stream {
        const PERMISSION: Permission = Permission::Stream;
        const CLASS: RateClass = RateClass::Requests;
    }
    impl Need for Read {
        const PERMISSION: Permission = Permission::Read;
        const CLASS: RateClass = RateClass::Requests;
    }
    impl Need for Retry {
        const PERMISSION: Permission = Permission::Retry;
        const CLASS: RateClass = RateClass::Requests;
    }
    impl Need for Operate {
        const PERMISSION: Permission = Permission::Operate;
        const CLASS: RateClass = RateClass::Requests;
    }
}

/// The caller of a route that needs `N`: authenticated, allowed, within its rate.
pub struct Caller<N: Need>(pub Arc<Principal>, PhantomData<N>);

impl<N: Need> Caller<N> {
    pub fn principal(&self) -> &Principal {
        &self.0
    }
}

impl<S, N> FromRequestParts<S> for Caller<N>
where
    S: Send + Sync,
    N: Need,
    Authenticator: FromRef<S>,
{
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = Authenticator::from_ref(state);
        let credential = bearer(&parts.headers)?;
        let principal = auth.authorize(credential, N::PERMISSION, N::CLASS).await?;
        Ok(Caller(principal, PhantomData))
    }
}

/// `GET /metrics` on an address clients reach: an `admin` key only.
pub async fn metrics(_caller: Caller<need::Operate>) -> Response {
    crate::http::metrics().await
}
