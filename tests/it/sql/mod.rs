//! SQL over HTTP: `/api/execute-sql` and its scopes, the value codec against PostgreSQL,
//! row-level security, and what SQL sent with any key may not reach.

pub(crate) mod answers;
mod execute;
mod memory;
mod reset;
mod rls;
mod sandbox;
pub(crate) mod shares;
mod values;
