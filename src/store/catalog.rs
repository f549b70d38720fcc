//! Where pg_token's objects are in this database: relation OIDs, the token table's attribute
//! numbers (looked up by name, so column order does not matter) and the row descriptors of the
//! identity and verdict types. Looked up once per backend and again after an invalidation of
//! one of these relations (`freshness`).

use pgrx::pg_sys;

use crate::error;

/// Attribute numbers in token.tokens, looked up by name (robust to column order).
pub struct TokenAtts {
    pub id: usize,
    pub token_hash: usize,
    pub prefix: usize,
    pub account: usize,
    pub key_type: usize,
    pub environment: usize,
    pub name: usize,
    pub scopes: usize,
    pub metadata: usize,
    pub expires_at: usize,
    pub revoke_after: usize,
    pub revoked_at: usize,
    pub last_used_at: usize,
    /// Columns 0.2.0 added: None while a database still has 0.1.0's schema (between a package
    /// upgrade and ALTER EXTENSION UPDATE), where they read as NULL.
    pub disabled_at: Option<usize>,
    pub parent_id: Option<usize>,
    pub allowed_networks: Option<usize>,
    pub rate_limits: Option<usize>,
    pub uses_remaining: Option<usize>,
    pub uses_version: Option<usize>,
    pub refill_uses: Option<usize>,
    pub family_id: Option<usize>,
    pub family_revoked_at: Option<usize>,
}

/// Attribute numbers in token.key_types (the 0.2.0 columns optional, as above).
pub struct KeyTypeAtts {
    pub name: usize,
    pub can_validate: usize,
    pub allowed_scopes: usize,
    pub allowed_networks: Option<usize>,
    pub rate_limits: Option<usize>,
    pub conceal_cross_account: Option<usize>,
    pub reuse_detection: Option<usize>,
}

/// The legacy JWT tables (0.2.0) and the attribute numbers the registry reads.
pub struct LegacyCatalog {
    pub issuers: pg_sys::Oid,
    pub keys: pg_sys::Oid,
    pub revocations: pg_sys::Oid,
    /// legacy_issuers: name, algorithms, key_type, environment, cutoff_at, migration_message,
    /// issuer, audience, account_claim, scopes_claim.
    pub issuer_atts: [usize; 10],
    /// legacy_issuer_keys: name, key.
    pub key_atts: [usize; 2],
    /// legacy_revocations: issuer, jti, account, revoked_at.
    pub revocation_atts: [usize; 4],
}

impl LegacyCatalog {
    /// None while the database has 0.1.0's schema.
    fn load(ns: pg_sys::Oid) -> Option<LegacyCatalog> {
        // SAFETY: syscache lookups by name.
        let rel = |n: &std::ffi::CStr| Some(unsafe { pg_sys::get_relname_relid(n.as_ptr(), ns) }).filter(|o| *o != pg_sys::InvalidOid);
        let (issuers, keys, revocations) = (rel(c"legacy_issuers")?, rel(c"legacy_issuer_keys")?, rel(c"legacy_revocations")?);
        let at = |r: pg_sys::Oid, n: &std::ffi::CStr| attindex_if(r, n);
        Some(LegacyCatalog {
            issuers,
            keys,
            revocations,
            issuer_atts: [
                at(issuers, c"name")?,
                at(issuers, c"algorithms")?,
                at(issuers, c"key_type")?,
                at(issuers, c"environment")?,
                at(issuers, c"cutoff_at")?,
                at(issuers, c"migration_message")?,
                at(issuers, c"issuer")?,
                at(issuers, c"audience")?,
                at(issuers, c"account_claim")?,
                at(issuers, c"scopes_claim")?,
            ],
            key_atts: [at(keys, c"name")?, at(keys, c"key")?],
            revocation_atts: [at(revocations, c"issuer")?, at(revocations, c"jti")?, at(revocations, c"account")?, at(revocations, c"revoked_at")?],
        })
    }
}

/// Where pg_token's objects are in this database.
pub struct Catalog {
    /// token.cache_signal's relation: what the triggers invalidate.
    pub signal: pg_sys::Oid,
    pub tokens: pg_sys::Oid,
    pub hash_index: pg_sys::Oid,
    /// The primary key on token.tokens (id): how a derived token's parents are found.
    pub id_index: pg_sys::Oid,
    /// The btree on token.tokens (account).
    pub account_index: pg_sys::Oid,
    pub key_types: pg_sys::Oid,
    pub prefixes: pg_sys::Oid,
    pub identity_desc: pg_sys::TupleDesc,
    pub verdict_desc: pg_sys::TupleDesc,
    /// token.rate_limit's type and row descriptor (InvalidOid and NULL while the database has
    /// 0.1.0's schema, which has no rate limits).
    pub rate_limit_type: pg_sys::Oid,
    /// Where the per-call columns (uses_remaining, rate_limit, rate_remaining, rate_reset_at)
    /// are in the identity and verdict rows (None on 0.1.0's row types, which have none).
    pub identity_per_call: Option<[usize; 4]>,
    pub verdict_per_call: Option<[usize; 4]>,
    /// Where scopes is in the identity row (its fifth column since 0.1.0).
    pub identity_scopes: Option<usize>,
    /// Where deprecation and sunset_at are in the identity row (None on 0.1.0's); check_token's
    /// verdict row is the identity's columns behind (valid, reason), so it has them too.
    pub identity_legacy: Option<[usize; 2]>,
    pub legacy: Option<LegacyCatalog>,
    pub rate_limit_desc: pg_sys::TupleDesc,
    /// token.tokens' own row descriptor (with its columns' missing values), for the rows the
    /// shared cache keeps.
    pub tokens_desc: pg_sys::TupleDesc,
    /// Where this database's token.tokens rows belong in the shared cache.
    pub shared_scope: pg_token_core::shared::Scope,
    pub atts: TokenAtts,
    pub key_type_atts: KeyTypeAtts,
    /// The relations whose invalidation empties the cache: cache_signal and the relations
    /// behind the identity and verdict types.
    pub data_relations: [u32; 3],
}

/// The `token` schema's OID, or 55000 when the extension is not installed here.
pub fn token_namespace() -> pg_sys::Oid {
    // SAFETY: a syscache lookup by name.
    let ns = unsafe { pg_sys::get_namespace_oid(c"token".as_ptr(), true) };
    if ns == pg_sys::InvalidOid {
        error::not_installed();
    }
    ns
}

/// A relation in `ns` by name, or 55000.
pub fn relid(ns: pg_sys::Oid, name: &std::ffi::CStr) -> pg_sys::Oid {
    // SAFETY: a syscache lookup by name.
    let oid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), ns) };
    if oid == pg_sys::InvalidOid {
        error::not_installed();
    }
    oid
}

/// A column's 0-based index in `rel`, or 55000.
fn attindex(rel: pg_sys::Oid, name: &std::ffi::CStr) -> usize {
    attindex_if(rel, name).unwrap_or_else(|| error::not_installed())
}

/// A column's 0-based index in `rel`, or None when it has no such column.
fn attindex_if(rel: pg_sys::Oid, name: &std::ffi::CStr) -> Option<usize> {
    // SAFETY: a syscache lookup by name.
    let n = unsafe { pg_sys::get_attnum(rel, name.as_ptr()) };
    usize::try_from(n).ok().filter(|n| *n > 0).map(|n| n - 1)
}

fn row_desc(ns: pg_sys::Oid, name: &std::ffi::CStr) -> (u32, pg_sys::TupleDesc) {
    let rel = relid(ns, name);
    // SAFETY: a composite type's relation has a row type; the copy lives in
    // TopMemoryContext for as long as this backend keeps the catalog (freed in Drop).
    unsafe {
        let typ = pg_sys::get_rel_type_id(rel);
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let desc = pg_sys::lookup_rowtype_tupdesc_copy(typ, -1);
        pg_sys::MemoryContextSwitchTo(old);
        (rel.to_u32(), desc)
    }
}

/// Where this database's token.tokens rows belong in the shared cache: the database, the
/// table's OID and the transaction that last wrote its pg_class row (an ALTER TABLE or a
/// re-created table is another scope).
fn shared_scope(tokens: pg_sys::Oid) -> pg_token_core::shared::Scope {
    // SAFETY: a syscache lookup of an existing relation's pg_class row, released at once;
    // its raw xmin is read from the header.
    let xmin = unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as _, pg_sys::Datum::from(tokens));
        if tup.is_null() {
            0
        } else {
            let x = (*(*tup).t_data).t_choice.t_heap.t_xmin.into_inner();
            pg_sys::ReleaseSysCache(tup);
            x
        }
    };
    // SAFETY: reads this backend's database OID.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    [u64::from(db), (u64::from(tokens.to_u32()) << 32) | u64::from(xmin)]
}

/// The indexes of the per-call columns in a row type, when it has all four.
fn per_call_columns(desc: pg_sys::TupleDesc) -> Option<[usize; 4]> {
    columns(desc, ["uses_remaining", "rate_limit", "rate_remaining", "rate_reset_at"])
}

/// The indexes of named columns in a row type, when it has them all.
fn columns<const N: usize>(desc: pg_sys::TupleDesc, names: [&str; N]) -> Option<[usize; N]> {
    // SAFETY: `desc` is a live descriptor; its attributes are read by index below natts.
    let attnames: Vec<String> =
        unsafe { pgrx::PgTupleDesc::from_pg_unchecked(desc) }.iter().map(|a| a.name().to_owned()).collect();
    let mut out = [0usize; N];
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = attnames.iter().position(|a| a == name)?;
    }
    Some(out)
}

impl Catalog {
    pub fn load() -> Catalog {
        let ns = token_namespace();
        let tokens = relid(ns, c"tokens");
        let att = |n: &std::ffi::CStr| attindex(tokens, n);
        let atts = TokenAtts {
            id: att(c"id"),
            token_hash: att(c"token_hash"),
            prefix: att(c"prefix"),
            account: att(c"account"),
            key_type: att(c"key_type"),
            environment: att(c"environment"),
            name: att(c"name"),
            scopes: att(c"scopes"),
            metadata: att(c"metadata"),
            expires_at: att(c"expires_at"),
            revoke_after: att(c"revoke_after"),
            revoked_at: att(c"revoked_at"),
            last_used_at: att(c"last_used_at"),
            disabled_at: attindex_if(tokens, c"disabled_at"),
            parent_id: attindex_if(tokens, c"parent_id"),
            allowed_networks: attindex_if(tokens, c"allowed_networks"),
            rate_limits: attindex_if(tokens, c"rate_limits"),
            uses_remaining: attindex_if(tokens, c"uses_remaining"),
            uses_version: attindex_if(tokens, c"uses_version"),
            refill_uses: attindex_if(tokens, c"refill_uses"),
            family_id: attindex_if(tokens, c"family_id"),
            family_revoked_at: attindex_if(tokens, c"family_revoked_at"),
        };
        let key_types = relid(ns, c"key_types");
        let key_type_atts = KeyTypeAtts {
            name: attindex(key_types, c"name"),
            can_validate: attindex(key_types, c"can_validate"),
            allowed_scopes: attindex(key_types, c"allowed_scopes"),
            allowed_networks: attindex_if(key_types, c"allowed_networks"),
            rate_limits: attindex_if(key_types, c"rate_limits"),
            conceal_cross_account: attindex_if(key_types, c"conceal_cross_account"),
            reuse_detection: attindex_if(key_types, c"reuse_detection"),
        };
        let prefixes = relid(ns, c"prefixes");
        let signal = relid(ns, c"cache_signal");
        let (identity_rel, identity_desc) = row_desc(ns, c"identity");
        let (verdict_rel, verdict_desc) = row_desc(ns, c"verdict");
        // SAFETY: a syscache lookup by name.
        let rate_limit_rel = unsafe { pg_sys::get_relname_relid(c"rate_limit".as_ptr(), ns) };
        let (rate_limit_type, rate_limit_desc) = if rate_limit_rel == pg_sys::InvalidOid {
            (pg_sys::InvalidOid, std::ptr::null_mut())
        } else {
            // SAFETY: as in row_desc.
            (unsafe { pg_sys::get_rel_type_id(rate_limit_rel) }, row_desc(ns, c"rate_limit").1)
        };
        Catalog {
            data_relations: [signal.to_u32(), identity_rel, verdict_rel],
            signal,
            tokens,
            hash_index: relid(ns, c"tokens_token_hash_excl"),
            id_index: relid(ns, c"tokens_pkey"),
            account_index: relid(ns, c"tokens_account_idx"),
            key_types,
            prefixes,
            identity_desc,
            verdict_desc,
            rate_limit_type,
            rate_limit_desc,
            identity_per_call: per_call_columns(identity_desc),
            identity_scopes: columns(identity_desc, ["scopes"]).map(|[i]| i),
            verdict_per_call: per_call_columns(verdict_desc),
            identity_legacy: columns(identity_desc, ["deprecation", "sunset_at"]),
            legacy: LegacyCatalog::load(ns),
            tokens_desc: row_desc(ns, c"tokens").1,
            shared_scope: shared_scope(tokens),
            atts,
            key_type_atts,
        }
    }

    /// The relations this catalog found: a different set means the extension was dropped and
    /// created again, and nothing cached from the old tables may be used.
    pub fn relations(&self) -> [pg_sys::Oid; 5] {
        [self.signal, self.tokens, self.hash_index, self.key_types, self.prefixes]
    }

    /// The tables whose own invalidation makes us look the catalog up again.
    pub fn catalog_relations(&self) -> [u32; 3] {
        [self.tokens.to_u32(), self.key_types.to_u32(), self.prefixes.to_u32()]
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        // SAFETY: the descriptors were copied into TopMemoryContext by `row_desc`.
        unsafe {
            pg_sys::FreeTupleDesc(self.identity_desc);
            pg_sys::FreeTupleDesc(self.verdict_desc);
            pg_sys::FreeTupleDesc(self.tokens_desc);
            if !self.rate_limit_desc.is_null() {
                pg_sys::FreeTupleDesc(self.rate_limit_desc);
            }
        }
    }
}
