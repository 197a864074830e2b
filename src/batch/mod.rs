//! Batching changes for the lake: decoded, committed changes are appended row by row to one
//! Arrow builder per source table ([`rows`]) and leave as record batches for the Delta writer.

pub mod rows;
