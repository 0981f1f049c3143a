//! The ledger's behavioural suite: one binary, each behaviour declared once and run on both
//! stores through [`both_stores!`] (SQLite in a tempdir, PostgreSQL in a fresh database).

#[cfg(test)]
mod audit_alerts;
#[cfg(test)]
mod audit_checkpoints;
#[cfg(test)]
mod batch;
#[cfg(test)]
mod batches;
#[cfg(test)]
mod billing;
#[cfg(test)]
mod common;
#[cfg(test)]
mod crash;
#[cfg(test)]
mod keys_usage;
#[cfg(test)]
mod model;
#[cfg(test)]
mod rollups;
#[cfg(test)]
mod schema;
#[cfg(test)]
mod throwaway;
