//! Shape, decoding, keys, and what looks like a JWT.

use super::*;

// ---- Shape and decoding.

#[test]
fn oversized_input_is_refused_before_decoding() {
    let pad = "x".repeat(MAX_JWT_BYTES);
    let big = hs256(&claims(&format!(r#""pad":"{pad}""#)));
    assert!(big.len() > MAX_JWT_BYTES && looks_like_jwt(big.as_bytes()));
    assert_eq!(decode(big.as_bytes()).err(), Some(JwtError::TooLong));
    // Not even base64: the length decides first.
    let junk = vec![b'!'; MAX_JWT_BYTES + 1];
    assert_eq!(decode(&junk).err(), Some(JwtError::TooLong));
    let huge_header = format!(
        r#"{{"alg":"HS256","x":"{}"}}"#,
        "h".repeat(MAX_HEADER_BYTES)
    );
    assert_eq!(
        decode(hs256_with(SECRET, &huge_header, &claims("")).as_bytes()).err(),
        Some(JwtError::HeaderTooLarge)
    );
    let deep = format!(
        r#""n":{}1{}"#,
        "[".repeat(MAX_JSON_DEPTH),
        "]".repeat(MAX_JSON_DEPTH)
    );
    assert_eq!(
        decode(hs256(&claims(&deep)).as_bytes()).err(),
        Some(JwtError::TooDeep)
    );
    let ok_depth = format!(
        r#""n":{}1{}"#,
        "[".repeat(MAX_JSON_DEPTH - 1),
        "]".repeat(MAX_JSON_DEPTH - 1)
    );
    assert!(decode(hs256(&claims(&ok_depth)).as_bytes()).is_ok());
    // Brackets inside strings do not count.
    let in_string = format!(r#""n":"{}""#, "[".repeat(100));
    assert!(decode(hs256(&claims(&in_string)).as_bytes()).is_ok());
}

#[test]
fn malformed_segments_are_refused() {
    let t = hs256(&claims(""));
    let (h, rest) = t.split_once('.').expect("dot");
    let (c, s) = rest.split_once('.').expect("dot");
    let cases: Vec<(String, JwtError)> = vec![
        (String::new(), JwtError::Malformed),
        (format!("{h}.{c}"), JwtError::Malformed),
        (format!("{h}.{c}.{s}.{s}"), JwtError::Malformed),
        (format!(".{c}.{s}"), JwtError::Malformed),
        (format!("{h}..{s}"), JwtError::Malformed),
        (format!("{h}.{c}.{s} "), JwtError::Malformed),
        (format!("{h}.{c}+.{s}"), JwtError::Malformed),
        (format!("{h}.{c}/.{s}"), JwtError::Malformed),
        (format!("{h}.{c}.{s}="), JwtError::BadBase64),
        (format!("{h}==.{c}.{s}"), JwtError::BadBase64),
        (format!("{h}.AAAAA.{s}"), JwtError::BadBase64),
        (
            format!("{h}.{c}.{}", flip_last_char_noncanonical(s)),
            JwtError::BadBase64,
        ),
    ];
    for (token, want) in cases {
        assert_eq!(decode(token.as_bytes()).err(), Some(want), "{token}");
    }
    let nonutf8 = "eyJhbGciOiJIUzI1NiJ9\u{e9}.e30.AA";
    assert_eq!(decode(nonutf8.as_bytes()).err(), Some(JwtError::Malformed));
}

/// A 32-byte MAC's base64url ends in a character carrying 4 bits and 2 zero bits; one with
/// a non-zero trailing bit is another spelling of (nearly) the same bytes.
fn flip_last_char_noncanonical(sig: &str) -> String {
    let mut s = sig.to_owned();
    let last = s.pop().expect("non-empty");
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let i = alphabet
        .iter()
        .position(|&b| b as char == last)
        .expect("base64url");
    s.push(alphabet[i | 1] as char);
    s
}

#[test]
fn header_rules() {
    let c = claims("");
    let refused = |header: &str| decode(hs256_with(SECRET, header, &c).as_bytes()).err();
    assert_eq!(refused("[]"), Some(JwtError::BadHeader));
    assert_eq!(refused("\"HS256\""), Some(JwtError::BadHeader));
    assert_eq!(refused("{\"alg\":\"HS256\""), Some(JwtError::BadHeader));
    assert_eq!(refused("{\"alg\":\"HS256\"} x"), Some(JwtError::BadHeader));
    assert_eq!(refused("{}"), Some(JwtError::MissingAlg));
    assert_eq!(refused(r#"{"alg":256}"#), Some(JwtError::MissingAlg));
    assert_eq!(
        refused(r#"{"alg":"HS256","alg":"none"}"#),
        Some(JwtError::DuplicateMember)
    );
    assert_eq!(
        refused(r#"{"alg":"HS256","typ":"JOSE"}"#),
        Some(JwtError::BadTyp)
    );
    assert_eq!(
        refused(r#"{"alg":"HS256","typ":"at+jwt"}"#),
        Some(JwtError::BadTyp)
    );
    assert_eq!(
        refused(r#"{"alg":"HS256","typ":null}"#),
        Some(JwtError::BadTyp)
    );
    assert_eq!(
        refused(r#"{"alg":"HS256","crit":["exp"]}"#),
        Some(JwtError::CritHeader)
    );
    assert_eq!(
        refused(r#"{"alg":"HS256","b64":false,"crit":["b64"]}"#),
        Some(JwtError::CritHeader)
    );
    assert_eq!(
        refused(r#"{"alg":"HS256","kid":7}"#),
        Some(JwtError::BadKid)
    );
    assert_eq!(
        refused(&format!(r#"{{"alg":"HS256","kid":"{}"}}"#, "k".repeat(257))),
        Some(JwtError::BadKid)
    );
    assert_eq!(refused(r#"{"alg":"HS256","typ":"jwt"}"#), None);
    // A key offered in the header is ignored, never trusted.
    let jwk_header = format!(r#"{{"alg":"RS256","jwk":{}}}"#, rfc_rsa_jwk());
    let t = rs256(&jwk_header, &c);
    assert_eq!(
        check(&t, &es_issuer(), NOW, &EXPECT),
        Err(JwtError::AlgorithmNotAllowed)
    );
    assert!(check(&t, &rs_issuer(), NOW, &EXPECT).is_ok());
}

#[test]
fn claims_must_be_one_json_object() {
    for bad in [
        "[]",
        "\"sub\"",
        "1",
        "null",
        "{",
        "{\"sub\":\"a\"}{}",
        "\u{feff}{}",
    ] {
        let t = hs256_with(SECRET, r#"{"alg":"HS256"}"#, bad);
        assert_eq!(
            decode(t.as_bytes()).err(),
            Some(JwtError::BadClaims),
            "{bad:?}"
        );
    }
    let twice = format!(r#"{{"sub":"acme","sub":"admin","exp":{}}}"#, NOW + 60);
    assert_eq!(
        decode(hs256(&twice).as_bytes()).err(),
        Some(JwtError::DuplicateMember)
    );
    let bad_utf8 = format!(
        "{}.{}.AA",
        b64(br#"{"alg":"HS256"}"#),
        b64(b"{\"sub\":\"\xff\"}")
    );
    assert_eq!(decode(bad_utf8.as_bytes()).err(), Some(JwtError::BadClaims));
}

// ---- Keys.

#[test]
fn key_material_is_checked_at_registration() {
    let rs = |m: &str| parse_key(Algorithm::Rs256, m.as_bytes()).err();
    let es = |m: &str| parse_key(Algorithm::Es256, m.as_bytes()).err();
    assert_eq!(
        parse_key(Algorithm::Hs256, &[7u8; 31]).err(),
        Some(KeyError::SecretTooShort)
    );
    assert!(parse_key(Algorithm::Hs256, &[7u8; 32]).is_ok());
    assert!(
        parse_key(Algorithm::Hs256, &[b'{'; 40]).is_ok(),
        "a secret may start with '{{'"
    );
    assert_eq!(
        parse_key(Algorithm::Hs256, &vec![1u8; MAX_KEY_MATERIAL_BYTES + 1]).err(),
        Some(KeyError::TooLarge)
    );
    assert_eq!(rs(RSA_1024_PEM), Some(KeyError::RsaTooSmall));
    assert_eq!(rs(A3_SPKI_PEM), Some(KeyError::NotRsaKey));
    assert_eq!(rs(P384_PEM), Some(KeyError::BadPem));
    assert_eq!(es(P384_PEM), Some(KeyError::NotP256Key));
    assert_eq!(es(A2_SPKI_PEM), Some(KeyError::NotP256Key));
    assert_eq!(es(A2_PKCS1_PEM), Some(KeyError::NotP256Key));
    assert_eq!(
        rs("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
        Some(KeyError::PrivateKey)
    );
    assert_eq!(
        es("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"),
        Some(KeyError::PrivateKey)
    );
    assert_eq!(
        rs("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        Some(KeyError::Certificate)
    );
    assert_eq!(
        rs("-----BEGIN DSA PUBLIC KEY-----\nAAAA\n-----END DSA PUBLIC KEY-----\n"),
        Some(KeyError::UnsupportedPem)
    );
    assert_eq!(
        rs("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
        Some(KeyError::BadPem)
    );
    assert_eq!(rs("ssh-rsa AAAAB3NzaC1yc2E"), Some(KeyError::Unrecognised));
    assert_eq!(
        parse_key(Algorithm::Rs256, b"\xff\xfe").err(),
        Some(KeyError::Unrecognised)
    );
    // Surrounding whitespace and CRLF line ends are fine.
    assert!(rs(&format!("\n  {}\n", A2_SPKI_PEM.replace('\n', "\r\n"))).is_none());
    // The A.2 PEM as a secret is refused; as an RS256 key it is accepted.
    assert!(rs(A2_SPKI_PEM).is_none() && es(A3_SPKI_PEM).is_none());
}

#[test]
fn jwk_rules() {
    let rs = |m: &str| parse_key(Algorithm::Rs256, m.as_bytes()).err();
    let es = |m: &str| parse_key(Algorithm::Es256, m.as_bytes()).err();
    let jwk = |extra: &str| format!(r#"{{"kty":"RSA","n":"{A2_N}","e":"AQAB"{extra}}}"#);
    assert_eq!(rs(&jwk("")), None);
    assert_eq!(
        rs(&jwk(r#","use":"sig","alg":"RS256","key_ops":["verify"]"#)),
        None
    );
    assert_eq!(rs(&jwk(r#","d":"AQAB""#)), Some(KeyError::PrivateKey));
    assert_eq!(rs(&jwk(r#","use":"enc""#)), Some(KeyError::NotForSigning));
    assert_eq!(
        rs(&jwk(r#","key_ops":["encrypt"]"#)),
        Some(KeyError::NotForSigning)
    );
    assert_eq!(
        rs(&jwk(r#","alg":"RS512""#)),
        Some(KeyError::JwkAlgMismatch)
    );
    assert_eq!(rs(&jwk(r#","kid":7"#)), Some(KeyError::BadJwk));
    assert_eq!(
        rs(&jwk(r#","kty":"RSA""#)),
        Some(KeyError::BadJwk),
        "a repeated member"
    );
    assert_eq!(rs(r#"{"kty":"RSA","e":"AQAB"}"#), Some(KeyError::BadJwk));
    assert_eq!(
        rs(&format!(r#"{{"kty":"RSA","n":"{A2_N}=","e":"AQAB"}}"#)),
        Some(KeyError::BadJwk)
    );
    assert_eq!(
        rs(&format!(
            r#"{{"kty":"RSA","n":"{}","e":"AQAB"}}"#,
            b64(&[0xff; 128])
        )),
        Some(KeyError::RsaTooSmall)
    );
    assert_eq!(
        rs(&format!(
            r#"{{"kty":"RSA","n":"{}","e":"AQAB"}}"#,
            b64(&[0xff; 513])
        )),
        Some(KeyError::RsaTooLarge)
    );
    assert_eq!(rs(&rfc_ec_jwk()), Some(KeyError::NotRsaKey));
    assert_eq!(rs(r#"{"kty":"oct","k":"AyM1"}"#), Some(KeyError::NotRsaKey));
    assert_eq!(es(&rfc_ec_jwk()), None);
    assert_eq!(es(&jwk("")), Some(KeyError::NotP256Key));
    assert_eq!(
        es(&rfc_ec_jwk().replace("P-256", "P-384")),
        Some(KeyError::NotP256Key)
    );
    assert_eq!(
        es(&format!(
            r#"{{"kty":"EC","crv":"P-256","x":"{A3_Y}","y":"{A3_X}"}}"#
        )),
        Some(KeyError::BadJwk),
        "off the curve"
    );
    assert_eq!(
        es(&format!(r#"{{"kty":"EC","crv":"P-256","x":"{A3_X}"}}"#)),
        Some(KeyError::BadJwk)
    );
    assert_eq!(
        es(&format!(
            r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{A3_Y}"}}"#,
            b64(&[1; 31])
        )),
        Some(KeyError::BadJwk)
    );
    assert_eq!(
        es(&format!("{}{}", "[".repeat(100), "]".repeat(100))),
        Some(KeyError::Unrecognised)
    );
    assert_eq!(
        es(&format!(
            r#"{{"a":{}1{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        )),
        Some(KeyError::BadJwk)
    );
}

#[test]
fn jwks_keys_are_chosen_by_kid_or_as_the_only_key() {
    let other_ec = ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("scalar");
    let p = other_ec.verifying_key().to_encoded_point(false);
    let (ox, oy) = (b64(p.x().expect("x")), b64(p.y().expect("y")));
    let jwks = format!(
        r#"{{"keys":[
            {{"kty":"EC","crv":"P-256","kid":"old","x":"{ox}","y":"{oy}"}},
            {{"kty":"EC","crv":"P-256","kid":"new","x":"{A3_X}","y":"{A3_Y}"}},
            {{"kty":"RSA","kid":"rsa","n":"{A2_N}","e":"AQAB"}},
            {{"kty":"EC","crv":"P-256","kid":"enc","use":"enc","x":"{A3_X}","y":"{A3_Y}"}}
        ]}}"#
    );
    let keys = IssuerKeys::from_material(&[Algorithm::Es256], jwks.as_bytes()).expect("jwks");
    assert_eq!(
        keys.keys().len(),
        2,
        "the RSA and encryption keys are skipped"
    );
    assert_eq!(
        parse_key(Algorithm::Es256, jwks.as_bytes()).err(),
        Some(KeyError::SeveralKeys)
    );
    let c = claims("");
    let with_kid = |kid: &str| es256(&format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#), &c);
    assert_eq!(
        check(&with_kid("new"), &keys, NOW, &EXPECT).map(|c| c.kid),
        Ok(Some("new".into()))
    );
    assert_eq!(
        check(&with_kid("old"), &keys, NOW, &EXPECT),
        Err(JwtError::BadSignature)
    );
    assert_eq!(
        check(&with_kid("gone"), &keys, NOW, &EXPECT),
        Err(JwtError::NoMatchingKey)
    );
    assert_eq!(
        check(&es256(r#"{"alg":"ES256"}"#, &c), &keys, NOW, &EXPECT),
        Err(JwtError::NoMatchingKey)
    );

    // Both algorithms from one set; a kid names a key for its own algorithm only.
    let both = IssuerKeys::from_material(&[Algorithm::Es256, Algorithm::Rs256], jwks.as_bytes())
        .expect("jwks");
    assert_eq!(both.keys().len(), 3);
    assert!(check(
        &rs256(r#"{"alg":"RS256","kid":"rsa"}"#, &c),
        &both,
        NOW,
        &EXPECT
    )
    .is_ok());
    assert!(
        check(&rs256(r#"{"alg":"RS256"}"#, &c), &both, NOW, &EXPECT).is_ok(),
        "the only RSA key"
    );
    assert_eq!(
        check(
            &rs256(r#"{"alg":"RS256","kid":"new"}"#, &c),
            &both,
            NOW,
            &EXPECT
        ),
        Err(JwtError::NoMatchingKey)
    );

    // A set of one key: used for a token without kid, or whose kid it does not name.
    let one = format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"new","x":"{A3_X}","y":"{A3_Y}"}}]}}"#
    );
    let keys = IssuerKeys::from_material(&[Algorithm::Es256], one.as_bytes()).expect("jwks");
    assert!(check(&es256(r#"{"alg":"ES256"}"#, &c), &keys, NOW, &EXPECT).is_ok());
    assert_eq!(
        check(&with_kid("other"), &keys, NOW, &EXPECT),
        Err(JwtError::NoMatchingKey)
    );
    // A PEM has no kid: any kid in the token is fine.
    assert!(check(&with_kid("whatever"), &es_issuer(), NOW, &EXPECT).is_ok());

    let none_usable = format!(r#"{{"keys":[{{"kty":"RSA","n":"{A2_N}","e":"AQAB"}}]}}"#);
    assert_eq!(
        IssuerKeys::from_material(&[Algorithm::Es256], none_usable.as_bytes()).err(),
        Some(KeyError::NoUsableKey)
    );
    let bad_member = format!(r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{A3_X}"}}]}}"#);
    assert_eq!(
        IssuerKeys::from_material(&[Algorithm::Es256], bad_member.as_bytes()).err(),
        Some(KeyError::BadJwk)
    );
    let many = format!(
        r#"{{"keys":[{}]}}"#,
        vec![rfc_ec_jwk(); MAX_KEYS + 1].join(",")
    );
    assert_eq!(
        IssuerKeys::from_material(&[Algorithm::Es256], many.as_bytes()).err(),
        Some(KeyError::TooManyKeys)
    );
    assert_eq!(
        IssuerKeys::from_material(&[Algorithm::Es256], br#"{"keys":{}}"#).err(),
        Some(KeyError::BadJwk)
    );
    assert_eq!(
        IssuerKeys::from_material(&[], SECRET).err(),
        Some(KeyError::NoAlgorithms)
    );
}

#[test]
fn errors_and_debug_output_never_carry_the_token_or_the_key() {
    let t = hs256(&claims(r#""jti":"secret-ish-id""#));
    let d = decode(t.as_bytes()).expect("decodes");
    let shown = format!("{d:?} {:?}", hs_issuer());
    let sig = t.rsplit('.').next().expect("sig");
    let payload = t.split('.').nth(1).expect("payload");
    assert!(
        !shown.contains(sig) && !shown.contains(payload) && !shown.contains("secret-ish"),
        "{shown}"
    );
    assert!(!shown.contains("test-only HS256"), "{shown}");
    let key_shown = format!(
        "{:?}",
        parse_key(Algorithm::Rs256, A2_SPKI_PEM.as_bytes()).expect("key")
    );
    assert_eq!(key_shown, "VerifyingKey(RS256)");
    // Every sentence is fixed text.
    for e in [
        JwtError::Malformed,
        JwtError::BadSignature,
        JwtError::Expired,
        JwtError::BadAccount,
    ] {
        assert!(!e.describe().contains(sig) && !e.as_str().is_empty());
    }
    assert!(KeyError::BadPem.describe().len() < 100);
}

#[test]
fn issuer_hint_is_bounded_and_sanitised() {
    let hint =
        |extra: &str| issuer_hint(&decode(hs256(&claims(extra)).as_bytes()).expect("decodes"));
    assert_eq!(
        hint(r#""iss":"https://idp.example/t1","jti":"a1-b2""#),
        "iss=https://idp.example/t1 jti=a1-b2"
    );
    assert_eq!(hint(""), "");
    assert_eq!(hint(r#""jti":"x""#), "jti=x");
    assert_eq!(hint(r#""iss":"a b\"c\n<script>=""#), "iss=a?b?c??script??");
    let long = hint(&format!(
        r#""iss":"{}","jti":"{}""#,
        "i".repeat(500),
        "j".repeat(500)
    ));
    assert_eq!(
        long,
        format!(
            "iss={}... jti={}...",
            "i".repeat(HINT_ISSUER_CHARS),
            "j".repeat(HINT_JTI_CHARS)
        )
    );
    assert_eq!(hint(r#""iss":7"#), "");
}

