//! Masks tokens so that no log line can carry one, whatever path wrote it (an error echoing its
//! input, `log_statement`, a bind parameter in a DETAIL), and leaves everything else alone.
//!
//! What is masked: a separator (`_` or `-`) that ends a prefix of at least one letter or digit
//! (or of a letter or digit and then any one character: a prefix whose last character was
//! mistyped), followed by at least 22 base62 characters: room for a whole token body. That is a token
//! (28), one cut short inside its checksum (the checksum is recomputed from the body, so that is
//! the token too), or tokens glued to what follows them (a token repeated to make an oversized
//! input). The run is masked down to its first four characters (the hint shown everywhere
//! else). Ordinary identifiers (`order_itemsandpricing2024q3`: 21 characters after the
//! underscore) do not have that shape and pass unchanged, in every database, statement
//! included; an identifier with 22 or more letters and digits after an underscore is masked.
//!
//! The checksum is deliberately not required: a token with one mistyped character fails its
//! checksum but reveals the real token, which an attacker recovers offline by trying the
//! 28 x 61 single-character corrections against the checksum. Shorter runs (a token cut inside
//! its body) are left alone: masking every run of 16 or more after an underscore mangled
//! ordinary messages. Pure: no Postgres.

use crate::format::{BODY_LEN, HINT_BODY_CHARS};

/// The fewest characters after a separator that still hold a whole token body.
const MIN_TAIL: usize = BODY_LEN;
const KEEP: usize = HINT_BODY_CHARS;
pub const MASK: u8 = b'*';

fn is_separator(b: u8) -> bool {
    b == b'_' || b == b'-'
}

/// The next token-shaped stretch at or after `from`: the range of the (22 or more) characters
/// after its separator. Allocates nothing (the log hook calls it).
fn next_run(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < buf.len() {
        // (A mask before the separator is the end of a token masked just now, glued to this one.)
        if is_separator(buf[i]) && i > 0 && (buf[i - 1].is_ascii_alphanumeric() || buf[i - 1] == MASK || damaged_before(buf, i)) {
            let start = i + 1;
            let run = buf[start..].iter().take_while(|b| b.is_ascii_alphanumeric()).count();
            if run >= MIN_TAIL {
                return Some((start, start + run));
            }
            i = start + run;
            continue;
        }
        if let Some(range) = mistyped_separator(buf, i, from) {
            return Some(range);
        }
        i += 1;
    }
    None
}

/// Whether the character just before the separator at `at` is one other character (any, a
/// multi-byte one included) after a letter or digit: a prefix whose last character was
/// mistyped or damaged (`f_-`, `f -`, `fé-` for `fz-`). What follows is the token's body all the
/// same, and the prefix is public. (A character mistyped earlier in a prefix leaves a letter or
/// digit before the separator; a mistyped separator is `mistyped_separator`'s.)
fn damaged_before(buf: &[u8], at: usize) -> bool {
    let mut j = at - 1;
    while j > 0 && (buf[j] & 0xC0) == 0x80 {
        j -= 1;
    }
    j > 0 && !buf[j].is_ascii_alphanumeric() && buf[j - 1].is_ascii_alphanumeric()
}

/// A token whose separator was mistyped (`cf.`, `cf `, `cfé`, `cfa` for `cf-`): the prefix's
/// head, one other character at `at`, then exactly a body and a checksum that matches the head
/// with `_` or `-`. That is the token, recovered by trying both separators, so its body is masked too.
/// The checksum must match: ordinary words before a long run of letters stay as they are.
fn mistyped_separator(buf: &[u8], at: usize, floor: usize) -> Option<(usize, usize)> {
    use crate::format::{checksum_of_parts, is_token_byte, CHECKSUM_LEN, MAX_PREFIX_LEN};
    const TAIL: usize = BODY_LEN + CHECKSUM_LEN;
    if at == floor || is_separator(buf[at]) || !buf[at - 1].is_ascii_alphanumeric() || (buf[at] & 0xC0) == 0x80 {
        return None;
    }
    // A non-ASCII character is several bytes: the body starts after its continuation bytes.
    let mut start = at + 1;
    while start < buf.len() && (buf[start] & 0xC0) == 0x80 {
        start += 1;
    }
    // Exactly a body and a checksum, then the end of the run (looked at no further than that,
    // so that a long run costs linear time).
    let end = start + TAIL;
    if end > buf.len() || !buf[start..end].iter().all(u8::is_ascii_alphanumeric) || buf.get(end).is_some_and(u8::is_ascii_alphanumeric) {
        return None;
    }
    let run = TAIL;
    let (body, checksum) = buf[start..start + run].split_at(BODY_LEN);
    let mut head = at;
    while head > floor && at - head < MAX_PREFIX_LEN - 1 && is_token_byte(buf[head - 1]) {
        head -= 1;
        for sep in [b'_', b'-'] {
            if checksum_of_parts(&buf[head..at], sep, body) == checksum {
                return Some((start, start + run));
            }
        }
    }
    None
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The fewest base64url characters (with "eyJ") that start a JWT: `{"alg":"none"}` encodes to 19.
const MIN_JWT_HEADER: usize = 16;
/// The fewest characters of a JWT signature (HS256: 43; ES256: 86; RS256: 342).
const MIN_JWT_SIGNATURE: usize = 40;

fn run_at(buf: &[u8], at: usize) -> usize {
    buf[at.min(buf.len())..].iter().take_while(|b| is_b64url(**b)).count()
}

/// The end of the dotted base64url chain that `at` is in.
fn chain_end(buf: &[u8], at: usize) -> usize {
    let mut e = at;
    while e < buf.len() && (is_b64url(buf[e]) || buf[e] == b'.') {
        e += 1;
    }
    e
}

/// The next JWT-shaped stretch at or after `from` (legacy JWTs are bearer secrets too), as the
/// range to mask: "eyJ" at a boundary, a header-sized base64url run, '.', and the dotted chain
/// that follows (masked after "eyJ"). A JWT with one mistyped character (a space, a non-ASCII
/// character, a changed "eyJ") is split in two, and its second half carries the rest of the
/// claims and the whole signature; the header is guessable, so that half is a credential too:
/// so is any dotted chain in which a signature-sized run follows a dot (masked whole). Only a
/// half with neither the claims' tail nor the signature is left: it cannot be completed.
fn next_jwt(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < buf.len() {
        if buf[i..].starts_with(b"eyJ") && (i == 0 || !is_b64url(buf[i - 1])) {
            let a = i + run_at(buf, i);
            if a - i >= MIN_JWT_HEADER && buf.get(a) == Some(&b'.') && run_at(buf, a + 1) > 0 {
                return Some((i + 3, chain_end(buf, a)));
            }
        }
        if buf[i] == b'.' && i > from && is_b64url(buf[i - 1]) && run_at(buf, i + 1) >= MIN_JWT_SIGNATURE {
            let mut s = i;
            while s > from && (is_b64url(buf[s - 1]) || buf[s - 1] == b'.') {
                s -= 1;
            }
            return Some((s, chain_end(buf, i)));
        }
        i += 1;
    }
    None
}

/// Whether `buf` holds anything token-shaped (a pg_token token or a JWT).
pub fn contains_token(buf: &[u8]) -> bool {
    next_run(buf, 0).is_some() || next_jwt(buf, 0).is_some()
}

/// Masks every token in place, keeping the four characters after its prefix; the length is
/// unchanged, so a C string can be rewritten where it lies. Allocates nothing. Returns whether
/// anything changed.
pub fn mask_tokens(buf: &mut [u8]) -> bool {
    let mut from = 0;
    let mut changed = false;
    // JWTs first: their segments hold '-' and '_', which would otherwise read as prefixes.
    while let Some((start, end)) = next_jwt(buf, from) {
        for b in &mut buf[start..end] {
            if *b != b'.' {
                *b = MASK;
            }
        }
        changed = true;
        from = end;
    }
    from = 0;
    while let Some((start, end)) = next_run(buf, from) {
        buf[start + KEEP..end].fill(MASK);
        changed = true;
        from = end;
    }
    changed
}

/// Whether `buf` names a function that takes legacy JWT key material (register_legacy_issuer,
/// alter_legacy_issuer): a statement calling it carries an HS256 secret or a key.
pub fn names_key_material(buf: &[u8]) -> bool {
    buf.windows(14).any(|w| w.eq_ignore_ascii_case(b"legacy_issuer("))
        || buf.windows(14).any(|w| w.eq_ignore_ascii_case(b"legacy_issuer\""))
}

/// Masks the inside of every single-quoted literal (`'...'`, `''` inside kept as is), in
/// place: for a statement that carries key material, every literal may be the key.
pub fn mask_literals(buf: &mut [u8]) -> bool {
    let mut inside = false;
    let mut changed = false;
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\'' {
            if inside && buf.get(i + 1) == Some(&b'\'') {
                buf[i] = MASK;
                buf[i + 1] = MASK;
                i += 2;
                continue;
            }
            inside = !inside;
        } else if inside {
            buf[i] = MASK;
            changed = true;
        }
        i += 1;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format;

    fn masked(text: &str) -> String {
        let mut b = text.as_bytes().to_vec();
        mask_tokens(&mut b);
        String::from_utf8(b).expect("ascii")
    }

    #[test]
    fn key_material_statements_have_their_literals_masked() {
        let stmt = "SELECT token.register_legacy_issuer('old', '{HS256}', 'it''s a secret', 'agent')";
        assert!(names_key_material(stmt.as_bytes()));
        let mut b = stmt.as_bytes().to_vec();
        assert!(mask_literals(&mut b));
        let m = String::from_utf8(b).expect("ascii");
        assert!(!m.contains("secret") && !m.contains("HS256") && m.starts_with("SELECT token.register_legacy_issuer('***'"), "{m}");
        assert!(!names_key_material(b"SELECT token.validate_token($1)"));
        assert!(names_key_material(b"parameters: ... SELECT token.ALTER_LEGACY_ISSUER($1)"));
    }

    #[test]
    fn jwts_are_masked_whole() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiIsImV4cCI6OTk5OTk5OTk5OX0.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let line = format!("statement: SELECT * FROM token.validate_token('{jwt}')");
        let m = masked(&line);
        assert!(!m.contains("dBjf") && !m.contains("eyJzdWIi") && m.contains("'eyJ***"), "{m}");
        assert_eq!(m.len(), line.len());
        assert!(contains_token(line.as_bytes()));
        assert_eq!(masked("keyJ.x.y eyJ alone, eyJabc.def"), "keyJ.x.y eyJ alone, eyJabc.def", "not JWT-shaped");
    }

    #[test]
    fn a_jwt_with_one_mistyped_character_cannot_be_rebuilt_from_the_log() {
        // Found by tests/fuzz: a JWT with a space in its header was logged with its claims and
        // signature in the clear; the header is guessable, so that was the credential.
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2xlZ2FjeS5mdXp6LmV4YW1wbGUiLCJzdWIiOiJhY21lIiwiZXhwIjoxNzk1OTM5NzMxLCJqdGkiOiJqMTIzNDU2Nzg5Iiwic2NvcGUiOiJyZWFkIHdyaXRlIn0.i1GvSUO9M9sqdmloAJ8xi7VTHY-AwfdcVaKfu9YE358";
        let mut parts = jwt.split('.');
        let (_, claims, sig) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let seen = |m: &str, seg: &str| seg.as_bytes().windows(12).any(|w| m.as_bytes().windows(12).any(|v| v == w));
        for pos in 0..jwt.len() {
            for c in [" ", ".", "\u{e9}", "x", "'", "*"] {
                let bad = format!("{}{}{}", &jwt[..pos], c, &jwt[pos + 1..]);
                let line = format!("parameters: $1 = '{bad}'");
                let m = masked(&line);
                assert_eq!(m.len(), line.len());
                assert!(!(seen(&m, claims) && seen(&m, sig)), "claims and signature both readable: {m}");
            }
        }
        assert_eq!(masked("token.validate_token($1), pg_catalog.now(), www.example.com"),
                   "token.validate_token($1), pg_catalog.now(), www.example.com", "ordinary dotted names");
    }

    #[test]
    fn a_token_with_a_mistyped_separator_is_masked() {
        // Found by tests/fuzz: `fzmid.` for `fzmid_` left the body and checksum in the clear,
        // and the token is recovered by trying the two separators against the checksum.
        let t = format::compose("fzmid_", "k7R9fQw2VDp3Zx4mN8tJ1s");
        for c in [".", " ", "\u{e9}", "'", ":", "/", "a", "Z", "0"] {
            let line = format!("parameters: $1 = 'x{}'", t.replacen('_', c, 1));
            let m = masked(&line);
            assert!(!m.contains("fQw2VDp3Zx4mN8tJ1s") && m.contains("k7R9"), "{m}");
            assert!(contains_token(line.as_bytes()));
        }
        for ordinary in ["relation pg_catalog.abcdefghijklmnopqrstuvwxyz01 does not exist",
                         "md5 0123456789abcdef0123456789abcdef and 0123456789abcdef0123456789ab"] {
            assert_eq!(masked(ordinary), ordinary, "no checksum, no mask");
        }
    }

    #[test]
    fn masks_a_token_inside_a_statement() {
        let t = format::compose("cf-", "k7R9fQw2VDp3Zx4mN8tJ1s");
        let line = format!("statement: SELECT * FROM token.validate_token('{t}')");
        assert!(contains_token(line.as_bytes()));
        let m = masked(&line);
        assert!(!m.contains(&t));
        assert!(m.contains("'cf-k7R9************************')"), "{m}");
    }

    #[test]
    fn masks_every_prefix_style_and_mistyped_tokens() {
        let good = format::compose("thresh_live_", "abcdefghijklmnopqrstuv");
        let mut typo = format::compose("cfstg-", "0123456789abcdefghijkl").into_bytes();
        typo[10] = b'Z'; // the checksum no longer matches: still masked, it reveals the token
        let typo = String::from_utf8(typo).expect("ascii");
        for t in [good, typo, format::compose("a_", "0000000000000000000000")] {
            let m = masked(&format!("x {t} y"));
            assert!(!m.contains(&t[t.len() - 20..]), "{t} -> {m}");
        }
    }

    /// Found by the fuzzer (seed 2905172917): `f_-` for `fz-` left the body in the log. Every
    /// prefix character but the first, replaced by any character the fuzzer uses, still masks it.
    #[test]
    fn masks_a_token_whose_prefix_was_damaged() {
        for prefix in ["fz-", "fzmid_", "thresh_live_"] {
            let t = format::compose(prefix, "k7R9fQw2VDp3Zx4mN8tJ1s");
            for pos in 1..prefix.len() {
                for c in ["_", "-", ".", " ", "é", "Q", "'"] {
                    let damaged = format!("{}{}{}", &t[..pos], c, &t[pos + 1..]);
                    let m = masked(&format!("$1 = '{damaged}'"));
                    assert!(!m.contains("fQw2VDp3Zx4mN8tJ1s"), "{damaged} -> {m}");
                }
            }
        }
    }

    #[test]
    fn masks_a_token_cut_inside_its_checksum() {
        let t = format::compose("cf-", "k7R9fQw2VDp3Zx4mN8tJ1s");
        for keep in 3 + 22..t.len() {
            let m = masked(&format!("'{}'", &t[..keep]));
            assert!(!m.contains("fQw2VDp3Zx4mN8tJ1s"), "cut at {keep}: {m}");
        }
    }

    #[test]
    fn masks_a_token_next_to_other_token_characters() {
        let t = format::compose("cf-", "k7R9fQw2VDp3Zx4mN8tJ1s");
        let m = masked(&format!("key={t}_backup"));
        assert!(!m.contains(&t), "{m}");
        // Glued end to end (an oversized input made of one token): every copy is masked.
        let m = masked(&t.repeat(10));
        assert!(!m.contains("fQw2VDp3Zx4mN8tJ1s"), "{m}");
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        for text in [
            "relation \"order_itemsandpricing2024q3\" does not exist",
            "relation \"token.tokens_token_hash_key\" uuid a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "cf-0123456789abcdef",                                // cut inside its body: not masked
            "_0123456789012345678901234567",                      // no prefix before the separator
            "SELECT 1; -- 0123456789012345678901234567",          // no letter or digit before it
        ] {
            assert!(!contains_token(text.as_bytes()), "{text}");
            assert_eq!(masked(text), text);
        }
    }

    proptest::proptest! {
        // The log hook runs this on every message of every process: it must never panic, and
        // masking never changes a length or touches a byte outside a token.
        #[test]
        fn arbitrary_bytes_never_panic_and_keep_their_length(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut b = bytes.clone();
            mask_tokens(&mut b);
            proptest::prop_assert_eq!(b.len(), bytes.len());
            for (x, y) in b.iter().zip(&bytes) {
                proptest::prop_assert!(x == y || *x == MASK);
            }
        }
    }

    #[test]
    fn handles_tokens_at_the_edges() {
        let t = format::compose("ab-", "0123456789abcdefXYZ012");
        assert_eq!(masked(&t), format!("ab-0123{}", "*".repeat(24)));
        assert_eq!(masked("_"), "_");
        assert_eq!(masked(""), "");
    }
}
