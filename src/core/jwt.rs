//! JWTs from a legacy issuer, for applications migrating to pg_token ("Migrating from JWTs"):
//! recognising a presented JWT (`looks_like_jwt`), splitting it (`decode`), reading an
//! issuer's registered keys (`parse_key`, `parse_key_set`, `IssuerKeys`), and deciding whether
//! a JWT is acceptable (`verify`), which yields the account, scopes and identifiers it carries.
//!
//! Only JWS compact serialization with HS256, RS256 and ES256 is accepted, and only with keys
//! the database administrator registered: keys named in the token (`jwk`, `jku`, `x5u`, `x5c`)
//! are never used, a token's `alg` must be one its issuer was registered with and must match
//! the kind of key chosen, and an issuer is either HMAC (a secret) or public-key, never both, so
//! a public key can never be used as an HMAC secret. The crypto is RustCrypto's (`hmac`, `rsa`,
//! `p256`); nothing here computes a signature by hand.
//!
//! Every input is bounded before it costs anything: the token's length before any base64
//! decoding, the header's size and the JSON nesting before any JSON parsing, key material
//! before any key parsing. Errors are fixed sentences (`describe`): they never contain the
//! token, any part of it, or any part of a key. Pure: no Postgres, no clock (the time is passed
//! in), no logging.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use p256::ecdsa;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use rsa::traits::PublicKeyParts;
use rsa::{pkcs1v15, BigUint, RsaPublicKey};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::format::is_token_byte;

/// A JWT longer than this is refused before any base64 decoding.
pub const MAX_JWT_BYTES: usize = 8192;
/// `looks_like_jwt` scans at most this much, so a JWT somewhat over `MAX_JWT_BYTES` is still
/// recognised, and refused as too long rather than as a malformed opaque token.
pub const MAX_JWT_SHAPE_BYTES: usize = 4 * MAX_JWT_BYTES;
/// The decoded header, in bytes: ample for alg, typ, kid and a thumbprint.
pub const MAX_HEADER_BYTES: usize = 2048;
/// Object and array nesting in a header, claims set or key document. serde_json would stop at
/// 128; real claims sets nest three or four levels.
pub const MAX_JSON_DEPTH: usize = 16;
/// A registered key: a secret, a PEM or a JWK set.
pub const MAX_KEY_MATERIAL_BYTES: usize = 64 * 1024;
/// Keys in a registered JWK set.
pub const MAX_KEYS: usize = 32;
/// RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
pub const MIN_HMAC_SECRET_BYTES: usize = 32;
/// RSA moduli below this are refused (RFC 7518 section 3.3 asks for 2048 bits or more); the
/// `rsa` crate refuses moduli above 4096 bits, which also bounds the cost of a verification.
pub const MIN_RSA_BITS: usize = 2048;
pub const MAX_RSA_BITS: usize = RsaPublicKey::MAX_SIZE;
/// A `kid`, in the header or in a registered JWK.
pub const MAX_KID_BYTES: usize = 256;
/// An `iss` claim.
pub const MAX_ISSUER_BYTES: usize = 1024;
/// A `jti` claim.
pub const MAX_JTI_BYTES: usize = 128;
/// Scopes per JWT (as per pg_token token), and bytes per scope.
pub const MAX_SCOPES: usize = crate::limits::MAX_SCOPES;
pub const MAX_SCOPE_BYTES: usize = 128;
/// How much of `iss` and `jti` `issuer_hint` keeps.
pub const HINT_ISSUER_CHARS: usize = 64;
pub const HINT_JTI_CHARS: usize = 32;

/// Why a JWT is refused. Each variant is one rule; `describe` is the sentence for an error
/// DETAIL and `as_str` a stable word for events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtError {
    TooLong,
    Malformed,
    BadBase64,
    HeaderTooLarge,
    TooDeep,
    BadHeader,
    BadClaims,
    DuplicateMember,
    MissingAlg,
    BadTyp,
    CritHeader,
    BadKid,
    AlgNone,
    UnsupportedAlgorithm,
    AlgorithmNotAllowed,
    NoMatchingKey,
    BadSignature,
    MissingExp,
    BadExp,
    Expired,
    BadNbf,
    NotYetValid,
    BadIat,
    BadIssuer,
    IssuerMismatch,
    AudienceMismatch,
    UnexpectedAudience,
    MissingAccount,
    BadAccount,
    BadScopes,
    TooManyScopes,
    ScopeTooLong,
    BadJti,
}

impl JwtError {
    pub fn as_str(self) -> &'static str {
        match self {
            JwtError::TooLong => "too_long",
            JwtError::Malformed => "malformed",
            JwtError::BadBase64 => "bad_base64",
            JwtError::HeaderTooLarge => "header_too_large",
            JwtError::TooDeep => "too_deep",
            JwtError::BadHeader => "bad_header",
            JwtError::BadClaims => "bad_claims",
            JwtError::DuplicateMember => "duplicate_member",
            JwtError::MissingAlg => "missing_alg",
            JwtError::BadTyp => "bad_typ",
            JwtError::CritHeader => "crit_header",
            JwtError::BadKid => "bad_kid",
            JwtError::AlgNone => "alg_none",
            JwtError::UnsupportedAlgorithm => "unsupported_algorithm",
            JwtError::AlgorithmNotAllowed => "algorithm_not_allowed",
            JwtError::NoMatchingKey => "no_matching_key",
            JwtError::BadSignature => "bad_signature",
            JwtError::MissingExp => "missing_exp",
            JwtError::BadExp => "bad_exp",
            JwtError::Expired => "expired",
            JwtError::BadNbf => "bad_nbf",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::BadIat => "bad_iat",
            JwtError::BadIssuer => "bad_issuer",
            JwtError::IssuerMismatch => "issuer_mismatch",
            JwtError::AudienceMismatch => "audience_mismatch",
            JwtError::UnexpectedAudience => "unexpected_audience",
            JwtError::MissingAccount => "missing_account",
            JwtError::BadAccount => "bad_account",
            JwtError::BadScopes => "bad_scopes",
            JwtError::TooManyScopes => "too_many_scopes",
            JwtError::ScopeTooLong => "scope_too_long",
            JwtError::BadJti => "bad_jti",
        }
    }

    /// A sentence for an error DETAIL; never contains any part of the token.
    pub fn describe(self) -> &'static str {
        match self {
            JwtError::TooLong => "the JWT is longer than 8192 bytes",
            JwtError::Malformed => "the JWT is not three base64url segments separated by two dots",
            JwtError::BadBase64 => "a JWT segment is not unpadded, canonical base64url",
            JwtError::HeaderTooLarge => "the JWT header is longer than 2048 bytes",
            JwtError::TooDeep => "the JWT header or claims nest deeper than 16 levels",
            JwtError::BadHeader => "the JWT header is not a JSON object",
            JwtError::BadClaims => "the JWT claims are not a JSON object",
            JwtError::DuplicateMember => "the JWT header or claims name the same member twice",
            JwtError::MissingAlg => "the JWT header has no \"alg\" string",
            JwtError::BadTyp => "the JWT header's \"typ\" is not \"JWT\"",
            JwtError::CritHeader => "the JWT header has \"crit\": no critical extension is supported",
            JwtError::BadKid => "the JWT header's \"kid\" is not a string of at most 256 bytes",
            JwtError::AlgNone => "the JWT is unsigned (alg \"none\")",
            JwtError::UnsupportedAlgorithm => "the JWT's alg is not HS256, RS256 or ES256",
            JwtError::AlgorithmNotAllowed => "the JWT's alg is not one its issuer is registered with",
            JwtError::NoMatchingKey => "no registered key of the issuer matches the JWT's kid and alg",
            JwtError::BadSignature => "the JWT's signature does not verify",
            JwtError::MissingExp => "the JWT has no \"exp\" claim",
            JwtError::BadExp => "the JWT's \"exp\" claim is not a NumericDate",
            JwtError::Expired => "the JWT has expired",
            JwtError::BadNbf => "the JWT's \"nbf\" claim is not a NumericDate",
            JwtError::NotYetValid => "the JWT is not valid yet (\"nbf\" is in the future)",
            JwtError::BadIat => "the JWT's \"iat\" claim is not a NumericDate",
            JwtError::BadIssuer => "the JWT's \"iss\" claim is not a string of at most 1024 bytes",
            JwtError::IssuerMismatch => "the JWT's \"iss\" claim is not the registered issuer",
            JwtError::AudienceMismatch => "the JWT's \"aud\" claim does not name the registered audience",
            JwtError::UnexpectedAudience => {
                "the JWT names an audience (\"aud\") but its issuer is registered without one"
            }
            JwtError::MissingAccount => "the JWT lacks the issuer's account claim",
            JwtError::BadAccount => {
                "the JWT's account claim is not a string or integer of 1 to 256 characters without control characters"
            }
            JwtError::BadScopes => {
                "the JWT's scopes claim is not a space-separated string or an array of non-empty strings without control characters"
            }
            JwtError::TooManyScopes => "the JWT carries more than 64 scopes",
            JwtError::ScopeTooLong => "a scope in the JWT is longer than 128 bytes",
            JwtError::BadJti => "the JWT's \"jti\" claim is not a string of at most 128 bytes",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why key material cannot be registered. Never carries any part of the material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyError {
    TooLarge,
    SecretTooShort,
    SecretLooksLikePublicKey,
    Unrecognised,
    PrivateKey,
    Certificate,
    UnsupportedPem,
    BadPem,
    NotRsaKey,
    NotP256Key,
    RsaTooSmall,
    RsaTooLarge,
    BadJwk,
    NotForSigning,
    JwkAlgMismatch,
    TooManyKeys,
    NoUsableKey,
    SeveralKeys,
    NoAlgorithms,
    MixedKeyKinds,
    KeyAlgorithmNotAllowed,
}

impl KeyError {
    /// A sentence for an error message; never contains any part of the key material.
    pub fn describe(self) -> &'static str {
        match self {
            KeyError::TooLarge => "the key material is longer than 65536 bytes",
            KeyError::SecretTooShort => "an HS256 secret must be at least 32 bytes (RFC 7518 section 3.2)",
            KeyError::SecretLooksLikePublicKey => {
                "the HS256 secret is a PEM or JWK key: register a public key for RS256 or ES256, never as an HMAC secret"
            }
            KeyError::Unrecognised => "the key is neither PEM nor a JWK or JWK set (JSON)",
            KeyError::PrivateKey => "the key is a private key: register the public key only",
            KeyError::Certificate => "the PEM is a certificate: register its public key (\"PUBLIC KEY\")",
            KeyError::UnsupportedPem => "the PEM is not a \"PUBLIC KEY\" or \"RSA PUBLIC KEY\"",
            KeyError::BadPem => "the PEM could not be decoded as a public key of the algorithm's type",
            KeyError::NotRsaKey => "RS256 needs an RSA public key",
            KeyError::NotP256Key => "ES256 needs an EC public key on curve P-256",
            KeyError::RsaTooSmall => "the RSA key is shorter than 2048 bits",
            KeyError::RsaTooLarge => "the RSA key is longer than 4096 bits",
            KeyError::BadJwk => "a JWK member (kty, n, e, crv, x, y, kid) is missing or invalid",
            KeyError::NotForSigning => "the JWK is not for signatures (its \"use\" or \"key_ops\" say otherwise)",
            KeyError::JwkAlgMismatch => "the JWK's \"alg\" is not the issuer's algorithm",
            KeyError::TooManyKeys => "the JWK set holds more than 32 keys",
            KeyError::NoUsableKey => "the JWK set holds no key for the issuer's algorithms",
            KeyError::SeveralKeys => "the JWK set holds several keys for the algorithm: register it as a key set",
            KeyError::NoAlgorithms => "an issuer needs at least one algorithm",
            KeyError::MixedKeyKinds => {
                "HS256 cannot be combined with RS256 or ES256 for one issuer: a key is either a secret or public"
            }
            KeyError::KeyAlgorithmNotAllowed => "a key's algorithm is not one of the issuer's algorithms",
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The algorithms a legacy issuer may be registered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Hs256,
    Rs256,
    Es256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Hs256, Algorithm::Rs256, Algorithm::Es256];

    /// The algorithm named `name`. Exact match: JWS algorithm names are case-sensitive (RFC
    /// 7515 section 4.1.1), so "hs256" is not HS256.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A registered key, ready to verify. Its Debug output names the algorithm only.
#[derive(Clone)]
pub struct VerifyingKey(KeyKind);

#[derive(Clone)]
enum KeyKind {
    /// Kept keyed: the inner and outer pads are hashed once, at registration.
    Hs256(Hmac<Sha256>),
    Rs256(pkcs1v15::VerifyingKey<Sha256>),
    Es256(ecdsa::VerifyingKey),
}

impl VerifyingKey {
    pub fn algorithm(&self) -> Algorithm {
        match self.0 {
            KeyKind::Hs256(_) => Algorithm::Hs256,
            KeyKind::Rs256(_) => Algorithm::Rs256,
            KeyKind::Es256(_) => Algorithm::Es256,
        }
    }

    /// Whether `signature` signs `input`. HMAC tags are compared in constant time
    /// (`verify_slice`); a signature of the wrong length is simply false.
    fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        match &self.0 {
            KeyKind::Hs256(keyed) => {
                let mut mac = keyed.clone();
                mac.update(input);
                mac.verify_slice(signature).is_ok()
            }
            KeyKind::Rs256(key) => match pkcs1v15::Signature::try_from(signature) {
                Ok(sig) => key.verify(input, &sig).is_ok(),
                Err(_) => false,
            },
            // JWS carries ES256 signatures as raw r||s (RFC 7518 section 3.4), not DER. High-S
            // signatures are accepted: JWS does not ask for low-S (RFC 7515 A.3's is high-S).
            KeyKind::Es256(key) => match ecdsa::Signature::from_slice(signature) {
                Ok(sig) => key.verify(input, &sig).is_ok(),
                Err(_) => false,
            },
        }
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", self.algorithm())
    }
}

/// A key and the `kid` it was registered under (a JWK's), if any.
#[derive(Debug, Clone)]
pub struct NamedKey {
    pub kid: Option<String>,
    pub key: VerifyingKey,
}

/// What an issuer is registered with: its algorithms and its keys, checked to agree.
#[derive(Debug, Clone)]
pub struct IssuerKeys {
    algorithms: Vec<Algorithm>,
    keys: Vec<NamedKey>,
}

impl IssuerKeys {
    /// Refuses an empty algorithm list, HS256 next to a public-key algorithm (one of the two
    /// defences against algorithm confusion: no issuer can hold a public key where a token may
    /// ask for HMAC), no keys or too many, and a key whose algorithm is not in the list.
    pub fn new(algorithms: &[Algorithm], keys: Vec<NamedKey>) -> Result<IssuerKeys, KeyError> {
        let mut algs: Vec<Algorithm> = Vec::with_capacity(algorithms.len());
        for a in algorithms {
            if !algs.contains(a) {
                algs.push(*a);
            }
        }
        if algs.is_empty() {
            return Err(KeyError::NoAlgorithms);
        }
        if algs.contains(&Algorithm::Hs256) && algs.len() > 1 {
            return Err(KeyError::MixedKeyKinds);
        }
        if keys.is_empty() {
            return Err(KeyError::NoUsableKey);
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::TooManyKeys);
        }
        if keys.iter().any(|k| !algs.contains(&k.key.algorithm())) {
            return Err(KeyError::KeyAlgorithmNotAllowed);
        }
        Ok(IssuerKeys { algorithms: algs, keys })
    }

    /// An issuer from one piece of registered material: the secret for `[HS256]`; otherwise a
    /// PEM, a JWK or a JWK set, of which the keys for the listed algorithms are kept.
    pub fn from_material(algorithms: &[Algorithm], material: &[u8]) -> Result<IssuerKeys, KeyError> {
        if algorithms.is_empty() {
            return Err(KeyError::NoAlgorithms);
        }
        if algorithms.contains(&Algorithm::Hs256) && algorithms.iter().any(|a| *a != Algorithm::Hs256) {
            return Err(KeyError::MixedKeyKinds);
        }
        let mut keys = Vec::new();
        let mut first_error = None;
        for alg in Algorithm::ALL.into_iter().filter(|a| algorithms.contains(a)) {
            match parse_key_set(alg, material) {
                Ok(found) => keys.extend(found),
                // With RS256 and ES256 both allowed, a single RSA key is "not P-256" for one
                // of them; that is only an error if no algorithm finds a key.
                Err(e @ (KeyError::NotRsaKey | KeyError::NotP256Key | KeyError::NoUsableKey | KeyError::JwkAlgMismatch))
                    if algorithms.len() > 1 =>
                {
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        if keys.is_empty() {
            return Err(first_error.unwrap_or(KeyError::NoUsableKey));
        }
        IssuerKeys::new(algorithms, keys)
    }

    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    pub fn keys(&self) -> &[NamedKey] {
        &self.keys
    }

    /// The key for a token: the one registered under the token's `kid` (used only for its own
    /// algorithm, never with a fallback to another key), else the only key for `alg` (when
    /// the token names no kid or that key has none). Never tries several keys.
    fn select(&self, alg: Algorithm, kid: Option<&str>) -> Option<&VerifyingKey> {
        if let Some(kid) = kid {
            let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).peekable();
            if named.peek().is_some() {
                return named.find(|k| k.key.algorithm() == alg).map(|k| &k.key);
            }
        }
        let mut of_alg = self.keys.iter().filter(|k| k.key.algorithm() == alg);
        match (of_alg.next(), of_alg.next()) {
            (Some(only), None) if kid.is_none() || only.kid.is_none() => Some(&only.key),
            _ => None,
        }
    }
}

/// One key for `alg` from `material`: the secret for HS256; for RS256 and ES256 a PEM public
/// key, a JWK, or a JWK set holding exactly one key for `alg`.
pub fn parse_key(alg: Algorithm, material: &[u8]) -> Result<VerifyingKey, KeyError> {
    let mut keys = parse_key_set(alg, material)?;
    match (keys.pop(), keys.is_empty()) {
        (Some(only), true) => Ok(only.key),
        (Some(_), false) => Err(KeyError::SeveralKeys),
        (None, _) => Err(KeyError::NoUsableKey),
    }
}

/// Every key for `alg` in `material`, with its kid. A JWK set's keys of another type, or
/// marked for another algorithm or for encryption, are skipped; a key of the right type that
/// is invalid (too short, not on the curve, private) refuses the whole set, so a mistake is
/// seen at registration rather than when a token needs that key.
pub fn parse_key_set(alg: Algorithm, material: &[u8]) -> Result<Vec<NamedKey>, KeyError> {
    if material.len() > MAX_KEY_MATERIAL_BYTES {
        return Err(KeyError::TooLarge);
    }
    if alg == Algorithm::Hs256 {
        return hmac_key(material).map(|key| vec![NamedKey { kid: None, key }]);
    }
    let text = std::str::from_utf8(material).map_err(|_| KeyError::Unrecognised)?.trim();
    if text.starts_with("-----BEGIN ") {
        return pem_key(alg, text).map(|key| vec![NamedKey { kid: None, key }]);
    }
    if !text.starts_with('{') {
        return Err(KeyError::Unrecognised);
    }
    if !nesting_within(text.as_bytes(), MAX_JSON_DEPTH) {
        return Err(KeyError::BadJwk);
    }
    let doc = match serde_json::from_str::<Members>(text) {
        Ok(m) if !m.duplicate => m.map,
        _ => return Err(KeyError::BadJwk),
    };
    let Some(set) = doc.get("keys") else {
        return jwk_key(alg, &doc).map(|k| vec![k]);
    };
    let Value::Array(entries) = set else { return Err(KeyError::BadJwk) };
    if entries.len() > MAX_KEYS {
        return Err(KeyError::TooManyKeys);
    }
    let mut keys = Vec::new();
    for entry in entries {
        let Value::Object(jwk) = entry else { return Err(KeyError::BadJwk) };
        match jwk_key(alg, jwk) {
            Ok(k) => keys.push(k),
            Err(KeyError::NotRsaKey | KeyError::NotP256Key | KeyError::NotForSigning | KeyError::JwkAlgMismatch) => {}
            Err(e) => return Err(e),
        }
    }
    if keys.is_empty() {
        return Err(KeyError::NoUsableKey);
    }
    Ok(keys)
}

fn hmac_key(secret: &[u8]) -> Result<VerifyingKey, KeyError> {
    if secret.len() < MIN_HMAC_SECRET_BYTES {
        return Err(KeyError::SecretTooShort);
    }
    // A public key registered as an HMAC secret would let anyone who reads it mint tokens:
    // that is the algorithm-confusion attack, made by hand. Random secrets never look so.
    let trimmed = secret.trim_ascii_start();
    let pem = trimmed.starts_with(b"-----BEGIN ");
    let jwk = trimmed.starts_with(b"{") && trimmed.windows(5).any(|w| w == b"\"kty\"");
    if pem || jwk {
        return Err(KeyError::SecretLooksLikePublicKey);
    }
    let keyed = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| KeyError::SecretTooShort)?;
    Ok(VerifyingKey(KeyKind::Hs256(keyed)))
}

/// A PEM's label (`-----BEGIN <label>-----`).
fn pem_label(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("-----BEGIN ")?;
    rest.find("-----").map(|end| &rest[..end])
}

fn pem_key(alg: Algorithm, text: &str) -> Result<VerifyingKey, KeyError> {
    if text.contains("PRIVATE KEY-----") {
        return Err(KeyError::PrivateKey);
    }
    match (pem_label(text), alg) {
        (Some("PUBLIC KEY"), Algorithm::Rs256) => match RsaPublicKey::from_public_key_pem(text) {
            Ok(k) => rsa_key(k),
            Err(_) if ecdsa::VerifyingKey::from_public_key_pem(text).is_ok() => Err(KeyError::NotRsaKey),
            Err(_) => Err(KeyError::BadPem),
        },
        (Some("RSA PUBLIC KEY"), Algorithm::Rs256) => match RsaPublicKey::from_pkcs1_pem(text) {
            Ok(k) => rsa_key(k),
            Err(_) => Err(KeyError::BadPem),
        },
        (Some("PUBLIC KEY"), Algorithm::Es256) => match ecdsa::VerifyingKey::from_public_key_pem(text) {
            Ok(k) => Ok(VerifyingKey(KeyKind::Es256(k))),
            Err(_) => Err(KeyError::NotP256Key),
        },
        (Some("RSA PUBLIC KEY"), Algorithm::Es256) => Err(KeyError::NotP256Key),
        (Some("CERTIFICATE"), _) => Err(KeyError::Certificate),
        _ => Err(KeyError::UnsupportedPem),
    }
}

fn rsa_key(key: RsaPublicKey) -> Result<VerifyingKey, KeyError> {
    if key.n().bits() < MIN_RSA_BITS {
        return Err(KeyError::RsaTooSmall);
    }
    Ok(VerifyingKey(KeyKind::Rs256(pkcs1v15::VerifyingKey::<Sha256>::new(key))))
}

/// One JWK (RFC 7517) as a key for `alg`.
fn jwk_key(alg: Algorithm, jwk: &Map<String, Value>) -> Result<NamedKey, KeyError> {
    let text = |name: &str| -> Result<Option<&str>, KeyError> {
        match jwk.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(KeyError::BadJwk),
        }
    };
    let bytes = |name: &str| -> Result<Vec<u8>, KeyError> {
        let s = text(name)?.ok_or(KeyError::BadJwk)?;
        URL_SAFE_NO_PAD.decode(s).map_err(|_| KeyError::BadJwk)
    };
    let kty = text("kty")?.ok_or(KeyError::BadJwk)?;
    let kid = text("kid")?;
    if kid.is_some_and(|k| k.len() > MAX_KID_BYTES) {
        return Err(KeyError::BadJwk);
    }
    if jwk.contains_key("d") {
        return Err(KeyError::PrivateKey);
    }
    if text("use")?.is_some_and(|u| u != "sig") {
        return Err(KeyError::NotForSigning);
    }
    match jwk.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|o| o.as_str() == Some("verify")) => {}
        Some(Value::Array(_)) => return Err(KeyError::NotForSigning),
        Some(_) => return Err(KeyError::BadJwk),
    }
    if text("alg")?.is_some_and(|a| a != alg.as_str()) {
        return Err(KeyError::JwkAlgMismatch);
    }
    let key = match alg {
        Algorithm::Hs256 => return Err(KeyError::Unrecognised),
        Algorithm::Rs256 => {
            if kty != "RSA" {
                return Err(KeyError::NotRsaKey);
            }
            let n = BigUint::from_bytes_be(&bytes("n")?);
            let e = BigUint::from_bytes_be(&bytes("e")?);
            if n.bits() > MAX_RSA_BITS {
                return Err(KeyError::RsaTooLarge);
            }
            if n.bits() < MIN_RSA_BITS {
                return Err(KeyError::RsaTooSmall);
            }
            rsa_key(RsaPublicKey::new(n, e).map_err(|_| KeyError::BadJwk)?)?
        }
        Algorithm::Es256 => {
            if kty != "EC" || text("crv")? != Some("P-256") {
                return Err(KeyError::NotP256Key);
            }
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err(KeyError::BadJwk);
            }
            let point = p256::EncodedPoint::from_affine_coordinates(
                p256::FieldBytes::from_slice(&x),
                p256::FieldBytes::from_slice(&y),
                false,
            );
            // Refuses a point that is not on the curve (an invalid-curve attack's first step).
            let key = ecdsa::VerifyingKey::from_encoded_point(&point).map_err(|_| KeyError::BadJwk)?;
            VerifyingKey(KeyKind::Es256(key))
        }
    };
    Ok(NamedKey { kid: kid.map(str::to_owned), key })
}

/// A JSON object's members, with a note of whether a name came twice. serde_json's own map
/// keeps the last of two equal names silently; RFC 7515 section 5.2 lets a parser refuse
/// them, and refusing closes the gap between parsers that keep the first and the last.
struct Members {
    map: Map<String, Value>,
    duplicate: bool,
}

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Members, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Members, A::Error> {
                let mut members = Members { map: Map::new(), duplicate: false };
                while let Some(name) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if members.map.insert(name, value).is_some() {
                        members.duplicate = true;
                    }
                }
                Ok(members)
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Whether `json` nests objects and arrays at most `max` deep. A byte scan that knows strings,
/// run before parsing so the parser's recursion is bounded well below its own limit. Invalid
/// JSON may pass; the parser refuses it.
fn nesting_within(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Whether a presented token should be judged as a JWT: three non-empty segments of
/// `[A-Za-z0-9_-]` separated by exactly two dots, the first starting with "eyJ" (`{"` in
/// base64url), at most `MAX_JWT_SHAPE_BYTES` long. pg_token's own tokens never contain a dot,
/// so they never look like one. Reads each byte once and allocates nothing.
pub fn looks_like_jwt(token: &[u8]) -> bool {
    if token.len() > MAX_JWT_SHAPE_BYTES || !token.starts_with(b"eyJ") {
        return false;
    }
    let (mut dots, mut segment) = (0usize, 0usize);
    for &b in token {
        if b == b'.' {
            if segment == 0 || dots == 2 {
                return false;
            }
            dots += 1;
            segment = 0;
        } else if is_token_byte(b) {
            segment += 1;
        } else {
            return false;
        }
    }
    dots == 2 && segment > 0
}

/// The protected header members this module reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

/// A JWT split and parsed, not yet verified: nothing in it is to be believed before `verify`
/// returns. Borrows the signing input from the token; its Debug output shows neither the
/// token nor the signature.
pub struct Decoded<'a> {
    signing_input: &'a [u8],
    header: Header,
    claims: Map<String, Value>,
    signature: Vec<u8>,
}

impl Decoded<'_> {
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The claims as sent. Unverified until `verify` accepts the token.
    pub fn unverified_claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// The `iss` claim as sent, to choose which registered issuer to verify against.
    /// Unverified: `verify` checks it again when the issuer expects one.
    pub fn unverified_issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}

impl fmt::Debug for Decoded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoded")
            .field("header", &self.header)
            .field("claims", &self.claims.len())
            .field("signature_bytes", &self.signature.len())
            .finish_non_exhaustive()
    }
}

/// Splits a JWT into header, claims and signature, keeping the signing input
/// (`header.claims` as sent). Checks structure only; see `verify` for everything else.
pub fn decode(token: &[u8]) -> Result<Decoded<'_>, JwtError> {
    if token.len() > MAX_JWT_BYTES {
        return Err(JwtError::TooLong);
    }
    let mut dots = [0usize; 2];
    let mut found = 0;
    for (i, &b) in token.iter().enumerate() {
        if b == b'.' {
            if found == 2 {
                return Err(JwtError::Malformed);
            }
            dots[found] = i;
            found += 1;
        } else if b == b'=' {
            return Err(JwtError::BadBase64);
        } else if !is_token_byte(b) {
            return Err(JwtError::Malformed);
        }
    }
    if found != 2 {
        return Err(JwtError::Malformed);
    }
    let (header_b64, claims_b64) = (&token[..dots[0]], &token[dots[0] + 1..dots[1]]);
    let signature_b64 = &token[dots[1] + 1..];
    // An empty signature is let through so that an unsigned token is refused as such (alg
    // "none") by `verify`, not as a shape error.
    if header_b64.is_empty() || claims_b64.is_empty() {
        return Err(JwtError::Malformed);
    }
    if header_b64.len() / 4 * 3 > MAX_HEADER_BYTES {
        return Err(JwtError::HeaderTooLarge);
    }
    let header_json = URL_SAFE_NO_PAD.decode(header_b64).map_err(|_| JwtError::BadBase64)?;
    let claims_json = URL_SAFE_NO_PAD.decode(claims_b64).map_err(|_| JwtError::BadBase64)?;
    let signature = URL_SAFE_NO_PAD.decode(signature_b64).map_err(|_| JwtError::BadBase64)?;
    if !nesting_within(&header_json, MAX_JSON_DEPTH) || !nesting_within(&claims_json, MAX_JSON_DEPTH) {
        return Err(JwtError::TooDeep);
    }
    let header = object(&header_json, JwtError::BadHeader)?;
    let claims = object(&claims_json, JwtError::BadClaims)?;

    let Some(Value::String(alg)) = header.get("alg") else { return Err(JwtError::MissingAlg) };
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("JWT") => {}
        Some(_) => return Err(JwtError::BadTyp),
    }
    // RFC 7515 section 4.1.11: a recipient that does not understand a listed extension must
    // refuse the JWS; none are understood here.
    if header.contains_key("crit") {
        return Err(JwtError::CritHeader);
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) if k.len() <= MAX_KID_BYTES => Some(k.clone()),
        Some(_) => return Err(JwtError::BadKid),
    };
    Ok(Decoded {
        signing_input: &token[..dots[1]],
        header: Header { alg: alg.clone(), kid },
        claims,
        signature,
    })
}

fn object(json: &[u8], not_object: JwtError) -> Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice::<Members>(json) {
        Ok(m) if m.duplicate => Err(JwtError::DuplicateMember),
        Ok(m) => Ok(m.map),
        Err(_) => Err(not_object),
    }
}

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
    let key = keys.select(alg, decoded.header.kid.as_deref()).ok_or(JwtError::NoMatchingKey)?;
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
    if now_s >= exp.saturating_add(leeway) {
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
    n.as_f64().filter(|f| f.is_finite() && *f >= -LIMIT && *f < LIMIT).map(|f| f.floor() as i64)
}

fn account_of(v: Option<&Value>) -> Result<String, JwtError> {
    let given = match v {
        None => return Err(JwtError::MissingAccount),
        Some(Value::String(s)) => crate::limits::account(s),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => crate::limits::account(&n.to_string()),
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
                let Value::String(scope) = item else { return Err(JwtError::BadScopes) };
                add(scope)?;
            }
        }
        Some(_) => return Err(JwtError::BadScopes),
    }
    Ok(out)
}

/// What an event may record about a JWT, accepted or refused: its `iss` (at most 64
/// characters) and `jti` (at most 32), each cut to `[A-Za-z0-9._:/@+~%-]` with anything else
/// shown as '?', as `iss=<...> jti=<...>` (either part left out when absent, "" when both are).
/// Never the header, the signature, or the token. For a refused token these are what the
/// sender claimed, not facts.
pub fn issuer_hint(decoded: &Decoded<'_>) -> String {
    let mut out = String::new();
    for (name, max) in [("iss", HINT_ISSUER_CHARS), ("jti", HINT_JTI_CHARS)] {
        let Some(value) = decoded.claims.get(name).and_then(Value::as_str) else { continue };
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(name);
        out.push('=');
        out.extend(value.chars().take(max).map(|c| {
            if c.is_ascii_alphanumeric() || "._:/@+~%-".contains(c) {
                c
            } else {
                '?'
            }
        }));
        if value.chars().nth(max).is_some() {
            out.push_str("...");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format;
    use proptest::prelude::*;

    // ---- Published test vectors and test-only keys. None of these keys may ever be used
    // ---- outside these tests: their private halves are printed in RFCs or here.

    /// RFC 7515 Appendix A.1 (and RFC 7519 section 3.1, the same JWT): HS256.
    const A1_JWT: &str = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.\
        eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.\
        dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const A1_K: &str = "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow";
    /// The examples' claims: {"iss":"joe", "exp":1300819380, "http://example.com/is_root":true}.
    const A_PAYLOAD: &str = "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
    const A_EXP: i64 = 1_300_819_380;

    /// RFC 7515 Appendix A.2: RS256, header {"alg":"RS256"}.
    const A2_SIG: &str = "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";
    const A2_N: &str = "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ";
    const A2_D: &str = "Eq5xpGnNCivDflJsRQBXHx1hdR1k6Ulwe2JZD50LpXyWPEAeP88vLNO97IjlA7_GQ5sLKMgvfTeXZx9SE-7YwVol2NXOoAJe46sui395IW_GO-pWJ1O0BkTGoVEn2bKVRUCgu-GjBVaYLU6f3l9kJfFNS3E0QbVdxzubSu3Mkqzjkn439X0M_V51gfpRLI9JYanrC4D4qAdGcopV_0ZHHzQlBjudU2QvXt4ehNYTCBr6XCLQUShb1juUO1ZdiYoFaFQT5Tw8bGUl_x_jTj3ccPDVZFD9pIuhLhBOneufuBiB4cS98l2SR_RQyGWSeWjnczT0QU91p1DhOVRuOopznQ";
    const A2_P: &str = "4BzEEOtIpmVdVEZNCqS7baC4crd0pqnRH_5IB3jw3bcxGn6QLvnEtfdUdiYrqBdss1l58BQ3KhooKeQTa9AB0Hw_Py5PJdTJNPY8cQn7ouZ2KKDcmnPGBY5t7yLc1QlQ5xHdwW1VhvKn-nXqhJTBgIPgtldC-KDV5z-y2XDwGUc";
    const A2_Q: &str = "uQPEfgmVtjL0Uyyx88GZFF1fOunH3-7cepKmtH4pxhtCoHqpWmT8YAmZxaewHgHAjLYsp1ZSe7zFYHj7C6ul7TjeLQeZD_YwD66t62wDmpe_HlB-TnBA-njbglfIsRLtXlnDzQkv5dTltRJ11BKBBypeeF6689rjcJIDEz9RWdc";
    /// The A.2 public key as openssl writes it (SPKI and PKCS#1), made from n and e above.
    const A2_SPKI_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAofgWCuLjybRlzo0tZWJj
NiuSfb4p4fAkd/wWJcyQoTbji9k0l8W26mPddxHmfHQp+Vaw+4qPCJrcS2mJPMEz
P1Pt0Bm4d4QlL+yRT+SFd2lZS+pCgNMsD1W/YpRPEwOWvG6b32690r2jZ47soMZo
9wGzjb/7OMg0LOL+bSf63kpaSHSXndS5z5rexMdbBYUsLA9e+KXBdQOS+UTo7WTB
EMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6/I5IhlJH7aGhyxX
FvUK+DWNmoudF8NAco9/h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXp
oQIDAQAB
-----END PUBLIC KEY-----
";
    const A2_PKCS1_PEM: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd/wWJcyQoTbji9k0l8W2
6mPddxHmfHQp+Vaw+4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL+yRT+SFd2lZS+pCgNMs
D1W/YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb/7OMg0LOL+bSf63kpaSHSXndS5
z5rexMdbBYUsLA9e+KXBdQOS+UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxv
b3qCo5ZwKh9kG4LT6/I5IhlJH7aGhyxXFvUK+DWNmoudF8NAco9/h9iaGNj8q2et
hFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQIDAQAB
-----END RSA PUBLIC KEY-----
";

    /// RFC 7515 Appendix A.3: ES256, header {"alg":"ES256"}.
    const A3_SIG: &str = "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
    const A3_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const A3_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
    const A3_D: &str = "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI";
    const A3_SPKI_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEf83OJ3D2xF1Bg8vub9tLe1gHMzV7
6e8Tus9uPHvRVEXH8UTNG72bfocs3+257rn0s2ldbqkLJK2KRiMohYjlrQ==
-----END PUBLIC KEY-----
";

    /// Test-only public keys from openssl, for the refusals: another 2048-bit RSA key, a
    /// 1024-bit RSA key, and a P-384 key.
    const OTHER_RSA_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAjiNDpo0ETlNBZeZZmwQ5
9N2+ZpZD51u4kjz0VqFV6a1P/dnm/vs0Bqz+gc2UuCC7XUyKNT/HxOLPr2ISvQfd
kSIVwB0Ua1uKCtqg0qiFH9ET3bQafAfbcTmh6bjzBsWzFgvWy/0PlIDFuMzizH8Y
7Gbt7bAZB8ZhS2dZctD4K0tYgSdGPOsgjIn2pz81hfrbm5VBPD8QSc/YS0bQ8niM
fAkSi/H7dArQFcrff9yOsrUxvE9kJTNz2wk2gYcidSVDnch0b8dF3ek9F/OvbUYt
fR6Htgow/JV8a0IfVzRUMzs8cz6VhNg3s5/3uWN+rBYkV9SuxF4tXoVb69O+dxdq
6QIDAQAB
-----END PUBLIC KEY-----
";
    const RSA_1024_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC0yEGe+ZO+pK9HxSV+7mP8AH4U
wO/9f7dS/znemPuJ8/eLb7mdZ5BmDRPeugsSsMrF4/Q1j90LT1gsKclJp7zJSDqi
OJn0LDMmGUqZscUqe6g3gXGNtl8zaqexyXslGzOD6fLbcmeIezYCcrIZ2wzZnzyK
GQWmiuwY7SUHs9VZSwIDAQAB
-----END PUBLIC KEY-----
";
    const P384_PEM: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEToJV+ELz10XkefWELaeYJNqt96dQsWQP
OARWqr+TD2ijBEKAb5CekuVbizEqK2hAMAJR25MCd+WknOmbXSYSThiEPholjNdR
7PGTLFTrH56kW5uu4Pym/DhmXfpTlj+9
-----END PUBLIC KEY-----
";

    /// A time before the RFC examples expire.
    const BEFORE_A: i64 = A_EXP - 1;
    /// The clock for freshly made tokens.
    const NOW: i64 = 1_800_000_000;
    const SECRET: &[u8] = b"test-only HS256 secret, 32+ bytes long!";

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn unb64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).expect("test vector is base64url")
    }

    fn a1_secret() -> Vec<u8> {
        unb64(A1_K)
    }

    fn rfc_rsa_jwk() -> String {
        format!(r#"{{"kty":"RSA","n":"{A2_N}","e":"AQAB"}}"#)
    }

    fn rfc_ec_jwk() -> String {
        format!(r#"{{"kty":"EC","crv":"P-256","x":"{A3_X}","y":"{A3_Y}"}}"#)
    }

    fn rfc_rsa_private() -> rsa::RsaPrivateKey {
        let int = |s: &str| BigUint::from_bytes_be(&unb64(s));
        rsa::RsaPrivateKey::from_components(int(A2_N), int("AQAB"), int(A2_D), vec![int(A2_P), int(A2_Q)])
            .expect("the RFC 7515 A.2 key is consistent")
    }

    fn rfc_ec_private() -> ecdsa::SigningKey {
        ecdsa::SigningKey::from_slice(&unb64(A3_D)).expect("the RFC 7515 A.3 key is valid")
    }

    fn unsigned(header: &str, claims: &str) -> String {
        format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()))
    }

    fn hs256_with(secret: &[u8], header: &str, claims: &str) -> String {
        let input = unsigned(header, claims);
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any length");
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn hs256(claims: &str) -> String {
        hs256_with(SECRET, r#"{"alg":"HS256","typ":"JWT"}"#, claims)
    }

    fn rs256(header: &str, claims: &str) -> String {
        use rsa::signature::{SignatureEncoding, Signer};
        let input = unsigned(header, claims);
        let key = pkcs1v15::SigningKey::<Sha256>::new(rfc_rsa_private());
        format!("{input}.{}", b64(&key.sign(input.as_bytes()).to_vec()))
    }

    fn es256(header: &str, claims: &str) -> String {
        use p256::ecdsa::signature::Signer;
        let input = unsigned(header, claims);
        let sig: ecdsa::Signature = rfc_ec_private().sign(input.as_bytes());
        format!("{input}.{}", b64(&sig.to_bytes()))
    }

    fn hs_issuer() -> IssuerKeys {
        IssuerKeys::from_material(&[Algorithm::Hs256], SECRET).expect("secret")
    }

    fn rs_issuer() -> IssuerKeys {
        IssuerKeys::from_material(&[Algorithm::Rs256], A2_SPKI_PEM.as_bytes()).expect("rsa pem")
    }

    fn es_issuer() -> IssuerKeys {
        IssuerKeys::from_material(&[Algorithm::Es256], A3_SPKI_PEM.as_bytes()).expect("ec pem")
    }

    const EXPECT: Expectations<'static> =
        Expectations { issuer: None, audience: None, account_claim: "sub", scopes_claim: "scope" };

    /// Claims that pass every rule at `NOW`, with `extra` members added.
    fn claims(extra: &str) -> String {
        let sep = if extra.is_empty() { "" } else { "," };
        format!(r#"{{"sub":"acme","exp":{}{sep}{extra}}}"#, NOW + 60)
    }

    fn check(token: &str, keys: &IssuerKeys, now: i64, expect: &Expectations<'_>) -> Result<Claims, JwtError> {
        verify(&decode(token.as_bytes())?, keys, now, 0, expect)
    }

    fn refusal(token: &str) -> Option<JwtError> {
        check(token, &hs_issuer(), NOW, &EXPECT).err()
    }

    fn flip_last_char(token: &str) -> String {
        let mut t = token.to_owned();
        let last = t.pop().expect("non-empty");
        // Both replacements keep the last base64url character canonical for a 32-byte MAC.
        t.push(if last == 'A' { 'E' } else { 'A' });
        t
    }

    // ---- The RFC examples.

    #[test]
    fn rfc7515_a1_and_rfc7519_3_1_hs256_example_verifies() {
        let keys = IssuerKeys::from_material(&[Algorithm::Hs256], &a1_secret()).expect("64-byte secret");
        let as_joe = Expectations { issuer: Some("joe"), audience: None, account_claim: "iss", scopes_claim: "scope" };
        let got = check(A1_JWT, &keys, BEFORE_A, &as_joe).expect("the RFC example verifies");
        assert_eq!(got.account, "joe");
        assert_eq!(got.exp, A_EXP);
        assert!(got.scopes.is_empty() && got.jti.is_none() && got.kid.is_none() && got.iat.is_none());
        assert_eq!(got.issuer_claim.as_deref(), Some("joe"));
        // At exp it has expired (RFC 7519 4.1.4: "on or after"); leeway covers skew.
        assert_eq!(check(A1_JWT, &keys, A_EXP, &as_joe), Err(JwtError::Expired));
        let d = decode(A1_JWT.as_bytes()).expect("decodes");
        assert!(verify(&d, &keys, A_EXP + 5, 10, &as_joe).is_ok());
        assert_eq!(verify(&d, &keys, A_EXP + 10, 10, &as_joe), Err(JwtError::Expired));
    }

    #[test]
    fn rfc7515_a2_rs256_example_verifies_with_every_key_form() {
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{A_PAYLOAD}.{A2_SIG}");
        let as_joe = Expectations { account_claim: "iss", ..EXPECT };
        let jwks = format!(r#"{{"keys":[{{"kty":"RSA","kid":"2010-12-29","use":"sig","alg":"RS256","n":"{A2_N}","e":"AQAB"}}]}}"#);
        for material in [rfc_rsa_jwk(), A2_SPKI_PEM.to_owned(), A2_PKCS1_PEM.to_owned(), jwks] {
            let keys = IssuerKeys::from_material(&[Algorithm::Rs256], material.as_bytes()).expect("key parses");
            let got = check(&jwt, &keys, BEFORE_A, &as_joe).expect("the RFC example verifies");
            assert_eq!((got.account.as_str(), got.exp), ("joe", A_EXP));
        }
    }

    #[test]
    fn the_rfc_test_rsa_key_reproduces_the_rfc_signature() {
        // PKCS#1 v1.5 is deterministic: signing the A.2 input with the A.2 private key gives
        // the A.2 signature, which proves the test key was transcribed right.
        let made = rs256(r#"{"alg":"RS256"}"#, "");
        let input = format!("eyJhbGciOiJSUzI1NiJ9.{A_PAYLOAD}");
        use rsa::signature::{SignatureEncoding, Signer};
        let sig = pkcs1v15::SigningKey::<Sha256>::new(rfc_rsa_private()).sign(input.as_bytes());
        assert_eq!(b64(&sig.to_vec()), A2_SIG);
        assert!(made.starts_with("eyJhbGciOiJSUzI1NiJ9."));
    }

    #[test]
    fn rfc7515_a3_es256_example_verifies() {
        let jwt = format!("eyJhbGciOiJFUzI1NiJ9.{A_PAYLOAD}.{A3_SIG}");
        let as_joe = Expectations { account_claim: "iss", ..EXPECT };
        for material in [rfc_ec_jwk(), A3_SPKI_PEM.to_owned()] {
            let keys = IssuerKeys::from_material(&[Algorithm::Es256], material.as_bytes()).expect("key parses");
            let got = check(&jwt, &keys, BEFORE_A, &as_joe).expect("the RFC example verifies");
            assert_eq!(got.account, "joe");
        }
        // The test private key matches the RFC's public key.
        let fresh = es256(r#"{"alg":"ES256","kid":"k1"}"#, &claims(""));
        let got = check(&fresh, &es_issuer(), NOW, &EXPECT).expect("fresh ES256 token");
        assert_eq!(got.kid.as_deref(), Some("k1"));
    }

    #[test]
    fn fresh_tokens_of_each_algorithm_verify_and_yield_their_claims() {
        let c = claims(r#""scope":"read write read","jti":"j-1","iat":1799999990,"iss":"https://idp.example""#);
        let expect = Expectations { issuer: Some("https://idp.example"), ..EXPECT };
        let hs = check(&hs256(&c), &hs_issuer(), NOW, &expect).expect("HS256");
        let rs = check(&rs256(r#"{"alg":"RS256"}"#, &c), &rs_issuer(), NOW, &expect).expect("RS256");
        let es = check(&es256(r#"{"alg":"ES256"}"#, &c), &es_issuer(), NOW, &expect).expect("ES256");
        assert_eq!(hs, rs);
        assert_eq!(rs, es);
        assert_eq!(
            hs,
            Claims {
                account: "acme".into(),
                scopes: vec!["read".into(), "write".into()],
                jti: Some("j-1".into()),
                exp: NOW + 60,
                iat: Some(1_799_999_990),
                issuer_claim: Some("https://idp.example".into()),
                kid: None,
            }
        );
    }

    // ---- Algorithm rules.

    #[test]
    fn alg_none_is_refused_in_any_case_signed_or_not() {
        let keys = hs_issuer();
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = format!(r#"{{"alg":"{alg}"}}"#);
            let bare = format!("{}.", unsigned(&header, &claims("")));
            let faked = format!("{bare}{}", b64(b"anything"));
            for t in [bare, faked] {
                assert_eq!(check(&t, &keys, NOW, &EXPECT), Err(JwtError::AlgNone), "{alg}");
            }
        }
    }

    #[test]
    fn algorithms_other_than_the_three_are_unsupported() {
        for alg in ["HS512", "RS384", "PS256", "EdDSA", "hs256", "HS256 ", ""] {
            let header = format!(r#"{{"alg":"{alg}"}}"#);
            let t = hs256_with(SECRET, &header, &claims(""));
            assert_eq!(refusal(&t), Some(JwtError::UnsupportedAlgorithm), "{alg:?}");
        }
        assert_eq!(Algorithm::from_name("RS256"), Some(Algorithm::Rs256));
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(a.as_str()), Some(a));
        }
    }

    #[test]
    fn hs256_token_made_with_the_rsa_public_key_is_refused_by_an_rs256_issuer() {
        // The classic confusion attack: the attacker knows the issuer's public key and HMACs
        // a token with its text, hoping the verifier uses that text as an HMAC secret.
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        let rsa_jwk = rfc_rsa_jwk();
        for material in [A2_SPKI_PEM, A2_PKCS1_PEM, A2_SPKI_PEM.trim_end(), rsa_jwk.as_str()] {
            let keys = IssuerKeys::from_material(&[Algorithm::Rs256], material.as_bytes()).expect("rsa key");
            let forged = hs256_with(material.as_bytes(), header, &claims(""));
            assert_eq!(check(&forged, &keys, NOW, &EXPECT), Err(JwtError::AlgorithmNotAllowed));
        }
        // Nor can an issuer be registered so that the attack could work.
        assert_eq!(
            IssuerKeys::from_material(&[Algorithm::Hs256, Algorithm::Rs256], A2_SPKI_PEM.as_bytes()).err(),
            Some(KeyError::MixedKeyKinds)
        );
        for material in [A2_SPKI_PEM, A2_PKCS1_PEM, A3_SPKI_PEM, rsa_jwk.as_str()] {
            assert_eq!(
                IssuerKeys::from_material(&[Algorithm::Hs256], material.as_bytes()).err(),
                Some(KeyError::SecretLooksLikePublicKey)
            );
        }
        let rsa = NamedKey { kid: None, key: parse_key(Algorithm::Rs256, A2_SPKI_PEM.as_bytes()).expect("rsa") };
        assert_eq!(IssuerKeys::new(&[Algorithm::Hs256], vec![rsa.clone()]).err(), Some(KeyError::KeyAlgorithmNotAllowed));
        assert_eq!(IssuerKeys::new(&[Algorithm::Hs256, Algorithm::Rs256], vec![rsa]).err(), Some(KeyError::MixedKeyKinds));
    }

    #[test]
    fn an_allowed_alg_still_needs_a_key_of_its_kind() {
        // RS256 and ES256 both allowed, only an RSA key registered: an ES256 token finds no key.
        let keys = IssuerKeys::from_material(&[Algorithm::Rs256, Algorithm::Es256], A2_SPKI_PEM.as_bytes()).expect("rsa");
        let t = es256(r#"{"alg":"ES256"}"#, &claims(""));
        assert_eq!(check(&t, &keys, NOW, &EXPECT), Err(JwtError::NoMatchingKey));
        let t = rs256(r#"{"alg":"RS256"}"#, &claims(""));
        assert!(check(&t, &keys, NOW, &EXPECT).is_ok());
        // An RS256 token to an ES256-only issuer.
        assert_eq!(check(&t, &es_issuer(), NOW, &EXPECT), Err(JwtError::AlgorithmNotAllowed));
    }

    // ---- Signatures.

    #[test]
    fn a_tampered_payload_is_refused_for_every_algorithm() {
        let good = claims("");
        let evil = format!(r#"{{"sub":"admin","exp":{}}}"#, NOW + 60);
        let cases = [
            (hs256(&good), hs_issuer()),
            (rs256(r#"{"alg":"RS256"}"#, &good), rs_issuer()),
            (es256(r#"{"alg":"ES256"}"#, &good), es_issuer()),
        ];
        for (t, keys) in cases {
            let parts: Vec<&str> = t.split('.').collect();
            let swapped = format!("{}.{}.{}", parts[0], b64(evil.as_bytes()), parts[2]);
            assert_eq!(check(&swapped, &keys, NOW, &EXPECT), Err(JwtError::BadSignature));
            assert!(check(&t, &keys, NOW, &EXPECT).is_ok());
        }
    }

    #[test]
    fn a_tampered_or_truncated_signature_is_refused() {
        assert_eq!(refusal(&flip_last_char(&hs256(&claims("")))), Some(JwtError::BadSignature));
        let es = es256(r#"{"alg":"ES256"}"#, &claims(""));
        let (input, sig) = es.rsplit_once('.').expect("three parts");
        let mut raw = unb64(sig);
        raw[10] ^= 1;
        let flipped = format!("{input}.{}", b64(&raw));
        let short = format!("{input}.{}", b64(&unb64(sig)[..63]));
        let empty = format!("{input}.");
        // ES256 signatures in DER (as some libraries wrongly emit) are not JWS signatures.
        let der = ecdsa::Signature::from_slice(&unb64(sig)).expect("sig").to_der();
        let as_der = format!("{input}.{}", b64(der.as_bytes()));
        for t in [flipped, short, empty, as_der] {
            assert_eq!(check(&t, &es_issuer(), NOW, &EXPECT), Err(JwtError::BadSignature));
        }
        let rs = rs256(r#"{"alg":"RS256"}"#, &claims(""));
        let (input, sig) = rs.rsplit_once('.').expect("three parts");
        let mut raw = unb64(sig);
        raw[0] ^= 0x80;
        let flipped = format!("{input}.{}", b64(&raw));
        let short = format!("{input}.{}", b64(&raw[1..]));
        for t in [flipped, short] {
            assert_eq!(check(&t, &rs_issuer(), NOW, &EXPECT), Err(JwtError::BadSignature));
        }
    }

    #[test]
    fn the_wrong_key_is_refused() {
        let other_hs = IssuerKeys::from_material(&[Algorithm::Hs256], b"another test-only secret of 32+ bytes").expect("secret");
        assert_eq!(check(&hs256(&claims("")), &other_hs, NOW, &EXPECT), Err(JwtError::BadSignature));
        let other_rs = IssuerKeys::from_material(&[Algorithm::Rs256], OTHER_RSA_PEM.as_bytes()).expect("rsa");
        let rs = rs256(r#"{"alg":"RS256"}"#, &claims(""));
        assert_eq!(check(&rs, &other_rs, NOW, &EXPECT), Err(JwtError::BadSignature));
        // Another P-256 key: the public key of the scalar 0x0707...07.
        let other_ec = ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("scalar");
        let point = other_ec.verifying_key().to_encoded_point(false);
        let jwk = format!(
            r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#,
            b64(point.x().expect("x")),
            b64(point.y().expect("y"))
        );
        let other_es = IssuerKeys::from_material(&[Algorithm::Es256], jwk.as_bytes()).expect("ec");
        let es = es256(r#"{"alg":"ES256"}"#, &claims(""));
        assert_eq!(check(&es, &other_es, NOW, &EXPECT), Err(JwtError::BadSignature));
    }

    // ---- Time.

    #[test]
    fn expiry_with_and_without_leeway() {
        let t = hs256(&format!(r#"{{"sub":"acme","exp":{NOW}}}"#));
        let d = decode(t.as_bytes()).expect("decodes");
        let keys = hs_issuer();
        assert!(verify(&d, &keys, NOW - 1, 0, &EXPECT).is_ok());
        assert_eq!(verify(&d, &keys, NOW, 0, &EXPECT), Err(JwtError::Expired));
        assert_eq!(verify(&d, &keys, NOW + 1000, 0, &EXPECT), Err(JwtError::Expired));
        assert!(verify(&d, &keys, NOW + 29, 30, &EXPECT).is_ok());
        assert_eq!(verify(&d, &keys, NOW + 30, 30, &EXPECT), Err(JwtError::Expired));
        assert_eq!(verify(&d, &keys, NOW, -30, &EXPECT), Err(JwtError::Expired), "negative leeway is 0");
        // Huge values neither overflow nor wrap.
        assert!(verify(&d, &keys, i64::MIN, i64::MAX, &EXPECT).is_ok());
        assert_eq!(verify(&d, &keys, i64::MAX, i64::MAX, &EXPECT), Err(JwtError::Expired));
    }

    #[test]
    fn exp_must_be_a_numeric_date() {
        assert_eq!(refusal(&hs256(r#"{"sub":"acme"}"#)), Some(JwtError::MissingExp));
        for exp in [r#""1900000000""#, "null", "true", "[1900000000]", "1e300", "18446744073709551615"] {
            let t = hs256(&format!(r#"{{"sub":"acme","exp":{exp}}}"#));
            assert_eq!(refusal(&t), Some(JwtError::BadExp), "{exp}");
        }
        let fractional = hs256(&format!(r#"{{"sub":"acme","exp":{}.75}}"#, NOW + 1));
        assert_eq!(check(&fractional, &hs_issuer(), NOW, &EXPECT).map(|c| c.exp), Ok(NOW + 1));
        let past_float = hs256(&format!(r#"{{"sub":"acme","exp":{}.5}}"#, NOW - 1));
        assert_eq!(refusal(&past_float), Some(JwtError::Expired));
        assert_eq!(refusal(&hs256(&claims(r#""iat":"yesterday""#))), Some(JwtError::BadIat));
        assert_eq!(refusal(&hs256(&claims(r#""nbf":"now""#))), Some(JwtError::BadNbf));
    }

    #[test]
    fn nbf_in_the_future_is_refused_beyond_the_leeway() {
        let t = hs256(&claims(&format!(r#""nbf":{}"#, NOW + 10)));
        let d = decode(t.as_bytes()).expect("decodes");
        let keys = hs_issuer();
        assert_eq!(verify(&d, &keys, NOW, 0, &EXPECT), Err(JwtError::NotYetValid));
        assert_eq!(verify(&d, &keys, NOW, 9, &EXPECT), Err(JwtError::NotYetValid));
        assert!(verify(&d, &keys, NOW, 10, &EXPECT).is_ok());
        assert!(verify(&d, &keys, NOW + 10, 0, &EXPECT).is_ok(), "valid from nbf on");
    }

    // ---- Issuer and audience.

    #[test]
    fn issuer_must_match_when_registered() {
        let keys = hs_issuer();
        let expect = Expectations { issuer: Some("https://idp.example"), ..EXPECT };
        let good = hs256(&claims(r#""iss":"https://idp.example""#));
        assert!(check(&good, &keys, NOW, &expect).is_ok());
        for other in [r#""iss":"https://evil.example""#, r#""iss":"https://idp.example/""#, ""] {
            let t = hs256(&claims(other));
            assert_eq!(check(&t, &keys, NOW, &expect), Err(JwtError::IssuerMismatch), "{other}");
        }
        assert_eq!(check(&hs256(&claims(r#""iss":7"#)), &keys, NOW, &expect), Err(JwtError::BadIssuer));
        let long = format!(r#""iss":"{}""#, "i".repeat(MAX_ISSUER_BYTES + 1));
        assert_eq!(check(&hs256(&claims(&long)), &keys, NOW, &EXPECT), Err(JwtError::BadIssuer));
    }

    #[test]
    fn audience_must_be_named_when_registered_and_absent_otherwise() {
        let keys = hs_issuer();
        let expect = Expectations { audience: Some("orders-db"), ..EXPECT };
        for aud in [r#""aud":"orders-db""#, r#""aud":["billing","orders-db"]"#] {
            assert!(check(&hs256(&claims(aud)), &keys, NOW, &expect).is_ok(), "{aud}");
            assert_eq!(check(&hs256(&claims(aud)), &keys, NOW, &EXPECT), Err(JwtError::UnexpectedAudience));
        }
        for aud in [r#""aud":"billing""#, r#""aud":["billing"]"#, r#""aud":[]"#, r#""aud":7"#, r#""aud":["orders-db "]"#, ""] {
            assert_eq!(check(&hs256(&claims(aud)), &keys, NOW, &expect), Err(JwtError::AudienceMismatch), "{aud}");
        }
    }

    // ---- Account, scopes, jti.

    #[test]
    fn account_claim_rules() {
        let keys = hs_issuer();
        let exp = NOW + 60;
        let with = |sub: &str| hs256(&format!(r#"{{"sub":{sub},"exp":{exp}}}"#));
        assert_eq!(refusal(&hs256(&format!(r#"{{"exp":{exp}}}"#))), Some(JwtError::MissingAccount));
        let max = format!(r#""{}""#, "a".repeat(256));
        let over = format!(r#""{}""#, "a".repeat(257));
        let over_multibyte = format!(r#""{}""#, "é".repeat(257));
        for bad in ["\"\"", over.as_str(), over_multibyte.as_str(), "\"a\\u0000b\"", "\"a\\nb\"", "true", "null", "1.5", "[\"acme\"]", "{}"] {
            assert_eq!(refusal(&with(bad)), Some(JwtError::BadAccount), "{bad}");
        }
        for (given, one) in [(max.as_str(), "a".repeat(256)), ("42", "42".into()), ("\"0042\"", "42".into()), ("\"é\"", "é".into())] {
            assert_eq!(check(&with(given), &keys, NOW, &EXPECT).map(|c| c.account), Ok(one), "{given}");
        }
        let custom = Expectations { account_claim: "https://example.com/tenant", ..EXPECT };
        let t = hs256(&claims(r#""https://example.com/tenant":"globex""#));
        assert_eq!(check(&t, &keys, NOW, &custom).map(|c| c.account), Ok("globex".into()));
    }

    #[test]
    fn scopes_claim_rules() {
        let keys = hs_issuer();
        let scopes = |extra: &str| check(&hs256(&claims(extra)), &keys, NOW, &EXPECT).map(|c| c.scopes);
        let v = |s: &[&str]| Ok(s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(scopes(""), v(&[]));
        assert_eq!(scopes(r#""scope":"""#), v(&[]));
        assert_eq!(scopes(r#""scope":"  read   write ""#), v(&["read", "write"]));
        assert_eq!(scopes(r#""scope":["read","orders:write","read"]"#), v(&["read", "orders:write"]));
        for bad in [r#""scope":7"#, r#""scope":null"#, r#""scope":["read",7]"#, r#""scope":[""]"#, r#""scope":{"a":1}"#, r#""scope":"a\tb""#] {
            assert_eq!(scopes(bad), Err(JwtError::BadScopes), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        assert_eq!(scopes(&format!(r#""scope":"{}""#, many.join(" "))), Err(JwtError::TooManyScopes));
        assert_eq!(scopes(&format!(r#""scope":{:?}"#, many)), Err(JwtError::TooManyScopes));
        assert_eq!(scopes(&format!(r#""scope":"{}""#, many[..MAX_SCOPES].join(" "))).map(|s| s.len()), Ok(MAX_SCOPES));
        let long = "s".repeat(MAX_SCOPE_BYTES + 1);
        assert_eq!(scopes(&format!(r#""scope":"read {long}""#)), Err(JwtError::ScopeTooLong));
        assert_eq!(scopes(&format!(r#""scope":["{long}"]"#)), Err(JwtError::ScopeTooLong));
        assert_eq!(scopes(&format!(r#""scope":"{}""#, &long[1..])).map(|s| s.len()), Ok(1));
        let roles = Expectations { scopes_claim: "roles", ..EXPECT };
        let t = hs256(&claims(r#""roles":["admin"],"scope":"ignored""#));
        assert_eq!(check(&t, &keys, NOW, &roles).map(|c| c.scopes), v(&["admin"]));
    }

    #[test]
    fn jti_is_a_short_string() {
        assert_eq!(refusal(&hs256(&claims(r#""jti":7"#))), Some(JwtError::BadJti));
        let long = format!(r#""jti":"{}""#, "j".repeat(MAX_JTI_BYTES + 1));
        assert_eq!(refusal(&hs256(&claims(&long))), Some(JwtError::BadJti));
        let max = format!(r#""jti":"{}""#, "j".repeat(MAX_JTI_BYTES));
        assert!(refusal(&hs256(&claims(&max))).is_none());
    }

    // ---- Shape and decoding.

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let pad = "x".repeat(MAX_JWT_BYTES);
        let big = hs256(&claims(&format!(r#""pad":"{pad}""#)));
        assert!(big.len() > MAX_JWT_BYTES && looks_like_jwt(big.as_bytes()));
        assert_eq!(decode(big.as_bytes()).err(), Some(JwtError::TooLong));
        // Not even base64: the length decides first.
        let junk = vec![b'!'; MAX_JWT_BYTES + 1];
        assert_eq!(decode(&junk).err(), Some(JwtError::TooLong));
        let huge_header = format!(r#"{{"alg":"HS256","x":"{}"}}"#, "h".repeat(MAX_HEADER_BYTES));
        assert_eq!(decode(hs256_with(SECRET, &huge_header, &claims("")).as_bytes()).err(), Some(JwtError::HeaderTooLarge));
        let deep = format!(r#""n":{}1{}"#, "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        assert_eq!(decode(hs256(&claims(&deep)).as_bytes()).err(), Some(JwtError::TooDeep));
        let ok_depth = format!(r#""n":{}1{}"#, "[".repeat(MAX_JSON_DEPTH - 1), "]".repeat(MAX_JSON_DEPTH - 1));
        assert!(decode(hs256(&claims(&ok_depth)).as_bytes()).is_ok());
        // Brackets inside strings do not count.
        let in_string = format!(r#""n":"{}""#, "[".repeat(100));
        assert!(decode(hs256(&claims(&in_string)).as_bytes()).is_ok());
    }

    #[test]
    fn malformed_segments_are_refused() {
        let t = hs256(&claims(""));
        let (h, rest) = t.split_once('.').expect("dot");
        let (c, s) = rest.split_once('.').expect("dot");
        let cases: Vec<(String, JwtError)> = vec![
            (String::new(), JwtError::Malformed),
            (format!("{h}.{c}"), JwtError::Malformed),
            (format!("{h}.{c}.{s}.{s}"), JwtError::Malformed),
            (format!(".{c}.{s}"), JwtError::Malformed),
            (format!("{h}..{s}"), JwtError::Malformed),
            (format!("{h}.{c}.{s} "), JwtError::Malformed),
            (format!("{h}.{c}+.{s}"), JwtError::Malformed),
            (format!("{h}.{c}/.{s}"), JwtError::Malformed),
            (format!("{h}.{c}.{s}="), JwtError::BadBase64),
            (format!("{h}==.{c}.{s}"), JwtError::BadBase64),
            (format!("{h}.AAAAA.{s}"), JwtError::BadBase64),
            (format!("{h}.{c}.{}", flip_last_char_noncanonical(s)), JwtError::BadBase64),
        ];
        for (token, want) in cases {
            assert_eq!(decode(token.as_bytes()).err(), Some(want), "{token}");
        }
        let nonutf8 = "eyJhbGciOiJIUzI1NiJ9\u{e9}.e30.AA";
        assert_eq!(decode(nonutf8.as_bytes()).err(), Some(JwtError::Malformed));
    }

    /// A 32-byte MAC's base64url ends in a character carrying 4 bits and 2 zero bits; one with
    /// a non-zero trailing bit is another spelling of (nearly) the same bytes.
    fn flip_last_char_noncanonical(sig: &str) -> String {
        let mut s = sig.to_owned();
        let last = s.pop().expect("non-empty");
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let i = alphabet.iter().position(|&b| b as char == last).expect("base64url");
        s.push(alphabet[i | 1] as char);
        s
    }

    #[test]
    fn header_rules() {
        let c = claims("");
        let refused = |header: &str| decode(hs256_with(SECRET, header, &c).as_bytes()).err();
        assert_eq!(refused("[]"), Some(JwtError::BadHeader));
        assert_eq!(refused("\"HS256\""), Some(JwtError::BadHeader));
        assert_eq!(refused("{\"alg\":\"HS256\""), Some(JwtError::BadHeader));
        assert_eq!(refused("{\"alg\":\"HS256\"} x"), Some(JwtError::BadHeader));
        assert_eq!(refused("{}"), Some(JwtError::MissingAlg));
        assert_eq!(refused(r#"{"alg":256}"#), Some(JwtError::MissingAlg));
        assert_eq!(refused(r#"{"alg":"HS256","alg":"none"}"#), Some(JwtError::DuplicateMember));
        assert_eq!(refused(r#"{"alg":"HS256","typ":"JOSE"}"#), Some(JwtError::BadTyp));
        assert_eq!(refused(r#"{"alg":"HS256","typ":"at+jwt"}"#), Some(JwtError::BadTyp));
        assert_eq!(refused(r#"{"alg":"HS256","typ":null}"#), Some(JwtError::BadTyp));
        assert_eq!(refused(r#"{"alg":"HS256","crit":["exp"]}"#), Some(JwtError::CritHeader));
        assert_eq!(refused(r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#), Some(JwtError::CritHeader));
        assert_eq!(refused(r#"{"alg":"HS256","kid":7}"#), Some(JwtError::BadKid));
        assert_eq!(refused(&format!(r#"{{"alg":"HS256","kid":"{}"}}"#, "k".repeat(257))), Some(JwtError::BadKid));
        assert_eq!(refused(r#"{"alg":"HS256","typ":"jwt"}"#), None);
        // A key offered in the header is ignored, never trusted.
        let jwk_header = format!(r#"{{"alg":"RS256","jwk":{}}}"#, rfc_rsa_jwk());
        let t = rs256(&jwk_header, &c);
        assert_eq!(check(&t, &es_issuer(), NOW, &EXPECT), Err(JwtError::AlgorithmNotAllowed));
        assert!(check(&t, &rs_issuer(), NOW, &EXPECT).is_ok());
    }

    #[test]
    fn claims_must_be_one_json_object() {
        for bad in ["[]", "\"sub\"", "1", "null", "{", "{\"sub\":\"a\"}{}", "\u{feff}{}"] {
            let t = hs256_with(SECRET, r#"{"alg":"HS256"}"#, bad);
            assert_eq!(decode(t.as_bytes()).err(), Some(JwtError::BadClaims), "{bad:?}");
        }
        let twice = format!(r#"{{"sub":"acme","sub":"admin","exp":{}}}"#, NOW + 60);
        assert_eq!(decode(hs256(&twice).as_bytes()).err(), Some(JwtError::DuplicateMember));
        let bad_utf8 = format!("{}.{}.AA", b64(br#"{"alg":"HS256"}"#), b64(b"{\"sub\":\"\xff\"}"));
        assert_eq!(decode(bad_utf8.as_bytes()).err(), Some(JwtError::BadClaims));
    }

    // ---- Keys.

    #[test]
    fn key_material_is_checked_at_registration() {
        let rs = |m: &str| parse_key(Algorithm::Rs256, m.as_bytes()).err();
        let es = |m: &str| parse_key(Algorithm::Es256, m.as_bytes()).err();
        assert_eq!(parse_key(Algorithm::Hs256, &[7u8; 31]).err(), Some(KeyError::SecretTooShort));
        assert!(parse_key(Algorithm::Hs256, &[7u8; 32]).is_ok());
        assert!(parse_key(Algorithm::Hs256, &[b'{'; 40]).is_ok(), "a secret may start with '{{'");
        assert_eq!(parse_key(Algorithm::Hs256, &vec![1u8; MAX_KEY_MATERIAL_BYTES + 1]).err(), Some(KeyError::TooLarge));
        assert_eq!(rs(RSA_1024_PEM), Some(KeyError::RsaTooSmall));
        assert_eq!(rs(A3_SPKI_PEM), Some(KeyError::NotRsaKey));
        assert_eq!(rs(P384_PEM), Some(KeyError::BadPem));
        assert_eq!(es(P384_PEM), Some(KeyError::NotP256Key));
        assert_eq!(es(A2_SPKI_PEM), Some(KeyError::NotP256Key));
        assert_eq!(es(A2_PKCS1_PEM), Some(KeyError::NotP256Key));
        assert_eq!(rs("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), Some(KeyError::PrivateKey));
        assert_eq!(es("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"), Some(KeyError::PrivateKey));
        assert_eq!(rs("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), Some(KeyError::Certificate));
        assert_eq!(rs("-----BEGIN DSA PUBLIC KEY-----\nAAAA\n-----END DSA PUBLIC KEY-----\n"), Some(KeyError::UnsupportedPem));
        assert_eq!(rs("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"), Some(KeyError::BadPem));
        assert_eq!(rs("ssh-rsa AAAAB3NzaC1yc2E"), Some(KeyError::Unrecognised));
        assert_eq!(parse_key(Algorithm::Rs256, b"\xff\xfe").err(), Some(KeyError::Unrecognised));
        // Surrounding whitespace and CRLF line ends are fine.
        assert!(rs(&format!("\n  {}\n", A2_SPKI_PEM.replace('\n', "\r\n"))).is_none());
        // The A.2 PEM as a secret is refused; as an RS256 key it is accepted.
        assert!(rs(A2_SPKI_PEM).is_none() && es(A3_SPKI_PEM).is_none());
    }

    #[test]
    fn jwk_rules() {
        let rs = |m: &str| parse_key(Algorithm::Rs256, m.as_bytes()).err();
        let es = |m: &str| parse_key(Algorithm::Es256, m.as_bytes()).err();
        let jwk = |extra: &str| format!(r#"{{"kty":"RSA","n":"{A2_N}","e":"AQAB"{extra}}}"#);
        assert_eq!(rs(&jwk("")), None);
        assert_eq!(rs(&jwk(r#","use":"sig","alg":"RS256","key_ops":["verify"]"#)), None);
        assert_eq!(rs(&jwk(r#","d":"AQAB""#)), Some(KeyError::PrivateKey));
        assert_eq!(rs(&jwk(r#","use":"enc""#)), Some(KeyError::NotForSigning));
        assert_eq!(rs(&jwk(r#","key_ops":["encrypt"]"#)), Some(KeyError::NotForSigning));
        assert_eq!(rs(&jwk(r#","alg":"RS512""#)), Some(KeyError::JwkAlgMismatch));
        assert_eq!(rs(&jwk(r#","kid":7"#)), Some(KeyError::BadJwk));
        assert_eq!(rs(&jwk(r#","kty":"RSA""#)), Some(KeyError::BadJwk), "a repeated member");
        assert_eq!(rs(r#"{"kty":"RSA","e":"AQAB"}"#), Some(KeyError::BadJwk));
        assert_eq!(rs(&format!(r#"{{"kty":"RSA","n":"{A2_N}=","e":"AQAB"}}"#)), Some(KeyError::BadJwk));
        assert_eq!(rs(&format!(r#"{{"kty":"RSA","n":"{}","e":"AQAB"}}"#, b64(&[0xff; 128]))), Some(KeyError::RsaTooSmall));
        assert_eq!(rs(&format!(r#"{{"kty":"RSA","n":"{}","e":"AQAB"}}"#, b64(&[0xff; 513]))), Some(KeyError::RsaTooLarge));
        assert_eq!(rs(&rfc_ec_jwk()), Some(KeyError::NotRsaKey));
        assert_eq!(rs(r#"{"kty":"oct","k":"AyM1"}"#), Some(KeyError::NotRsaKey));
        assert_eq!(es(&rfc_ec_jwk()), None);
        assert_eq!(es(&jwk("")), Some(KeyError::NotP256Key));
        assert_eq!(es(&rfc_ec_jwk().replace("P-256", "P-384")), Some(KeyError::NotP256Key));
        assert_eq!(es(&format!(r#"{{"kty":"EC","crv":"P-256","x":"{A3_Y}","y":"{A3_X}"}}"#)), Some(KeyError::BadJwk), "off the curve");
        assert_eq!(es(&format!(r#"{{"kty":"EC","crv":"P-256","x":"{A3_X}"}}"#)), Some(KeyError::BadJwk));
        assert_eq!(es(&format!(r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{A3_Y}"}}"#, b64(&[1; 31]))), Some(KeyError::BadJwk));
        assert_eq!(es(&format!("{}{}", "[".repeat(100), "]".repeat(100))), Some(KeyError::Unrecognised));
        assert_eq!(es(&format!(r#"{{"a":{}1{}}}"#, "[".repeat(100), "]".repeat(100))), Some(KeyError::BadJwk));
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_or_as_the_only_key() {
        let other_ec = ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("scalar");
        let p = other_ec.verifying_key().to_encoded_point(false);
        let (ox, oy) = (b64(p.x().expect("x")), b64(p.y().expect("y")));
        let jwks = format!(
            r#"{{"keys":[
                {{"kty":"EC","crv":"P-256","kid":"old","x":"{ox}","y":"{oy}"}},
                {{"kty":"EC","crv":"P-256","kid":"new","x":"{A3_X}","y":"{A3_Y}"}},
                {{"kty":"RSA","kid":"rsa","n":"{A2_N}","e":"AQAB"}},
                {{"kty":"EC","crv":"P-256","kid":"enc","use":"enc","x":"{A3_X}","y":"{A3_Y}"}}
            ]}}"#
        );
        let keys = IssuerKeys::from_material(&[Algorithm::Es256], jwks.as_bytes()).expect("jwks");
        assert_eq!(keys.keys().len(), 2, "the RSA and encryption keys are skipped");
        assert_eq!(parse_key(Algorithm::Es256, jwks.as_bytes()).err(), Some(KeyError::SeveralKeys));
        let c = claims("");
        let with_kid = |kid: &str| es256(&format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#), &c);
        assert_eq!(check(&with_kid("new"), &keys, NOW, &EXPECT).map(|c| c.kid), Ok(Some("new".into())));
        assert_eq!(check(&with_kid("old"), &keys, NOW, &EXPECT), Err(JwtError::BadSignature));
        assert_eq!(check(&with_kid("gone"), &keys, NOW, &EXPECT), Err(JwtError::NoMatchingKey));
        assert_eq!(check(&es256(r#"{"alg":"ES256"}"#, &c), &keys, NOW, &EXPECT), Err(JwtError::NoMatchingKey));

        // Both algorithms from one set; a kid names a key for its own algorithm only.
        let both = IssuerKeys::from_material(&[Algorithm::Es256, Algorithm::Rs256], jwks.as_bytes()).expect("jwks");
        assert_eq!(both.keys().len(), 3);
        assert!(check(&rs256(r#"{"alg":"RS256","kid":"rsa"}"#, &c), &both, NOW, &EXPECT).is_ok());
        assert!(check(&rs256(r#"{"alg":"RS256"}"#, &c), &both, NOW, &EXPECT).is_ok(), "the only RSA key");
        assert_eq!(check(&rs256(r#"{"alg":"RS256","kid":"new"}"#, &c), &both, NOW, &EXPECT), Err(JwtError::NoMatchingKey));

        // A set of one key: used for a token without kid, or whose kid it does not name.
        let one = format!(r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"new","x":"{A3_X}","y":"{A3_Y}"}}]}}"#);
        let keys = IssuerKeys::from_material(&[Algorithm::Es256], one.as_bytes()).expect("jwks");
        assert!(check(&es256(r#"{"alg":"ES256"}"#, &c), &keys, NOW, &EXPECT).is_ok());
        assert_eq!(check(&with_kid("other"), &keys, NOW, &EXPECT), Err(JwtError::NoMatchingKey));
        // A PEM has no kid: any kid in the token is fine.
        assert!(check(&with_kid("whatever"), &es_issuer(), NOW, &EXPECT).is_ok());

        let none_usable = format!(r#"{{"keys":[{{"kty":"RSA","n":"{A2_N}","e":"AQAB"}}]}}"#);
        assert_eq!(IssuerKeys::from_material(&[Algorithm::Es256], none_usable.as_bytes()).err(), Some(KeyError::NoUsableKey));
        let bad_member = format!(r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{A3_X}"}}]}}"#);
        assert_eq!(IssuerKeys::from_material(&[Algorithm::Es256], bad_member.as_bytes()).err(), Some(KeyError::BadJwk));
        let many = format!(r#"{{"keys":[{}]}}"#, vec![rfc_ec_jwk(); MAX_KEYS + 1].join(","));
        assert_eq!(IssuerKeys::from_material(&[Algorithm::Es256], many.as_bytes()).err(), Some(KeyError::TooManyKeys));
        assert_eq!(IssuerKeys::from_material(&[Algorithm::Es256], br#"{"keys":{}}"#).err(), Some(KeyError::BadJwk));
        assert_eq!(IssuerKeys::from_material(&[], SECRET).err(), Some(KeyError::NoAlgorithms));
    }

    #[test]
    fn errors_and_debug_output_never_carry_the_token_or_the_key() {
        let t = hs256(&claims(r#""jti":"secret-ish-id""#));
        let d = decode(t.as_bytes()).expect("decodes");
        let shown = format!("{d:?} {:?}", hs_issuer());
        let sig = t.rsplit('.').next().expect("sig");
        let payload = t.split('.').nth(1).expect("payload");
        assert!(!shown.contains(sig) && !shown.contains(payload) && !shown.contains("secret-ish"), "{shown}");
        assert!(!shown.contains("test-only HS256"), "{shown}");
        let key_shown = format!("{:?}", parse_key(Algorithm::Rs256, A2_SPKI_PEM.as_bytes()).expect("key"));
        assert_eq!(key_shown, "VerifyingKey(RS256)");
        // Every sentence is fixed text.
        for e in [JwtError::Malformed, JwtError::BadSignature, JwtError::Expired, JwtError::BadAccount] {
            assert!(!e.describe().contains(sig) && !e.as_str().is_empty());
        }
        assert!(KeyError::BadPem.describe().len() < 100);
    }

    #[test]
    fn issuer_hint_is_bounded_and_sanitised() {
        let hint = |extra: &str| issuer_hint(&decode(hs256(&claims(extra)).as_bytes()).expect("decodes"));
        assert_eq!(hint(r#""iss":"https://idp.example/t1","jti":"a1-b2""#), "iss=https://idp.example/t1 jti=a1-b2");
        assert_eq!(hint(""), "");
        assert_eq!(hint(r#""jti":"x""#), "jti=x");
        assert_eq!(hint(r#""iss":"a b\"c\n<script>=""#), "iss=a?b?c??script??");
        let long = hint(&format!(r#""iss":"{}","jti":"{}""#, "i".repeat(500), "j".repeat(500)));
        assert_eq!(long, format!("iss={}... jti={}...", "i".repeat(HINT_ISSUER_CHARS), "j".repeat(HINT_JTI_CHARS)));
        assert_eq!(hint(r#""iss":7"#), "");
    }

    // ---- Routing: what looks like a JWT.

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt(A1_JWT.as_bytes()));
        assert!(looks_like_jwt(hs256(&claims("")).as_bytes()));
        for not in [
            "", "eyJ", "eyJ.a", "eyJ..a", "eyJ.a.", ".eyJ.a.b", "eyJ.a.b.c", "eyI.a.b", "eyJ.a b.c", "eyJ.a.b=",
            "eyJ.a.b\n", "cf-k7R9fQw2VDp3Zx4mN8tJ1s000000", "eyJhbGc_k7R9fQw2VDp3Zx4mN8tJ1s000000",
        ] {
            assert!(!looks_like_jwt(not.as_bytes()), "{not:?}");
        }
        let long = format!("eyJ{}.a.b", "A".repeat(MAX_JWT_SHAPE_BYTES));
        assert!(!looks_like_jwt(long.as_bytes()));
        assert!(!looks_like_jwt("eyJ.a.\u{e9}".as_bytes()));
    }

    #[test]
    fn generated_opaque_tokens_never_look_like_jwts() {
        for prefix in ["cf-", "eyJ_", "eyJhbGciOiJIUzI1NiJ9-", "thresh_live_", "e-"] {
            for _ in 0..200 {
                let t = format::generate(prefix).expect("csprng");
                assert!(!looks_like_jwt(t.as_bytes()), "{t}");
            }
        }
    }

    proptest! {
        #[test]
        fn no_opaque_token_shape_looks_like_a_jwt(
            prefix in "(eyJ)?[A-Za-z0-9][A-Za-z0-9_-]{0,27}[_-]",
            body in "[0-9A-Za-z]{22}",
        ) {
            let t = format::compose(&prefix, &body);
            prop_assert!(format::parse(&t).is_ok());
            prop_assert!(!looks_like_jwt(t.as_bytes()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = looks_like_jwt(&bytes);
            if let Ok(d) = decode(&bytes) {
                let _ = verify(&d, &hs_issuer(), NOW, 0, &EXPECT);
                let _ = issuer_hint(&d);
            }
            let _ = parse_key(Algorithm::Rs256, &bytes);
            let _ = parse_key(Algorithm::Es256, &bytes);
        }

        #[test]
        fn arbitrary_claims_never_panic(json in "\\{(\"[a-z]{1,4}\":(\"[ -~]{0,8}\"|-?[0-9]{1,20}(\\.[0-9])?|true|null|\\[\\]),?){0,6}\\}") {
            let t = hs256(&json);
            if let Ok(d) = decode(t.as_bytes()) {
                let _ = verify(&d, &hs_issuer(), NOW, 5, &EXPECT);
            }
        }
    }
}
