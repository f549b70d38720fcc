//! What looks like a JWT: routing, and property tests that nothing panics.

use super::*;

// ---- Routing: what looks like a JWT.

#[test]
fn jwt_shape() {
    assert!(looks_like_jwt(A1_JWT.as_bytes()));
    assert!(looks_like_jwt(hs256(&claims("")).as_bytes()));
    assert!(looks_like_jwt(b"eyJ.a."), "an unsigned JWT is judged (and refused as alg none)");
    for not in [
        "",
        "eyJ",
        "eyJ.a",
        "eyJ..a",
        ".eyJ.a.b",
        "eyJ.a.b.c",
        "eyI.a.b",
        "eyJ.a b.c",
        "eyJ.a.b=",
        "eyJ.a.b\n",
        "cf-k7R9fQw2VDp3Zx4mN8tJ1s000000",
        "eyJhbGc_k7R9fQw2VDp3Zx4mN8tJ1s000000",
    ] {
        assert!(!looks_like_jwt(not.as_bytes()), "{not:?}");
    }
    let long = format!("eyJ{}.a.b", "A".repeat(MAX_JWT_SHAPE_BYTES));
    assert!(!looks_like_jwt(long.as_bytes()));
    assert!(!looks_like_jwt("eyJ.a.\u{e9}".as_bytes()));
}

#[test]
fn generated_opaque_tokens_never_look_like_jwts() {
    for prefix in ["cf-", "eyJ_", "eyJhbGciOiJIUzI1NiJ9-", "thresh_live_", "e-"] {
        for _ in 0..200 {
            let t = format::generate(prefix).expect("csprng");
            assert!(!looks_like_jwt(t.as_bytes()), "{t}");
        }
    }
}

proptest! {
    #[test]
    fn no_opaque_token_shape_looks_like_a_jwt(
        prefix in "(eyJ)?[A-Za-z0-9][A-Za-z0-9_-]{0,27}[_-]",
        body in "[0-9A-Za-z]{22}",
    ) {
        let t = format::compose(&prefix, &body);
        prop_assert!(format::parse(&t).is_ok());
        prop_assert!(!looks_like_jwt(t.as_bytes()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = looks_like_jwt(&bytes);
        if let Ok(d) = decode(&bytes) {
            let _ = verify(&d, &hs_issuer(), NOW, 0, &EXPECT);
            let _ = issuer_hint(&d);
        }
        let _ = parse_key(Algorithm::Rs256, &bytes);
        let _ = parse_key(Algorithm::Es256, &bytes);
    }

    #[test]
    fn arbitrary_claims_never_panic(json in "\\{(\"[a-z]{1,4}\":(\"[ -~]{0,8}\"|-?[0-9]{1,20}(\\.[0-9])?|true|null|\\[\\]),?){0,6}\\}") {
        let t = hs256(&json);
        if let Ok(d) = decode(t.as_bytes()) {
            let _ = verify(&d, &hs_issuer(), NOW, 5, &EXPECT);
        }
    }
}
