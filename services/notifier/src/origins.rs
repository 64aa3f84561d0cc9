//! Which web pages may open the live view. A browser lets any page open a WebSocket to any
//! host and sends the user's network position along, so the server must check the `Origin`
//! a browser puts on the upgrade: the page's own origin (same-origin, the dashboard) and
//! those listed in `ALLOWED_ORIGINS`. Clients that are not browsers send no `Origin` and are
//! judged by their key alone.

use axum::{
    http::{HeaderMap, StatusCode, header},
    response::Response,
};
use common::http::{ErrorBody, ErrorResponse as _};

/// The origins allowed besides the page's own, exactly as browsers write them
/// (`https://ops.example.com`, no path, no trailing slash).
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Vec<String>);

impl AllowedOrigins {
    /// A comma-separated list; empty allows same-origin pages only.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut origins = Vec::new();
        for origin in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
            });
            if !valid {
                return Err(format!(
                    "ALLOWED_ORIGINS: {origin:?} is not an origin like https://ops.example.com \
                     (scheme and host, optional port, no path; `*` is not allowed)"
                ));
            }
            origins.push(origin.to_ascii_lowercase());
        }
        Ok(Self(origins))
    }

    /// `Err(403)` for a browser page of an origin that is neither this server's nor listed.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or_default().to_ascii_lowercase();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let same_origin = origin
            .split_once("://")
            .is_some_and(|(_, authority)| !authority.is_empty() && authority == host);
        if same_origin || self.0.contains(&origin) {
            return Ok(());
        }
        metrics::counter!("switchboard_notifier_origin_refused_total").increment(1);
        Err(ErrorBody::new(
            "forbidden_origin",
            format!(
                "pages from {origin} may not open the live view; add the origin to \
                 ALLOWED_ORIGINS if it should"
            ),
        )
        .with_field("Origin")
        .into_response_with(StatusCode::FORBIDDEN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn same_origin_listed_origins_and_non_browsers_pass_others_do_not() {
        let allowed =
            AllowedOrigins::parse("https://ops.example.com, http://localhost:3000").unwrap();
        let host = "switchboard.example.com";
        assert!(allowed.check(&headers(None, host)).is_ok());
        assert!(
            allowed
                .check(&headers(Some("https://switchboard.example.com"), host))
                .is_ok()
        );
        assert!(
            allowed
                .check(&headers(Some("https://OPS.example.com"), host))
                .is_ok()
        );
        assert!(
            allowed
                .check(&headers(Some("http://localhost:3000"), host))
                .is_ok()
        );
        for foreign in [
            "https://evil.example",
            "null",
            "https://switchboard.example.com.evil.example",
        ] {
            let refused = allowed.check(&headers(Some(foreign), host)).unwrap_err();
            assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{foreign}");
        }
    }

    #[test]
    fn a_list_of_anything_but_origins_is_refused() {
        for bad in [
            "*",
            "ops.example.com",
            "https://ops.example.com/",
            "ftp://x",
        ] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad}");
        }
        assert!(AllowedOrigins::parse("").unwrap().0.is_empty());
    }
}
