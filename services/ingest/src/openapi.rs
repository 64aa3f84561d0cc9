//! The OpenAPI document served at `/openapi.json` and browsed at `/docs` (Swagger UI,
//! vendored into the binary by `utoipa-swagger-ui`'s `vendored` feature: no network needed).

use utoipa::OpenApi;

use crate::routes::{calls, ops, packets};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard ingest API",
        description = "The HTTP API a PBX streams call audio to. Every error body is \
            `{\"error\": {\"code\", \"message\", \"field\"?}}`."
    ),
    paths(
        packets::stream_packet,
        calls::complete_call,
        calls::retry_call,
        calls::get_call,
        calls::list_calls,
        ops::readyz,
    ),
    tags(
        (name = "packets", description = "Streaming audio packets"),
        (name = "calls", description = "Call state, completion and history"),
        (name = "operations", description = "Health and readiness"),
    )
)]
pub struct ApiDoc;
