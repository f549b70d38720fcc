//! What an administrator may store: bounds on names, lists and texts, so that no registry row,
//! cache entry, event or log line grows with what a caller typed. The edge raises 22023 with
//! the message these return. Error messages quote a caller's string through `quoted`, never
//! whole. Pure: no Postgres.

/// An account id, in characters.
pub const MAX_ACCOUNT_CHARS: usize = 256;
/// Scopes per token or key type, and characters per scope.
pub const MAX_SCOPES: usize = 64;
pub const MAX_SCOPE_CHARS: usize = 64;
/// Key types a key type may validate.
pub const MAX_CAN_VALIDATE: usize = 64;
/// A key type's description, a token's name, a revocation reason, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
pub const MAX_TOKEN_NAME_CHARS: usize = 200;
pub const MAX_REASON_CHARS: usize = 200;
/// A token's metadata document, serialized (it is cached and returned on every hit).
pub const MAX_METADATA_BYTES: usize = 8192;
/// How much of a caller's string a message quotes.
pub const MAX_QUOTED_CHARS: usize = 64;

/// `s` for a message: at most `MAX_QUOTED_CHARS` characters, control characters replaced, and
/// an ellipsis when cut.
pub fn quoted(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_QUOTED_CHARS).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().nth(MAX_QUOTED_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

fn plain_text(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// A scope list: no NULL, 1..=64 characters each without control characters, at most 64,
/// duplicates dropped (first one kept).
pub fn scopes(given: &[Option<&str>]) -> Result<Vec<String>, String> {
    if given.len() > MAX_SCOPES {
        return Err(format!("a token may carry at most {MAX_SCOPES} scopes"));
    }
    let mut out: Vec<String> = Vec::with_capacity(given.len());
    for s in given {
        match s {
            None => return Err("scopes must not contain NULL".into()),
            Some(s) if s.is_empty() || s.chars().count() > MAX_SCOPE_CHARS || !plain_text(s) => {
                return Err(format!(
                    "invalid scope \"{}\": scopes are 1 to {MAX_SCOPE_CHARS} characters without control characters",
                    quoted(s)
                ))
            }
            Some(s) => {
                if !out.iter().any(|o| o == s) {
                    out.push((*s).to_owned());
                }
            }
        }
    }
    Ok(out)
}

/// 1 to `max` characters of a-z, 0-9 and _, starting with a letter: the names pg_token gives
/// key types, environments and legacy issuers.
pub fn is_identifier(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A key type name: 1 to 63 characters of a-z, 0-9 and _, starting with a letter.
pub fn key_type_name(name: &str) -> Result<(), String> {
    if is_identifier(name, 63) {
        Ok(())
    } else {
        Err(format!(
            "invalid key type name \"{}\": use 1 to 63 characters of a-z, 0-9 and _, starting with a letter",
            quoted(name)
        ))
    }
}

/// An environment name: 1 to 32 characters of a-z, 0-9 and _, starting with a letter.
pub fn environment_name(env: &str) -> Result<(), String> {
    if is_identifier(env, 32) {
        Ok(())
    } else {
        Err(format!("invalid environment name \"{}\"", quoted(env)))
    }
}

/// A list of key type names (can_validate): at most 64, each a valid name, duplicates dropped.
pub fn key_type_list(given: &[Option<&str>]) -> Result<Vec<String>, String> {
    if given.len() > MAX_CAN_VALIDATE {
        return Err(format!("a key type may validate at most {MAX_CAN_VALIDATE} key types"));
    }
    let mut out: Vec<String> = Vec::with_capacity(given.len());
    for k in given {
        let Some(k) = k else { return Err("can_validate must not contain NULL".into()) };
        key_type_name(k)?;
        if !out.iter().any(|o| o == k) {
            out.push((*k).to_owned());
        }
    }
    Ok(out)
}

/// Free text (a description, a token name, a reason): at most `max` characters.
pub fn text(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.chars().count() > max {
        return Err(format!("{what} must be at most {max} characters"));
    }
    Ok(())
}

/// An account id: 1 to 256 characters without control characters. Returns its one spelling
/// (`crate::account::canonical`), which is what is stored and compared.
pub fn account(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().count() > MAX_ACCOUNT_CHARS || !plain_text(s) {
        return Err(format!(
            "invalid account: accounts are 1 to {MAX_ACCOUNT_CHARS} characters without control characters"
        ));
    }
    Ok(crate::account::canonical(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_bounds_what_a_message_repeats() {
        assert_eq!(quoted("agent"), "agent");
        let long = "x".repeat(1_000_000);
        assert_eq!(quoted(&long).len(), MAX_QUOTED_CHARS + 3);
        assert_eq!(quoted("a\nb"), "a?b");
    }

    #[test]
    fn lists_are_bounded_and_deduplicated() {
        let many: Vec<Option<&str>> = vec![Some("agent"); MAX_CAN_VALIDATE + 1];
        assert!(key_type_list(&many).is_err());
        assert_eq!(key_type_list(&[Some("a"), Some("a"), Some("b")]), Ok(vec!["a".into(), "b".into()]));
        assert!(key_type_list(&[None]).is_err());
        assert!(key_type_list(&[Some("Not_Valid")]).is_err());
        assert_eq!(scopes(&[Some("read"), Some("read")]), Ok(vec!["read".into()]));
        assert!(scopes(&[Some("")]).is_err());
        assert!(scopes(&vec![Some("s"); MAX_SCOPES + 1]).is_err());
    }

    #[test]
    fn names_and_texts() {
        assert!(key_type_name("agent_2").is_ok());
        let e = key_type_name(&"a".repeat(1_000_000)).expect_err("too long");
        assert!(e.len() < 200, "the message quotes at most 64 characters: {}", e.len());
        assert!(environment_name("prod").is_ok() && environment_name("Prod").is_err());
        assert!(text("name", &"n".repeat(200), MAX_TOKEN_NAME_CHARS).is_ok());
        assert!(text("name", &"n".repeat(201), MAX_TOKEN_NAME_CHARS).is_err());
    }

    #[test]
    fn accounts_come_back_in_their_one_spelling() {
        assert_eq!(account("00042"), Ok("42".into()));
        assert_eq!(account("acme"), Ok("acme".into()));
        assert!(account("").is_err() && account("a\tb").is_err() && account(&"a".repeat(257)).is_err());
    }
}
