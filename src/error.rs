//! Every error pg_token raises, and the one map from what went wrong to its SQLSTATE.
//!
//! Code anywhere in the extension says *what* went wrong with a `Kind` (or a refusal `Reason`
//! from the core) and a message; `Kind::sqlstate` is the only place that turns that into an
//! SQLSTATE, so the README's tables, `token.reasons()` and the tests can rely on one mapping.
//! Errors that Postgres raises inside our SPI statements (a constraint, a lock timeout, a
//! serialization failure) are not ours to map: they unwind through pgrx with their own
//! SQLSTATE untouched. pgrx's own SPI failures (`SpiError`) get the nearest Postgres code
//! here rather than a blanket XX000, which is left for states that are bugs.
//!
//! Messages follow Postgres' style (lower case, no trailing period, detail and hint in their
//! own fields) and never carry a token: a prefix and a 4-character hint at most. Add a new
//! kind here, with its SQLSTATE, before raising it anywhere.

use pg_token_core::limits;
use pg_token_core::reason::Reason;
use pg_token_core::verdict::Refusal;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::spi::{SpiError, SpiErrorCodes};
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// What went wrong, as far as the SQLSTATE is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A token (or caller token) was refused: 28000, whatever the reason.
    Refused(Reason),
    /// A required argument was NULL: 22004.
    NullArgument,
    /// An argument is out of range or malformed: 22023.
    InvalidValue,
    /// A key type, prefix or other named object does not exist: 42704.
    UndefinedObject,
    /// It exists already: 42710.
    DuplicateObject,
    /// The object is in the wrong state for this (revoked, rotated, environment unset, not
    /// installed, not preloaded): 55000.
    WrongState,
    /// No token with this id: P0002.
    NoSuchToken,
    /// A writing function in a read-only transaction or on a standby: 25006.
    ReadOnly,
    /// The operating system failed us (the random source): 58000.
    SystemError,
    /// A resource limit was reached (no background worker slot): 53400.
    ConfigurationLimit,
    /// Queued data could not be written and was dropped: 22000.
    DataException,
    /// A value pgrx could not convert between SQL and Rust: 42804.
    DatatypeMismatch,
    /// pgrx's SPI refused a transaction-control statement: 2D000.
    InvalidTransactionTermination,
    /// SPI was asked for something it does not support: 0A000.
    FeatureNotSupported,
    /// SPI could not find a relation: 42P01.
    UndefinedTable,
    /// SPI could not find a column: 42703.
    UndefinedColumn,
    /// A concurrent transaction changed what this one decided on; retry it: 40001.
    SerializationFailure,
    /// The caller's role may not do this: 42501.
    InsufficientPrivilege,
    /// A state that only a bug can reach: XX000.
    Internal,
}

impl Kind {
    /// The map: every SQLSTATE pg_token raises comes from here.
    pub fn sqlstate(self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Kind::Refused(_) => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            Kind::NullArgument => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            Kind::InvalidValue => ERRCODE_INVALID_PARAMETER_VALUE,
            Kind::UndefinedObject => ERRCODE_UNDEFINED_OBJECT,
            Kind::DuplicateObject => ERRCODE_DUPLICATE_OBJECT,
            Kind::WrongState => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Kind::NoSuchToken => ERRCODE_NO_DATA_FOUND,
            Kind::ReadOnly => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            Kind::SystemError => ERRCODE_SYSTEM_ERROR,
            Kind::ConfigurationLimit => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            Kind::DataException => ERRCODE_DATA_EXCEPTION,
            Kind::DatatypeMismatch => ERRCODE_DATATYPE_MISMATCH,
            Kind::InvalidTransactionTermination => ERRCODE_INVALID_TRANSACTION_TERMINATION,
            Kind::FeatureNotSupported => ERRCODE_FEATURE_NOT_SUPPORTED,
            Kind::UndefinedTable => ERRCODE_UNDEFINED_TABLE,
            Kind::UndefinedColumn => ERRCODE_UNDEFINED_COLUMN,
            Kind::SerializationFailure => ERRCODE_T_R_SERIALIZATION_FAILURE,
            Kind::InsufficientPrivilege => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Kind::Internal => ERRCODE_INTERNAL_ERROR,
        }
    }
}

/// An error on its way to the client: a kind, a message, and optional detail and hint.
#[must_use = "an error does nothing until it is raised"]
pub struct Error {
    kind: Kind,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), detail: None, hint: None }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Error {
        self.detail = Some(detail.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Error {
        self.hint = Some(hint.into());
        self
    }

    fn report(self, level: PgLogLevel) {
        let mut report = ErrorReport::new(self.kind.sqlstate(), self.message, "pg_token");
        if let Some(d) = self.detail {
            report = report.set_detail(d);
        }
        if let Some(h) = self.hint {
            report = report.set_hint(h);
        }
        report.report(level);
    }

    /// Raises it as an ERROR: the statement (and transaction) fails.
    pub fn raise(self) -> ! {
        self.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }

    /// Sends it as a WARNING and carries on.
    pub fn warn(self) {
        self.report(PgLogLevel::WARNING);
    }
}

/// Writes a line to the server log only (never to the client), with SQLSTATE 00000: how
/// pg_token's event lines are written.
/// An error the event writer caught in one of its own transactions (and rolled back).
pub struct Caught {
    /// The moment's fault, not the batch's: a lock or statement timeout, a cancel, a
    /// serialization failure or deadlock, no memory or disk, an I/O error. Retried without
    /// counting against the batch; anything else (bad data, a bug) counts.
    pub transient: bool,
    pub sqlstate: String,
    pub message: String,
}

/// Classifies what the writer caught (SQLSTATE classes 08, 40, 53, 55, 57, 58 and 72 are
/// transient).
pub fn caught(e: pgrx::pg_sys::panic::CaughtError) -> Caught {
    use pgrx::pg_sys::panic::CaughtError as C;
    let (code, message) = match &e {
        C::PostgresError(r) | C::ErrorReport(r) | C::RustPanic { ereport: r, .. } => (r.sql_error_code(), r.message().to_owned()),
    };
    // MAKE_SQLSTATE packs five characters, six bits each, offset from '0'.
    let packed = code as u32;
    let sqlstate: String = (0..5).map(|i| char::from(b'0' + ((packed >> (6 * i)) & 0x3F) as u8)).collect();
    let transient = matches!(&sqlstate[..2], "08" | "40" | "53" | "55" | "57" | "58" | "72");
    Caught { transient, sqlstate, message }
}

/// Whether a caught error is a lock wait that ran out (`lock_timeout`, SQLSTATE 55P03) or
/// ended in a deadlock (40P01).
pub fn is_lock_wait(e: &pgrx::pg_sys::panic::CaughtError) -> bool {
    use pgrx::pg_sys::panic::CaughtError as C;
    match e {
        C::PostgresError(r) | C::ErrorReport(r) | C::RustPanic { ereport: r, .. } => matches!(
            r.sql_error_code(),
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE | PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
        ),
    }
}

pub fn log_server_only(line: String) {
    ErrorReport::new(PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, line, "pg_token").report(PgLogLevel::LOG_SERVER_ONLY);
}

/// Raises a refusal: SQLSTATE 28000, the reason word (or the environment-mismatch wording) as
/// the message, and a detail that names the hint, never the token. What the caller is told: a
/// concealed refusal shows its disguise (the events keep the truth).
pub fn refuse(refusal: &Refusal) -> ! {
    let e = Error::new(Kind::Refused(refusal.shown_reason()), refusal.message()).detail(refusal.shown_detail().to_owned());
    match refusal.hint() {
        Some(h) => e.hint(h).raise(),
        None => e.raise(),
    }
}

/// 42704 for a key type name that is not defined, saying where the defined ones are.
pub fn unknown_key_type(name: &str) -> ! {
    Error::new(Kind::UndefinedObject, format!("key type \"{}\" does not exist", limits::quoted(name)))
        .hint("SELECT name FROM token.key_types lists them; token.create_key_type(name, ...) defines one.")
        .raise()
}

/// Raises `kind` with `message` and an optional hint.
pub fn fail(kind: Kind, message: String, hint: Option<&str>) -> ! {
    let e = Error::new(kind, message);
    match hint {
        Some(h) => e.hint(h).raise(),
        None => e.raise(),
    }
}

/// Refuses a writing function in a read-only transaction or on a hot standby with 25006, the
/// way Postgres refuses INSERT there, before any SPI write could ask for a transaction id
/// (which on a standby fails as an internal error).
pub fn require_writable(function: &str) {
    // SAFETY: XactReadOnly is a plain backend-local global, set at transaction start (and
    // forced on during recovery); RecoveryInProgress only reads shared state.
    let (read_only, standby) = unsafe { (pgrx::pg_sys::XactReadOnly, pgrx::pg_sys::RecoveryInProgress()) };
    if read_only {
        let e = Error::new(Kind::ReadOnly, format!("cannot execute {function}() in a read-only transaction"));
        match standby {
            true => e.hint("This server is a hot standby; run it on the primary.").raise(),
            false => e.raise(),
        }
    }
}

/// 22023 with `message`.
pub fn invalid(message: impl Into<String>) -> ! {
    Error::new(Kind::InvalidValue, message).raise()
}

/// The value, or 22004 naming the argument.
pub fn required<T>(value: Option<T>, what: &str) -> T {
    match value {
        Some(v) => v,
        None => Error::new(Kind::NullArgument, format!("{what} must not be NULL")).raise(),
    }
}

/// The kind pgrx's own SPI failures map to. (Errors Postgres raises while running the
/// statement never arrive here: they unwind with their own SQLSTATE.)
pub fn spi_kind(e: &SpiError) -> Kind {
    match e {
        SpiError::DatumError(_) => Kind::DatatypeMismatch,
        SpiError::SpiError(code) => match code {
            SpiErrorCodes::Transaction => Kind::InvalidTransactionTermination,
            SpiErrorCodes::Copy => Kind::FeatureNotSupported,
            SpiErrorCodes::RelNotFound => Kind::UndefinedTable,
            SpiErrorCodes::NoAttribute => Kind::UndefinedColumn,
            SpiErrorCodes::TypUnknown => Kind::UndefinedObject,
            SpiErrorCodes::Argument | SpiErrorCodes::Param => Kind::InvalidValue,
            _ => Kind::Internal,
        },
        SpiError::PreparedStatementArgumentMismatch { .. } => Kind::InvalidValue,
        SpiError::InvalidPosition | SpiError::CursorNotFound(_) | SpiError::NoTupleTable => Kind::Internal,
    }
}

/// The result of an SPI call, or its failure raised with the mapped SQLSTATE.
pub fn spi<T>(r: Result<T, SpiError>) -> T {
    spi_or(r, "pg_token")
}

/// The same, with `context` (what was being done) in front of the message.
pub fn spi_or<T>(r: Result<T, SpiError>, context: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => Error::new(spi_kind(&e), format!("{context}: {e}")).raise(),
    }
}

/// 55000 for a database without the extension's objects.
pub fn not_installed() -> ! {
    Error::new(Kind::WrongState, "pg_token is not installed in this database")
        .hint("CREATE EXTENSION pg_token; it must also be in shared_preload_libraries.")
        .raise()
}

/// 55000 when the library was loaded late (shared memory was never set up).
pub fn not_preloaded() -> ! {
    Error::new(Kind::WrongState, "pg_token must be loaded via shared_preload_libraries")
        .hint("Add pg_token to shared_preload_libraries in postgresql.conf and restart the server.")
        .raise()
}
