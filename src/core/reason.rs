//! Why a token is refused: one stable word per reason, the SQLSTATE every refusal carries,
//! and the message text. These words are API: applications match on them, events store
//! them, the README documents them. Never add the token to a message: the prefix and a
//! 4-character hint at most. Pure: no Postgres.

use std::fmt;

/// SQLSTATE 28000, invalid_authorization_specification: every refusal raises it.
pub const REFUSAL_SQLSTATE: &str = "28000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    Malformed = 1,
    BadChecksum,
    UnknownPrefix,
    EnvironmentMismatch,
    NotFound,
    Expired,
    Revoked,
    CallerInvalid,
    CallerNotPermitted,
    CrossAccount,
    InsufficientScope,
    TaintedSession,
    Disabled,
    ParentInvalid,
    NetworkNotAllowed,
    RateLimited,
    UsageExceeded,
    UnknownIssuer,
    BadSignature,
    LegacyTokenRetired,
    FamilyRevoked,
}

impl Reason {
    /// Every reason, in the order the checks run (a caller token is checked first; any
    /// refusal of it is `CallerInvalid`).
    pub const ALL: [Reason; 21] = [
        Reason::Malformed,
        Reason::BadChecksum,
        Reason::UnknownPrefix,
        Reason::UnknownIssuer,
        Reason::BadSignature,
        Reason::CallerNotPermitted,
        Reason::EnvironmentMismatch,
        Reason::LegacyTokenRetired,
        Reason::NotFound,
        Reason::FamilyRevoked,
        Reason::Revoked,
        Reason::Expired,
        Reason::Disabled,
        Reason::ParentInvalid,
        Reason::NetworkNotAllowed,
        Reason::CrossAccount,
        Reason::InsufficientScope,
        Reason::RateLimited,
        Reason::UsageExceeded,
        Reason::CallerInvalid,
        Reason::TaintedSession,
    ];

    /// Room for reasons in fixed per-reason arrays (metrics, the events table's overflow
    /// rows): every discriminant is below it.
    pub const SLOTS: usize = 32;

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::BadChecksum => "bad_checksum",
            Reason::UnknownPrefix => "unknown_prefix",
            Reason::EnvironmentMismatch => "environment_mismatch",
            Reason::NotFound => "not_found",
            Reason::Expired => "expired",
            Reason::Revoked => "revoked",
            Reason::CallerInvalid => "caller_invalid",
            Reason::CallerNotPermitted => "caller_not_permitted",
            Reason::CrossAccount => "cross_account",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::TaintedSession => "tainted_session",
            Reason::Disabled => "disabled",
            Reason::ParentInvalid => "parent_invalid",
            Reason::NetworkNotAllowed => "network_not_allowed",
            Reason::RateLimited => "rate_limited",
            Reason::UsageExceeded => "usage_exceeded",
            Reason::UnknownIssuer => "unknown_issuer",
            Reason::BadSignature => "bad_signature",
            Reason::LegacyTokenRetired => "legacy_token_retired",
            Reason::FamilyRevoked => "family_revoked",
        }
    }

    pub fn from_u8(v: u8) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| *r as u8 == v)
    }

    /// One line for the README and `token.reasons()`.
    pub fn explain(self) -> &'static str {
        match self {
            Reason::Malformed => "NULL, empty, over 256 bytes, characters outside [A-Za-z0-9_-], or not <prefix><22 chars><6 chars> (a JWT: over 8 KB, bad base64 or JSON, a missing or bad claim)",
            Reason::BadChecksum => "well formed, but the checksum does not match: a typo or a truncation",
            Reason::UnknownPrefix => "the prefix is not registered in this database",
            Reason::EnvironmentMismatch => "the prefix belongs to another environment than token.environment",
            Reason::NotFound => "no token with this hash exists",
            Reason::Expired => "past expires_at (a JWT: past exp, or before nbf, beyond token.jwt_leeway)",
            Reason::Revoked => "revoked, or past revoke_after (the end of a rotation's grace window)",
            Reason::CallerInvalid => "the caller token given with caller_token is itself refused",
            Reason::CallerNotPermitted => "the caller's key type may not validate the presented key type",
            Reason::CrossAccount => "the caller and the presented token belong to different accounts",
            Reason::InsufficientScope => "the token lacks the required scope",
            Reason::TaintedSession => "authenticate: the connection carries temporary objects or a WITH HOLD cursor made under another identity",
            Reason::Disabled => "disabled by an administrator (disable_token); enable_token brings it back",
            Reason::ParentInvalid => "a token derive_token made: its parent (or an ancestor) is revoked, disabled, expired or gone",
            Reason::NetworkNotAllowed => "the client address is outside the networks the token or its key type allows",
            Reason::RateLimited => "the token's rate limit is reached for the current window; retry when it resets",
            Reason::UsageExceeded => "the token's usage cap is spent (until its next refill, if it has one)",
            Reason::UnknownIssuer => "a JWT: no legacy issuer is registered for its iss, or its iss or aud is not the registered one",
            Reason::BadSignature => "a JWT: unsigned (alg none), an alg its issuer is not registered for, no matching key, or a signature that does not verify",
            Reason::LegacyTokenRetired => "a JWT of a legacy issuer presented at or after the issuer's cut-off; the detail carries the migration message",
            Reason::FamilyRevoked => "a token rotated away was presented after its grace window (key type with reuse_detection): it and its whole rotation family are revoked",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The primary message for a refusal. The environment mismatch keeps the wording its users
/// asked for; the others name the reason word so logs and clients can match on it.
pub fn message(reason: Reason, token_environment: Option<&str>, database_environment: Option<&str>) -> String {
    match reason {
        Reason::EnvironmentMismatch => format!(
            "Token environment mismatch: {} token used in {}",
            token_environment.unwrap_or("unknown"),
            database_environment.unwrap_or("(unset)")
        ),
        other => format!("token rejected: {other}"),
    }
}

/// What to do about a refusal, when the fix is the operator's rather than the caller's: a
/// database without `token.environment` refuses every token, which looks like an attack on
/// the tokens but is a missing setting.
pub fn hint(reason: Reason, database_environment: Option<&str>) -> Option<&'static str> {
    match (reason, database_environment) {
        (Reason::EnvironmentMismatch, None) => Some(
            "token.environment is not set here, so every token is refused; a superuser sets it \
             (ALTER DATABASE ... SET token.environment = 'prod', or ALTER SYSTEM).",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unset_environment_gets_a_hint() {
        assert!(hint(Reason::EnvironmentMismatch, None).is_some_and(|h| h.contains("token.environment")));
        assert_eq!(hint(Reason::EnvironmentMismatch, Some("prod")), None);
        for r in Reason::ALL {
            if r != Reason::EnvironmentMismatch {
                assert_eq!(hint(r, None), None, "{r:?}");
            }
        }
    }

    #[test]
    fn words_are_unique_and_round_trip_through_u8() {
        let mut words: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        words.sort();
        words.dedup();
        assert_eq!(words.len(), Reason::ALL.len());
        for r in Reason::ALL {
            assert_eq!(Reason::from_u8(r as u8), Some(r));
        }
        assert_eq!(Reason::from_u8(0), None);
        assert!(Reason::ALL.iter().all(|r| (*r as usize) < Reason::SLOTS));
    }

    #[test]
    fn environment_mismatch_message_names_both_environments() {
        assert_eq!(
            message(Reason::EnvironmentMismatch, Some("dev"), Some("prod")),
            "Token environment mismatch: dev token used in prod"
        );
        assert_eq!(message(Reason::Revoked, None, None), "token rejected: revoked");
    }
}
