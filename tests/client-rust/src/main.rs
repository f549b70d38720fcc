//! pg_token from a Rust application's point of view: tokio-postgres over TCP, SCRAM password
//! authentication, ordinary (non-superuser) roles, prepared statements reused on one open
//! connection. It proves what an application relies on: the token's shape and what is stored
//! for it, validation and its identity, rotation, instant revocation on a warm cache, the
//! refusal reasons with their SQLSTATE and message, the caller-token rule, and that an
//! application role can do nothing but validate.
//!
//! Run by tests/client-rust/run.sh (under scripts/test.sh or standalone). Every plaintext
//! token it receives or makes up is appended to $PGT_TOKENS for the leak check; no error it
//! sees may contain one, and this program never prints one (only hints).

mod harness;

use std::collections::BTreeSet;
use std::fmt::Display;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

use harness::{body, hint, Context, Message, Outcome, Secrets, Settings};

const PASSWORD: &str = "rust-e2e-password";
const ADMIN: &str = "rust_admin";
const APP: &str = "rust_app";
const ACCOUNT_A: &str = "rust-acct-a";
const ACCOUNT_B: &str = "rust-acct-b";
const ACCOUNT_C: &str = "rust-acct-c";
const DEV_PREFIX: &str = "rs-";
const MID_PREFIX: &str = "rsmid_";
const PROD_PREFIX: &str = "rsprd-";
const VALIDATIONS: usize = 200;

const REFUSED: SqlState = SqlState::INVALID_AUTHORIZATION_SPECIFICATION; // 28000
const DENIED: SqlState = SqlState::INSUFFICIENT_PRIVILEGE; // 42501

fn say(step: &str, line: impl Display) {
    println!("[rust] {step:<8} {line}");
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("[rust] FAIL could not start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("[rust] FAIL {f}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Outcome {
    let s = Settings::from_env()?;
    let mut secrets = Secrets::open(&s.tokens)?;
    let started = Instant::now();

    let su = setup(&s).await?;
    let admin = login_as(&s, &mut secrets, ADMIN, true).await?;
    let app = login_as(&s, &mut secrets, APP, false).await?;
    let v = Validator::prepare(&app).await?;

    let first = step1_generate(&su, &admin, &mut secrets).await?;
    step2_validate(&app, &v, &first).await?;
    let (rotating, revoked_by_grace, successor) = step3_rotate(&admin, &app, &v, &mut secrets, &first).await?;
    step4_revoke(&admin, &app, &v, &mut secrets, &successor).await?;
    let live = step5_refusals(&su, &admin, &app, &v, &mut secrets, &rotating, &revoked_by_grace, &successor).await?;
    step6_denied(&app, &v, &mut secrets, &live).await?;
    step7_no_token_leaks(&s, &admin, &secrets).await?;

    say(
        "pass",
        format!(
            "{} tokens recorded in $PGT_TOKENS, {} expected errors checked, {:.1}s",
            secrets.count(),
            secrets.errors_checked,
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token syntax, as src/core/format.rs and the README define it: <prefix><22 base62><6 base62 CRC32>.

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn checksum(prefix: &str, body: &str) -> String {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix.as_bytes());
    h.update(body.as_bytes());
    let mut v = h.finalize();
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v % 62) as usize];
        v /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A well-formed token (right checksum) that was never issued.
fn compose(prefix: &str, seed: &str) -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let digest = Sha256::digest(format!("{seed}/{nanos}/{}", std::process::id()).as_bytes());
    let body: String = digest.iter().take(22).map(|b| ALPHABET[(*b % 62) as usize] as char).collect();
    let sum = checksum(prefix, &body);
    format!("{prefix}{body}{sum}")
}

fn check_shape(token: &str, prefix: &str) -> Outcome {
    check!(token.starts_with(prefix), "token {} does not start with {prefix}", hint(token));
    let rest = &token[prefix.len()..];
    check_eq!(rest.len(), 28, "characters after the prefix of {}", hint(token));
    check!(
        rest.bytes().all(|b| b.is_ascii_alphanumeric()),
        "token {} has non-base62 characters after its prefix",
        hint(token)
    );
    let (b, sum) = rest.split_at(22);
    check!(checksum(prefix, b) == sum, "token {}: the checksum is not CRC32(prefix + body) in base62", hint(token));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Set-up, as the superuser over the unix socket.

async fn setup(s: &Settings) -> Outcome<Client> {
    let su = harness::superuser(s, &s.database).await?;
    // The password reaches the server only as a SCRAM verifier, so log_statement = 'all'
    // logs no password either.
    let verifier = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
    let sql = format!(
        "CREATE EXTENSION pg_token;
         SELECT token.create_key_type('agent', allowed_scopes => '{{read,write}}');
         SELECT token.create_key_type('mid', can_validate => '{{agent}}');
         SELECT token.register_prefix('{DEV_PREFIX}', 'agent', 'dev');
         SELECT token.register_prefix('{MID_PREFIX}', 'mid', 'dev');
         SELECT token.register_prefix('{PROD_PREFIX}', 'agent', 'prod');
         DROP ROLE IF EXISTS {ADMIN};
         DROP ROLE IF EXISTS {APP};
         CREATE ROLE {ADMIN} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD '{verifier}';
         CREATE ROLE {APP} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD '{verifier}';
         GRANT token_admin TO {ADMIN};
         GRANT token_validator TO {APP};"
    );
    su.batch_execute(&sql).await.context("set up the extension, registry and roles as superuser")?;
    let env: String = su.query_one("SHOW token.environment", &[]).await.context("SHOW token.environment")?.get(0);
    check_eq!(env.as_str(), "dev", "token.environment of the cluster");
    let scram: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_authid WHERE rolname IN ($1, $2) AND rolpassword LIKE 'SCRAM-SHA-256$%'",
            &[&ADMIN, &APP],
        )
        .await
        .context("read the roles' password verifiers")?
        .get(0);
    check_eq!(scram, 2, "roles with a SCRAM-SHA-256 verifier");
    say(
        "setup",
        format!(
            "database {}: key types agent{{read,write}} and mid (can validate agent), prefixes {DEV_PREFIX} {MID_PREFIX} (dev) \
             {PROD_PREFIX} (prod); roles {ADMIN} (token_admin) and {APP} (token_validator)",
            s.database
        ),
    );
    Ok(su)
}

/// Logs in over TCP with the password (after proving a wrong one is refused) and checks who
/// the session is: not a superuser, the right memberships, a TCP client.
async fn login_as(s: &Settings, secrets: &mut Secrets, role: &str, admin: bool) -> Outcome<Client> {
    let bad = harness::login_refused(s, role, "not-the-password").await?;
    check_eq!(bad.code(), &SqlState::INVALID_PASSWORD, "SQLSTATE for {role} with a wrong password");
    let client = harness::login(s, role, PASSWORD).await?;
    let r = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, r.rolbypassrls,
                    pg_catalog.pg_has_role(current_user, 'token_admin', 'MEMBER'),
                    pg_catalog.pg_has_role(current_user, 'token_validator', 'MEMBER'),
                    pg_catalog.host(pg_catalog.inet_client_addr()),
                    pg_catalog.current_setting('is_superuser')
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .context(format!("who am I, as {role}"))?;
    check_eq!(r.get::<_, String>(0).as_str(), role, "current_user");
    check!(!r.get::<_, bool>(1) && !r.get::<_, bool>(2), "{role} must be neither superuser nor BYPASSRLS");
    check_eq!(r.get::<_, bool>(3), admin, "{role} is a member of token_admin");
    check!(r.get::<_, bool>(4), "{role} must be a member of token_validator");
    check_eq!(r.get::<_, Option<String>>(5).as_deref(), Some(s.host.as_str()), "{role}'s client address (TCP)");
    check_eq!(r.get::<_, String>(6).as_str(), "off", "is_superuser for {role}");
    secrets.errors_checked += 1; // the refused login
    say(
        "login",
        format!(
            "{role} over TCP {}:{} with a SCRAM password (a wrong one: SQLSTATE 28P01); not superuser{}",
            s.host,
            s.port,
            if admin { ", token_admin" } else { ", token_validator only" }
        ),
    );
    Ok(client)
}

// ---------------------------------------------------------------------------------------------
// Issuing tokens (rust_admin).

struct Issued {
    id: Uuid,
    token: String,
}

/// generate_token with named arguments; the token is recorded before it is looked at.
async fn generate(
    admin: &Client,
    secrets: &mut Secrets,
    account: &str,
    key_type: &str,
    name: Option<&str>,
    scopes: &[&str],
    expires_in: Option<&str>,
) -> Outcome<Issued> {
    let row = admin
        .query_one(
            "SELECT token_id, token FROM token.generate_token(account => $1, key_type => $2, name => $3,
                 scopes => $4, expires_in => $5::text::interval, metadata => $6::text::jsonb)",
            &[&account, &key_type, &name, &scopes, &expires_in, &r#"{"team": "rust"}"#],
        )
        .await
        .context(format!("generate_token({account}, {key_type})"))?;
    issued(row, secrets)
}

fn issued(row: Row, secrets: &mut Secrets) -> Outcome<Issued> {
    let token = secrets.record(row.try_get::<_, String>("token").context("the returned token")?)?;
    let id = row.try_get::<_, Uuid>("token_id").context("the returned token_id")?;
    Ok(Issued { id, token })
}

fn approx(t: Option<SystemTime>, expected: SystemTime, what: &str) -> Outcome {
    let t = t.context(format!("{what} is NULL"))?;
    let off = t.duration_since(expected).or_else(|e| Ok::<_, ()>(e.duration())).unwrap_or_default();
    check!(off < Duration::from_secs(300), "{what} is {off:?} away from what was expected");
    Ok(())
}

const DAY: Duration = Duration::from_secs(24 * 3600);

async fn step1_generate(su: &Client, admin: &Client, secrets: &mut Secrets) -> Outcome<Issued> {
    let t =
        generate(admin, secrets, ACCOUNT_A, "agent", Some("rust-client"), &["read", "write"], Some("30 days")).await?;
    check_shape(&t.token, DEV_PREFIX)?;

    // token_list: everything but the hash, and certainly not the token.
    let list = admin.prepare("SELECT * FROM token.token_list WHERE id = $1").await.context("prepare token_list")?;
    let columns: Vec<&str> = list.columns().iter().map(|c| c.name()).collect();
    for forbidden in ["token", "token_hash", "hash"] {
        check!(!columns.contains(&forbidden), "token.token_list has a column {forbidden:?}: {columns:?}");
    }
    let row = admin.query_one(&list, &[&t.id]).await.context("token_list row of the new token")?;
    check_eq!(row.get::<_, String>("hint"), hint(&t.token), "token_list.hint (prefix + 4 body characters)");
    check_eq!(row.get::<_, String>("status").as_str(), "active", "token_list.status");
    check_eq!(row.get::<_, String>("account").as_str(), ACCOUNT_A, "token_list.account");
    check_eq!(row.get::<_, String>("environment").as_str(), "dev", "token_list.environment");
    check_eq!(row.get::<_, Vec<String>>("scopes"), vec!["read".to_string(), "write".into()], "token_list.scopes");
    approx(row.get("expires_at"), SystemTime::now() + 30 * DAY, "token_list.expires_at")?;
    let whole: String = admin
        .query_one("SELECT l::text FROM token.token_list l WHERE l.id = $1", &[&t.id])
        .await
        .context("token_list row as text")?
        .get(0);
    secrets.absent_from("the token_list row", &whole)?;

    // The admin reads no hash: token.tokens is not granted to token_admin.
    let r = admin.query("SELECT token_hash FROM token.tokens", &[]).await;
    secrets.expect_error(
        "token_admin selecting token.tokens",
        r,
        &DENIED,
        Message::StartsWith("permission denied for table tokens"),
    )?;

    // What is stored is SHA-256 of the token: hash_token (by the admin, token as a bind
    // parameter) = SHA-256 computed here = token_hash read by the superuser.
    let by_function: Vec<u8> =
        admin.query_one("SELECT token.hash_token($1)", &[&t.token]).await.context("hash_token")?.get(0);
    let here = Sha256::digest(t.token.as_bytes()).to_vec();
    check!(by_function == here, "token.hash_token(token) is not the SHA-256 of the token");
    let stored = su
        .query_one("SELECT token_hash, t::text FROM token.tokens t WHERE id = $1", &[&t.id])
        .await
        .context("the stored row, as superuser")?;
    check!(stored.get::<_, Vec<u8>>(0) == here, "token.tokens.token_hash is not hash_token(token)");
    secrets.absent_from("the token.tokens row", &stored.get::<_, String>(1))?;
    say(
        "1 issue",
        format!(
            "{ADMIN} generated {}... ({} chars: prefix + 22 + 6, checksum verified here); token_list shows it without \
             hash; stored hash = hash_token = SHA-256; token.tokens denied to the admin (42501)",
            hint(&t.token),
            t.token.len()
        ),
    );
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// Validating (rust_app, prepared statements on one connection).

struct Validator {
    validate: Statement,
    with_caller: Statement,
    with_scope: Statement,
    check: Statement,
    check_caller: Statement,
}

#[derive(Debug)]
struct Identity {
    token_id: Uuid,
    account: String,
    key_type: String,
    environment: String,
    scopes: Option<Vec<String>>,
    name: Option<String>,
    expires_at: Option<SystemTime>,
    revoke_after: Option<SystemTime>,
    metadata: Option<serde_json::Value>,
}

impl Identity {
    fn from_row(row: &Row) -> Outcome<Identity> {
        let col = |n: &str| format!("identity column {n}");
        Ok(Identity {
            token_id: row.try_get("token_id").context(col("token_id"))?,
            account: row.try_get("account").context(col("account"))?,
            key_type: row.try_get("key_type").context(col("key_type"))?,
            environment: row.try_get("environment").context(col("environment"))?,
            scopes: row.try_get("scopes").context(col("scopes"))?,
            name: row.try_get("name").context(col("name"))?,
            expires_at: row.try_get("expires_at").context(col("expires_at"))?,
            revoke_after: row.try_get("revoke_after").context(col("revoke_after"))?,
            metadata: row.try_get("metadata").context(col("metadata"))?,
        })
    }
}

impl Validator {
    async fn prepare(app: &Client) -> Outcome<Validator> {
        let p = |sql: &'static str| async move { app.prepare(sql).await.context(format!("prepare {sql}")) };
        let v = Validator {
            validate: p("SELECT * FROM token.validate_token($1)").await?,
            with_caller: p("SELECT * FROM token.validate_token($1, caller_token => $2)").await?,
            with_scope: p("SELECT * FROM token.validate_token($1, required_scope => $2)").await?,
            check: p("SELECT valid, reason, token_id FROM token.check_token($1)").await?,
            check_caller: p("SELECT valid, reason, token_id FROM token.check_token($1, caller_token => $2)").await?,
        };
        let names: Vec<&str> = v.validate.columns().iter().map(|c| c.name()).collect();
        let expected = [
            "token_id",
            "account",
            "key_type",
            "environment",
            "scopes",
            "name",
            "expires_at",
            "revoke_after",
            "metadata",
            "parent_id",
            "uses_remaining",
            "rate_limit",
            "rate_remaining",
            "rate_reset_at",
            "deprecation",
            "sunset_at",
        ];
        check_eq!(names, expected, "columns of SELECT * FROM token.validate_token($1)");
        Ok(v)
    }

    async fn validate(&self, app: &Client, token: &str) -> Outcome<Identity> {
        let row =
            app.query_one(&self.validate, &[&token]).await.context(format!("validate_token({}...)", hint(token)))?;
        Identity::from_row(&row)
    }

    /// check_token's verdict: Ok(token_id) when valid, Err(reason) when not.
    async fn check(&self, app: &Client, token: Option<&str>, caller: Option<&str>) -> Outcome<Result<Uuid, String>> {
        let what = format!("check_token({})", token.map(hint).unwrap_or_else(|| "NULL".into()));
        let row = match caller {
            None => app.query_one(&self.check, &[&token]).await,
            Some(c) => app.query_one(&self.check_caller, &[&token, &c]).await,
        }
        .context(&what)?;
        let valid: bool = row.get(0);
        let reason: Option<String> = row.get(1);
        let id: Option<Uuid> = row.get(2);
        match (valid, reason, id) {
            (true, None, Some(id)) => Ok(Ok(id)),
            (false, Some(r), None) => Ok(Err(r)),
            (v, r, id) => {
                Err(harness::Failure(format!("{what}: inconsistent verdict valid={v} reason={r:?} token_id={id:?}")))
            }
        }
    }

    /// The connection and the prepared statement still work after an error.
    async fn still_usable(&self, app: &Client, live: &Issued, after: &str) -> Outcome {
        let id = self.validate(app, &live.token).await.map_err(|f| harness::Failure(format!("after {after}: {f}")))?;
        check_eq!(id.token_id, live.id, "validate on the same connection after {after}");
        Ok(())
    }
}

async fn cache_entries(app: &Client) -> Outcome<i64> {
    Ok(app.query_one("SELECT entries FROM token.cache_stats()", &[]).await.context("cache_stats")?.get(0))
}

async fn step2_validate(app: &Client, v: &Validator, t: &Issued) -> Outcome {
    let start = Instant::now();
    let mut id = v.validate(app, &t.token).await?;
    for _ in 1..VALIDATIONS {
        id = v.validate(app, &t.token).await?;
        check_eq!(id.token_id, t.id, "token_id from a repeated validation");
    }
    let per_call = start.elapsed() / VALIDATIONS as u32;
    check_eq!(id.token_id, t.id, "identity.token_id");
    check_eq!(id.account.as_str(), ACCOUNT_A, "identity.account");
    check_eq!(id.key_type.as_str(), "agent", "identity.key_type");
    check_eq!(id.environment.as_str(), "dev", "identity.environment");
    check_eq!(id.scopes, Some(vec!["read".to_string(), "write".into()]), "identity.scopes");
    check_eq!(id.name.as_deref(), Some("rust-client"), "identity.name");
    approx(id.expires_at, SystemTime::now() + 30 * DAY, "identity.expires_at")?;
    check_eq!(id.revoke_after, None, "identity.revoke_after of a token never rotated");
    check_eq!(id.metadata, Some(serde_json::json!({"team": "rust"})), "identity.metadata");
    check_eq!(v.check(app, Some(&t.token), None).await?, Ok(t.id), "check_token verdict");
    let entries = cache_entries(app).await?;
    check!(entries >= 1, "cache_stats().entries is {entries} after {VALIDATIONS} validations");
    say(
        "2 verify",
        format!(
            "{APP}: one prepared validate_token($1) run {VALIDATIONS} times ({per_call:?} per call), identity \
             {ACCOUNT_A}/agent/dev scopes {{read,write}} name, expiry, metadata right; check_token valid; \
             {entries} cache entr{}",
            if entries == 1 { "y" } else { "ies" }
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rotation.

async fn rotate(
    admin: &Client,
    secrets: &mut Secrets,
    sql: &str,
    arg: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Outcome<Issued> {
    let row = admin.query_one(sql, &[arg]).await.context(sql)?;
    issued(row, secrets)
}

async fn step3_rotate(
    admin: &Client,
    app: &Client,
    v: &Validator,
    secrets: &mut Secrets,
    first: &Issued,
) -> Outcome<(Issued, Issued, Issued)> {
    let second = rotate(admin, secrets, "SELECT token_id, token FROM token.rotate_token($1)", &first.id).await?;
    check_shape(&second.token, DEV_PREFIX)?;
    check!(second.id != first.id && second.token != first.token, "rotate_token returned the same token");

    // Both validate during the grace period (24 hours by default).
    let old = v.validate(app, &first.token).await?;
    check_eq!(old.token_id, first.id, "the rotated token's identity");
    approx(old.revoke_after, SystemTime::now() + DAY, "revoke_after of the rotated token (now + 24h)")?;
    let new = v.validate(app, &second.token).await?;
    check_eq!(new.token_id, second.id, "the successor's identity");
    check_eq!(new.account.as_str(), ACCOUNT_A, "the successor's account");
    check_eq!(new.scopes, old.scopes, "the successor's scopes");
    check_eq!(new.name, old.name, "the successor's name");
    check_eq!(new.metadata, old.metadata, "the successor's metadata");
    check_eq!(new.revoke_after, None, "the successor's revoke_after");

    // A token is rotated once.
    let r = admin.query("SELECT * FROM token.rotate_token($1)", &[&first.id]).await;
    let e = secrets.expect_error(
        "rotating an already rotated token",
        r,
        &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        Message::Exact(&format!("token {} has already been rotated", first.id)),
    )?;
    check!(
        e.hint().is_some_and(|h| h.contains(&second.id.to_string())),
        "the hint should name the successor: {:?}",
        e.hint()
    );

    // Who may rotate: token_admin has rotate_token and rotate_own_token; token_validator neither.
    let r = app.query("SELECT * FROM token.rotate_token($1)", &[&second.id]).await;
    secrets.expect_error(
        "rust_app calling rotate_token",
        r,
        &DENIED,
        Message::Exact("permission denied for function rotate_token"),
    )?;
    v.still_usable(app, &second, "a refused rotate_token").await?;
    let r = app.query("SELECT * FROM token.rotate_own_token($1, grace => '0')", &[&second.token]).await;
    secrets.expect_error(
        "rust_app calling rotate_own_token",
        r,
        &DENIED,
        Message::Exact("permission denied for function rotate_own_token"),
    )?;
    v.still_usable(app, &second, "a refused rotate_own_token").await?;
    let third =
        rotate(admin, secrets, "SELECT token_id, token FROM token.rotate_own_token($1, grace => '0')", &second.token)
            .await?;
    check_shape(&third.token, DEV_PREFIX)?;

    // grace => '0': the second token is refused at once; the first is still in its grace period.
    let r = app.query_one(&v.validate, &[&second.token]).await;
    let e = secrets.expect_error(
        "the token rotated with grace 0",
        r,
        &REFUSED,
        Message::Exact("token rejected: revoked"),
    )?;
    check!(
        e.detail().is_some_and(|d| d.contains(&hint(&second.token))),
        "the detail should name the hint: {:?}",
        e.detail()
    );
    check_eq!(
        v.check(app, Some(&second.token), None).await?,
        Err("revoked".to_string()),
        "check_token after rotation with grace 0"
    );
    let id = v.validate(app, &third.token).await?;
    check_eq!(id.token_id, third.id, "the self-rotated successor's identity");
    check_eq!(id.account.as_str(), ACCOUNT_A, "the self-rotated successor's account");
    v.still_usable(app, first, "refusing the token rotated with grace 0").await?;

    let statuses = admin
        .query(
            "SELECT id, status, rotated_from FROM token.token_list WHERE id = ANY($1) ORDER BY created_at",
            &[&vec![first.id, second.id, third.id]],
        )
        .await
        .context("token_list statuses after rotation")?;
    let got: Vec<(Uuid, String, Option<Uuid>)> = statuses.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let expected = vec![
        (first.id, "rotating".to_string(), None),
        (second.id, "revoked".to_string(), Some(first.id)),
        (third.id, "active".to_string(), Some(second.id)),
    ];
    check_eq!(got, expected, "token_list (id, status, rotated_from) after two rotations");
    say(
        "3 rotate",
        format!(
            "{ADMIN} rotate_token: old {}... and new {}... both validate (old until now + 24h); rotating twice: 55000; \
             {APP} refused rotate_token and rotate_own_token (42501); {ADMIN} rotate_own_token(grace => 0): {}... \
             refused at once as revoked, successor {}... validates",
            hint(&first.token),
            hint(&second.token),
            hint(&second.token),
            hint(&third.token)
        ),
    );
    Ok((Issued { id: first.id, token: first.token.clone() }, second, third))
}

// ---------------------------------------------------------------------------------------------
// Revocation, seen by a warm cache on an open connection.

async fn step4_revoke(admin: &Client, app: &Client, v: &Validator, secrets: &mut Secrets, t: &Issued) -> Outcome {
    for _ in 0..5 {
        check_eq!(v.validate(app, &t.token).await?.token_id, t.id, "validation before revoke");
    }
    let warm = cache_entries(app).await?;
    check!(warm >= 1, "the app's cache is empty before revoke ({warm} entries)");

    let revoked: bool = admin
        .query_one("SELECT token.revoke_token($1, reason => 'rust e2e')", &[&t.id])
        .await
        .context("revoke_token")?
        .get(0);
    check!(revoked, "revoke_token returned false for a live token");

    // The very next call on the same connection, same prepared statement.
    let r = app.query_one(&v.validate, &[&t.token]).await;
    let e =
        secrets.expect_error("validate right after revoke", r, &REFUSED, Message::Exact("token rejected: revoked"))?;
    check!(
        e.detail().is_some_and(|d| d.contains(&hint(&t.token))),
        "the detail should name the hint: {:?}",
        e.detail()
    );
    check_eq!(v.check(app, Some(&t.token), None).await?, Err("revoked".to_string()), "check_token after revoke");

    let again: bool =
        admin.query_one("SELECT token.revoke_token($1)", &[&t.id]).await.context("revoke_token again")?.get(0);
    check!(!again, "revoke_token of a revoked token should return false");
    let row = admin
        .query_one("SELECT status, revoked_reason FROM token.token_list WHERE id = $1", &[&t.id])
        .await
        .context("token_list after revoke")?;
    check_eq!(
        (row.get::<_, String>(0), row.get::<_, Option<String>>(1)),
        ("revoked".to_string(), Some("rust e2e".to_string())),
        "token_list status and reason"
    );
    say(
        "4 revoke",
        format!(
            "{ADMIN} revoked {}... while {APP}'s cache held {warm} entr{}: its very next validate on the same \
             prepared statement: 28000 \"token rejected: revoked\"; check_token reason revoked; second revoke false",
            hint(&t.token),
            if warm == 1 { "y" } else { "ies" }
        ),
    );

    // A whole account at once: every token of it is refused from the next call.
    let mut account_c = Vec::new();
    for i in 0..3 {
        let c = generate(admin, secrets, ACCOUNT_C, "agent", Some(&format!("rust-c{i}")), &["read"], Some("1 hour"))
            .await?;
        check_eq!(
            v.validate(app, &c.token).await?.account.as_str(),
            ACCOUNT_C,
            "validation before revoke_account_tokens"
        );
        account_c.push(c);
    }
    let n: i64 = admin
        .query_one("SELECT token.revoke_account_tokens($1, reason => 'rust e2e: account')", &[&ACCOUNT_C])
        .await
        .context("revoke_account_tokens")?
        .get(0);
    check_eq!(n, 3, "tokens revoked by revoke_account_tokens");
    for c in &account_c {
        let r = app.query_one(&v.validate, &[&c.token]).await;
        secrets.expect_error(
            "validate after revoke_account_tokens",
            r,
            &REFUSED,
            Message::Exact("token rejected: revoked"),
        )?;
    }
    say(
        "4 revoke",
        format!("{ADMIN} revoke_account_tokens({ACCOUNT_C}): 3 tokens, each refused as revoked on {APP}'s next call"),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Refusals as the application sees them.

#[allow(clippy::too_many_arguments)]
async fn step5_refusals(
    su: &Client,
    admin: &Client,
    app: &Client,
    v: &Validator,
    secrets: &mut Secrets,
    rotating: &Issued,
    rotated_out: &Issued,
    revoked: &Issued,
) -> Outcome<Issued> {
    let live = generate(admin, secrets, ACCOUNT_A, "agent", Some("rust-agent-a"), &["read"], None).await?;
    let agent_b = generate(admin, secrets, ACCOUNT_B, "agent", Some("rust-agent-b"), &["read"], None).await?;
    let mid_a = generate(admin, secrets, ACCOUNT_A, "mid", Some("rust-mid-a"), &[], None).await?;
    check_shape(&mid_a.token, MID_PREFIX)?;

    // A real prod token: generated by the superuser with token.environment = 'prod' for the
    // transaction (a superuser-only setting).
    su.batch_execute("BEGIN; SET LOCAL token.environment = 'prod'")
        .await
        .context("BEGIN; SET LOCAL token.environment = 'prod'")?;
    let row = su
        .query_one("SELECT token_id, token FROM token.generate_token($1, 'agent')", &[&ACCOUNT_A])
        .await
        .context("generate a prod token as superuser")?;
    su.batch_execute("COMMIT").await.context("COMMIT")?;
    let prod = issued(row, secrets)?;
    check_shape(&prod.token, PROD_PREFIX)?;

    let mut tampered = live.token.clone();
    let last = tampered.pop().context("a token's last character")?;
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let unknown = secrets.record(compose("rsx-", "unknown"))?;
    let not_issued = secrets.record(compose(DEV_PREFIX, "not-issued"))?;
    let huge = live.token.repeat((10 << 20) / live.token.len() + 1);

    let env_msg = "Token environment mismatch: prod token used in dev";
    let cases: Vec<(&str, Option<&str>, &str, String)> = vec![
        ("a wrong checksum", Some(&tampered), "bad_checksum", "token rejected: bad_checksum".into()),
        ("an unregistered prefix", Some(&unknown), "unknown_prefix", "token rejected: unknown_prefix".into()),
        ("a prod token", Some(&prod.token), "environment_mismatch", env_msg.into()),
        ("a well-formed token never issued", Some(&not_issued), "not_found", "token rejected: not_found".into()),
        ("NULL", None, "malformed", "token rejected: malformed".into()),
        ("an empty string", Some(""), "malformed", "token rejected: malformed".into()),
        ("a 10 MB string (the live token repeated)", Some(&huge), "malformed", "token rejected: malformed".into()),
        (
            "a token revoked by rotation with grace 0",
            Some(&rotated_out.token),
            "revoked",
            "token rejected: revoked".into(),
        ),
    ];
    for (what, token, reason, message) in &cases {
        let r = app.query_one(&v.validate, &[token]).await;
        secrets.expect_error(&format!("validate_token with {what}"), r, &REFUSED, Message::Exact(message))?;
        v.still_usable(app, &live, what).await?;
        check_eq!(v.check(app, *token, None).await?, Err(reason.to_string()), "check_token reason for {what}");
    }
    say(
        "5 refuse",
        format!(
            "{APP}: 28000 with the reason in the message for {}; \"{env_msg}\"; the connection and prepared \
             statement work after each",
            cases
                .iter()
                .filter(|c| c.2 != "environment_mismatch")
                .map(|c| c.2)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    // The caller-token rule: mid may validate agent, same account only; agent may not validate agent.
    let id = Identity::from_row(
        &app.query_one(&v.with_caller, &[&live.token, &mid_a.token])
            .await
            .context("validate agent A with caller mid A")?,
    )?;
    check_eq!((id.token_id, id.account.as_str()), (live.id, ACCOUNT_A), "agent A validated by mid A");
    check_eq!(
        v.check(app, Some(&live.token), Some(&mid_a.token)).await?,
        Ok(live.id),
        "check_token agent A, caller mid A"
    );
    let caller_cases: [(&str, &str, &str, &str); 3] = [
        ("agent B with caller mid A", agent_b.token.as_str(), mid_a.token.as_str(), "cross_account"),
        ("agent A with caller agent A", live.token.as_str(), rotating.token.as_str(), "caller_not_permitted"),
        ("agent A with a revoked caller", live.token.as_str(), revoked.token.as_str(), "caller_invalid"),
    ];
    for (what, token, caller, reason) in caller_cases {
        let r = app.query_one(&v.with_caller, &[&token, &caller]).await;
        secrets.expect_error(
            &format!("validate {what}"),
            r,
            &REFUSED,
            Message::Exact(&format!("token rejected: {reason}")),
        )?;
        v.still_usable(app, &live, what).await?;
        check_eq!(
            v.check(app, Some(token), Some(caller)).await?,
            Err(reason.to_string()),
            "check_token reason for {what}"
        );
    }
    let r = app.query_one(&v.with_scope, &[&live.token, &"write"]).await;
    secrets.expect_error(
        "validate a read-only token requiring write",
        r,
        &REFUSED,
        Message::Exact("token rejected: insufficient_scope"),
    )?;
    let id = Identity::from_row(
        &app.query_one(&v.with_scope, &[&live.token, &"read"]).await.context("validate requiring read")?,
    )?;
    check_eq!(id.token_id, live.id, "validate with required_scope => read");
    say(
        "5 caller",
        format!(
            "mid {}... validates agent {}... of {ACCOUNT_A}; refused: cross_account ({ACCOUNT_B}), caller_not_permitted \
             (agent caller), caller_invalid (revoked caller), insufficient_scope (write on a read token)",
            hint(&mid_a.token),
            hint(&live.token)
        ),
    );
    Ok(live)
}

// ---------------------------------------------------------------------------------------------
// What the application role may not do.

async fn step6_denied(app: &Client, v: &Validator, secrets: &mut Secrets, live: &Issued) -> Outcome {
    let cases: [(&str, &str, &str); 6] = [
        (
            "generate_token",
            "SELECT * FROM token.generate_token('rust-acct-a', 'agent')",
            "permission denied for function generate_token",
        ),
        (
            "revoke_account_tokens",
            "SELECT token.revoke_account_tokens('rust-acct-a')",
            "permission denied for function revoke_account_tokens",
        ),
        (
            "register_prefix",
            "SELECT token.register_prefix('rsapp-', 'agent', 'dev')",
            "permission denied for function register_prefix",
        ),
        ("SELECT token.tokens", "SELECT count(*) FROM token.tokens", "permission denied for table tokens"),
        ("SELECT token.events", "SELECT count(*) FROM token.events", "permission denied for table events"),
        ("SELECT token.token_list", "SELECT count(*) FROM token.token_list", "permission denied for view token_list"),
    ];
    for (what, sql, message) in cases {
        let r = app.query(sql, &[]).await;
        secrets.expect_error(&format!("{APP}: {what}"), r, &DENIED, Message::Exact(message))?;
        v.still_usable(app, live, what).await?;
    }
    // revoke_token with the live token's id, as an application would try it.
    let r = app.query("SELECT token.revoke_token($1)", &[&live.id]).await;
    secrets.expect_error(
        &format!("{APP}: revoke_token(live id)"),
        r,
        &DENIED,
        Message::Exact("permission denied for function revoke_token"),
    )?;

    let setting = "permission denied to set parameter \"token.environment\"";
    let r = app.batch_execute("SET token.environment = 'prod'").await;
    secrets.expect_error(&format!("{APP}: SET token.environment"), r, &DENIED, Message::Exact(setting))?;
    let r = app.query("SELECT pg_catalog.set_config('token.environment', 'prod', false)", &[]).await;
    secrets.expect_error(&format!("{APP}: set_config('token.environment')"), r, &DENIED, Message::Exact(setting))?;
    let env: String = app.query_one("SHOW token.environment", &[]).await.context("SHOW token.environment")?.get(0);
    check_eq!(env.as_str(), "dev", "token.environment after the refused SETs");
    v.still_usable(app, live, "the refused SETs").await?;
    say(
        "6 deny",
        format!(
            "{APP}: 42501 for generate_token, revoke_token, revoke_account_tokens, register_prefix, token.tokens, \
             token.events, token.token_list, SET and set_config of token.environment (still dev)"
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// No token anywhere the test can look: error fields (checked all along), events, server log.

async fn step7_no_token_leaks(s: &Settings, admin: &Client, secrets: &Secrets) -> Outcome {
    let flushed: bool =
        admin.query_one("SELECT token.flush_events('10 seconds')", &[]).await.context("flush_events")?.get(0);
    check!(flushed, "the event writer did not drain within 10 seconds");
    let rows = admin
        .query(
            "SELECT reason, e::text, application_name, client_addr FROM token.events e
             WHERE event = 'refused' AND db_user = $1",
            &[&APP],
        )
        .await
        .context("read the app's refusal events")?;
    let mut reasons = BTreeSet::new();
    for r in &rows {
        reasons.insert(r.get::<_, Option<String>>(0).unwrap_or_default());
        secrets.absent_from("a token.events row", &r.get::<_, String>(1))?;
        check_eq!(
            r.get::<_, Option<String>>(2).as_deref(),
            Some(harness::APPLICATION_NAME),
            "token.events.application_name"
        );
        check_eq!(r.get::<_, Option<String>>(3).as_deref(), Some(s.host.as_str()), "token.events.client_addr");
    }
    let expected: BTreeSet<String> = [
        "bad_checksum",
        "caller_invalid",
        "caller_not_permitted",
        "cross_account",
        "environment_mismatch",
        "insufficient_scope",
        "malformed",
        "not_found",
        "revoked",
        "unknown_prefix",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    check_eq!(reasons, expected, "refusal reasons recorded in token.events for {APP}");

    let path = format!("{}/server.log", s.data);
    let log = std::fs::read(&path).context(format!("read {path}"))?;
    let log = String::from_utf8_lossy(&log);
    let marker = format!("{APP}@{}", s.database);
    check!(log.contains(&marker), "{path} has no line from {marker}: is it the right log?");
    for t in secrets.tokens() {
        check!(!log.contains(body(t)), "{path} contains the raw token {}...", hint(t));
    }
    say(
        "7 leaks",
        format!(
            "{} expected errors carried no token in message/detail/hint/context; {} refusal events (user, address, \
             application right) with every reason and no token; {path} ({:.1} MB, log_statement = all) holds none of the {} tokens",
            secrets.errors_checked,
            rows.len(),
            log.len() as f64 / 1e6,
            secrets.count()
        ),
    );
    Ok(())
}
