//! Which pg_token schema this database has installed. Between a package upgrade (a new library)
//! and `ALTER EXTENSION pg_token UPDATE`, a database still has the old release's tables and
//! functions. Validation keeps working on them (the store reads columns by name and needs none
//! that 0.1.0 lacks); functions that write with the new schema refuse clearly instead, with
//! 55000 and a hint to update, rather than fail on a missing column.
//!
//! A new release adds its version's schema to the upgrade script and needs nothing here:
//! `require_current` compares with the library's own version.

use pgrx::prelude::*;

use crate::error::{self, Error, Kind};

/// The library's version: what `CREATE EXTENSION pg_token` installs.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The installed extension's version in this database, or None when it is not installed.
pub fn installed() -> Option<String> {
    error::spi(Spi::connect(|client| {
        crate::prepared::run(
            client,
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_token'",
            Some(1),
            &[],
        )?
        .first()
        .get_one::<String>()
    }))
}

/// Refuses `function` with 55000 unless this database runs the library's own schema.
pub fn require_current(function: &str) {
    match installed() {
        Some(v) if v == LIBRARY_VERSION => {}
        Some(v) => Error::new(
            Kind::WrongState,
            format!("{function}() needs pg_token {LIBRARY_VERSION}'s schema; this database has {v}"),
        )
        .hint("Run ALTER EXTENSION pg_token UPDATE in this database.")
        .raise(),
        None => error::not_installed(),
    }
}
