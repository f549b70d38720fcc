//! Recognising and splitting a presented JWT, bounded before any decoding; the event hint.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::format::is_token_byte;

use super::*;

/// A JSON object's members, with a note of whether a name came twice. serde_json's own map
/// keeps the last of two equal names silently; RFC 7515 section 5.2 lets a parser refuse
/// them, and refusing closes the gap between parsers that keep the first and the last.
pub(super) struct Members {
    pub(super) map: Map<String, Value>,
    pub(super) duplicate: bool,
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
                let mut members = Members {
                    map: Map::new(),
                    duplicate: false,
                };
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
pub(super) fn nesting_within(json: &[u8], max: usize) -> bool {
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

/// Whether a presented token should be judged as a JWT: three segments of `[A-Za-z0-9_-]`
/// separated by exactly two dots (the signature may be empty: an unsigned JWT is judged, and
/// refused as such), the first starting with "eyJ" (`{"` in
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
    dots == 2
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
    pub(super) signing_input: &'a [u8],
    pub(super) header: Header,
    pub(super) claims: Map<String, Value>,
    pub(super) signature: Vec<u8>,
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
    let header_json = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwtError::BadBase64)?;
    let claims_json = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| JwtError::BadBase64)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtError::BadBase64)?;
    if !nesting_within(&header_json, MAX_JSON_DEPTH)
        || !nesting_within(&claims_json, MAX_JSON_DEPTH)
    {
        return Err(JwtError::TooDeep);
    }
    let header = object(&header_json, JwtError::BadHeader)?;
    let claims = object(&claims_json, JwtError::BadClaims)?;

    let Some(Value::String(alg)) = header.get("alg") else {
        return Err(JwtError::MissingAlg);
    };
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
        header: Header {
            alg: alg.clone(),
            kid,
        },
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

/// What an event may record about a JWT, accepted or refused: its `iss` (at most 64
/// characters) and `jti` (at most 32), each cut to `[A-Za-z0-9._:/@+~%-]` with anything else
/// shown as '?', as `iss=<...> jti=<...>` (either part left out when absent, "" when both are).
/// Never the header, the signature, or the token. For a refused token these are what the
/// sender claimed, not facts.
pub fn issuer_hint(decoded: &Decoded<'_>) -> String {
    let mut out = String::new();
    for (name, max) in [("iss", HINT_ISSUER_CHARS), ("jti", HINT_JTI_CHARS)] {
        let Some(value) = decoded.claims.get(name).and_then(Value::as_str) else {
            continue;
        };
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
