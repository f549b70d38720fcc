//! Algorithm, signature, time, issuer/audience and claim rules.

use super::*;

// ---- Algorithm rules.

#[test]
fn alg_none_is_refused_in_any_case_signed_or_not() {
    let keys = hs_issuer();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = format!(r#"{{"alg":"{alg}"}}"#);
        let bare = format!("{}.", unsigned(&header, &claims("")));
        let faked = format!("{bare}{}", b64(b"anything"));
        for t in [bare, faked] {
            assert_eq!(
                check(&t, &keys, NOW, &EXPECT),
                Err(JwtError::AlgNone),
                "{alg}"
            );
        }
    }
}

#[test]
fn algorithms_other_than_the_three_are_unsupported() {
    for alg in ["HS512", "RS384", "PS256", "EdDSA", "hs256", "HS256 ", ""] {
        let header = format!(r#"{{"alg":"{alg}"}}"#);
        let t = hs256_with(SECRET, &header, &claims(""));
        assert_eq!(refusal(&t), Some(JwtError::UnsupportedAlgorithm), "{alg:?}");
    }
    assert_eq!(Algorithm::from_name("RS256"), Some(Algorithm::Rs256));
    for a in Algorithm::ALL {
        assert_eq!(Algorithm::from_name(a.as_str()), Some(a));
    }
}

#[test]
fn hs256_token_made_with_the_rsa_public_key_is_refused_by_an_rs256_issuer() {
    // The classic confusion attack: the attacker knows the issuer's public key and HMACs
    // a token with its text, hoping the verifier uses that text as an HMAC secret.
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    let rsa_jwk = rfc_rsa_jwk();
    for material in [
        A2_SPKI_PEM,
        A2_PKCS1_PEM,
        A2_SPKI_PEM.trim_end(),
        rsa_jwk.as_str(),
    ] {
        let keys =
            IssuerKeys::from_material(&[Algorithm::Rs256], material.as_bytes()).expect("rsa key");
        let forged = hs256_with(material.as_bytes(), header, &claims(""));
        assert_eq!(
            check(&forged, &keys, NOW, &EXPECT),
            Err(JwtError::AlgorithmNotAllowed)
        );
    }
    // Nor can an issuer be registered so that the attack could work.
    assert_eq!(
        IssuerKeys::from_material(
            &[Algorithm::Hs256, Algorithm::Rs256],
            A2_SPKI_PEM.as_bytes()
        )
        .err(),
        Some(KeyError::MixedKeyKinds)
    );
    for material in [A2_SPKI_PEM, A2_PKCS1_PEM, A3_SPKI_PEM, rsa_jwk.as_str()] {
        assert_eq!(
            IssuerKeys::from_material(&[Algorithm::Hs256], material.as_bytes()).err(),
            Some(KeyError::SecretLooksLikePublicKey)
        );
    }
    let rsa = NamedKey {
        kid: None,
        key: parse_key(Algorithm::Rs256, A2_SPKI_PEM.as_bytes()).expect("rsa"),
    };
    assert_eq!(
        IssuerKeys::new(&[Algorithm::Hs256], vec![rsa.clone()]).err(),
        Some(KeyError::KeyAlgorithmNotAllowed)
    );
    assert_eq!(
        IssuerKeys::new(&[Algorithm::Hs256, Algorithm::Rs256], vec![rsa]).err(),
        Some(KeyError::MixedKeyKinds)
    );
}

#[test]
fn an_allowed_alg_still_needs_a_key_of_its_kind() {
    // RS256 and ES256 both allowed, only an RSA key registered: an ES256 token finds no key.
    let keys = IssuerKeys::from_material(
        &[Algorithm::Rs256, Algorithm::Es256],
        A2_SPKI_PEM.as_bytes(),
    )
    .expect("rsa");
    let t = es256(r#"{"alg":"ES256"}"#, &claims(""));
    assert_eq!(check(&t, &keys, NOW, &EXPECT), Err(JwtError::NoMatchingKey));
    let t = rs256(r#"{"alg":"RS256"}"#, &claims(""));
    assert!(check(&t, &keys, NOW, &EXPECT).is_ok());
    // An RS256 token to an ES256-only issuer.
    assert_eq!(
        check(&t, &es_issuer(), NOW, &EXPECT),
        Err(JwtError::AlgorithmNotAllowed)
    );
}

// ---- Signatures.

#[test]
fn a_tampered_payload_is_refused_for_every_algorithm() {
    let good = claims("");
    let evil = format!(r#"{{"sub":"admin","exp":{}}}"#, NOW + 60);
    let cases = [
        (hs256(&good), hs_issuer()),
        (rs256(r#"{"alg":"RS256"}"#, &good), rs_issuer()),
        (es256(r#"{"alg":"ES256"}"#, &good), es_issuer()),
    ];
    for (t, keys) in cases {
        let parts: Vec<&str> = t.split('.').collect();
        let swapped = format!("{}.{}.{}", parts[0], b64(evil.as_bytes()), parts[2]);
        assert_eq!(
            check(&swapped, &keys, NOW, &EXPECT),
            Err(JwtError::BadSignature)
        );
        assert!(check(&t, &keys, NOW, &EXPECT).is_ok());
    }
}

#[test]
fn a_tampered_or_truncated_signature_is_refused() {
    assert_eq!(
        refusal(&flip_last_char(&hs256(&claims("")))),
        Some(JwtError::BadSignature)
    );
    let es = es256(r#"{"alg":"ES256"}"#, &claims(""));
    let (input, sig) = es.rsplit_once('.').expect("three parts");
    let mut raw = unb64(sig);
    raw[10] ^= 1;
    let flipped = format!("{input}.{}", b64(&raw));
    let short = format!("{input}.{}", b64(&unb64(sig)[..63]));
    let empty = format!("{input}.");
    // ES256 signatures in DER (as some libraries wrongly emit) are not JWS signatures.
    let der = ecdsa::Signature::from_slice(&unb64(sig))
        .expect("sig")
        .to_der();
    let as_der = format!("{input}.{}", b64(der.as_bytes()));
    for t in [flipped, short, empty, as_der] {
        assert_eq!(
            check(&t, &es_issuer(), NOW, &EXPECT),
            Err(JwtError::BadSignature)
        );
    }
    let rs = rs256(r#"{"alg":"RS256"}"#, &claims(""));
    let (input, sig) = rs.rsplit_once('.').expect("three parts");
    let mut raw = unb64(sig);
    raw[0] ^= 0x80;
    let flipped = format!("{input}.{}", b64(&raw));
    let short = format!("{input}.{}", b64(&raw[1..]));
    for t in [flipped, short] {
        assert_eq!(
            check(&t, &rs_issuer(), NOW, &EXPECT),
            Err(JwtError::BadSignature)
        );
    }
}

#[test]
fn the_wrong_key_is_refused() {
    let other_hs = IssuerKeys::from_material(
        &[Algorithm::Hs256],
        b"another test-only secret of 32+ bytes",
    )
    .expect("secret");
    assert_eq!(
        check(&hs256(&claims("")), &other_hs, NOW, &EXPECT),
        Err(JwtError::BadSignature)
    );
    let other_rs =
        IssuerKeys::from_material(&[Algorithm::Rs256], OTHER_RSA_PEM.as_bytes()).expect("rsa");
    let rs = rs256(r#"{"alg":"RS256"}"#, &claims(""));
    assert_eq!(
        check(&rs, &other_rs, NOW, &EXPECT),
        Err(JwtError::BadSignature)
    );
    // Another P-256 key: the public key of the scalar 0x0707...07.
    let other_ec = ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("scalar");
    let point = other_ec.verifying_key().to_encoded_point(false);
    let jwk = format!(
        r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#,
        b64(point.x().expect("x")),
        b64(point.y().expect("y"))
    );
    let other_es = IssuerKeys::from_material(&[Algorithm::Es256], jwk.as_bytes()).expect("ec");
    let es = es256(r#"{"alg":"ES256"}"#, &claims(""));
    assert_eq!(
        check(&es, &other_es, NOW, &EXPECT),
        Err(JwtError::BadSignature)
    );
}

// ---- Time.

#[test]
fn expiry_with_and_without_leeway() {
    let t = hs256(&format!(r#"{{"sub":"acme","exp":{NOW}}}"#));
    let d = decode(t.as_bytes()).expect("decodes");
    let keys = hs_issuer();
    assert!(verify(&d, &keys, NOW - 1, 0, &EXPECT).is_ok());
    assert_eq!(verify(&d, &keys, NOW, 0, &EXPECT), Err(JwtError::Expired));
    assert_eq!(
        verify(&d, &keys, NOW + 1000, 0, &EXPECT),
        Err(JwtError::Expired)
    );
    assert!(verify(&d, &keys, NOW + 29, 30, &EXPECT).is_ok());
    assert_eq!(
        verify(&d, &keys, NOW + 30, 30, &EXPECT),
        Err(JwtError::Expired)
    );
    assert_eq!(
        verify(&d, &keys, NOW, -30, &EXPECT),
        Err(JwtError::Expired),
        "negative leeway is 0"
    );
    // Huge values neither overflow nor wrap.
    assert!(verify(&d, &keys, i64::MIN, i64::MAX, &EXPECT).is_ok());
    assert_eq!(
        verify(&d, &keys, i64::MAX, i64::MAX, &EXPECT),
        Err(JwtError::Expired)
    );
}

#[test]
fn exp_must_be_a_numeric_date() {
    assert_eq!(
        refusal(&hs256(r#"{"sub":"acme"}"#)),
        Some(JwtError::MissingExp)
    );
    for exp in [
        r#""1900000000""#,
        "null",
        "true",
        "[1900000000]",
        "1e300",
        "18446744073709551615",
    ] {
        let t = hs256(&format!(r#"{{"sub":"acme","exp":{exp}}}"#));
        assert_eq!(refusal(&t), Some(JwtError::BadExp), "{exp}");
    }
    let fractional = hs256(&format!(r#"{{"sub":"acme","exp":{}.75}}"#, NOW + 1));
    assert_eq!(
        check(&fractional, &hs_issuer(), NOW, &EXPECT).map(|c| c.exp),
        Ok(NOW + 1)
    );
    let past_float = hs256(&format!(r#"{{"sub":"acme","exp":{}.5}}"#, NOW - 1));
    assert_eq!(refusal(&past_float), Some(JwtError::Expired));
    assert_eq!(
        refusal(&hs256(&claims(r#""iat":"yesterday""#))),
        Some(JwtError::BadIat)
    );
    assert_eq!(
        refusal(&hs256(&claims(r#""nbf":"now""#))),
        Some(JwtError::BadNbf)
    );
}

#[test]
fn nbf_in_the_future_is_refused_beyond_the_leeway() {
    let t = hs256(&claims(&format!(r#""nbf":{}"#, NOW + 10)));
    let d = decode(t.as_bytes()).expect("decodes");
    let keys = hs_issuer();
    assert_eq!(
        verify(&d, &keys, NOW, 0, &EXPECT),
        Err(JwtError::NotYetValid)
    );
    assert_eq!(
        verify(&d, &keys, NOW, 9, &EXPECT),
        Err(JwtError::NotYetValid)
    );
    assert!(verify(&d, &keys, NOW, 10, &EXPECT).is_ok());
    assert!(
        verify(&d, &keys, NOW + 10, 0, &EXPECT).is_ok(),
        "valid from nbf on"
    );
}

// ---- Issuer and audience.

#[test]
fn issuer_must_match_when_registered() {
    let keys = hs_issuer();
    let expect = Expectations {
        issuer: Some("https://idp.example"),
        ..EXPECT
    };
    let good = hs256(&claims(r#""iss":"https://idp.example""#));
    assert!(check(&good, &keys, NOW, &expect).is_ok());
    for other in [
        r#""iss":"https://evil.example""#,
        r#""iss":"https://idp.example/""#,
        "",
    ] {
        let t = hs256(&claims(other));
        assert_eq!(
            check(&t, &keys, NOW, &expect),
            Err(JwtError::IssuerMismatch),
            "{other}"
        );
    }
    assert_eq!(
        check(&hs256(&claims(r#""iss":7"#)), &keys, NOW, &expect),
        Err(JwtError::BadIssuer)
    );
    let long = format!(r#""iss":"{}""#, "i".repeat(MAX_ISSUER_BYTES + 1));
    assert_eq!(
        check(&hs256(&claims(&long)), &keys, NOW, &EXPECT),
        Err(JwtError::BadIssuer)
    );
}

#[test]
fn audience_must_be_named_when_registered_and_absent_otherwise() {
    let keys = hs_issuer();
    let expect = Expectations {
        audience: Some("orders-db"),
        ..EXPECT
    };
    for aud in [r#""aud":"orders-db""#, r#""aud":["billing","orders-db"]"#] {
        assert!(
            check(&hs256(&claims(aud)), &keys, NOW, &expect).is_ok(),
            "{aud}"
        );
        assert_eq!(
            check(&hs256(&claims(aud)), &keys, NOW, &EXPECT),
            Err(JwtError::UnexpectedAudience)
        );
    }
    for aud in [
        r#""aud":"billing""#,
        r#""aud":["billing"]"#,
        r#""aud":[]"#,
        r#""aud":7"#,
        r#""aud":["orders-db "]"#,
        "",
    ] {
        assert_eq!(
            check(&hs256(&claims(aud)), &keys, NOW, &expect),
            Err(JwtError::AudienceMismatch),
            "{aud}"
        );
    }
}

// ---- Account, scopes, jti.

#[test]
fn account_claim_rules() {
    let keys = hs_issuer();
    let exp = NOW + 60;
    let with = |sub: &str| hs256(&format!(r#"{{"sub":{sub},"exp":{exp}}}"#));
    assert_eq!(
        refusal(&hs256(&format!(r#"{{"exp":{exp}}}"#))),
        Some(JwtError::MissingAccount)
    );
    let max = format!(r#""{}""#, "a".repeat(256));
    let over = format!(r#""{}""#, "a".repeat(257));
    let over_multibyte = format!(r#""{}""#, "é".repeat(257));
    for bad in [
        "\"\"",
        over.as_str(),
        over_multibyte.as_str(),
        "\"a\\u0000b\"",
        "\"a\\nb\"",
        "true",
        "null",
        "1.5",
        "[\"acme\"]",
        "{}",
    ] {
        assert_eq!(refusal(&with(bad)), Some(JwtError::BadAccount), "{bad}");
    }
    for (given, one) in [
        (max.as_str(), "a".repeat(256)),
        ("42", "42".into()),
        ("\"0042\"", "42".into()),
        ("\"é\"", "é".into()),
    ] {
        assert_eq!(
            check(&with(given), &keys, NOW, &EXPECT).map(|c| c.account),
            Ok(one),
            "{given}"
        );
    }
    let custom = Expectations {
        account_claim: "https://example.com/tenant",
        ..EXPECT
    };
    let t = hs256(&claims(r#""https://example.com/tenant":"globex""#));
    assert_eq!(
        check(&t, &keys, NOW, &custom).map(|c| c.account),
        Ok("globex".into())
    );
}

#[test]
fn scopes_claim_rules() {
    let keys = hs_issuer();
    let scopes = |extra: &str| check(&hs256(&claims(extra)), &keys, NOW, &EXPECT).map(|c| c.scopes);
    let v = |s: &[&str]| Ok(s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
    assert_eq!(scopes(""), v(&[]));
    assert_eq!(scopes(r#""scope":"""#), v(&[]));
    assert_eq!(
        scopes(r#""scope":"  read   write ""#),
        v(&["read", "write"])
    );
    assert_eq!(
        scopes(r#""scope":["read","orders:write","read"]"#),
        v(&["read", "orders:write"])
    );
    for bad in [
        r#""scope":7"#,
        r#""scope":null"#,
        r#""scope":["read",7]"#,
        r#""scope":[""]"#,
        r#""scope":{"a":1}"#,
        r#""scope":"a\tb""#,
    ] {
        assert_eq!(scopes(bad), Err(JwtError::BadScopes), "{bad}");
    }
    let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
    assert_eq!(
        scopes(&format!(r#""scope":"{}""#, many.join(" "))),
        Err(JwtError::TooManyScopes)
    );
    assert_eq!(
        scopes(&format!(r#""scope":{:?}"#, many)),
        Err(JwtError::TooManyScopes)
    );
    assert_eq!(
        scopes(&format!(r#""scope":"{}""#, many[..MAX_SCOPES].join(" "))).map(|s| s.len()),
        Ok(MAX_SCOPES)
    );
    let long = "s".repeat(MAX_SCOPE_BYTES + 1);
    assert_eq!(
        scopes(&format!(r#""scope":"read {long}""#)),
        Err(JwtError::ScopeTooLong)
    );
    assert_eq!(
        scopes(&format!(r#""scope":["{long}"]"#)),
        Err(JwtError::ScopeTooLong)
    );
    assert_eq!(
        scopes(&format!(r#""scope":"{}""#, &long[1..])).map(|s| s.len()),
        Ok(1)
    );
    let roles = Expectations {
        scopes_claim: "roles",
        ..EXPECT
    };
    let t = hs256(&claims(r#""roles":["admin"],"scope":"ignored""#));
    assert_eq!(
        check(&t, &keys, NOW, &roles).map(|c| c.scopes),
        v(&["admin"])
    );
}

#[test]
fn jti_is_a_short_string() {
    assert_eq!(
        refusal(&hs256(&claims(r#""jti":7"#))),
        Some(JwtError::BadJti)
    );
    let long = format!(r#""jti":"{}""#, "j".repeat(MAX_JTI_BYTES + 1));
    assert_eq!(refusal(&hs256(&claims(&long))), Some(JwtError::BadJti));
    let max = format!(r#""jti":"{}""#, "j".repeat(MAX_JTI_BYTES));
    assert!(refusal(&hs256(&claims(&max))).is_none());
}
