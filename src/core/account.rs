//! Account ids are application-defined and stored as text, in one spelling per account: a
//! decimal integer without leading zeros ('42', never '042' or '00042'), a uuid in lowercase
//! 8-4-4-4-12 form, anything else as given (`canonical`). Every path that takes an account
//! (generate, revoke_account_tokens, the caller rules, the token list) compares that spelling,
//! and the typed accessors below read only it, so '042' and '42' can never be two accounts to
//! one path and one tenant to another.
//!
//! The accessors read accounts back as the types applications key their tables by, so
//! policies compare typed values (and keep index use): `tenant_id =
//! token.current_account_uuid()`. A value of another shape reads as `None` (SQL NULL), which
//! a policy treats as "no rows". Pure: no Postgres.

/// The one spelling of an account id.
pub fn canonical(s: &str) -> String {
    if let Some(n) = integer_canonical(s) {
        return n;
    }
    if let Some(u) = uuid_bytes(s) {
        return uuid_text(&u);
    }
    s.to_owned()
}

/// A decimal integer (optional minus sign, digits only) without its leading zeros; "-0" is "0".
fn integer_canonical(s: &str) -> Option<String> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        return Some("0".into());
    }
    Some(if negative { format!("-{trimmed}") } else { trimmed.to_owned() })
}

fn uuid_text(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The uuid of an account in its one spelling (lowercase 8-4-4-4-12), else `None`.
pub fn as_uuid(s: &str) -> Option<[u8; 16]> {
    uuid_bytes(s).filter(|u| uuid_text(u) == s)
}

/// A uuid in the forms Postgres prints or commonly accepts: 8-4-4-4-12 or 32 hex digits,
/// either case, optionally in braces.
fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let s = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')).unwrap_or(s);
    let hex: Vec<u8> = match s.len() {
        36 => {
            let b = s.as_bytes();
            if [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
                return None;
            }
            b.iter().copied().filter(|&c| c != b'-').collect()
        }
        32 => s.as_bytes().to_vec(),
        _ => return None,
    };
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The bigint of an account in its one spelling (as Postgres prints a bigint), else `None`.
pub fn as_bigint(s: &str) -> Option<i64> {
    if integer_canonical(s).as_deref() != Some(s) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANONICAL: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

    #[test]
    fn every_spelling_of_a_uuid_is_one_account() {
        for spelling in [CANONICAL, "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "a0eebc999c0b4ef8bb6d6bb9bd380a11"] {
            assert_eq!(canonical(spelling), CANONICAL, "{spelling}");
        }
        let u = as_uuid(CANONICAL).expect("canonical");
        assert_eq!((u[0], u[15]), (0xa0, 0x11));
        assert_eq!(as_uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"), None, "only the one spelling reads as a uuid");
        for bad in ["", "acme", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99x9c0b-4ef8-bb6d-6bb9bd380a11"] {
            assert_eq!(as_uuid(bad), None, "{bad}");
            assert_eq!(canonical(bad), bad, "not a uuid: kept as given");
        }
    }

    #[test]
    fn every_spelling_of_an_integer_is_one_account() {
        for (given, one) in [("42", "42"), ("042", "42"), ("00042", "42"), ("-007", "-7"), ("000", "0"), ("-0", "0"),
                             ("99999999999999999999", "99999999999999999999")] {
            assert_eq!(canonical(given), one, "{given}");
        }
        assert_eq!(as_bigint("42"), Some(42));
        assert_eq!(as_bigint("-7"), Some(-7));
        assert_eq!(as_bigint("9223372036854775807"), Some(i64::MAX));
        for other in ["042", "-0", "", "-", "+1", " 1", "1.0", "9223372036854775808", "acme"] {
            assert_eq!(as_bigint(other), None, "{other}");
        }
        for kept in ["+1", " 1", "1.0", "acme", "0x2A"] {
            assert_eq!(canonical(kept), kept);
        }
    }
}
