//! PostgreSQL frontend pieces for Fluxbase that stand on their own:
//!
//! * [`wire`]: an async frontend connection on `postgres-protocol` that keeps results in
//!   PostgreSQL's text format (with type OIDs), for the SQL API and the replication client.
//! * [`client`]: the logical replication client: replication commands (`IDENTIFY_SYSTEM`, slots)
//!   and the `START_REPLICATION` copy-both stream that owns the LSN feedback to the server.
//! * [`pgoutput`]: the pgoutput logical replication message decoder: plain functions from bytes
//!   to typed messages, no I/O.
//! * [`values`]: the value codec: PostgreSQL text values to JSON exactly as `to_json()` renders them,
//!   and JSON request parameters to PostgreSQL text input. Shared by the SQL API and the change stream.
pub mod client;
pub mod pgoutput;
mod type_names;
pub mod values;
pub mod wire;
