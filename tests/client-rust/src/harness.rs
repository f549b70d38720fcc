//! What every step of the client test needs: failures that say what and where, connections
//! (the superuser over the unix socket, login roles over TCP with a SCRAM password), the
//! list of plaintext tokens this run has seen, and the check every expected error goes
//! through (SQLSTATE, message, no token in any field, connection still usable).
//!
//! Nothing here prints a token: failures name a token by its hint (prefix + 4 characters).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::time::Duration;

use tokio_postgres::error::{DbError, SqlState};
use tokio_postgres::{Client, Config, NoTls};

/// Why the run failed: where (file:line of the check) and what.
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Failure {
    pub fn at(file: &str, line: u32, what: String) -> Failure {
        Failure(format!("{file}:{line}: {what}"))
    }
}

pub type Outcome<T = ()> = Result<T, Failure>;

/// `check!(condition, "what was expected {}", x)`: fails the run with the location.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($what:tt)+) => {
        if !$cond {
            return Err($crate::harness::Failure::at(file!(), line!(), format!($($what)+)));
        }
    };
}

/// `check_eq!(got, expected, "what")`; only for values that are not secrets.
#[macro_export]
macro_rules! check_eq {
    ($got:expr, $expected:expr, $($what:tt)+) => {
        // `match` keeps temporaries alive for the comparison, as assert_eq! does.
        match (&$got, &$expected) {
            (got, expected) => {
                if got != expected {
                    return Err($crate::harness::Failure::at(
                        file!(),
                        line!(),
                        format!("{}: expected {:?}, got {:?}", format!($($what)+), expected, got),
                    ));
                }
            }
        }
    };
}

/// Turns any error into a failure that says what was being done.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Outcome<T>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn context(self, what: impl fmt::Display) -> Outcome<T> {
        self.map_err(|e| Failure(format!("{what}: {}", describe(&e))))
    }
}

impl<T> Context<T> for Result<T, std::io::Error> {
    fn context(self, what: impl fmt::Display) -> Outcome<T> {
        self.map_err(|e| Failure(format!("{what}: {e}")))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Outcome<T> {
        self.ok_or_else(|| Failure(format!("{what}: nothing there")))
    }
}

/// An error as Postgres reported it: SQLSTATE, message, detail, hint.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("SQLSTATE {} \"{}\"", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// The 22-character random body of a token: what the leak check looks for.
pub fn body(token: &str) -> &str {
    let n = token.len();
    token.get(n.saturating_sub(28)..n.saturating_sub(6)).unwrap_or(token)
}

/// Prefix and first four body characters: the only part of a token this test ever prints.
pub fn hint(token: &str) -> String {
    let n = token.len();
    token.get(..n.saturating_sub(24)).unwrap_or("?").to_string()
}

/// Where the cluster is and what to call things, from the variables scripts/test.sh sets.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub socket: String,
    pub data: String,
    pub tokens: String,
    pub database: String,
}

fn var(name: &str) -> Outcome<String> {
    std::env::var(name)
        .map_err(|_| Failure(format!("environment variable {name} is not set (run tests/client-rust/run.sh)")))
}

impl Settings {
    pub fn from_env() -> Outcome<Settings> {
        let port = var("PGT_PORT")?;
        Ok(Settings {
            host: var("PGT_HOST")?,
            port: port.parse().map_err(|_| Failure(format!("PGT_PORT is not a port number: {port:?}")))?,
            socket: var("PGT_SOCKET")?,
            data: var("PGT_DATA")?,
            tokens: var("PGT_TOKENS")?,
            database: std::env::var("PGT_DB").unwrap_or_else(|_| "pgt_rust".into()),
        })
    }
}

pub const APPLICATION_NAME: &str = "pg_token-client-rust";

async fn open(config: &Config, who: &str) -> Outcome<Client> {
    let (client, connection) = config.connect(NoTls).await.context(format!("connect as {who}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("[rust] connection error: {e}");
        }
    });
    Ok(client)
}

/// The superuser, over the unix socket (trust), in `database`.
pub async fn superuser(s: &Settings, database: &str) -> Outcome<Client> {
    let mut c = Config::new();
    c.host_path(&s.socket)
        .port(s.port)
        .user("postgres")
        .dbname(database)
        .application_name(APPLICATION_NAME)
        .connect_timeout(Duration::from_secs(10));
    open(&c, "postgres over the unix socket").await
}

fn tcp_config(s: &Settings, role: &str, password: &str) -> Config {
    let mut c = Config::new();
    c.host(&s.host)
        .port(s.port)
        .user(role)
        .password(password)
        .dbname(&s.database)
        .application_name(APPLICATION_NAME)
        .connect_timeout(Duration::from_secs(10));
    c
}

/// A login role over TCP, authenticated with its password (SCRAM, per pg_hba.conf).
pub async fn login(s: &Settings, role: &str, password: &str) -> Outcome<Client> {
    open(&tcp_config(s, role, password), &format!("{role} over TCP")).await
}

/// A login attempt that must be refused; returns the server's error.
pub async fn login_refused(s: &Settings, role: &str, password: &str) -> Outcome<DbError> {
    match tcp_config(s, role, password).connect(NoTls).await {
        Ok(_) => Err(Failure(format!("{role} logged in with a wrong password"))),
        Err(e) => e
            .as_db_error()
            .cloned()
            .ok_or_else(|| Failure(format!("login as {role} failed without a server error: {e}"))),
    }
}

/// What an expected error's primary message must be.
pub enum Message<'a> {
    Exact(&'a str),
    StartsWith(&'a str),
}

/// Every plaintext token this run received or made up, kept in memory and appended to the
/// leak check's file ($PGT_TOKENS) the moment it is seen; and a count of the errors checked.
pub struct Secrets {
    file: File,
    tokens: Vec<String>,
    pub errors_checked: usize,
}

impl Secrets {
    pub fn open(path: &str) -> Outcome<Secrets> {
        let file = OpenOptions::new().append(true).create(true).open(path).context(format!("open {path}"))?;
        Ok(Secrets { file, tokens: Vec::new(), errors_checked: 0 })
    }

    pub fn count(&self) -> usize {
        self.tokens.len()
    }

    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// Records a token (before anything else is done with it) and returns it.
    pub fn record(&mut self, token: String) -> Outcome<String> {
        writeln!(self.file, "{token}").and_then(|()| self.file.flush()).context("append to PGT_TOKENS")?;
        self.tokens.push(token.clone());
        Ok(token)
    }

    /// Fails if `text` holds any recorded token, or its random body alone.
    pub fn absent_from(&self, what: &str, text: &str) -> Outcome {
        for t in &self.tokens {
            if text.contains(t.as_str()) || text.contains(body(t)) {
                return Err(Failure(format!("{what} contains the raw token {}...", hint(t))));
            }
        }
        Ok(())
    }

    /// Checks an error that must happen: its SQLSTATE, its message, and that none of its
    /// fields carries a token. Returns the error for further checks.
    pub fn expect_error<T>(
        &mut self,
        what: &str,
        result: Result<T, tokio_postgres::Error>,
        code: &SqlState,
        message: Message<'_>,
    ) -> Outcome<DbError> {
        let e = match result {
            Ok(_) => return Err(Failure(format!("{what}: expected SQLSTATE {}, but it succeeded", code.code()))),
            Err(e) => e,
        };
        let Some(db) = e.as_db_error().cloned() else {
            return Err(Failure(format!("{what}: expected SQLSTATE {}, got a client error: {e}", code.code())));
        };
        if db.code() != code {
            return Err(Failure(format!("{what}: expected SQLSTATE {}, got {}", code.code(), describe(&e))));
        }
        let ok = match message {
            Message::Exact(m) => db.message() == m,
            Message::StartsWith(m) => db.message().starts_with(m),
        };
        if !ok {
            let want = match message {
                Message::Exact(m) => format!("\"{m}\""),
                Message::StartsWith(m) => format!("a message starting \"{m}\""),
            };
            return Err(Failure(format!("{what}: expected {want}, got {}", describe(&e))));
        }
        for (field, text) in
            [("message", Some(db.message())), ("detail", db.detail()), ("hint", db.hint()), ("context", db.where_())]
        {
            if let Some(text) = text {
                self.absent_from(&format!("{what}: the error's {field}"), text)?;
            }
        }
        self.absent_from(&format!("{what}: the error"), &e.to_string())?;
        self.errors_checked += 1;
        Ok(db)
    }
}
