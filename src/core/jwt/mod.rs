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

mod decode;
mod error;
mod keys;
mod verify;

pub use decode::{decode, issuer_hint, looks_like_jwt, Decoded, Header};
pub use error::{JwtError, KeyError};
pub use keys::{parse_key, parse_key_set, Algorithm, IssuerKeys, NamedKey, VerifyingKey};
pub use verify::{verify, verify_except_exp, Claims, Expectations};

use rsa::RsaPublicKey;

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

#[cfg(test)]
mod tests;
