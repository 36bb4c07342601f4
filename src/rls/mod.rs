//! Row-level security (moving into one file per job; see policies.rs).

mod policies;

pub use policies::*;
