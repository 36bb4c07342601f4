//! What the OpenAPI document says beyond the handlers' own annotations: the title and the
//! WebSocket protocol (text, since OpenAPI cannot describe frames), the bearer scheme, the one
//! error shape, and the error answers every operation can give. Served at
//! `GET /api/openapi.json` from the route table ([`super::routes::ApiDoc`]).

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};
use utoipa::ToSchema;

/// The guide's error shape.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, e.g. `AUTH_REQUIRED`, `SCOPE_MISMATCH`, `RATE_LIMIT`.
    pub code: String,
    pub message: String,
    /// More about the failure: the SQLSTATE of a SQL error, the request id of an internal one.
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

/// The bearer scheme's name in the document.
pub const BEARER: &str = "bearer";

/// The statuses any operation may answer with the error shape: a bad request, no or a wrong
/// credential, a refused scope, nothing found, a body over the limit, a rate limit, a database
/// or storage outage, a bug.
const ERRORS: &[(&str, &str)] = &[
    (
        "400",
        "The request is malformed: a missing or mistyped field or parameter.",
    ),
    (
        "401",
        "No credential, or one that is unknown, expired or revoked.",
    ),
    (
        "403",
        "The credential's scope or role does not allow this, or the project is suspended.",
    ),
    ("404", "No such project or resource."),
    ("405", "The path exists with other methods."),
    ("409", "The resource exists already or is in use."),
    ("413", "The body is larger than the limit."),
    (
        "429",
        "A rate limit or a bounded resource; `Retry-After` says when to come back.",
    ),
    (
        "500",
        "An internal error; `details.requestId` names it in the server's log.",
    ),
    (
        "503",
        "The database or the storage backend is unreachable; retry.",
    ),
];

pub struct Describe;

impl utoipa::Modify for Describe {
    fn modify(&self, doc: &mut OpenApi) {
        doc.info.title = "Fluxbase".into();
        doc.info.version = env!("CARGO_PKG_VERSION").into();
        doc.info.description = Some(include_str!("websocket.md").into());
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`flx_live_…`) or a session token from /api/auth/login.",
                    ))
                    .build(),
            ),
        );
        for (name, schema) in [
            ("ErrorBody", <ErrorBody as utoipa::PartialSchema>::schema()),
            (
                "ErrorDetail",
                <ErrorDetail as utoipa::PartialSchema>::schema(),
            ),
        ] {
            components.schemas.insert(name.to_string(), schema);
        }
        for item in doc.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.head,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                for (status, description) in ERRORS {
                    if operation.responses.responses.contains_key(*status) {
                        continue;
                    }
                    let response = ResponseBuilder::new()
                        .description(*description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build();
                    operation
                        .responses
                        .responses
                        .insert(status.to_string(), response.into());
                }
            }
        }
    }
}
