//! Every refusal reason, from check_token (a row) and validate_token (SQLSTATE 28000), and
//! bad input of every kind: a clear error or reason, the backend stays up, no row written.

#[pgrx::pg_schema]
mod tests {
    use super::super::fixture::*;
    use pgrx::prelude::*;

    fn refuses(arg: &str, expected: &str) {
        registry();
        let rows = token_rows();
        assert_eq!(reason(arg).as_deref(), Some(expected), "check_token({arg})");
        let message = if expected == "environment_mismatch" {
            "Token environment mismatch: ".to_string()
        } else {
            format!("token rejected: {expected}")
        };
        assert_fails(&format!("SELECT * FROM token.validate_token({arg})"), "28000", &message);
        assert_eq!(token_rows(), rows, "a refusal must not write a token row");
        assert_eq!(one::<i32>("SELECT 1"), Some(1), "the backend is still up");
    }

    #[pg_test]
    fn null_is_malformed() {
        refuses("NULL", "malformed");
    }

    #[pg_test]
    fn empty_string_is_malformed() {
        refuses("''", "malformed");
    }

    #[pg_test]
    fn ten_megabyte_string_is_malformed() {
        refuses("repeat('a', 10 * 1024 * 1024)", "malformed");
    }

    #[pg_test]
    fn non_ascii_from_convert_from_is_malformed() {
        refuses(r"convert_from('\xc3a9c3a9'::bytea, 'UTF8') || 'tst-'", "malformed");
        refuses(r"convert_from('\xff'::bytea, 'LATIN1')", "malformed");
    }

    #[pg_test]
    fn sql_metacharacters_are_malformed() {
        for s in ["tst-'; DROP TABLE token.tokens; --", "tst-\" OR 1=1", "tst-$$;--", "tst-\\x00", "tst-%_*"] {
            refuses(&lit(s), "malformed");
        }
        assert!(one::<bool>("SELECT to_regclass('token.tokens') IS NOT NULL").unwrap_or(false));
    }

    #[pg_test]
    fn wrong_shape_is_malformed() {
        refuses("'tst-abc'", "malformed");
        refuses("'no-separator-here'", "malformed");
        refuses(&lit(&format!("{}-{}", "a".repeat(40), "b".repeat(28))), "malformed");
    }

    #[pg_test]
    fn truncated_token_is_malformed_before_any_lookup() {
        registry();
        let t = issue("acme", "agent", "");
        refuses(&lit(&t.token[..t.token.len() - 1]), "malformed");
    }

    #[pg_test]
    fn wrong_checksum_is_bad_checksum() {
        registry();
        let t = issue("acme", "agent", "");
        let mut bytes = t.token.clone().into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        refuses(&lit(&String::from_utf8(bytes).unwrap_or_default()), "bad_checksum");
    }

    #[pg_test]
    fn unregistered_prefix_is_unknown_prefix() {
        refuses(&lit(&forged("nope-")), "unknown_prefix");
    }

    #[pg_test]
    fn never_issued_token_is_not_found() {
        refuses(&lit(&forged("tst-")), "not_found");
    }

    #[pg_test]
    fn past_expires_at_is_expired() {
        registry();
        let t = issue("acme", "agent", "expires_in => '1 hour'");
        run(&format!("UPDATE token.tokens SET expires_at = clock_timestamp() - interval '1 second' WHERE id = '{}'", t.id));
        refuses(&lit(&t.token), "expired");
    }

    #[pg_test]
    fn revoked_token_is_revoked() {
        registry();
        let t = issue("acme", "agent", "");
        run(&format!("SELECT token.revoke_token('{}', 'test')", t.id));
        refuses(&lit(&t.token), "revoked");
    }

    #[pg_test]
    fn past_revoke_after_is_revoked() {
        registry();
        let t = issue("acme", "agent", "");
        run(&format!("SELECT token.rotate_token('{}', grace => '0')", t.id));
        refuses(&lit(&t.token), "revoked");
    }

    #[pg_test]
    fn other_environment_is_environment_mismatch() {
        refuses(&lit(&forged("tstprd-")), "environment_mismatch");
    }

    #[pg_test]
    fn every_reason_is_listed_by_token_reasons() {
        let listed = one::<i64>("SELECT count(*) FROM token.reasons()").unwrap_or(0);
        assert_eq!(listed as usize, pg_token_core::reason::Reason::ALL.len());
        let words = one::<String>("SELECT string_agg(reason, ',' ORDER BY reason) FROM token.reasons()").unwrap_or_default();
        for w in ["malformed", "bad_checksum", "unknown_prefix", "not_found", "expired", "revoked", "environment_mismatch",
                  "caller_invalid", "caller_not_permitted", "cross_account", "insufficient_scope"] {
            assert!(words.split(',').any(|x| x == w), "{w} missing from {words}");
        }
    }

    #[pg_test]
    fn refusal_messages_never_contain_the_token() {
        registry();
        let t = issue("acme", "agent", "");
        run(&format!("SELECT token.revoke_token('{}')", t.id));
        let err = error_of(&format!("SELECT * FROM token.validate_token({})", lit(&t.token))).unwrap_or_default();
        assert!(err.starts_with("28000"), "{err}");
        assert!(!err.contains(&t.token), "{err}");
        assert!(!err.contains(&t.token[..12]), "more than prefix + 4 chars shown: {err}");
    }

    #[pg_test]
    fn hash_token_is_sha256_and_refuses_oversized_input() {
        let same = one::<bool>("SELECT token.hash_token('tst-abc') = sha256('tst-abc'::bytea)");
        assert_eq!(same, Some(true));
        assert_eq!(one::<bool>("SELECT token.hash_token(NULL) IS NULL"), Some(true));
        assert_fails("SELECT token.hash_token(repeat('a', 257))", "22023", "longer than 256 bytes");
    }
}
