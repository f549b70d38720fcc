//! Account ids are application-defined and stored as text; these read them back as the types
//! applications key their tables by, so policies compare typed values (and keep index use):
//! `tenant_id = token.current_account_uuid()`. A value of another shape reads as `None`
//! (SQL NULL), which a policy treats as "no rows". Pure: no Postgres.

/// A uuid in the forms Postgres prints or commonly accepts: 8-4-4-4-12 or 32 hex digits,
/// either case, optionally in braces.
pub fn as_uuid(s: &str) -> Option<[u8; 16]> {
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

/// A decimal bigint, as Postgres prints it (optional minus sign, no spaces or plus sign).
pub fn as_bigint(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_in_every_accepted_form() {
        let canonical = as_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").expect("canonical");
        assert_eq!(canonical[0], 0xa0);
        assert_eq!(canonical[15], 0x11);
        assert_eq!(as_uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"), Some(canonical));
        assert_eq!(as_uuid("{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"), Some(canonical));
        assert_eq!(as_uuid("a0eebc999c0b4ef8bb6d6bb9bd380a11"), Some(canonical));
        for bad in ["", "acme", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99x9c0b-4ef8-bb6d-6bb9bd380a11"] {
            assert_eq!(as_uuid(bad), None, "{bad}");
        }
    }

    #[test]
    fn bigints_only_when_plainly_decimal() {
        assert_eq!(as_bigint("42"), Some(42));
        assert_eq!(as_bigint("-7"), Some(-7));
        assert_eq!(as_bigint("9223372036854775807"), Some(i64::MAX));
        for bad in ["", "-", "+1", " 1", "1.0", "9223372036854775808", "acme"] {
            assert_eq!(as_bigint(bad), None, "{bad}");
        }
    }
}
