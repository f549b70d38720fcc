//! Legacy JWT issuers: the rules that turn a presented JWT into a token state the verdict
//! rules judge like any other ("Migrating from JWTs" in the README). An issuer is what a
//! database administrator registered (`token.register_legacy_issuer`): its keys, the claims
//! that hold the account and scopes, the key type and environment its JWTs count as, and the
//! cut-off after which they are refused as `legacy_token_retired`.
//!
//! Routing: a JWT goes to the issuer whose `issuer` equals its (unverified) `iss`; when none
//! does, to the issuers registered without an `issuer`. Nothing is believed before `jwt::verify`
//! accepts the signature. Pure: no Postgres, no clock.

use std::collections::{HashMap, HashSet};

use crate::clock::Micros;
use crate::hash::token_hash;
use crate::jwt::{self, Claims, Expectations, IssuerKeys, JwtError};
use crate::reason::Reason;

/// One registered legacy issuer.
#[derive(Debug)]
pub struct Issuer {
    pub name: String,
    pub keys: IssuerKeys,
    /// The `iss` its JWTs carry (and must carry), when registered.
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub account_claim: String,
    pub scopes_claim: String,
    pub key_type: String,
    pub environment: String,
    pub cutoff_at: Micros,
    pub message: Option<String>,
}

/// What a token state carries when it is a legacy JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyState {
    pub issuer: String,
    pub jti: Option<String>,
    pub issued_at: Option<Micros>,
    pub cutoff_at: Micros,
    pub message: Option<String>,
}

/// Revocations of legacy JWTs: by (issuer, jti), and by account (every JWT of the account
/// issued before the revocation, or without `iat`).
#[derive(Debug, Default, Clone)]
pub struct Revocations {
    /// Revoked jtis by issuer (looked up without allocating, on every call).
    pub jtis: HashMap<String, HashSet<String>>,
    pub accounts: HashMap<String, Micros>,
}

impl Revocations {
    pub fn revoke_jti(&mut self, issuer: String, jti: String) {
        self.jtis.entry(issuer).or_default().insert(jti);
    }

    /// Why a legacy JWT is revoked, or None.
    pub fn check(&self, account: &str, legacy: &LegacyState) -> Option<&'static str> {
        if let Some(jti) = &legacy.jti {
            if self.jtis.get(&legacy.issuer).is_some_and(|j| j.contains(jti)) {
                return Some("was revoked (by its jti)");
            }
        }
        match (self.accounts.get(account), legacy.issued_at) {
            (Some(at), Some(iat)) if iat < *at => Some("was issued before its account's tokens were revoked"),
            (Some(_), None) => Some("has no iat and its account's tokens were revoked"),
            _ => None,
        }
    }
}

/// The reason a JWT refusal is reported under.
pub fn reason_of(e: JwtError) -> Reason {
    match e {
        JwtError::AlgNone
        | JwtError::UnsupportedAlgorithm
        | JwtError::AlgorithmNotAllowed
        | JwtError::NoMatchingKey
        | JwtError::BadSignature => Reason::BadSignature,
        JwtError::Expired | JwtError::NotYetValid => Reason::Expired,
        JwtError::IssuerMismatch | JwtError::AudienceMismatch | JwtError::UnexpectedAudience => Reason::UnknownIssuer,
        _ => Reason::Malformed,
    }
}

/// A JWT that verified, and for which issuer.
pub struct Verified<'r> {
    pub issuer: &'r Issuer,
    pub claims: Claims,
}

/// A refused JWT: the reason, a detail (never any part of the token but the sanitised `iss`
/// and `jti` of `jwt::issuer_hint`), and the issuer it was routed to, if any.
pub struct Rejected<'r> {
    pub reason: Reason,
    pub detail: String,
    pub issuer: Option<&'r Issuer>,
    /// The `jti` the JWT claims (unverified), for the event's hint.
    pub jti: Option<String>,
}

/// What events show of a JWT's `jti`: "jti=" and its first four characters (as a token's hint
/// shows four of its body), anything outside `[A-Za-z0-9._:-]` as '?'.
pub fn jti_hint(jti: &str) -> String {
    let shown: String = jti
        .chars()
        .take(4)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') { c } else { '?' })
        .collect();
    format!("jti={shown}")
}

/// Verifies a JWT against the registered issuers at `now` with `leeway_s` of clock skew on
/// `nbf`; `exp` is left to the caller (an expired JWT is returned verified).
pub fn verify<'r>(token: &[u8], issuers: &'r [Issuer], now: Micros, leeway_s: i64) -> Result<Verified<'r>, Rejected<'r>> {
    let decoded =
        jwt::decode(token).map_err(|e| Rejected { reason: reason_of(e), detail: format!("JWT: {}", e.describe()), issuer: None, jti: None })?;
    let hint = jwt::issuer_hint(&decoded);
    let jti = decoded.unverified_claims().get("jti").and_then(|v| v.as_str()).map(str::to_owned);
    let iss = decoded.unverified_issuer();
    let mut candidates: Vec<&Issuer> = issuers.iter().filter(|i| i.issuer.is_some() && i.issuer.as_deref() == iss).collect();
    if candidates.is_empty() {
        candidates = issuers.iter().filter(|i| i.issuer.is_none()).collect();
    }
    let Some(first) = candidates.first() else {
        return Err(Rejected {
            reason: Reason::UnknownIssuer,
            detail: format!("no legacy issuer is registered for this JWT ({hint})"),
            issuer: None,
            jti,
        });
    };
    let now_s = crate::clock::to_unix_s(now);
    let mut first_error = None;
    for issuer in &candidates {
        let expect = Expectations {
            issuer: issuer.issuer.as_deref(),
            audience: issuer.audience.as_deref(),
            account_claim: &issuer.account_claim,
            scopes_claim: &issuer.scopes_claim,
        };
        // Expiry is judged by the caller, after revocation (verdict::resolve_legacy), so a
        // revoked JWT is `revoked` past its exp too, as a cached one is and as tokens are.
        match jwt::verify_except_exp(&decoded, &issuer.keys, now_s, leeway_s, &expect) {
            Ok(claims) => return Ok(Verified { issuer, claims }),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let e = first_error.unwrap_or(JwtError::BadSignature);
    Err(Rejected {
        reason: reason_of(e),
        detail: format!("legacy issuer \"{}\": {} ({hint})", first.name, e.describe()),
        issuer: Some(first),
        jti,
    })
}

/// The id a legacy JWT is known by (identity's token_id, events): a UUID (version 8, RFC 9562)
/// from the issuer and the `jti`, or from the JWT itself when it has none. Stable across
/// backends and servers; no token's id can collide with it in practice (random v4 ids).
pub fn legacy_id(issuer: &str, jti: Option<&str>, token: &[u8]) -> [u8; 16] {
    let mut input = Vec::with_capacity(64);
    input.extend_from_slice(b"pg_token legacy jwt\0");
    input.extend_from_slice(issuer.as_bytes());
    input.push(0);
    match jti {
        Some(j) => {
            input.push(b'j');
            input.extend_from_slice(j.as_bytes());
        }
        None => {
            input.push(b'h');
            input.extend_from_slice(&token_hash(token));
        }
    }
    let h = token_hash(&input);
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[..16]);
    id[6] = (id[6] & 0x0f) | 0x80; // version 8
    id[8] = (id[8] & 0x3f) | 0x80; // RFC 9562 variant
    id
}

/// The deprecation sentence an accepted legacy JWT's identity carries.
pub fn deprecation(issuer: &str, cutoff: &str, message: Option<&str>) -> String {
    let mut s = format!("legacy JWT (issuer \"{issuer}\") accepted until {cutoff}");
    if let Some(m) = message {
        s.push_str(": ");
        s.push_str(m);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{self, Context, KeyTypeInfo, LegacyStore, PrefixInfo, Registry, Request, TokenState};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    const SECRET: &[u8] = b"legacy test secret, at least 32 bytes";
    /// 2027-01-15 in Postgres micros (Unix 1_800_000_000).
    fn now() -> Micros {
        crate::clock::from_unix_s(1_800_000_000)
    }

    fn hs256(claims: &str, secret: &[u8]) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#), URL_SAFE_NO_PAD.encode(claims));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any length");
        mac.update(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    struct Reg {
        issuers: Vec<Issuer>,
        revocations: Revocations,
        agent: KeyTypeInfo,
        mid: KeyTypeInfo,
        mid_prefix: PrefixInfo,
    }
    impl Registry for Reg {
        fn prefix(&self, p: &str) -> Option<&PrefixInfo> {
            (p == "mid_").then_some(&self.mid_prefix)
        }
        fn key_type(&self, n: &str) -> Option<&KeyTypeInfo> {
            match n {
                "agent" => Some(&self.agent),
                "mid" => Some(&self.mid),
                _ => None,
            }
        }
        fn legacy_issuers(&self) -> &[Issuer] {
            &self.issuers
        }
        fn legacy_revocations(&self) -> Option<&Revocations> {
            Some(&self.revocations)
        }
    }

    #[derive(Default)]
    struct Jwts {
        verified: HashMap<Vec<u8>, TokenState>,
        verifications: usize,
    }
    impl LegacyStore<TokenState> for Jwts {
        fn cached(&mut self, token: &[u8]) -> Option<TokenState> {
            self.verified.get(token).cloned()
        }
        fn accepted(&mut self, token: &[u8], _: &Verified<'_>, state: TokenState) -> TokenState {
            self.verifications += 1;
            self.verified.insert(token.to_vec(), state.clone());
            state
        }
    }

    fn world() -> Reg {
        let issuer = Issuer {
            name: "old".into(),
            keys: IssuerKeys::from_material(&[jwt::Algorithm::Hs256], SECRET).expect("secret"),
            issuer: Some("https://auth.example".into()),
            audience: None,
            account_claim: "sub".into(),
            scopes_claim: "scope".into(),
            key_type: "agent".into(),
            environment: "dev".into(),
            cutoff_at: now() + 86_400_000_000,
            message: Some("see https://docs.example/migrate".into()),
        };
        Reg {
            issuers: vec![issuer],
            revocations: Revocations::default(),
            agent: KeyTypeInfo::default(),
            mid: KeyTypeInfo { can_validate: vec!["agent".into()], ..KeyTypeInfo::default() },
            mid_prefix: PrefixInfo { key_type: "mid".into(), environment: "dev".into() },
        }
    }

    fn judge(reg: &Reg, jwts: &mut Jwts, token: &str, env: &str, at: Micros, scope: Option<&str>) -> Result<TokenState, Reason> {
        let req = Request { token: Some(token.as_bytes()), caller: None, required_scope: scope };
        let ctx = Context { environment: Some(env), now: at, client: None, jwt_leeway_s: 30 };
        verdict::decide(req, ctx, reg, |_: &crate::hash::TokenHash| None::<TokenState>, |_: &[u8; 16]| None, jwts)
            .map(|a| a.token)
            .map_err(|r| r.reason)
    }

    const CLAIMS: &str = r#"{"sub":"acme","scope":"read write","exp":1800000600,"iat":1799999000,"iss":"https://auth.example","jti":"j1"}"#;

    #[test]
    fn a_verified_jwt_is_judged_like_a_token_and_cached() {
        let reg = world();
        let mut jwts = Jwts::default();
        let t = hs256(CLAIMS, SECRET);
        let s = judge(&reg, &mut jwts, &t, "dev", now(), Some("write")).expect("accepted");
        assert_eq!((s.account.as_str(), s.key_type.as_str(), s.scopes.len()), ("acme", "agent", 2));
        assert_eq!(s.legacy.as_ref().map(|l| l.issuer.as_str()), Some("old"));
        assert_eq!(s.id, legacy_id("old", Some("j1"), t.as_bytes()));
        judge(&reg, &mut jwts, &t, "dev", now(), None).expect("again");
        assert_eq!(jwts.verifications, 1, "the second presentation is a cache hit");
        assert_eq!(judge(&reg, &mut jwts, &t, "dev", now(), Some("admin")), Err(Reason::InsufficientScope));
        assert_eq!(judge(&reg, &mut jwts, &t, "prod", now(), None), Err(Reason::EnvironmentMismatch), "cached or not");
    }

    #[test]
    fn a_jwt_carries_only_the_scopes_its_key_type_allows() {
        let mut reg = world();
        reg.agent.allowed_scopes = Some(vec!["read".into(), "admin".into()]);
        assert!(reg.agent.allows_all(&["read".into(), "admin".into()]) && !reg.agent.allows_all(&["write".into()]));
        let t = hs256(CLAIMS, SECRET); // scope "read write"
        let s = judge(&reg, &mut Jwts::default(), &t, "dev", now(), Some("read")).expect("accepted");
        assert_eq!(s.scopes, vec!["read".to_string()], "write is not an agent scope; admin is not claimed");
        assert_eq!(judge(&reg, &mut Jwts::default(), &t, "dev", now(), Some("write")), Err(Reason::InsufficientScope));
        reg.agent.allowed_scopes = Some(Vec::new());
        assert!(judge(&reg, &mut Jwts::default(), &t, "dev", now(), None).expect("accepted").scopes.is_empty());
        reg.agent.allowed_scopes = None;
        assert_eq!(judge(&reg, &mut Jwts::default(), &t, "dev", now(), None).expect("accepted").scopes.len(), 2);
    }

    #[test]
    fn time_cutoff_and_revocation_are_checked_on_every_call() {
        let mut reg = world();
        let mut jwts = Jwts::default();
        let t = hs256(CLAIMS, SECRET);
        judge(&reg, &mut jwts, &t, "dev", now(), None).expect("accepted");
        let exp = crate::clock::from_unix_s(1_800_000_600);
        assert!(judge(&reg, &mut jwts, &t, "dev", exp + 29_000_000, None).is_ok(), "within the leeway");
        assert_eq!(judge(&reg, &mut jwts, &t, "dev", exp + 30_000_000, None), Err(Reason::Expired));
        let cutoff = reg.issuers[0].cutoff_at;
        // The cache holds the cut-off it verified under; a changed registry drops the cache (edge).
        assert_eq!(judge(&reg, &mut jwts, &t, "dev", cutoff, None), Err(Reason::LegacyTokenRetired));
        reg.revocations.revoke_jti("old".into(), "j1".into());
        assert_eq!(judge(&reg, &mut jwts, &t, "dev", now(), None), Err(Reason::Revoked));
    }

    #[test]
    fn a_revoked_jwt_past_its_exp_is_revoked_cached_or_not() {
        // Found by tests/model: a backend that verified the JWT before it expired said
        // `revoked`, one that first met it after said `expired` (its exp was judged before the
        // revocations). The reasons' order is revoked, then expired, for JWTs as for tokens.
        let mut reg = world();
        let t = hs256(CLAIMS, SECRET);
        let past = crate::clock::from_unix_s(1_800_000_600) + 30_000_000;
        let mut fresh = Jwts::default();
        assert_eq!(judge(&reg, &mut fresh, &t, "dev", past, None), Err(Reason::Expired), "not revoked: expired");
        reg.revocations.revoke_jti("old".into(), "j1".into());
        let mut cached = Jwts::default();
        judge(&world(), &mut cached, &t, "dev", now(), None).expect("accepted before its exp");
        assert_eq!(judge(&reg, &mut cached, &t, "dev", past, None), Err(Reason::Revoked), "cached");
        assert_eq!(judge(&reg, &mut Jwts::default(), &t, "dev", past, None), Err(Reason::Revoked), "verified after its exp");
    }

    #[test]
    fn forged_unknown_and_confused_jwts_are_refused() {
        let reg = world();
        let mut jwts = Jwts::default();
        assert_eq!(judge(&reg, &mut jwts, &hs256(CLAIMS, b"another secret of at least 32 bytes!"), "dev", now(), None), Err(Reason::BadSignature));
        let other_iss = CLAIMS.replace("auth.example", "evil.example");
        assert_eq!(judge(&reg, &mut jwts, &hs256(&other_iss, SECRET), "dev", now(), None), Err(Reason::UnknownIssuer));
        let none = format!("{}.{}", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(CLAIMS));
        assert_eq!(judge(&reg, &mut jwts, &format!("{none}.c2ln"), "dev", now(), None), Err(Reason::BadSignature));
        assert_eq!(judge(&reg, &mut jwts, &format!("{none}."), "dev", now(), None), Err(Reason::BadSignature), "unsigned");
        let huge = format!("eyJ{}.e30.", "A".repeat(10_000));
        assert_eq!(judge(&reg, &mut jwts, &huge, "dev", now(), None), Err(Reason::Malformed));
        assert_eq!(jwts.verifications, 0);
    }

    #[test]
    fn a_caller_token_must_be_allowed_and_of_the_same_account() {
        let reg = world();
        let t = hs256(CLAIMS, SECRET);
        // A JWT as the caller of a JWT: agent may not validate agent.
        let req = Request { token: Some(t.as_bytes()), caller: Some(t.as_bytes()), required_scope: None };
        let ctx = Context { environment: Some("dev"), now: now(), client: None, jwt_leeway_s: 30 };
        let r = verdict::decide(req, ctx, &reg, |_: &crate::hash::TokenHash| None::<TokenState>, |_: &[u8; 16]| None, &mut Jwts::default());
        assert_eq!(r.err().map(|r| r.reason), Some(Reason::CallerNotPermitted));
    }

    #[test]
    fn jti_hints_show_four_safe_characters() {
        assert_eq!(jti_hint("a1b2c3d4"), "jti=a1b2");
        assert_eq!(jti_hint("x y'z"), "jti=x?y?");
        assert_eq!(jti_hint("é"), "jti=?");
    }

    #[test]
    fn ids_are_stable_version_8_and_distinct() {
        let a = legacy_id("old", Some("1"), b"x");
        assert_eq!(a, legacy_id("old", Some("1"), b"y"), "the jti decides, not the JWT");
        assert_ne!(a, legacy_id("old", Some("2"), b"x"));
        assert_ne!(a, legacy_id("other", Some("1"), b"x"));
        assert_ne!(legacy_id("old", None, b"x"), legacy_id("old", None, b"y"));
        assert_eq!(a[6] >> 4, 8);
        assert_eq!(a[8] >> 6, 2);
    }

    #[test]
    fn revocations_by_jti_and_by_account() {
        let mut r = Revocations::default();
        let st = |jti: Option<&str>, iat: Option<Micros>| LegacyState {
            issuer: "old".into(),
            jti: jti.map(str::to_owned),
            issued_at: iat,
            cutoff_at: 0,
            message: None,
        };
        assert!(r.check("acme", &st(Some("1"), Some(5))).is_none());
        r.revoke_jti("old".into(), "1".into());
        assert!(r.check("acme", &st(Some("1"), Some(5))).is_some());
        assert!(r.check("acme", &st(Some("2"), Some(5))).is_none());
        r.accounts.insert("acme".into(), 10);
        assert!(r.check("acme", &st(Some("2"), Some(5))).is_some(), "issued before the revocation");
        assert!(r.check("acme", &st(Some("2"), Some(10))).is_none(), "issued at or after it");
        assert!(r.check("acme", &st(Some("2"), None)).is_some(), "no iat: cannot tell");
        assert!(r.check("other", &st(Some("2"), None)).is_none());
    }

    #[test]
    fn refusals_map_to_reasons() {
        assert_eq!(reason_of(JwtError::AlgNone), Reason::BadSignature);
        assert_eq!(reason_of(JwtError::AlgorithmNotAllowed), Reason::BadSignature);
        assert_eq!(reason_of(JwtError::Expired), Reason::Expired);
        assert_eq!(reason_of(JwtError::AudienceMismatch), Reason::UnknownIssuer);
        assert_eq!(reason_of(JwtError::TooLong), Reason::Malformed);
    }
}
