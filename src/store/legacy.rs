//! Legacy JWT issuers as this backend holds them: loaded with the registry (and dropped with
//! it, on any change to the issuers, their keys or the revocations), with the JWTs this
//! backend verified, so a JWT presented again costs a hash and a lookup instead of a signature
//! check. The rules are the core's (`legacy`, `verdict`); this file reads their inputs and
//! builds the identity row of an accepted JWT.

use std::collections::HashMap;
use std::rc::Rc;

use pg_token_core::cache::heap_chunk;
use pg_token_core::hash::{token_hash, TokenHash};
use pg_token_core::jwt::{Algorithm, IssuerKeys};
use pg_token_core::legacy::{self, Issuer, Revocations, Verified};
use pg_token_core::verdict::{LegacyStore, TokenState};
use pgrx::prelude::*;

use super::catalog::LegacyCatalog;
use super::{scan, Catalog, Stored};
use crate::datum::form_composite;
use crate::error;

/// JWTs verified by this backend, at most this many (then forgotten all at once).
const MAX_VERIFIED: usize = 4096;

#[derive(Default)]
pub struct Legacy {
    pub issuers: Vec<Issuer>,
    pub revocations: Revocations,
    verified: std::cell::RefCell<HashMap<TokenHash, Rc<Stored>>>,
}

impl Legacy {
    /// Heap bytes of the issuers and revocations (the verified JWTs are bounded apart).
    pub fn footprint(&self) -> usize {
        let text = |x: &String| heap_chunk(x.capacity());
        let issuers: usize = self.issuers.iter().map(|i| 4096 + text(&i.name) + i.message.as_ref().map_or(0, text)).sum();
        let jtis: usize =
            self.revocations.jtis.iter().map(|(i, j)| 64 + text(i) + j.iter().map(|j| 48 + text(j)).sum::<usize>()).sum();
        let accounts: usize = self.revocations.accounts.keys().map(|a| 48 + text(a)).sum();
        issuers + jtis + accounts
    }
}

/// Reads the issuers, their keys and the revocations in the latest committed state. An
/// issuer whose key material no longer parses (it was checked when registered) is left out,
/// with a WARNING: its JWTs are then refused as unknown_issuer.
pub fn load(cat: &Catalog, snap: &scan::LatestSnapshot) -> Legacy {
    let mut out = Legacy::default();
    let Some(lc) = cat.legacy.as_ref() else { return out };
    let mut keys: HashMap<String, String> = HashMap::new();
    let [kn, kk] = lc.key_atts;
    scan::scan_all(lc.keys, snap, |v, n| {
        if let (Some(name), Some(key)) = (scan::text(v, n, kn), scan::text(v, n, kk)) {
            keys.insert(name, key);
        }
    });
    scan::scan_all(lc.issuers, snap, |v, n| {
        if let Some(issuer) = issuer_from_row(lc, &keys, v, n) {
            out.issuers.push(issuer);
        }
    });
    let [ri, rj, ra, rt] = lc.revocation_atts;
    scan::scan_all(lc.revocations, snap, |v, n| {
        match (scan::text(v, n, ri), scan::text(v, n, rj), scan::text(v, n, ra)) {
            (Some(issuer), Some(jti), _) => {
                out.revocations.revoke_jti(issuer, jti);
            }
            (_, _, Some(account)) if !n[rt] => {
                let at = v[rt].value() as i64;
                let e = out.revocations.accounts.entry(account).or_insert(at);
                *e = (*e).max(at);
            }
            _ => {}
        }
    });
    out
}

fn issuer_from_row(lc: &LegacyCatalog, keys: &HashMap<String, String>, v: &[pg_sys::Datum], n: &[bool]) -> Option<Issuer> {
    let [name, algorithms, key_type, environment, cutoff_at, message, issuer, audience, account_claim, scopes_claim] = lc.issuer_atts;
    let t = |i: usize| scan::text(v, n, i);
    let name_s = t(name)?;
    // SAFETY: algorithms is text[] NOT NULL.
    let algs: Vec<String> = unsafe { Vec::<String>::from_datum(v[algorithms], n[algorithms]) }.unwrap_or_default();
    let algs: Vec<Algorithm> = algs.iter().filter_map(|a| Algorithm::from_name(a)).collect();
    let material = keys.get(&name_s)?;
    let parsed = match IssuerKeys::from_material(&algs, material.as_bytes()) {
        Ok(k) => k,
        Err(e) => {
            pgrx::warning!("pg_token: legacy issuer \"{name_s}\" is skipped: its key does not load ({})", e.describe());
            return None;
        }
    };
    Some(Issuer {
        name: name_s,
        keys: parsed,
        issuer: t(issuer),
        audience: t(audience),
        account_claim: t(account_claim).unwrap_or_else(|| "sub".into()),
        scopes_claim: t(scopes_claim).unwrap_or_else(|| "scope".into()),
        key_type: t(key_type)?,
        environment: t(environment)?,
        cutoff_at: if n[cutoff_at] { i64::MIN } else { v[cutoff_at].value() as i64 },
        message: t(message),
    })
}

/// The verdict rules' view of this backend's verified JWTs.
pub struct Store<'a> {
    pub cat: &'a Catalog,
    pub verified: &'a std::cell::RefCell<HashMap<TokenHash, Rc<Stored>>>,
}

impl<'a> Store<'a> {
    pub fn new(cat: &'a Catalog, legacy: &'a Legacy) -> Store<'a> {
        Store { cat, verified: &legacy.verified }
    }
}

impl LegacyStore<Rc<Stored>> for Store<'_> {
    fn cached(&mut self, token: &[u8]) -> Option<Rc<Stored>> {
        let verified = self.verified.borrow();
        if verified.is_empty() {
            return None;
        }
        verified.get(&token_hash(token)).cloned()
    }

    fn accepted(&mut self, token: &[u8], verified: &Verified<'_>, state: TokenState) -> Rc<Stored> {
        let stored = Rc::new(legacy_stored(self.cat, state, verified));
        let mut verified = self.verified.borrow_mut();
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(token_hash(token), Rc::clone(&stored));
        stored
    }
}

/// The identity row of an accepted legacy JWT: its derived id, account, the issuer's key type
/// and environment, its scopes, exp as expires_at, {"legacy_jwt": {issuer, jti}} as metadata,
/// and the deprecation columns.
fn legacy_stored(cat: &Catalog, state: TokenState, verified: &Verified<'_>) -> Stored {
    let null = (pg_sys::Datum::from(0), true);
    let datum = |d: Option<pg_sys::Datum>| d.map_or(null, |d| (d, false));
    let tstz = |t: Option<i64>| t.map(|t| (pg_sys::Datum::from(t), false)).unwrap_or(null);
    let issuer = verified.issuer;
    let metadata = pgrx::JsonB(serde_json::json!({
        "legacy_jwt": { "issuer": issuer.name, "jti": verified.claims.jti }
    }));
    let mut cols = vec![
        datum(pgrx::Uuid::from_bytes(state.id).into_datum()),
        datum(state.account.clone().into_datum()),
        datum(state.key_type.clone().into_datum()),
        datum(state.environment.clone().into_datum()),
        datum(state.scopes.clone().into_datum()),
        null,
        tstz(state.expires_at),
        null,
        datum(metadata.into_datum()),
    ];
    // SAFETY: identity_desc is the live descriptor of token.identity.
    let natts = unsafe { (*cat.identity_desc).natts } as usize;
    cols.resize(natts, null);
    if let Some([deprecation, sunset]) = cat.identity_legacy {
        let cutoff = pg_token_core::clock::iso_utc(issuer.cutoff_at);
        let text = legacy::deprecation(&issuer.name, &cutoff, issuer.message.as_deref());
        cols[deprecation] = datum(text.into_datum());
        cols[sunset] = tstz(Some(issuer.cutoff_at));
    }
    if cols.len() != natts {
        error::not_installed();
    }
    Stored::from_parts(state, form_composite(cat.identity_desc, cols))
}
