//! Shared set-up for the in-database tests: a registry and helpers to issue and check tokens.

use pgrx::prelude::*;

/// Runs SQL that must succeed.
pub fn run(sql: &str) {
    if let Err(e) = Spi::run(sql) {
        panic!("{sql}: {e}");
    }
}

/// One value from SQL that must succeed.
pub fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    match Spi::get_one::<T>(sql) {
        Ok(v) => v,
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// The error a statement raises, as "SQLSTATE: message", or None if it succeeds.
pub fn error_of(sql: &str) -> Option<String> {
    let quoted = sql.replace('\'', "''");
    one::<String>(&format!("SELECT tests.error_of('{quoted}')"))
}

/// Asserts that `sql` fails with `sqlstate` and a message containing `needle`.
pub fn assert_fails(sql: &str, sqlstate: &str, needle: &str) {
    match error_of(sql) {
        None => panic!("expected {sqlstate} from {sql}, but it succeeded"),
        Some(e) => {
            assert!(e.starts_with(&format!("{sqlstate}: ")), "expected {sqlstate} from {sql}, got {e}");
            assert!(e.contains(needle), "expected {needle:?} in the error of {sql}, got {e}");
        }
    }
}

/// Key types agent (validates nothing) and mid (validates agent), prefixes for dev and prod.
/// Idempotent within a test: a second call finds the registry in place and does nothing.
pub fn registry() {
    if one::<bool>("SELECT EXISTS (SELECT 1 FROM token.prefixes WHERE prefix = 'tst-')") == Some(true) {
        return;
    }
    run("SELECT token.create_key_type('agent', allowed_scopes => '{read,write,admin}', max_ttl => '90 days')");
    run("SELECT token.create_key_type('mid', can_validate => '{agent}')");
    run("SELECT token.create_key_type('cli', default_ttl => '1 day')");
    run("SELECT token.register_prefix('tst-', 'agent', 'dev')");
    run("SELECT token.register_prefix('tstprd-', 'agent', 'prod')");
    run("SELECT token.register_prefix('tstmid_', 'mid', 'dev')");
    run("SELECT token.register_prefix('tstcli_', 'cli', 'dev')");
}

pub struct Issued {
    pub id: String,
    pub token: String,
}

/// Generates a token with the given SQL arguments after (account, key_type).
pub fn issue(account: &str, key_type: &str, extra: &str) -> Issued {
    let sep = if extra.is_empty() { "" } else { ", " };
    let row = Spi::get_two::<pgrx::Uuid, String>(&format!(
        "SELECT token_id, token FROM token.generate_token('{account}', '{key_type}'{sep}{extra})"
    ));
    match row {
        Ok((Some(id), Some(token))) => Issued { id: id.to_string(), token },
        other => panic!("generate_token failed: {other:?}"),
    }
}

/// The reason check_token gives, or None when valid.
pub fn reason(args: &str) -> Option<String> {
    let r = one::<String>(&format!("SELECT CASE WHEN v.valid THEN NULL ELSE v.reason END FROM token.check_token({args}) v"));
    if r.is_none() {
        assert_eq!(one::<bool>(&format!("SELECT valid FROM token.check_token({args})")), Some(true));
    }
    r
}

pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A well-formed token (valid checksum) that was never issued.
pub fn forged(prefix: &str) -> String {
    pg_token_core::format::compose(prefix, "ZZZZforgedButWellFormd")
}

pub fn token_rows() -> i64 {
    one::<i64>("SELECT count(*) FROM token.tokens").unwrap_or(-1)
}
