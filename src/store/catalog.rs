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
}

/// Where pg_token's objects are in this database.
pub struct Catalog {
    /// token.cache_signal's relation: what the triggers invalidate.
    pub signal: pg_sys::Oid,
    pub tokens: pg_sys::Oid,
    pub hash_index: pg_sys::Oid,
    /// The btree on token.tokens (account).
    pub account_index: pg_sys::Oid,
    pub key_types: pg_sys::Oid,
    pub prefixes: pg_sys::Oid,
    pub identity_desc: pg_sys::TupleDesc,
    pub verdict_desc: pg_sys::TupleDesc,
    pub atts: TokenAtts,
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
    // SAFETY: a syscache lookup by name.
    let n = unsafe { pg_sys::get_attnum(rel, name.as_ptr()) };
    match usize::try_from(n) {
        Ok(n) if n > 0 => n - 1,
        _ => error::not_installed(),
    }
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
        };
        let key_types = relid(ns, c"key_types");
        let prefixes = relid(ns, c"prefixes");
        let signal = relid(ns, c"cache_signal");
        let (identity_rel, identity_desc) = row_desc(ns, c"identity");
        let (verdict_rel, verdict_desc) = row_desc(ns, c"verdict");
        Catalog {
            data_relations: [signal.to_u32(), identity_rel, verdict_rel],
            signal,
            tokens,
            hash_index: relid(ns, c"tokens_token_hash_excl"),
            account_index: relid(ns, c"tokens_account_idx"),
            key_types,
            prefixes,
            identity_desc,
            verdict_desc,
            atts,
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
        // SAFETY: both descriptors were copied into TopMemoryContext by `row_desc`.
        unsafe {
            pg_sys::FreeTupleDesc(self.identity_desc);
            pg_sys::FreeTupleDesc(self.verdict_desc);
        }
    }
}
