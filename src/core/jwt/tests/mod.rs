//! Published vectors (RFC 7515, 7519) and test-only keys, the helpers every JWT test uses, and
//! the RFC examples.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use p256::ecdsa;
use rsa::{pkcs1v15, BigUint};
use sha2::Sha256;

use super::*;
use crate::format;
use proptest::prelude::*;

// ---- Published test vectors and test-only keys. None of these keys may ever be used
// ---- outside these tests: their private halves are printed in RFCs or here.

/// RFC 7515 Appendix A.1 (and RFC 7519 section 3.1, the same JWT): HS256.
const A1_JWT: &str = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.\
    eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.\
    dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const A1_K: &str =
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow";
/// The examples' claims: {"iss":"joe", "exp":1300819380, "http://example.com/is_root":true}.
const A_PAYLOAD: &str = "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
const A_EXP: i64 = 1_300_819_380;

/// RFC 7515 Appendix A.2: RS256, header {"alg":"RS256"}.
const A2_SIG: &str = "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw";
const A2_N: &str = "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ";
const A2_D: &str = "Eq5xpGnNCivDflJsRQBXHx1hdR1k6Ulwe2JZD50LpXyWPEAeP88vLNO97IjlA7_GQ5sLKMgvfTeXZx9SE-7YwVol2NXOoAJe46sui395IW_GO-pWJ1O0BkTGoVEn2bKVRUCgu-GjBVaYLU6f3l9kJfFNS3E0QbVdxzubSu3Mkqzjkn439X0M_V51gfpRLI9JYanrC4D4qAdGcopV_0ZHHzQlBjudU2QvXt4ehNYTCBr6XCLQUShb1juUO1ZdiYoFaFQT5Tw8bGUl_x_jTj3ccPDVZFD9pIuhLhBOneufuBiB4cS98l2SR_RQyGWSeWjnczT0QU91p1DhOVRuOopznQ";
const A2_P: &str = "4BzEEOtIpmVdVEZNCqS7baC4crd0pqnRH_5IB3jw3bcxGn6QLvnEtfdUdiYrqBdss1l58BQ3KhooKeQTa9AB0Hw_Py5PJdTJNPY8cQn7ouZ2KKDcmnPGBY5t7yLc1QlQ5xHdwW1VhvKn-nXqhJTBgIPgtldC-KDV5z-y2XDwGUc";
const A2_Q: &str = "uQPEfgmVtjL0Uyyx88GZFF1fOunH3-7cepKmtH4pxhtCoHqpWmT8YAmZxaewHgHAjLYsp1ZSe7zFYHj7C6ul7TjeLQeZD_YwD66t62wDmpe_HlB-TnBA-njbglfIsRLtXlnDzQkv5dTltRJ11BKBBypeeF6689rjcJIDEz9RWdc";
/// The A.2 public key as openssl writes it (SPKI and PKCS#1), made from n and e above.
const A2_SPKI_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAofgWCuLjybRlzo0tZWJj
NiuSfb4p4fAkd/wWJcyQoTbji9k0l8W26mPddxHmfHQp+Vaw+4qPCJrcS2mJPMEz
P1Pt0Bm4d4QlL+yRT+SFd2lZS+pCgNMsD1W/YpRPEwOWvG6b32690r2jZ47soMZo
9wGzjb/7OMg0LOL+bSf63kpaSHSXndS5z5rexMdbBYUsLA9e+KXBdQOS+UTo7WTB
EMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6/I5IhlJH7aGhyxX
FvUK+DWNmoudF8NAco9/h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXp
oQIDAQAB
-----END PUBLIC KEY-----
";
const A2_PKCS1_PEM: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd/wWJcyQoTbji9k0l8W2
6mPddxHmfHQp+Vaw+4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL+yRT+SFd2lZS+pCgNMs
D1W/YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb/7OMg0LOL+bSf63kpaSHSXndS5
z5rexMdbBYUsLA9e+KXBdQOS+UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxv
b3qCo5ZwKh9kG4LT6/I5IhlJH7aGhyxXFvUK+DWNmoudF8NAco9/h9iaGNj8q2et
hFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQIDAQAB
-----END RSA PUBLIC KEY-----
";

/// RFC 7515 Appendix A.3: ES256, header {"alg":"ES256"}.
const A3_SIG: &str =
    "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
const A3_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
const A3_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
const A3_D: &str = "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI";
const A3_SPKI_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEf83OJ3D2xF1Bg8vub9tLe1gHMzV7
6e8Tus9uPHvRVEXH8UTNG72bfocs3+257rn0s2ldbqkLJK2KRiMohYjlrQ==
-----END PUBLIC KEY-----
";

/// Test-only public keys from openssl, for the refusals: another 2048-bit RSA key, a
/// 1024-bit RSA key, and a P-384 key.
const OTHER_RSA_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAjiNDpo0ETlNBZeZZmwQ5
9N2+ZpZD51u4kjz0VqFV6a1P/dnm/vs0Bqz+gc2UuCC7XUyKNT/HxOLPr2ISvQfd
kSIVwB0Ua1uKCtqg0qiFH9ET3bQafAfbcTmh6bjzBsWzFgvWy/0PlIDFuMzizH8Y
7Gbt7bAZB8ZhS2dZctD4K0tYgSdGPOsgjIn2pz81hfrbm5VBPD8QSc/YS0bQ8niM
fAkSi/H7dArQFcrff9yOsrUxvE9kJTNz2wk2gYcidSVDnch0b8dF3ek9F/OvbUYt
fR6Htgow/JV8a0IfVzRUMzs8cz6VhNg3s5/3uWN+rBYkV9SuxF4tXoVb69O+dxdq
6QIDAQAB
-----END PUBLIC KEY-----
";
const RSA_1024_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC0yEGe+ZO+pK9HxSV+7mP8AH4U
wO/9f7dS/znemPuJ8/eLb7mdZ5BmDRPeugsSsMrF4/Q1j90LT1gsKclJp7zJSDqi
OJn0LDMmGUqZscUqe6g3gXGNtl8zaqexyXslGzOD6fLbcmeIezYCcrIZ2wzZnzyK
GQWmiuwY7SUHs9VZSwIDAQAB
-----END PUBLIC KEY-----
";
const P384_PEM: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEToJV+ELz10XkefWELaeYJNqt96dQsWQP
OARWqr+TD2ijBEKAb5CekuVbizEqK2hAMAJR25MCd+WknOmbXSYSThiEPholjNdR
7PGTLFTrH56kW5uu4Pym/DhmXfpTlj+9
-----END PUBLIC KEY-----
";

/// A time before the RFC examples expire.
const BEFORE_A: i64 = A_EXP - 1;
/// The clock for freshly made tokens.
const NOW: i64 = 1_800_000_000;
const SECRET: &[u8] = b"test-only HS256 secret, 32+ bytes long!";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).expect("test vector is base64url")
}

fn a1_secret() -> Vec<u8> {
    unb64(A1_K)
}

fn rfc_rsa_jwk() -> String {
    format!(r#"{{"kty":"RSA","n":"{A2_N}","e":"AQAB"}}"#)
}

fn rfc_ec_jwk() -> String {
    format!(r#"{{"kty":"EC","crv":"P-256","x":"{A3_X}","y":"{A3_Y}"}}"#)
}

fn rfc_rsa_private() -> rsa::RsaPrivateKey {
    let int = |s: &str| BigUint::from_bytes_be(&unb64(s));
    rsa::RsaPrivateKey::from_components(
        int(A2_N),
        int("AQAB"),
        int(A2_D),
        vec![int(A2_P), int(A2_Q)],
    )
    .expect("the RFC 7515 A.2 key is consistent")
}

fn rfc_ec_private() -> ecdsa::SigningKey {
    ecdsa::SigningKey::from_slice(&unb64(A3_D)).expect("the RFC 7515 A.3 key is valid")
}

fn unsigned(header: &str, claims: &str) -> String {
    format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()))
}

fn hs256_with(secret: &[u8], header: &str, claims: &str) -> String {
    let input = unsigned(header, claims);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any length");
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

fn hs256(claims: &str) -> String {
    hs256_with(SECRET, r#"{"alg":"HS256","typ":"JWT"}"#, claims)
}

fn rs256(header: &str, claims: &str) -> String {
    use rsa::signature::{SignatureEncoding, Signer};
    let input = unsigned(header, claims);
    let key = pkcs1v15::SigningKey::<Sha256>::new(rfc_rsa_private());
    format!("{input}.{}", b64(&key.sign(input.as_bytes()).to_vec()))
}

fn es256(header: &str, claims: &str) -> String {
    use p256::ecdsa::signature::Signer;
    let input = unsigned(header, claims);
    let sig: ecdsa::Signature = rfc_ec_private().sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

fn hs_issuer() -> IssuerKeys {
    IssuerKeys::from_material(&[Algorithm::Hs256], SECRET).expect("secret")
}

fn rs_issuer() -> IssuerKeys {
    IssuerKeys::from_material(&[Algorithm::Rs256], A2_SPKI_PEM.as_bytes()).expect("rsa pem")
}

fn es_issuer() -> IssuerKeys {
    IssuerKeys::from_material(&[Algorithm::Es256], A3_SPKI_PEM.as_bytes()).expect("ec pem")
}

const EXPECT: Expectations<'static> = Expectations {
    issuer: None,
    audience: None,
    account_claim: "sub",
    scopes_claim: "scope",
};

/// Claims that pass every rule at `NOW`, with `extra` members added.
fn claims(extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { "," };
    format!(r#"{{"sub":"acme","exp":{}{sep}{extra}}}"#, NOW + 60)
}

fn check(
    token: &str,
    keys: &IssuerKeys,
    now: i64,
    expect: &Expectations<'_>,
) -> Result<Claims, JwtError> {
    verify(&decode(token.as_bytes())?, keys, now, 0, expect)
}

fn refusal(token: &str) -> Option<JwtError> {
    check(token, &hs_issuer(), NOW, &EXPECT).err()
}

fn flip_last_char(token: &str) -> String {
    let mut t = token.to_owned();
    let last = t.pop().expect("non-empty");
    // Both replacements keep the last base64url character canonical for a 32-byte MAC.
    t.push(if last == 'A' { 'E' } else { 'A' });
    t
}

// ---- The RFC examples.

#[test]
fn rfc7515_a1_and_rfc7519_3_1_hs256_example_verifies() {
    let keys =
        IssuerKeys::from_material(&[Algorithm::Hs256], &a1_secret()).expect("64-byte secret");
    let as_joe = Expectations {
        issuer: Some("joe"),
        audience: None,
        account_claim: "iss",
        scopes_claim: "scope",
    };
    let got = check(A1_JWT, &keys, BEFORE_A, &as_joe).expect("the RFC example verifies");
    assert_eq!(got.account, "joe");
    assert_eq!(got.exp, A_EXP);
    assert!(got.scopes.is_empty() && got.jti.is_none() && got.kid.is_none() && got.iat.is_none());
    assert_eq!(got.issuer_claim.as_deref(), Some("joe"));
    // At exp it has expired (RFC 7519 4.1.4: "on or after"); leeway covers skew.
    assert_eq!(check(A1_JWT, &keys, A_EXP, &as_joe), Err(JwtError::Expired));
    let d = decode(A1_JWT.as_bytes()).expect("decodes");
    assert!(verify(&d, &keys, A_EXP + 5, 10, &as_joe).is_ok());
    assert_eq!(
        verify(&d, &keys, A_EXP + 10, 10, &as_joe),
        Err(JwtError::Expired)
    );
}

#[test]
fn rfc7515_a2_rs256_example_verifies_with_every_key_form() {
    let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{A_PAYLOAD}.{A2_SIG}");
    let as_joe = Expectations {
        account_claim: "iss",
        ..EXPECT
    };
    let jwks = format!(
        r#"{{"keys":[{{"kty":"RSA","kid":"2010-12-29","use":"sig","alg":"RS256","n":"{A2_N}","e":"AQAB"}}]}}"#
    );
    for material in [
        rfc_rsa_jwk(),
        A2_SPKI_PEM.to_owned(),
        A2_PKCS1_PEM.to_owned(),
        jwks,
    ] {
        let keys = IssuerKeys::from_material(&[Algorithm::Rs256], material.as_bytes())
            .expect("key parses");
        let got = check(&jwt, &keys, BEFORE_A, &as_joe).expect("the RFC example verifies");
        assert_eq!((got.account.as_str(), got.exp), ("joe", A_EXP));
    }
}

#[test]
fn the_rfc_test_rsa_key_reproduces_the_rfc_signature() {
    // PKCS#1 v1.5 is deterministic: signing the A.2 input with the A.2 private key gives
    // the A.2 signature, which proves the test key was transcribed right.
    let made = rs256(r#"{"alg":"RS256"}"#, "");
    let input = format!("eyJhbGciOiJSUzI1NiJ9.{A_PAYLOAD}");
    use rsa::signature::{SignatureEncoding, Signer};
    let sig = pkcs1v15::SigningKey::<Sha256>::new(rfc_rsa_private()).sign(input.as_bytes());
    assert_eq!(b64(&sig.to_vec()), A2_SIG);
    assert!(made.starts_with("eyJhbGciOiJSUzI1NiJ9."));
}

#[test]
fn rfc7515_a3_es256_example_verifies() {
    let jwt = format!("eyJhbGciOiJFUzI1NiJ9.{A_PAYLOAD}.{A3_SIG}");
    let as_joe = Expectations {
        account_claim: "iss",
        ..EXPECT
    };
    for material in [rfc_ec_jwk(), A3_SPKI_PEM.to_owned()] {
        let keys = IssuerKeys::from_material(&[Algorithm::Es256], material.as_bytes())
            .expect("key parses");
        let got = check(&jwt, &keys, BEFORE_A, &as_joe).expect("the RFC example verifies");
        assert_eq!(got.account, "joe");
    }
    // The test private key matches the RFC's public key.
    let fresh = es256(r#"{"alg":"ES256","kid":"k1"}"#, &claims(""));
    let got = check(&fresh, &es_issuer(), NOW, &EXPECT).expect("fresh ES256 token");
    assert_eq!(got.kid.as_deref(), Some("k1"));
}

#[test]
fn fresh_tokens_of_each_algorithm_verify_and_yield_their_claims() {
    let c = claims(
        r#""scope":"read write read","jti":"j-1","iat":1799999990,"iss":"https://idp.example""#,
    );
    let expect = Expectations {
        issuer: Some("https://idp.example"),
        ..EXPECT
    };
    let hs = check(&hs256(&c), &hs_issuer(), NOW, &expect).expect("HS256");
    let rs = check(&rs256(r#"{"alg":"RS256"}"#, &c), &rs_issuer(), NOW, &expect).expect("RS256");
    let es = check(&es256(r#"{"alg":"ES256"}"#, &c), &es_issuer(), NOW, &expect).expect("ES256");
    assert_eq!(hs, rs);
    assert_eq!(rs, es);
    assert_eq!(
        hs,
        Claims {
            account: "acme".into(),
            scopes: vec!["read".into(), "write".into()],
            jti: Some("j-1".into()),
            exp: NOW + 60,
            iat: Some(1_799_999_990),
            issuer_claim: Some("https://idp.example".into()),
            kid: None,
        }
    );
}

mod rules;
mod routing;
mod shape;
