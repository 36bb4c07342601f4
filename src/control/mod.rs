//! Every query on the control database's schema (`fluxbase.*`), one file per table: typed rows
//! in, typed rows out, each function taking the client or transaction it runs on. The domains
//! decide what to do with the rows; nothing here knows HTTP.

pub mod buckets;
pub mod deliveries;
pub mod files;
pub mod webhooks;
