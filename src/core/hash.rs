//! Token hashing: SHA-256 of the token's bytes. The hash is what is stored and looked up;
//! the token itself is never kept. Tokens carry about 131 bits from a CSPRNG, so a plain
//! (unsalted, fast) hash is enough: there is nothing to brute-force that is cheaper than
//! guessing the token. Pure: no Postgres, no logging.

use sha2::{Digest, Sha256};

pub const HASH_LEN: usize = 32;

pub type TokenHash = [u8; HASH_LEN];

pub fn token_hash<T: AsRef<[u8]> + ?Sized>(token: &T) -> TokenHash {
    Sha256::digest(token.as_ref()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_sha256_test_vector() {
        // FIPS 180-2 test vector for "abc".
        let h = token_hash("abc");
        assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(h[28..], [0xf2, 0x00, 0x15, 0xad]);
    }

    #[test]
    fn different_tokens_hash_differently() {
        assert_ne!(token_hash("cf-a"), token_hash("cf-b"));
    }
}
