//! Token families revoked for a reuse (a rotated-away token presented after its grace window,
//! under a key type with `reuse_detection`). The refusing backend cannot write the revocation
//! itself: `validate_token` raises, so its transaction rolls back, and it may be read-only or on
//! a hot standby. So it marks the family here, in shared memory, at once (from then on no
//! member is accepted on this server, before anything is committed), and asks the event writer
//! to revoke every member in the writer's own committed transaction, waiting for it the way
//! `spend_use` waits for a reservation.
//!
//! A mark stays after the write is committed (until newer requests need its entry), so a
//! backend that has not yet processed the write's cache invalidation still finds it. A hot
//! standby cannot write: there the mark is all there is (`Unwritten`), and the primary is told
//! through the server log.
//!
//! Never holds a token: ids, the 4-character hint and the requester's connection only.

use pgrx::prelude::*;
use pgrx::PgBuiltInOids;

use pg_token_core::ring::FixedStr;

use super::plans::{prepared, still_installed, Plans};
use crate::error;

/// Families marked per database at once.
pub const FAMILY_ENTRIES: usize = 32;
/// A write that failed this many times by its own fault is given up (the mark stays).
const MAX_ATTEMPTS: u8 = 3;

/// What an entry is doing; all-zero is `EMPTY`.
pub mod state {
    pub const EMPTY: u8 = 0;
    /// Marked; the writer is asked to revoke the family.
    pub const REQUESTED: u8 = 1;
    pub const WRITING: u8 = 2;
    /// Revoked in a committed transaction.
    pub const DONE: u8 = 3;
    /// Marked only: a hot standby, or a write given up.
    pub const UNWRITTEN: u8 = 4;
}

/// A family to revoke, and who presented its reused token (for the event).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Request {
    pub state: u8,
    pub attempts: u8,
    pub family_id: [u8; 16],
    pub token_id: [u8; 16],
    /// Order of arrival: the oldest finished entry is reused first.
    pub seq: u64,
    pub backend_pid: i32,
    pub account: FixedStr<256>,
    pub prefix: FixedStr<32>,
    pub hint: FixedStr<40>,
    pub environment: FixedStr<32>,
    pub client_addr: FixedStr<64>,
    pub db_user: FixedStr<64>,
    pub application_name: FixedStr<64>,
}

/// What asking for a family's revocation came to.
pub enum Asked {
    /// This family's entry is in this state (just made, or already there).
    In(u8),
    /// Every entry holds a write in flight: try again.
    Full,
}

/// The families of one database, in shared memory. All-zero is an empty table.
#[repr(C)]
pub struct Table {
    entries: [Request; FAMILY_ENTRIES],
    seq: u64,
}

impl Table {
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            e.state = state::EMPTY;
        }
    }

    fn find(&self, family: &[u8; 16]) -> Option<usize> {
        self.entries.iter().position(|e| e.state != state::EMPTY && e.family_id == *family)
    }

    /// Marks `r.family_id` (in state `initial`) unless it is marked already.
    pub fn ask(&mut self, mut r: Request, initial: u8) -> Asked {
        if let Some(i) = self.find(&r.family_id) {
            return Asked::In(self.entries[i].state);
        }
        let free = self.entries.iter().position(|e| e.state == state::EMPTY).or_else(|| {
            self.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.state == state::DONE || e.state == state::UNWRITTEN)
                .min_by_key(|(_, e)| e.seq)
                .map(|(i, _)| i)
        });
        let Some(i) = free else { return Asked::Full };
        self.seq += 1;
        r.state = initial;
        r.attempts = 0;
        r.seq = self.seq;
        self.entries[i] = r;
        Asked::In(initial)
    }

    /// Whether a family is marked (requested, being written, written, or marked only).
    pub fn marked(&self, family: &[u8; 16]) -> bool {
        self.find(family).is_some()
    }

    /// Whether a revocation is asked for or being written (flush_events waits for those).
    pub fn in_flight(&self) -> bool {
        self.entries.iter().any(|e| e.state == state::REQUESTED || e.state == state::WRITING)
    }

    pub fn has_requests(&self) -> bool {
        self.entries.iter().any(|e| e.state == state::REQUESTED)
    }

    /// The writer takes the requests waiting.
    pub fn take(&mut self, out: &mut Vec<Request>) {
        out.clear();
        for e in &mut self.entries {
            if e.state == state::REQUESTED {
                e.state = state::WRITING;
                out.push(*e);
            }
        }
    }

    /// The writer committed the revocation of these families.
    pub fn complete(&mut self, families: &[[u8; 16]]) {
        for e in &mut self.entries {
            if e.state == state::WRITING && families.contains(&e.family_id) {
                e.state = state::DONE;
            }
        }
    }

    /// The write failed: ask again. A failure that was the write's own (`counted`: not a lock or
    /// statement timeout, a cancel or a deadlock, which are retried without end like the other
    /// batches) counts, and after `MAX_ATTEMPTS` the write is given up (the mark stays, so the
    /// family is still refused on this server).
    pub fn retry_in_progress(&mut self, counted: bool) {
        for e in &mut self.entries {
            if e.state == state::WRITING {
                e.attempts += u8::from(counted);
                e.state = if e.attempts >= MAX_ATTEMPTS { state::UNWRITTEN } else { state::REQUESTED };
            }
        }
    }
}

/// Revokes every member of the family (live or not, every descendant): `revoked_at` and
/// `family_revoked_at` set, `revoked_reason` kept when there is one. Repeated until a pass finds
/// nothing: a rotation in flight holds its old token's row, so the first pass waits for it and
/// the next one sees (and revokes) its successor; a rotation that starts later sees its token
/// revoked and refuses. Then one `family_revoked` event, if this revoked anything.
const REVOKE_FAMILY: &str = "WITH f AS ( \
         UPDATE token.tokens SET family_revoked_at = pg_catalog.clock_timestamp(), \
                revoked_at = COALESCE(revoked_at, pg_catalog.clock_timestamp()), \
                revoked_reason = COALESCE(revoked_reason, $2) \
          WHERE family_id OPERATOR(pg_catalog.=) $1 AND family_revoked_at IS NULL \
          RETURNING 1) \
     SELECT pg_catalog.count(*) FROM f";

const FAMILY_EVENT: &str = "INSERT INTO token.events (occurred_at, event, reason, token_id, account, prefix, hint, \
         environment, detail, client_addr, application_name, db_user, backend_pid) \
     VALUES (pg_catalog.clock_timestamp(), 'family_revoked', 'family_revoked', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

fn uuid(b: &[u8; 16]) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*b)
}

/// The writer's part: revokes each family in one transaction; returns the families done and
/// a log line for each that revoked something.
pub(super) fn revoke_families(plans: &mut Plans, requests: &[Request]) -> (Vec<[u8; 16]>, Vec<String>) {
    Spi::connect_mut(|client| {
        let mut done = Vec::new();
        let mut lines = Vec::new();
        if requests.is_empty() || !still_installed(client, plans) {
            return (requests.iter().map(|r| r.family_id).collect(), lines);
        }
        for r in requests {
            let reason = format!("pg_token: family revoked: reuse of {}", uuid(&r.token_id));
            let mut revoked = 0i64;
            for _ in 0..64 {
                let Some(plan) = prepared(client, &mut plans.revoke_family, REVOKE_FAMILY, &[PgBuiltInOids::UUIDOID, PgBuiltInOids::TEXTOID])
                else {
                    break;
                };
                let n: Option<i64> = error::spi_or(
                    client.update(plan, Some(1), &[uuid(&r.family_id).into(), reason.as_str().into()]).and_then(|t| t.first().get_one()),
                    "pg_token writer could not revoke a token family",
                );
                match n.unwrap_or(0) {
                    0 => break,
                    n => revoked += n,
                }
            }
            if revoked > 0 {
                let detail = format!("family={} reused_token_id={} revoked={revoked}", uuid(&r.family_id), uuid(&r.token_id));
                error::spi_or(
                    client.update(
                        FAMILY_EVENT,
                        None,
                        &[
                            uuid(&r.token_id).into(),
                            r.account.get().into(),
                            r.prefix.get().into(),
                            r.hint.get().into(),
                            r.environment.get().into(),
                            detail.as_str().into(),
                            r.client_addr.get().into(),
                            r.application_name.get().into(),
                            r.db_user.get().into(),
                            r.backend_pid.into(),
                        ],
                    ),
                    "pg_token writer could not record a family revocation",
                );
                lines.push(format!(
                    "pg_token: family_revoked reason=family_revoked hint={} token_id={} detail={detail}",
                    r.hint.get().unwrap_or(""),
                    uuid(&r.token_id)
                ));
            }
            done.push(r.family_id);
        }
        (done, lines)
    })
}
