//! Extractors whose rejections use the API's error shape, so a bad request is always a clean
//! 4xx naming the field, never axum's plain-text default.

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Query, Request},
    http::{HeaderMap, StatusCode, header, request::Parts},
};
use common::CallId;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body: 415 without a JSON content type, 400 for malformed JSON, 413 over the body
/// limit, 422 naming the field for a missing, unknown or mistyped field.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (headers, body) = read_body(req, state).await?;
        parse_json(&headers, &body).map(AppJson)
    }
}

/// Like [`AppJson`], but an empty body is `None`.
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (headers, body) = read_body(req, state).await?;
        // No body, or a JSON `null` (what "no body" is in JSON), is no body. Whitespace alone is
        // no body too, unless it is declared JSON: then it is malformed JSON (400), as a JSON
        // parser says.
        let json = is_json(&headers);
        let null = json && body.trim_ascii() == b"null";
        let blank = body.is_empty() || (!json && body.iter().all(u8::is_ascii_whitespace));
        if null || blank {
            return Ok(OptionalJson(None));
        }
        parse_json(&headers, &body).map(|v| OptionalJson(Some(v)))
    }
}

async fn read_body<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<(HeaderMap, Bytes), ApiError> {
    let headers = req.headers().clone();
    let body = Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                field: None,
                message: "the request body is larger than this server accepts".into(),
            }
        } else {
            ApiError::MalformedJson(rejection.body_text())
        }
    })?;
    Ok((headers, body))
}

fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    // Syntax first (400), then shape (422): a two-step parse tells the two apart.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if !value.is_object() {
        return Err(ApiError::invalid_field(
            "body",
            "the body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        field_error(&path, &inner)
    })
}

/// Turns serde's message into our error, naming the field.
fn field_error(path: &str, message: &str) -> ApiError {
    let named = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(|name| {
                if path == "." {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                }
            })
    };
    if let Some(field) = named("missing field `") {
        return ApiError::InvalidField {
            code: "missing_field",
            message: format!("the field `{field}` is required"),
            field,
        };
    }
    if let Some(name) = named("unknown field `") {
        // Here serde's path already ends with the unknown field itself.
        let field = if path == "." { name } else { path.to_owned() };
        return ApiError::InvalidField {
            code: "unknown_field",
            message: format!("unknown field `{field}`: {message}"),
            field,
        };
    }
    let field = if path == "." {
        "body".to_owned()
    } else {
        path.to_owned()
    };
    ApiError::InvalidField {
        code: "invalid_field",
        message: format!("`{field}`: {message}"),
        field,
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The `{call_id}` path segment, validated: 400 `invalid_call_id` otherwise.
#[derive(Debug)]
pub struct CallIdPath(pub CallId);

impl<S: Send + Sync> FromRequestParts<S> for CallIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidParameter {
                field: "call_id".into(),
                message: e.body_text(),
            })?;
        Ok(CallIdPath(CallId::parse(raw)?))
    }
}

/// The query string as name -> value, for handlers that validate each parameter themselves
/// and name the one at fault.
#[derive(Debug)]
pub struct QueryParams(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(params) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidParameter {
                field: "query".into(),
                message: e.body_text(),
            })?;
        Ok(QueryParams(params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_unknown_fields_are_named() {
        match field_error(".", "missing field `sequence`") {
            ApiError::InvalidField { code, field, .. } => {
                assert_eq!((code, field.as_str()), ("missing_field", "sequence"))
            }
            other => panic!("{other:?}"),
        }
        match field_error(".", "unknown field `seq`, expected one of `sequence`") {
            ApiError::InvalidField { code, field, .. } => {
                assert_eq!((code, field.as_str()), ("unknown_field", "seq"))
            }
            other => panic!("{other:?}"),
        }
        match field_error("timestamp", "invalid type: string \"x\", expected f64") {
            ApiError::InvalidField { code, field, .. } => {
                assert_eq!((code, field.as_str()), ("invalid_field", "timestamp"))
            }
            other => panic!("{other:?}"),
        }
    }
}
