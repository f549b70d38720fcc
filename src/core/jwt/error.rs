//! Why a JWT or a registered key is refused: one rule per variant, fixed sentences.

use std::fmt;

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
