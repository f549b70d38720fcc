//! Masks token-shaped text so that no log line can carry a token, whatever path wrote it
//! (an error echoing its input, `log_statement`, a bind parameter in a DETAIL).
//!
//! Token-shaped: a `_` or `-` followed by a run of at least `MIN_RUN` base62 characters.
//! Every token's body follows its prefix's final separator, and a run that long carries most
//! of a body's entropy, so such runs are masked down to their first four characters (the same
//! hint the project shows everywhere). False positives (a long identifier after an underscore)
//! cost a few masked characters in a log line, nothing more. Pure: no Postgres.

/// 16 of a body's 22 characters leave 62^6 (about 5.7e10) bodies to try, each needing an
/// online guess; a shorter run is left alone to keep ordinary log lines readable.
pub const MIN_RUN: usize = 16;
const KEEP: usize = crate::format::HINT_BODY_CHARS;
pub const MASK: u8 = b'*';

fn is_separator(b: u8) -> bool {
    b == b'_' || b == b'-'
}

/// Calls `f(start, end)` for each token-shaped run (the base62 part, after its separator).
fn for_each_run(buf: &[u8], mut f: impl FnMut(usize, usize)) {
    let mut i = 0;
    while i < buf.len() {
        if is_separator(buf[i]) {
            let start = i + 1;
            let mut end = start;
            while end < buf.len() && buf[end].is_ascii_alphanumeric() {
                end += 1;
            }
            if end - start >= MIN_RUN {
                f(start, end);
            }
            i = end.max(start);
        } else {
            i += 1;
        }
    }
}

/// Whether `buf` holds anything token-shaped.
pub fn contains_token(buf: &[u8]) -> bool {
    let mut found = false;
    for_each_run(buf, |_, _| found = true);
    found
}

/// Masks every token-shaped run in place, keeping its first four characters; the length is
/// unchanged, so a C string can be rewritten where it lies. Returns whether anything changed.
pub fn mask_tokens(buf: &mut [u8]) -> bool {
    let mut runs = Vec::new();
    for_each_run(buf, |s, e| runs.push((s, e)));
    for &(s, e) in &runs {
        buf[s + KEEP..e].fill(MASK);
    }
    !runs.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format;

    #[test]
    fn masks_a_token_inside_a_statement() {
        let t = format::compose("cf-", "k7R9fQw2VDp3Zx4mN8tJ1s");
        let mut line = format!("statement: SELECT * FROM token.validate_token('{t}')").into_bytes();
        assert!(contains_token(&line));
        assert!(mask_tokens(&mut line));
        let line = String::from_utf8(line).expect("ascii");
        assert!(!line.contains(&t));
        assert!(line.contains("'cf-k7R9************************')"), "{line}");
    }

    #[test]
    fn masks_every_prefix_style_and_truncated_tokens() {
        for t in [
            format::compose("thresh_live_", "abcdefghijklmnopqrstuv"),
            format::compose("cfstg-", "0123456789abcdefghijkl"),
            "cf-0123456789abcdef".to_string(), // a truncated token still carries most of a body
        ] {
            let mut b = format!("x {t} y").into_bytes();
            assert!(mask_tokens(&mut b), "{t}");
            assert!(!String::from_utf8(b).expect("ascii").contains(&t));
        }
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let mut b = b"relation \"token.tokens_token_hash_key\" uuid a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_vec();
        let before = b.clone();
        assert!(!mask_tokens(&mut b));
        assert_eq!(b, before);
    }

    #[test]
    fn handles_runs_at_the_edges() {
        let mut b = b"-0123456789abcdefXYZ".to_vec();
        assert!(mask_tokens(&mut b));
        assert_eq!(String::from_utf8(b).expect("ascii"), format!("-0123{}", "*".repeat(15)));
        let mut b = b"_".to_vec();
        assert!(!mask_tokens(&mut b));
    }
}
