//! The route table: the one list of every endpoint. Each entry names a handler whose
//! `#[utoipa::path]` annotation holds its method and path; from that one list come
//! - dispatch ([`Table::find`]): method + path → handler, 405 for a known path with another
//!   method, 404 otherwise;
//! - the metrics label (the path template, e.g. `/api/storage/public/{path}`);
//! - the OpenAPI document ([`ApiDoc`], served at `GET /api/openapi.json`).
//!
//! A handler's operation id is its function name, unique across the table (the build checks).

use futures_util::future::BoxFuture;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::OpenApi;
use warp::http::Method;
use warp::reply::Response;

use super::openapi::Describe;
use super::reply::Reply;
use super::request::Request;
use super::{
    auth, cdc, health, keys, metrics, projects, realtime, rls, sql, storage, team, webhooks,
};
use crate::api::error::{ApiError, ApiResult};
use crate::app::SharedApp;

pub type Handler = fn(SharedApp, Request) -> BoxFuture<'static, ApiResult<Response>>;

/// How the dispatcher hands the body to a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyMode {
    /// Read whole (up to `max_body_bytes`) before the handler runs; none for GET and HEAD.
    Read,
    /// Left as a stream for the handler (uploads).
    Stream,
}

macro_rules! route_table {
    ($( $area:ident :: $handler:ident $( [$mode:ident] )? ),* $(,)?) => {
        /// The OpenAPI document of every route, from the handlers' annotations.
        #[derive(OpenApi)]
        #[openapi(
            paths($( $area::$handler ),*),
            modifiers(&Describe),
        )]
        pub struct ApiDoc;

        /// (operation id, handler, body mode) of every route, in table order.
        fn handlers() -> Vec<(&'static str, Handler, BodyMode)> {
            vec![$(
                (
                    stringify!($handler),
                    (|app, req| Box::pin(async move {
                        $area::$handler(app, req).await.map(Reply::into_response)
                    })) as Handler,
                    route_table!(@mode $($mode)?),
                )
            ),*]
        }
    };
    (@mode) => { BodyMode::Read };
    (@mode stream) => { BodyMode::Stream };
}

route_table! {
    health::health,
    health::ready,
    metrics::metrics,
    health::openapi_document,
    realtime::realtime_socket_root,
    realtime::realtime_socket,
    auth::signup,
    auth::login,
    auth::logout,
    auth::me,
    projects::list_projects,
    projects::create_project,
    projects::patch_project,
    projects::delete_project,
    keys::list_keys,
    keys::create_key,
    keys::rotate_key,
    keys::delete_key,
    sql::execute_sql,
    rls::list_policies,
    rls::create_policy,
    rls::toggle_policy,
    rls::delete_policy,
    cdc::cdc_status,
    realtime::realtime_token,
    realtime::realtime_broadcast,
    webhooks::list_webhooks,
    webhooks::create_webhook,
    webhooks::patch_webhook,
    webhooks::delete_webhook,
    webhooks::list_deliveries,
    webhooks::redeliver,
    team::list_team,
    team::invite_member,
    team::change_role,
    team::remove_member,
    team::revoke_invite,
    team::answer_invite,
    storage::list_buckets,
    storage::create_bucket,
    storage::patch_bucket,
    storage::delete_bucket,
    storage::upload_file[stream],
    storage::list_files,
    storage::signed_url,
    storage::delete_file,
    storage::delete_file_legacy,
    storage::signed_download,
    storage::signed_download_head,
    storage::public_download,
    storage::public_download_head,
}

/// One route: a method on a path template.
pub struct Route {
    pub method: Method,
    /// The template as documented; a trailing `{name}` segment matches the rest of the path.
    pub template: String,
    /// The metrics and log label: the template.
    pub label: String,
    pub operation_id: &'static str,
    pub handler: Handler,
    pub body: BodyMode,
}

impl Route {
    /// Whether `path` matches; `Some(tail)` for a match (the text under a tail parameter).
    fn matches(&self, path: &str) -> Option<String> {
        match self.template.rfind("/{") {
            Some(i) if self.template.ends_with('}') => {
                let prefix = &self.template[..=i];
                path.strip_prefix(prefix)
                    .filter(|rest| !rest.is_empty())
                    .map(str::to_string)
            }
            _ => (path == self.template).then(String::new),
        }
    }
}

/// Why a request matched no route.
pub enum Miss {
    /// No route has this path.
    NotFound,
    /// The path exists with other methods: these.
    MethodNotAllowed(Vec<Method>),
}

impl Miss {
    pub fn into_error(self, method: &Method, path: &str) -> ApiError {
        match self {
            Miss::NotFound => ApiError::NotFound(format!("No route for {method} {path}")),
            Miss::MethodNotAllowed(allowed) => ApiError::MethodNotAllowed(
                allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }
    }
}

pub struct Table {
    routes: Vec<Route>,
}

impl Table {
    /// The table from the OpenAPI document's operations and the handlers listed above. Panics
    /// (at start-up, and in the unit test) if an operation has no handler or a handler is
    /// missing from the document, or an operation id repeats.
    pub fn build() -> Table {
        let doc = ApiDoc::openapi();
        let handlers = handlers();
        let mut used = vec![false; handlers.len()];
        for (i, (name, _, _)) in handlers.iter().enumerate() {
            assert!(
                !handlers[..i].iter().any(|(other, _, _)| other == name),
                "operation id {name} is listed twice"
            );
        }
        let mut routes = Vec::new();
        for (template, item) in doc.paths.paths.iter() {
            for (method, operation) in operations(item) {
                let id = operation
                    .operation_id
                    .as_deref()
                    .unwrap_or_else(|| panic!("{method} {template}: no operation id"));
                let at = handlers
                    .iter()
                    .position(|(name, _, _)| *name == id)
                    .unwrap_or_else(|| panic!("{method} {template}: no handler {id}"));
                assert!(
                    !used[at],
                    "{id} answers two routes: operation ids must be unique"
                );
                used[at] = true;
                let (operation_id, handler, body) = handlers[at];
                routes.push(Route {
                    method: method.clone(),
                    template: template.clone(),
                    label: template.clone(),
                    operation_id,
                    handler,
                    body,
                });
            }
        }
        let unrouted: Vec<_> = handlers
            .iter()
            .zip(&used)
            .filter(|(_, used)| !**used)
            .map(|((name, _, _), _)| *name)
            .collect();
        assert!(
            unrouted.is_empty(),
            "handlers without a route: {unrouted:?}"
        );
        // Exact paths win over tail templates.
        routes.sort_by_key(|r| r.template.ends_with('}'));
        Table { routes }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `method` on `path` (no trailing slash) and the tail it captured.
    pub fn find(&self, method: &Method, path: &str) -> Result<(&Route, String), Miss> {
        let mut allowed = Vec::new();
        for route in &self.routes {
            if let Some(tail) = route.matches(path) {
                if route.method == *method {
                    return Ok((route, tail));
                }
                if !allowed.contains(&route.method) {
                    allowed.push(route.method.clone());
                }
            }
        }
        Err(if allowed.is_empty() {
            Miss::NotFound
        } else {
            Miss::MethodNotAllowed(allowed)
        })
    }
}

fn operations(item: &PathItem) -> Vec<(Method, &Operation)> {
    [
        (Method::GET, &item.get),
        (Method::HEAD, &item.head),
        (Method::POST, &item.post),
        (Method::PUT, &item.put),
        (Method::PATCH, &item.patch),
        (Method::DELETE, &item.delete),
        (Method::OPTIONS, &item.options),
        (Method::TRACE, &item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_ref().map(|op| (m, op)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_handler_has_exactly_one_route_and_every_route_a_handler() {
        let table = Table::build();
        assert_eq!(table.routes().len(), handlers().len());
    }

    #[test]
    fn paths_methods_and_tails_dispatch_as_documented() {
        let table = Table::build();
        let (route, tail) = table.find(&Method::POST, "/api/keys/rotate").ok().unwrap();
        assert_eq!(route.operation_id, "rotate_key");
        assert_eq!(tail, "");
        let (route, tail) = table
            .find(&Method::GET, "/api/storage/public/p1/b/a%20b.txt")
            .ok()
            .unwrap();
        assert_eq!(route.operation_id, "public_download");
        assert_eq!(tail, "p1/b/a%20b.txt");
        match table.find(&Method::PUT, "/api/keys") {
            Err(Miss::MethodNotAllowed(allowed)) => {
                let mut allowed: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                allowed.sort_unstable();
                assert_eq!(allowed, ["DELETE", "GET", "POST"]);
            }
            _ => panic!("PUT /api/keys is not a 405"),
        }
        assert!(matches!(
            table.find(&Method::GET, "/api/nothing"),
            Err(Miss::NotFound)
        ));
        assert!(matches!(
            table.find(&Method::GET, "/api/storage/public"),
            Err(Miss::NotFound)
        ));
    }
}
