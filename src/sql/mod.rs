//! SQL over HTTP (moving into one file per job; see pool.rs).

mod pool;

pub use pool::*;
