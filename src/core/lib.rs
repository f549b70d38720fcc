//! pg_token's pure core: everything that decides about a token without asking Postgres.
//!
//! Token syntax and checksum (`format`), hashing (`hash`), the refusal reasons (`reason`), the
//! verdict rules (`verdict`), log redaction (`redact`), the per-backend cache structure
//! (`cache`), account ids and their one spelling (`account`), bounds on what admins store
//! (`limits`), the clock (`clock`), JWTs from legacy issuers (`jwt`), the fixed-size
//! records that cross shared memory (`ring`), the validation cache shared by all backends
//! (`shared`), how long the refusal tarpit holds a refusal (`tarpit`) and how the event writer
//! coalesces a batch of last uses (`touches`).
//!
//! This crate cannot reach Postgres: it does not depend on pgrx (a compile-time fact, checked
//! again by `scripts/check_layout.py`), so its unit and property tests run with
//! `cargo test -p pg_token_core` in milliseconds, without bindgen or a server. It holds no
//! `unsafe` code. Put new rules here when they can be stated without a database (a new
//! refusal reason, a new token syntax, rate-limit arithmetic, JWT claim checks); the edge
//! crate (`src/`) then only fetches their inputs and reports their results.

#![forbid(unsafe_code)]

pub mod account;
pub mod aggregate;
pub mod cache;
pub mod changes;
pub mod clock;
pub mod format;
pub mod hash;
pub mod jwt;
pub mod legacy;
pub mod limits;
pub mod network;
pub mod ratelimit;
pub mod reason;
pub mod redact;
pub mod tarpit;
pub mod touches;
pub mod ring;
pub mod shared;
pub mod uses;
pub mod verdict;
