//! slotlake: mirror a PostgreSQL database into a lakehouse over logical replication.
//!
//! Data flow (see `DESIGN.md`): [`replication`] reads a logical slot over `pgoutput`;
//! [`pgoutput`] decodes each message without I/O; [`txn`] assembles committed transactions
//! (including streamed ones) and stamps each change with its identity; [`types`] turns column
//! bytes into exact typed values. [`tail`] prints them; later stages batch them into the lake.

pub mod batch;
pub mod cli;
pub mod commands;
pub mod compact;
pub mod config;
pub mod lake;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod pipeline;
pub mod replication;
pub mod setup;
pub mod snapshot;
pub mod source;
pub mod tail;
pub mod txn;
pub mod types;
pub mod verify;
