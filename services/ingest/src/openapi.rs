//! The OpenAPI document served at `/openapi.json` and browsed at `/docs` (Swagger UI,
//! vendored into the binary by `utoipa-swagger-ui`'s `vendored` feature: no network needed).

use utoipa::OpenApi;

use crate::{
    config::IngestConfig,
    media,
    routes::{calls, ops, packets},
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard ingest API",
        description = "The HTTP API a PBX streams call audio to. Every `/v1` route takes \
            `Authorization: Bearer <key>`: a `pbx` key streams and completes calls, a \
            `supervisor` key reads and re-drives them, an `admin` key does all of it. Every \
            error body is `{\"error\": {\"code\", \"message\", \"field\"?}}`."
    ),
    paths(
        packets::stream_packet,
        calls::complete_call,
        calls::retry_call,
        calls::get_call,
        calls::list_calls,
        calls::audio_wav,
        media::twilio::upgrade,
        media::l16::upgrade,
        ops::readyz,
    ),
    tags(
        (name = "packets", description = "Streaming audio packets"),
        (name = "telephony", description = "WebSockets real PBXs stream to (docs/telephony.md): \
            Twilio Media Streams and binary L16. Asterisk AudioSocket is a TCP listener of its \
            own (`AUDIOSOCKET_ADDR`)."),
        (name = "calls", description = "Call state, completion and history"),
        (name = "operations", description = "Health and readiness"),
    )
)]
pub struct ApiDoc;

/// The document as this server enforces it: the packet's bounds that are settings
/// (`MAX_PACKET_BYTES`, `SEQUENCE_START`) as configured, not as defaulted.
pub fn document(config: &IngestConfig) -> utoipa::openapi::OpenApi {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    let packet = &mut doc["components"]["schemas"]["PacketBody"]["properties"];
    packet["data"]["maxLength"] = config.max_packet_bytes.into();
    packet["sequence"]["minimum"] = config.sequence_start.into();
    add_authentication(&mut doc);
    serde_json::from_value(doc).expect("the patched document reads back")
}

/// The bearer scheme, and on every `/v1` operation the answers every one of them may give
/// before its own work starts (`common::auth::http`): 401, 403, 408 and 429.
fn add_authentication(doc: &mut serde_json::Value) {
    doc["components"]["securitySchemes"]["bearer"] = serde_json::json!({
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`ingest keys create`) or a token minted from one"
    });
    let error = serde_json::json!({
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    });
    let answers = [
        (
            "401",
            "`unauthorized`: no key, or not a valid one (unknown, revoked, expired)",
        ),
        ("403", "`forbidden`: the key's role may not do this"),
        (
            "408",
            "`request_timeout`: not completed within REQUEST_TIMEOUT_SECS",
        ),
        (
            "429",
            "`rate_limited` (the key's rate) or `too_many_streaming_calls` (the tenant's cap); \
             retry after `Retry-After`",
        ),
    ];
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        // Twilio cannot send headers: its key is a stream parameter, checked after the upgrade.
        if !path.starts_with("/v1") || path == wire::media::TWILIO_PATH {
            continue;
        }
        for operation in item
            .as_object_mut()
            .into_iter()
            .flat_map(|o| o.values_mut())
        {
            // The L16 socket's key may come in its metadata frame instead of the header.
            operation["security"] = if path == wire::media::L16_PATH {
                serde_json::json!([{"bearer": []}, {}])
            } else {
                serde_json::json!([{"bearer": []}])
            };
            for (status, description) in answers {
                let mut answer = error.clone();
                answer["description"] = description.into();
                operation["responses"][status] = answer;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::IngestConfig;

    /// The document states the limits the handlers enforce, so that a client generated from
    /// it (or schemathesis) never sends what it calls valid and gets it refused.
    #[test]
    fn the_document_states_the_limits_the_handlers_enforce() {
        let parse = |args: &[&str]| {
            <IngestConfig as clap::Parser>::try_parse_from(args).expect("settings parse")
        };
        let doc = serde_json::to_value(super::document(&parse(&["ingest"]))).unwrap();
        let packet = &doc["components"]["schemas"]["PacketBody"]["properties"];
        assert_eq!(
            packet["sequence"]["maximum"].as_f64(),
            Some(crate::writer::MAX_SEQUENCE as f64)
        );
        assert_eq!(packet["sequence"]["minimum"].as_f64(), Some(0.0));
        assert_eq!(packet["data"]["maxLength"].as_u64(), Some(65_536));
        // Settings that bound a packet are in the document as configured.
        let custom = parse(&[
            "ingest",
            "--sequence-start",
            "1",
            "--max-packet-bytes",
            "1000",
        ]);
        let custom = serde_json::to_value(super::document(&custom)).unwrap();
        let custom = &custom["components"]["schemas"]["PacketBody"]["properties"];
        assert_eq!(custom["sequence"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(custom["data"]["maxLength"].as_u64(), Some(1000));
        let mut call_id_params = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for operation in item.as_object().unwrap().values() {
                for param in operation["parameters"].as_array().into_iter().flatten() {
                    if param["name"] == "call_id" {
                        call_id_params += 1;
                        let schema = &param["schema"];
                        assert_eq!(schema["pattern"], "^[A-Za-z0-9_-]{1,128}$", "{path}");
                        assert_eq!(
                            schema["maxLength"].as_u64(),
                            Some(common::call_id::MAX_CALL_ID_LEN as u64),
                            "{path}"
                        );
                    }
                }
            }
        }
        assert_eq!(
            call_id_params, 5,
            "stream, read, complete, retry and audio.wav take a call id"
        );
        // Every /v1 operation says it needs a key and what it answers without one.
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        for (path, item) in doc["paths"].as_object().unwrap() {
            for operation in item.as_object().unwrap().values() {
                let secured = operation["security"] == serde_json::json!([{"bearer": []}]);
                // Twilio sends its key as a stream parameter; the L16 socket may send it in
                // its metadata.
                let own_credentials = [wire::media::TWILIO_PATH, wire::media::L16_PATH];
                let expected = path.starts_with("/v1") && !own_credentials.contains(&path.as_str());
                assert_eq!(secured, expected, "{path}");
                if secured {
                    for status in ["401", "403", "429"] {
                        assert!(
                            operation["responses"][status].is_object(),
                            "{path} {status}"
                        );
                    }
                }
            }
        }
        let list = doc["paths"]["/v1/calls"]["get"]["parameters"]
            .as_array()
            .unwrap();
        let state = list.iter().find(|p| p["name"] == "state").unwrap();
        let names: Vec<&str> = common::CallState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            state["schema"]["pattern"],
            format!("^({})?$", names.join("|")),
            "the state filter's pattern names every state"
        );
    }
}
