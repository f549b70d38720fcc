//! An issuer's registered keys: HS256 secrets, RSA and P-256 public keys (PEM or JWK), JWK sets.

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
use serde_json::{Map, Value};
use sha2::Sha256;

use super::decode::{nesting_within, Members};
use super::*;

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
    pub(super) fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
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
    pub(super) algorithms: Vec<Algorithm>,
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
        Ok(IssuerKeys {
            algorithms: algs,
            keys,
        })
    }

    /// An issuer from one piece of registered material: the secret for `[HS256]`; otherwise a
    /// PEM, a JWK or a JWK set, of which the keys for the listed algorithms are kept.
    pub fn from_material(
        algorithms: &[Algorithm],
        material: &[u8],
    ) -> Result<IssuerKeys, KeyError> {
        if algorithms.is_empty() {
            return Err(KeyError::NoAlgorithms);
        }
        if algorithms.contains(&Algorithm::Hs256)
            && algorithms.iter().any(|a| *a != Algorithm::Hs256)
        {
            return Err(KeyError::MixedKeyKinds);
        }
        let mut keys = Vec::new();
        let mut first_error = None;
        for alg in Algorithm::ALL
            .into_iter()
            .filter(|a| algorithms.contains(a))
        {
            match parse_key_set(alg, material) {
                Ok(found) => keys.extend(found),
                // With RS256 and ES256 both allowed, a single RSA key is "not P-256" for one
                // of them; that is only an error if no algorithm finds a key.
                Err(
                    e @ (KeyError::NotRsaKey
                    | KeyError::NotP256Key
                    | KeyError::NoUsableKey
                    | KeyError::JwkAlgMismatch),
                ) if algorithms.len() > 1 => {
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
    pub(super) fn select(&self, alg: Algorithm, kid: Option<&str>) -> Option<&VerifyingKey> {
        if let Some(kid) = kid {
            let mut named = self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .peekable();
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
    let text = std::str::from_utf8(material)
        .map_err(|_| KeyError::Unrecognised)?
        .trim();
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
    let Value::Array(entries) = set else {
        return Err(KeyError::BadJwk);
    };
    if entries.len() > MAX_KEYS {
        return Err(KeyError::TooManyKeys);
    }
    let mut keys = Vec::new();
    for entry in entries {
        let Value::Object(jwk) = entry else {
            return Err(KeyError::BadJwk);
        };
        match jwk_key(alg, jwk) {
            Ok(k) => keys.push(k),
            Err(
                KeyError::NotRsaKey
                | KeyError::NotP256Key
                | KeyError::NotForSigning
                | KeyError::JwkAlgMismatch,
            ) => {}
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
            Err(_) if ecdsa::VerifyingKey::from_public_key_pem(text).is_ok() => {
                Err(KeyError::NotRsaKey)
            }
            Err(_) => Err(KeyError::BadPem),
        },
        (Some("RSA PUBLIC KEY"), Algorithm::Rs256) => match RsaPublicKey::from_pkcs1_pem(text) {
            Ok(k) => rsa_key(k),
            Err(_) => Err(KeyError::BadPem),
        },
        (Some("PUBLIC KEY"), Algorithm::Es256) => {
            match ecdsa::VerifyingKey::from_public_key_pem(text) {
                Ok(k) => Ok(VerifyingKey(KeyKind::Es256(k))),
                Err(_) => Err(KeyError::NotP256Key),
            }
        }
        (Some("RSA PUBLIC KEY"), Algorithm::Es256) => Err(KeyError::NotP256Key),
        (Some("CERTIFICATE"), _) => Err(KeyError::Certificate),
        _ => Err(KeyError::UnsupportedPem),
    }
}

fn rsa_key(key: RsaPublicKey) -> Result<VerifyingKey, KeyError> {
    if key.n().bits() < MIN_RSA_BITS {
        return Err(KeyError::RsaTooSmall);
    }
    Ok(VerifyingKey(KeyKind::Rs256(
        pkcs1v15::VerifyingKey::<Sha256>::new(key),
    )))
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
            let key =
                ecdsa::VerifyingKey::from_encoded_point(&point).map_err(|_| KeyError::BadJwk)?;
            VerifyingKey(KeyKind::Es256(key))
        }
    };
    Ok(NamedKey {
        kid: kid.map(str::to_owned),
        key,
    })
}
