//! Token syntax: `<prefix><body><checksum>`.
//!
//! The prefix (2-32 chars of `[A-Za-z0-9_-]`, ending in `_` or `-`) names a key type and an
//! environment; the body is 22 base62 characters from the OS CSPRNG (about 131 bits, through
//! `rand`'s `OsRng` and its unbiased `Alphanumeric` distribution); the
//! checksum is the CRC32 of prefix+body written as 6 base62 characters, so a typo or a
//! truncation is refused without touching a table, and a secret scanner can confirm a match
//! offline. Because the body and checksum are base62, the prefix is everything up to and
//! including the last `_` or `-`: parsing needs no registry.
//!
//! This module is pure: it never touches Postgres, never logs, and never keeps a token.

use std::fmt;

use rand::distr::Alphanumeric;
use rand::rngs::OsRng;
use rand::{Rng, RngCore, TryRngCore};

pub const BODY_LEN: usize = 22;
pub const CHECKSUM_LEN: usize = 6;
/// Inputs longer than this are refused before any other work, hashing included.
pub const MAX_TOKEN_BYTES: usize = 256;
pub const MIN_PREFIX_LEN: usize = 2;
pub const MAX_PREFIX_LEN: usize = 32;
/// Body characters shown after the prefix in hints (`cf-k7R9`).
pub const HINT_BODY_CHARS: usize = 4;

pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not a well-formed token. Each maps to reason `malformed`, except
/// `BadChecksum`, which maps to `bad_checksum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    Empty,
    TooLong,
    BadCharset,
    NoPrefix,
    BadPrefix,
    WrongLength,
    BadChecksum,
}

impl FormatError {
    /// A sentence for an error DETAIL; never contains any part of the input.
    pub fn describe(self) -> &'static str {
        match self {
            FormatError::Empty => "the token is empty",
            FormatError::TooLong => "the token is longer than 256 bytes",
            FormatError::BadCharset => "the token contains characters other than A-Z, a-z, 0-9, '_' and '-'",
            FormatError::NoPrefix => "the token has no prefix ending in '_' or '-'",
            FormatError::BadPrefix => "the token's prefix is not 2 to 32 characters long",
            FormatError::WrongLength => "the token does not have 28 characters after its prefix",
            FormatError::BadChecksum => "the token's checksum does not match (a typo or a truncation?)",
        }
    }
}

/// Why a string cannot be registered as a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixError {
    Length,
    Charset,
    Ending,
    InnerSeparatorRun,
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrefixError::Length => "a prefix must be 2 to 32 characters long",
            PrefixError::Charset => "a prefix may contain only A-Z, a-z, 0-9, '_' and '-'",
            PrefixError::Ending => "a prefix must end in '_' or '-'",
            PrefixError::InnerSeparatorRun => "a prefix must contain at least one letter or digit",
        })
    }
}

#[inline]
fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

#[inline]
fn is_separator(b: u8) -> bool {
    b == b'_' || b == b'-'
}

/// `[A-Za-z0-9_-]` as a table: the charset check runs on every validation.
static TOKEN_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
        b += 1;
    }
    t
};

#[inline]
pub fn is_token_byte(b: u8) -> bool {
    TOKEN_BYTES[b as usize]
}

/// Checks the registration rules for a prefix.
pub fn validate_prefix(prefix: &str) -> Result<(), PrefixError> {
    let bytes = prefix.as_bytes();
    if !(MIN_PREFIX_LEN..=MAX_PREFIX_LEN).contains(&bytes.len()) {
        return Err(PrefixError::Length);
    }
    if !bytes.iter().all(|&b| is_token_byte(b)) {
        return Err(PrefixError::Charset);
    }
    if !is_separator(bytes[bytes.len() - 1]) {
        return Err(PrefixError::Ending);
    }
    if !bytes.iter().any(|&b| is_base62(b)) {
        return Err(PrefixError::InnerSeparatorRun);
    }
    Ok(())
}

/// A syntactically valid token, borrowed from the input. It does not say the token exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub prefix: &'a str,
    pub body: &'a str,
    pub checksum: &'a str,
}

impl ParsedToken<'_> {
    /// The display hint: the prefix and the first four body characters. Safe to show and log.
    pub fn hint(&self) -> String {
        hint(self.prefix, self.body)
    }
}

pub fn hint(prefix: &str, body: &str) -> String {
    let shown = body.get(..HINT_BODY_CHARS).unwrap_or(body);
    let mut s = String::with_capacity(prefix.len() + shown.len());
    s.push_str(prefix);
    s.push_str(shown);
    s
}

/// Parses and checks a token's structure and checksum. Length is checked first, so a huge
/// input costs nothing more than reading its length.
pub fn parse<T: AsRef<[u8]> + ?Sized>(token: &T) -> Result<ParsedToken<'_>, FormatError> {
    let parsed = split(token)?;
    if !parsed.checksum_matches() {
        return Err(FormatError::BadChecksum);
    }
    Ok(parsed)
}

/// Checks a token's structure only (everything but the checksum). Takes bytes: the edge hands
/// over a text argument as it arrived, whatever the database encoding, and anything outside
/// `[A-Za-z0-9_-]` is `BadCharset` here rather than a conversion error there.
pub fn split<T: AsRef<[u8]> + ?Sized>(token: &T) -> Result<ParsedToken<'_>, FormatError> {
    let bytes = token.as_ref();
    if bytes.is_empty() {
        return Err(FormatError::Empty);
    }
    if bytes.len() > MAX_TOKEN_BYTES {
        return Err(FormatError::TooLong);
    }
    if !bytes.iter().all(|&b| is_token_byte(b)) {
        return Err(FormatError::BadCharset);
    }
    // Only ASCII is left, so this cannot fail; it is not unwrapped all the same.
    let token = std::str::from_utf8(bytes).map_err(|_| FormatError::BadCharset)?;
    let sep = bytes.iter().rposition(|&b| is_separator(b)).ok_or(FormatError::NoPrefix)?;
    let (prefix, rest) = token.split_at(sep + 1);
    if validate_prefix(prefix).is_err() {
        return Err(FormatError::BadPrefix);
    }
    if rest.len() != BODY_LEN + CHECKSUM_LEN {
        return Err(FormatError::WrongLength);
    }
    let (body, checksum) = rest.split_at(BODY_LEN);
    Ok(ParsedToken { prefix, body, checksum })
}

impl ParsedToken<'_> {
    pub fn checksum_matches(&self) -> bool {
        checksum_of(self.prefix, self.body) == self.checksum.as_bytes()
    }
}

/// The 6-character base62 checksum of prefix+body (CRC32, most significant digit first).
pub fn checksum_of(prefix: &str, body: &str) -> [u8; CHECKSUM_LEN] {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(prefix.as_bytes());
    hasher.update(body.as_bytes());
    encode_checksum(hasher.finalize())
}

/// The checksum of a prefix given in pieces (its head and its separator) and a body, without
/// building the string: for the log hook, which must not allocate.
pub fn checksum_of_parts(prefix_head: &[u8], separator: u8, body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(prefix_head);
    hasher.update(&[separator]);
    hasher.update(body);
    encode_checksum(hasher.finalize())
}

/// 62^6 > 2^32, so every CRC32 value has exactly one 6-digit encoding.
fn encode_checksum(mut value: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    out
}

/// Composes a token from a prefix and a body, appending the checksum.
pub fn compose(prefix: &str, body: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + body.len() + CHECKSUM_LEN);
    s.push_str(prefix);
    s.push_str(body);
    for b in checksum_of(prefix, body) {
        s.push(b as char);
    }
    s
}

/// The operating system's random source failed (no entropy device); nothing was generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomSourceError;

/// A fallible generator (`rand`'s `OsRng`) seen as an infallible one: a failure is remembered
/// and yields zeros, which `Alphanumeric` accepts, so sampling ends and the caller discards
/// the body. (`TryRngCore::unwrap_err` would panic instead.)
struct Remembering<R: TryRngCore> {
    inner: R,
    failed: bool,
}

impl<R: TryRngCore> RngCore for Remembering<R> {
    fn next_u32(&mut self) -> u32 {
        self.inner.try_next_u32().unwrap_or_else(|_| {
            self.failed = true;
            0
        })
    }
    fn next_u64(&mut self) -> u64 {
        self.inner.try_next_u64().unwrap_or_else(|_| {
            self.failed = true;
            0
        })
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        if self.inner.try_fill_bytes(dst).is_err() {
            self.failed = true;
            dst.fill(0);
        }
    }
}

/// A body from `rng`: `rand`'s `Alphanumeric` distribution, which draws 6 bits and rejects 62
/// and 63, so each of the 62 characters is equally likely (no modulo bias).
fn body_from<R: RngCore>(rng: &mut R) -> String {
    rng.sample_iter(Alphanumeric).take(BODY_LEN).map(char::from).collect()
}

/// A new random token under `prefix`, from the operating system's generator.
pub fn generate(prefix: &str) -> Result<String, RandomSourceError> {
    generate_from(prefix, OsRng)
}

fn generate_from<R: TryRngCore>(prefix: &str, source: R) -> Result<String, RandomSourceError> {
    let mut rng = Remembering { inner: source, failed: false };
    let body = body_from(&mut rng);
    if rng.failed {
        return Err(RandomSourceError);
    }
    Ok(compose(prefix, &body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    // proptest's prelude re-exports rand's traits too: name the ones meant.
    use rand::{Rng, RngCore, TryRngCore};

    fn prefix_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9_-]{0,30}[_-]"
    }

    fn body_strategy() -> impl Strategy<Value = String> {
        "[0-9A-Za-z]{22}"
    }

    #[test]
    fn generated_tokens_parse_and_keep_their_prefix() {
        let t = generate("cf-").expect("csprng");
        let p = parse(&t).expect("parses");
        assert_eq!(p.prefix, "cf-");
        assert_eq!(p.body.len(), BODY_LEN);
        assert_eq!(t.len(), 3 + BODY_LEN + CHECKSUM_LEN);
    }

    #[test]
    fn hint_is_prefix_and_four_body_chars() {
        let t = compose("thresh_live_", "k7R9fQw2VDp3Zx4mN8tJ1s");
        let p = parse(&t).expect("parses");
        assert_eq!(p.hint(), "thresh_live_k7R9");
    }

    #[test]
    fn each_input_class_gets_its_error() {
        assert_eq!(parse(""), Err(FormatError::Empty));
        assert_eq!(parse(&"a".repeat(257)), Err(FormatError::TooLong));
        assert_eq!(parse(&"x".repeat(10 * 1024 * 1024)), Err(FormatError::TooLong));
        assert_eq!(parse("cf-abc'; DROP TABLE x;--"), Err(FormatError::BadCharset));
        assert_eq!(parse("cf-é"), Err(FormatError::BadCharset));
        // Bytes that are not UTF-8 at all (a SQL_ASCII database passes them through).
        assert_eq!(parse(&b"cf-k7R9fQw2VDp3Zx4mN8tJ1s\xff\xfe00000"[..]), Err(FormatError::BadCharset));
        assert_eq!(parse("abcdefghijklmnopqrstuvwxyz0123"), Err(FormatError::NoPrefix));
        assert_eq!(parse(&format!("{}-{}", "a".repeat(40), "b".repeat(28))), Err(FormatError::BadPrefix));
        assert_eq!(parse("cf-abc"), Err(FormatError::WrongLength));
        let good = compose("cf-", "k7R9fQw2VDp3Zx4mN8tJ1s");
        let mut bad = good.clone().into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(parse(std::str::from_utf8(&bad).expect("ascii")), Err(FormatError::BadChecksum));
    }

    #[test]
    fn checksum_encoding_is_fixed_width_and_injective_at_the_edges() {
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(61), b"00000z");
        assert_eq!(&encode_checksum(62), b"000010");
        assert_ne!(encode_checksum(u32::MAX), encode_checksum(u32::MAX - 1));
    }

    #[test]
    fn token_byte_table_is_exactly_the_charset() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
            assert_eq!(is_token_byte(b), expected, "byte {b}");
        }
    }

    #[test]
    fn prefix_rules() {
        assert!(validate_prefix("cf-").is_ok());
        assert!(validate_prefix("thresh_live_").is_ok());
        assert_eq!(validate_prefix("c"), Err(PrefixError::Length));
        assert_eq!(validate_prefix(&format!("{}_", "a".repeat(32))), Err(PrefixError::Length));
        assert_eq!(validate_prefix("cf"), Err(PrefixError::Ending));
        assert_eq!(validate_prefix("c f-"), Err(PrefixError::Charset));
        assert_eq!(validate_prefix("--"), Err(PrefixError::InnerSeparatorRun));
    }

    /// Draws the 64 values of the top 6 bits in turn: what `Alphanumeric` reads.
    struct EveryValue(u32);
    impl RngCore for EveryValue {
        fn next_u32(&mut self) -> u32 {
            let v = (self.0 % 64) << 26;
            self.0 += 1;
            v
        }
        fn next_u64(&mut self) -> u64 {
            u64::from(self.next_u32())
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.fill(0)
        }
    }

    #[test]
    fn every_body_character_is_equally_likely() {
        // Over every value the distribution can draw, each of the 62 characters comes out
        // exactly once and 2 values are rejected: no character is favoured (a bare `% 62` of a
        // byte would favour eight of them).
        let mut rng = EveryValue(0);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..62 * 10 {
            let c: u8 = rng.sample(Alphanumeric);
            *counts.entry(c).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 62);
        assert!(counts.values().all(|&n| n == 10), "{counts:?}");
        assert!(counts.keys().all(|c| ALPHABET.contains(c)), "the body alphabet is the token alphabet");
        assert_eq!(rng.0, 64 * 10 - 2, "two of every 64 draws were rejected (the last two not drawn yet)");
    }

    struct Broken;
    impl TryRngCore for Broken {
        type Error = std::io::Error;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Err(std::io::Error::other("no entropy"))
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Err(std::io::Error::other("no entropy"))
        }
        fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), Self::Error> {
            Err(std::io::Error::other("no entropy"))
        }
    }

    #[test]
    fn a_failing_random_source_is_an_error_not_a_panic_or_a_weak_token() {
        assert_eq!(generate_from("cf-", Broken), Err(RandomSourceError));
    }

    proptest! {
        #[test]
        fn round_trip(prefix in prefix_strategy(), body in body_strategy()) {
            let t = compose(&prefix, &body);
            let p = parse(&t).expect("a composed token parses");
            prop_assert_eq!(p.prefix, prefix.as_str());
            prop_assert_eq!(p.body, body.as_str());
        }

        #[test]
        fn every_single_character_change_is_refused(
            prefix in prefix_strategy(), body in body_strategy(),
            pos in any::<prop::sample::Index>(), replacement in any::<prop::sample::Index>(),
        ) {
            let t = compose(&prefix, &body).into_bytes();
            let i = pos.index(t.len());
            let charset: Vec<u8> = ALPHABET.iter().copied().chain([b'_', b'-']).collect();
            let mut c = charset[replacement.index(charset.len())];
            if c == t[i] { c = charset[(replacement.index(charset.len()) + 1) % charset.len()]; }
            let mut changed = t.clone();
            changed[i] = c;
            let s = String::from_utf8(changed).expect("ascii");
            prop_assert!(parse(&s).is_err(), "changing byte {} was not caught", i);
        }

        #[test]
        fn every_truncation_is_refused(prefix in prefix_strategy(), body in body_strategy(), cut in 1usize..60) {
            let t = compose(&prefix, &body);
            let keep = t.len().saturating_sub(cut);
            prop_assert!(parse(&t[..keep]).is_err());
        }

        #[test]
        fn generated_bodies_use_only_base62(seed in any::<u64>()) {
            use rand::SeedableRng;
            let body = body_from(&mut rand::rngs::StdRng::seed_from_u64(seed));
            prop_assert_eq!(body.len(), BODY_LEN);
            prop_assert!(body.bytes().all(|b| ALPHABET.contains(&b)));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = parse(&s);
        }
    }
}
