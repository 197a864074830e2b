//! The lake: object storage ([`store`]) and the Delta change-log tables on it ([`changelog`]).

pub mod changelog;
pub mod store;
