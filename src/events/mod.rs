//! Security events: who was refused and why, and every generate, rotate and revoke.
//!
//! A refusal is recorded outside the caller's transaction (through `queue` and `worker`), so
//! it stays recorded when `validate_token` raises and the transaction rolls back. Lifecycle
//! events (generate, rotate, revoke) are inserted in the caller's transaction, so a rolled
//! back generate leaves no event for a token that never existed. Each event is also one LOG
//! line (unless `token.log_events` is off).
//!
//! Never record a token: prefixes and 4-character hints only.
//!
//! - `queue`: the shared-memory rings from backends to the writer.
//! - `writer`: the background worker that writes them.
//! - `admin`: the SQL functions over them (`flush_events`, `worker_status`, `purge_events`).
//! - `reserve`: the writer's use reservations for capped tokens (`spend_use` waits for them).
//!
//! A new kind of event is recorded from here: lifecycle events through `lifecycle()` (in the
//! caller's transaction), anything that must survive a rollback through the queue.

mod admin;
mod attempt;
pub mod family;
mod last_use;
mod plans;
pub mod queue;
mod reserve;
pub mod writer;

use pg_token_core::reason::Reason;
use pg_token_core::verdict::{Refusal, Reuse, Subject};
use pgrx::prelude::*;

pub use queue::require_preload;
use pg_token_core::aggregate::{Folded, Key, Sample};
use pg_token_core::ring::FixedStr;
use queue::{Pushed, Touch};

use crate::error::{self, Error, Kind};
use crate::guc;

/// Who is asking: client address, application name and session user.
pub struct Client {
    pub addr: Option<String>,
    pub application_name: Option<String>,
    pub db_user: Option<String>,
    pub pid: i32,
}

impl Client {
    pub fn current() -> Client {
        // SAFETY: inet_client_addr reads MyProcPort and handles its absence;
        // application_name is a GUC string owned by guc.c; the user lookup is a syscache read.
        unsafe {
            // inet_client_addr() is NULL for Unix-socket connections and background processes.
            let addr = pgrx::direct_function_call::<pgrx::Inet>(pg_sys::inet_client_addr, &[]).map(|i| i.0);
            let app = pg_sys::application_name;
            let application_name = (!app.is_null())
                .then(|| std::ffi::CStr::from_ptr(app).to_string_lossy().into_owned())
                .filter(|s| !s.is_empty());
            let name = pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), true);
            let db_user = (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned());
            Client { addr, application_name, db_user, pid: pg_sys::MyProcPid }
        }
    }
}

pub fn uuid_string(id: &[u8; 16]) -> String {
    pgrx::Uuid::from_bytes(*id).to_string()
}

fn log_line(event: &str, reason: Option<Reason>, subject: &Subject, caller: Option<&[u8; 16]>, detail: Option<&str>, client: &Client) {
    if !guc::LOG_EVENTS.get() {
        return;
    }
    let mut line = format!("pg_token: {event}");
    let mut field = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            line.push_str(&format!(" {k}={v}"));
        }
    };
    field("reason", reason.map(Reason::as_str));
    field("hint", subject.hint.as_deref());
    field("token_id", subject.token_id.as_ref().map(uuid_string).as_deref());
    field("account", subject.account.as_deref());
    field("environment", subject.environment.as_deref());
    field("caller_token_id", caller.map(uuid_string).as_deref());
    field("detail", detail);
    field("client", client.addr.as_deref());
    field("application", client.application_name.as_deref());
    field("user", client.db_user.as_deref());
    error::log_server_only(line);
}

/// Records a refusal: counted into its key's row of token.events (written by the writer, which
/// also logs one line per row). On a hot standby, where nothing can be written, the first
/// refusal of each key in a window is logged instead. Never one line or row per refusal.
pub fn refused(refusal: &Refusal) {
    let s = &refusal.subject;
    let key_of = |client: &Client| Key {
        reason: refusal.reason as u8,
        folded: Folded::No,
        prefix: FixedStr::new(s.prefix.as_deref()),
        environment: FixedStr::new(s.environment.as_deref()),
        client_addr: FixedStr::new(client.addr.as_deref()),
        db_user: FixedStr::new(client.db_user.as_deref()),
        application_name: FixedStr::new(client.application_name.as_deref()),
        hint: FixedStr::new(s.hint.as_deref()),
    };
    let sample = |client: &Client| Sample {
        token_id: s.token_id,
        caller_token_id: refusal.caller.as_ref().and_then(|c| c.token_id),
        account: FixedStr::new(s.account.as_deref()),
        detail: FixedStr::new(Some(&refusal.detail)),
        backend_pid: client.pid,
    };
    count(key_of, sample, |client, sample| {
        log_line("refused (standby: first of its key in the window)", Some(refusal.reason), &refusal.subject,
                 sample.caller_token_id.as_ref(), Some(&refusal.detail), client);
    });
    yield_if_flooding();
}

/// Counts an accepted legacy JWT: rows of event legacy_jwt_used per issuer, environment,
/// client, user and application and window (the deprecation counts a migration watches).
pub fn legacy_used(state: &pg_token_core::verdict::TokenState, lg: &pg_token_core::legacy::LegacyState) {
    let key_of = |client: &Client| Key {
        reason: pg_token_core::aggregate::LEGACY_USE,
        folded: Folded::No,
        prefix: FixedStr::new(Some(&lg.issuer)),
        environment: FixedStr::new(Some(&state.environment)),
        client_addr: FixedStr::new(client.addr.as_deref()),
        db_user: FixedStr::new(client.db_user.as_deref()),
        application_name: FixedStr::new(client.application_name.as_deref()),
        hint: FixedStr::EMPTY,
    };
    let sample = |client: &Client| Sample {
        token_id: Some(state.id),
        caller_token_id: None,
        account: FixedStr::new(Some(&state.account)),
        detail: FixedStr::new(Some("legacy JWT accepted")),
        backend_pid: client.pid,
    };
    count(key_of, sample, |client, _| {
        let subject = Subject { prefix: Some(lg.issuer.clone()), token_id: Some(state.id), account: Some(state.account.clone()), ..Subject::default() };
        log_line("legacy JWT used (standby: first of its key in the window)", None, &subject, None, None, client);
    });
}

/// Counts an entry in this database's event table (the writer writes it), or on a hot
/// standby, where nothing can be written, logs the first of each key in a window (`standby`).
fn count(key_of: impl Fn(&Client) -> Key, sample_of: impl Fn(&Client) -> Sample, standby: impl FnOnce(&Client, &Sample)) {
    let client = Client::current();
    let key = key_of(&client);
    let sample = sample_of(&client);
    let limits = guc::event_limits();
    // SAFETY: MyDatabaseId is set for every backend connected to a database.
    let db = unsafe { pg_sys::MyDatabaseId };
    // SAFETY: reads of process-global state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        if queue::count_on_standby(db, &key, &sample, &limits) == Some(true) {
            standby(&client, &sample);
        }
        return;
    }
    start_writer_if_asked(db, queue::push_refusal(db, &key, &sample, &limits));
}

/// Refusals per second after which a backend is taken for a flood.
const FLOOD_REFUSALS_PER_S: u32 = 1_000;

thread_local! {
    /// (the second, refusals made in it, whether this backend already lowered its priority)
    static FLOOD: std::cell::Cell<(i64, u32, bool)> = const { std::cell::Cell::new((0, 0, false)) };
}

/// A backend refusing over 1,000 tokens in a second is being used to flood: it lowers its own
/// CPU priority to `token.flood_nice` so that the server's other work keeps the CPU. It keeps
/// answering at full speed whenever the CPU is free; only when busy backends compete does it
/// yield. Linux lets a process lower its priority but never raise it back, so this lasts until
/// the connection ends (behind a pooler, until the server connection is recycled).
fn yield_if_flooding() {
    let nice = guc::FLOOD_NICE.get();
    if nice <= 0 {
        return;
    }
    let second = pg_token_core::clock::now() / 1_000_000;
    let (at, n, done) = FLOOD.with(std::cell::Cell::get);
    if done {
        return;
    }
    let n = if at == second { n + 1 } else { 1 };
    FLOOD.with(|f| f.set((second, n, false)));
    if n <= FLOOD_REFUSALS_PER_S {
        return;
    }
    FLOOD.with(|f| f.set((second, n, true)));
    // SAFETY: plain system calls on this process; errors only leave the priority as it was.
    let lowered = unsafe {
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        current < nice && libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0
    };
    if lowered && guc::LOG_EVENTS.get() {
        error::log_server_only(format!(
            "pg_token: backend {} refused over {FLOOD_REFUSALS_PER_S} tokens in a second; it now runs at nice {nice} (token.flood_nice) until it ends",
            // SAFETY: reads this process's pid.
            unsafe { pg_sys::MyProcPid }
        ));
    }
}

/// Queues a `last_used_at` update, applied unless the row was used within `interval_s`
/// seconds before `at`. Never waits, never fails the validation.
pub fn touched(token_id: [u8; 16], at: i64, interval_s: i32) {
    // SAFETY: reads process-global state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    // SAFETY: MyDatabaseId is set for every backend connected to a database.
    let db = unsafe { pg_sys::MyDatabaseId };
    start_writer_if_asked(db, queue::push_touch(db, &Touch { token_id, at, interval_s }));
}

/// What spending a use of a capped token came to.
pub enum UseOutcome {
    /// Spent; this many are left across the server.
    Spent(i64),
    /// None left, until the refill at this time (0: no refill).
    Exhausted(i64),
    /// The cap changed since this backend read the token: read it again.
    Stale,
    /// No use could be reserved (why).
    Unavailable(&'static str),
}

/// How long a validation waits for the writer to reserve uses, or to revoke a token family.
const WRITER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits a millisecond (or until our latch is set) for the writer, then checks interrupts.
fn pause_for_writer() {
    // SAFETY: the standard wait on our own latch, with interrupts checked after.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            1,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pg_sys::check_for_interrupts!();
}

/// Spends one use of a capped token: from the block reserved in shared memory, or after the
/// writer has reserved one (waiting for it: the use must be subtracted in a committed
/// transaction before it is granted).
pub fn spend_use(token_id: &[u8; 16], version: i64, table_remaining: i64, refills: bool) -> UseOutcome {
    use pg_token_core::uses::Step;
    // SAFETY: reads process-global state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return UseOutcome::Unavailable("uses are spent on the primary; a hot standby cannot reserve them");
    }
    // SAFETY: MyDatabaseId is set for every backend connected to a database.
    let db = unsafe { pg_sys::MyDatabaseId };
    let start = std::time::Instant::now();
    loop {
        let (step, writer_slot) = queue::spend_use(db, token_id, version, table_remaining, refills);
        if let Some(slot) = writer_slot {
            writer::start(slot, db);
        }
        match step {
            Step::Spent { remaining, .. } => return UseOutcome::Spent(remaining),
            Step::Exhausted { refill_at } => return UseOutcome::Exhausted(refill_at),
            Step::Stale => return UseOutcome::Stale,
            Step::Full => return UseOutcome::Unavailable("too many capped tokens wait for reservations at once"),
            Step::Requested | Step::Waiting => {}
        }
        if start.elapsed() >= WRITER_WAIT {
            return UseOutcome::Unavailable("the event writer reserved no uses within 5 s (see token.worker_status())");
        }
        pause_for_writer();
    }
}

/// Revokes a token family for a reuse: marks it in shared memory at once (no member is
/// accepted on this server from here on), then asks the writer to revoke every member in its own
/// committed transaction and, with `wait`, waits for that (up to 5 s) so that the refusal is
/// returned only once the revocation is committed. Without `wait` (the caller holds a row lock
/// the write needs) the write follows the caller's transaction. On a hot standby nothing can be
/// written: the family is marked on this server only, and the server log names it.
pub fn revoke_family(reuse: &Reuse, subject: &Subject, wait: bool) {
    let who = Client::current();
    let request = family::Request {
        state: 0,
        attempts: 0,
        family_id: reuse.family_id,
        token_id: reuse.token_id,
        seq: 0,
        backend_pid: who.pid,
        account: FixedStr::new(subject.account.as_deref()),
        prefix: FixedStr::new(subject.prefix.as_deref()),
        hint: FixedStr::new(subject.hint.as_deref()),
        environment: FixedStr::new(subject.environment.as_deref()),
        client_addr: FixedStr::new(who.addr.as_deref()),
        db_user: FixedStr::new(who.db_user.as_deref()),
        application_name: FixedStr::new(who.application_name.as_deref()),
    };
    // SAFETY: MyDatabaseId is set for every backend connected to a database.
    let db = unsafe { pg_sys::MyDatabaseId };
    // SAFETY: reads process-global state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        let (asked, _) = queue::ask_family(db, request, true);
        if matches!(asked, family::Asked::In(family::state::UNWRITTEN)) {
            let detail = format!(
                "family={} reused_token_id={}; a hot standby cannot write: this standby refuses the family until it restarts, \
                 revoke it on the primary with token.revoke_token_tree('{}')",
                uuid_string(&reuse.family_id),
                uuid_string(&reuse.token_id),
                uuid_string(&reuse.family_id)
            );
            // Always logged (not only with token.log_events): the primary must hear of it.
            error::log_server_only(format!(
                "pg_token: family_revoked (standby: not written) hint={} {detail}",
                subject.hint.as_deref().unwrap_or("")
            ));
        }
        return;
    }
    let start = std::time::Instant::now();
    loop {
        let (asked, writer_slot) = queue::ask_family(db, request, false);
        if let Some(slot) = writer_slot {
            writer::start(slot, db);
        }
        let pending = match asked {
            family::Asked::In(s) => s == family::state::REQUESTED || s == family::state::WRITING,
            family::Asked::Full => true,
        };
        if !pending || !wait || start.elapsed() >= WRITER_WAIT {
            if pending && wait {
                Error::new(Kind::WrongState, "pg_token: the event writer did not revoke a token family within 5 s; it stays refused on this server and the writer keeps trying")
                    .warn();
            }
            return;
        }
        pause_for_writer();
    }
}

/// Whether a token family is marked revoked on this server (a reuse whose write may not be
/// committed or seen yet).
pub fn family_marked(family_id: &[u8; 16]) -> bool {
    // SAFETY: MyDatabaseId is set for every backend connected to a database.
    queue::family_marked(unsafe { pg_sys::MyDatabaseId }, family_id)
}

/// Uses of a token reserved in this server's shared memory and not yet spent, whether a
/// reservation is in flight, and the count of completed reservations.
pub fn reserved_uses(token_id: &[u8; 16]) -> (i64, bool, u64) {
    // SAFETY: MyDatabaseId is set for every backend connected to a database.
    queue::reserved_uses(unsafe { pg_sys::MyDatabaseId }, token_id)
}

fn start_writer_if_asked(db: pg_sys::Oid, pushed: Pushed) {
    match pushed {
        Pushed::QueuedStartWorker(slot) => writer::start(slot, db),
        Pushed::Queued | Pushed::Dropped | Pushed::Unavailable => {}
    }
}

/// A lifecycle event, inserted in the caller's transaction.
pub struct Lifecycle<'a> {
    pub event: &'a str,
    pub token_id: Option<pgrx::Uuid>,
    pub account: Option<&'a str>,
    pub prefix: Option<&'a str>,
    pub hint: Option<&'a str>,
    pub environment: Option<&'a str>,
    pub detail: Option<String>,
}

pub fn lifecycle(client: &mut pgrx::spi::SpiClient<'_>, e: Lifecycle<'_>) -> Result<(), pgrx::spi::Error> {
    let who = Client::current();
    let subject = Subject {
        prefix: e.prefix.map(str::to_owned),
        hint: e.hint.map(str::to_owned),
        token_id: e.token_id.map(|u| *u.as_bytes()),
        account: e.account.map(str::to_owned),
        key_type: None,
        environment: e.environment.map(str::to_owned),
    };
    log_line(e.event, None, &subject, None, e.detail.as_deref(), &who);
    crate::prepared::run(
        client,
        "INSERT INTO token.events (occurred_at, event, token_id, account, prefix, hint, environment, \
         detail, client_addr, application_name, db_user, backend_pid) \
         VALUES (pg_catalog.clock_timestamp(), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        None,
        &[
            e.event.into(),
            e.token_id.into(),
            e.account.into(),
            e.prefix.into(),
            e.hint.into(),
            e.environment.into(),
            e.detail.into(),
            who.addr.into(),
            who.application_name.into(),
            who.db_user.into(),
            who.pid.into(),
        ],
    )?;
    Ok(())
}
