//! slotlake: mirror a PostgreSQL database into a lakehouse over logical replication.
//!
//! See `DESIGN.md` in the repository for the data flow; each module's docs describe its part.

pub mod lsn;
pub mod pgoutput;
pub mod types;
