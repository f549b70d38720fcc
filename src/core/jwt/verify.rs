//! Whether a decoded JWT is acceptable for an issuer, and the claims it yields.

use serde_json::Value;

use super::*;

/// What an issuer's tokens must say, beyond a good signature and a live `exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectations<'a> {
    /// The `iss` claim must equal this, when set.
    pub issuer: Option<&'a str>,
    /// The `aud` claim (a string or an array of strings) must name this, when set. When not
    /// set, a token carrying `aud` is refused: RFC 7519 section 4.1.3 forbids accepting a
    /// token addressed to an audience the recipient does not identify with.
    pub audience: Option<&'a str>,
    /// The claim holding the account id (a string or an integer), e.g. "sub".
    pub account_claim: &'a str,
    /// The claim holding the scopes (a space-separated string or an array of strings), e.g.
    /// "scope"; absent means no scopes.
    pub scopes_claim: &'a str,
}

/// What an accepted JWT grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// In its one spelling (`crate::account::canonical`), as every account in pg_token.
    pub account: String,
    /// Duplicates dropped, first kept.
    pub scopes: Vec<String>,
    pub jti: Option<String>,
    /// Seconds since the Unix epoch (fractions dropped).
    pub exp: i64,
    pub iat: Option<i64>,
    pub issuer_claim: Option<String>,
    pub kid: Option<String>,
}

/// Decides a decoded JWT against its issuer's keys and expectations at `now_s` (seconds since
/// the Unix epoch), allowing `leeway_s` seconds of clock skew on `exp` and `nbf` (a negative
/// leeway counts as 0). The algorithm and key are settled, and the signature checked, before
/// any claim is looked at, so an unsigned or forged token learns nothing about the rules.
pub fn verify(
    decoded: &Decoded<'_>,
    keys: &IssuerKeys,
    now_s: i64,
    leeway_s: i64,
    expect: &Expectations<'_>,
) -> Result<Claims, JwtError> {
    judge(decoded, keys, now_s, leeway_s, expect, true)
}

/// `verify` without the `exp` rule: an expired JWT that meets every other rule yields its
/// claims (their `exp` included). For a caller that judges `exp` itself after rules that come
/// first in the order of reasons: a legacy JWT that is revoked and expired is `revoked`,
/// whether its verified claims were cached before it expired or not (`verdict::resolve_legacy`).
pub fn verify_except_exp(
    decoded: &Decoded<'_>,
    keys: &IssuerKeys,
    now_s: i64,
    leeway_s: i64,
    expect: &Expectations<'_>,
) -> Result<Claims, JwtError> {
    judge(decoded, keys, now_s, leeway_s, expect, false)
}

fn judge(
    decoded: &Decoded<'_>,
    keys: &IssuerKeys,
    now_s: i64,
    leeway_s: i64,
    expect: &Expectations<'_>,
    judge_exp: bool,
) -> Result<Claims, JwtError> {
    let alg_name = decoded.header.alg.as_str();
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(JwtError::AlgNone);
    }
    let alg = Algorithm::from_name(alg_name).ok_or(JwtError::UnsupportedAlgorithm)?;
    // The algorithm-confusion defence: the token's alg must be one the issuer was registered
    // with, whatever key material an attacker believes was used.
    if !keys.algorithms.contains(&alg) {
        return Err(JwtError::AlgorithmNotAllowed);
    }
    let key = keys
        .select(alg, decoded.header.kid.as_deref())
        .ok_or(JwtError::NoMatchingKey)?;
    if !key.verifies(decoded.signing_input, &decoded.signature) {
        return Err(JwtError::BadSignature);
    }

    let claims = &decoded.claims;
    let leeway = leeway_s.max(0);
    let exp = match claims.get("exp") {
        None => return Err(JwtError::MissingExp),
        Some(v) => numeric_date(v).ok_or(JwtError::BadExp)?,
    };
    // RFC 7519 section 4.1.4: not accepted "on or after" exp, as pg_token's own tokens.
    if judge_exp && now_s >= exp.saturating_add(leeway) {
        return Err(JwtError::Expired);
    }
    if let Some(v) = claims.get("nbf") {
        let nbf = numeric_date(v).ok_or(JwtError::BadNbf)?;
        if now_s.saturating_add(leeway) < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    let iat = match claims.get("iat") {
        None => None,
        Some(v) => Some(numeric_date(v).ok_or(JwtError::BadIat)?),
    };

    let issuer_claim = match claims.get("iss") {
        None => None,
        Some(Value::String(s)) if s.len() <= MAX_ISSUER_BYTES => Some(s.as_str()),
        Some(_) => return Err(JwtError::BadIssuer),
    };
    if let Some(expected) = expect.issuer {
        if issuer_claim != Some(expected) {
            return Err(JwtError::IssuerMismatch);
        }
    }
    match (expect.audience, claims.get("aud")) {
        (None, None) => {}
        (None, Some(_)) => return Err(JwtError::UnexpectedAudience),
        (Some(expected), aud) => {
            let names = match aud {
                Some(Value::String(s)) => s == expected,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expected)),
                _ => false,
            };
            if !names {
                return Err(JwtError::AudienceMismatch);
            }
        }
    }

    let account = account_of(claims.get(expect.account_claim))?;
    let scopes = scopes_of(claims.get(expect.scopes_claim))?;
    let jti = match claims.get("jti") {
        None => None,
        Some(Value::String(s)) if s.len() <= MAX_JTI_BYTES => Some(s.clone()),
        Some(_) => return Err(JwtError::BadJti),
    };
    Ok(Claims {
        account,
        scopes,
        jti,
        exp,
        iat,
        issuer_claim: issuer_claim.map(str::to_owned),
        kid: decoded.header.kid.clone(),
    })
}

/// A NumericDate (RFC 7519 section 2): a JSON number of seconds, possibly fractional (the
/// fraction is dropped). `None` for anything else or beyond i64.
fn numeric_date(v: &Value) -> Option<i64> {
    let Value::Number(n) = v else { return None };
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    if n.is_u64() {
        return None;
    }
    // 2^63 as f64; below it, and at or above -2^63, flooring fits in an i64.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    n.as_f64()
        .filter(|f| f.is_finite() && *f >= -LIMIT && *f < LIMIT)
        .map(|f| f.floor() as i64)
}

fn account_of(v: Option<&Value>) -> Result<String, JwtError> {
    let given = match v {
        None => return Err(JwtError::MissingAccount),
        Some(Value::String(s)) => crate::limits::account(s),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            crate::limits::account(&n.to_string())
        }
        Some(_) => return Err(JwtError::BadAccount),
    };
    given.map_err(|_| JwtError::BadAccount)
}

fn scopes_of(v: Option<&Value>) -> Result<Vec<String>, JwtError> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |s: &str| -> Result<(), JwtError> {
        if s.len() > MAX_SCOPE_BYTES {
            return Err(JwtError::ScopeTooLong);
        }
        if s.is_empty() || s.chars().any(char::is_control) {
            return Err(JwtError::BadScopes);
        }
        if !out.iter().any(|o| o == s) {
            if out.len() == MAX_SCOPES {
                return Err(JwtError::TooManyScopes);
            }
            out.push(s.to_owned());
        }
        Ok(())
    };
    match v {
        None => {}
        // RFC 8693 section 4.2: "scope" is space-delimited; runs of spaces separate nothing.
        Some(Value::String(s)) => {
            for scope in s.split(' ').filter(|p| !p.is_empty()) {
                add(scope)?;
            }
        }
        Some(Value::Array(list)) => {
            if list.len() > MAX_SCOPES {
                return Err(JwtError::TooManyScopes);
            }
            for item in list {
                let Value::String(scope) = item else {
                    return Err(JwtError::BadScopes);
                };
                add(scope)?;
            }
        }
        Some(_) => return Err(JwtError::BadScopes),
    }
    Ok(out)
}
