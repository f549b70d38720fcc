//! A token row as this backend keeps it: the verdict inputs copied into Rust values, the
//! identity row built once as a composite datum, the verdict row built on first need, and the
//! last use this backend saw. Built from a row (`scan`) or a shared cache entry (`shared`), then
//! narrowed to what its key type allows now (`within_key_type`).

use std::cell::{Cell, OnceCell};

use pg_token_core::cache::{heap_chunk, Footprint};
use pg_token_core::hash::TokenHash;
use pg_token_core::verdict::{Micros, Stateful, TokenState};
use pgrx::pg_sys;
use pgrx::prelude::*;

use super::{Catalog, RegistryCache};
use crate::datum::{deform_composite, form_composite, form_composite_datum, palloc_copy, DatumBytes};

/// A stored token as this backend holds it: the verdict inputs, and the identity row already
/// built as a composite datum, so that returning it costs one palloc and a memcpy.
#[derive(Debug)]
pub struct Stored {
    pub state: TokenState,
    /// The `token.identity` row as a flat composite datum (header included), built once from
    /// the table row when the token is read.
    pub(super) identity: DatumBytes,
    /// The `token.verdict` row of an accepted token, built on the first check_token.
    pub(super) verdict: OnceCell<DatumBytes>,
    /// The last `last_used_at` this backend read or queued.
    pub last_used_at: Cell<Option<Micros>>,
    /// Where the shared cache keeps (or would keep) this row, for the last uses queued for it
    /// (`shared::touched`); None where the shared cache is not used.
    pub shared_key: Option<(TokenHash, pg_token_core::shared::Scope)>,
}

impl Stored {
    /// The identity row, copied into the current memory context.
    pub fn identity_datum(&self) -> pg_sys::Datum {
        palloc_copy(self.identity.as_bytes())
    }

    /// The verdict row of this accepted token, copied into the current memory context.
    pub fn verdict_datum(&self, cat: &Catalog) -> pg_sys::Datum {
        let bytes = self.verdict.get_or_init(|| {
            // SAFETY: `identity` is a composite datum of the identity type, which `cat` holds
            // the descriptor of (both are dropped together when the type changes).
            let values = unsafe { deform_composite(self.identity.as_bytes(), cat.identity_desc) };
            let head = [(pg_sys::Datum::from(true), false), (pg_sys::Datum::from(0), true)];
            form_composite(cat.verdict_desc, head.into_iter().chain(values))
        });
        palloc_copy(bytes.as_bytes())
    }
}

impl Stored {
    /// A stored token from its state and its identity row.
    pub(super) fn from_parts(state: TokenState, identity: DatumBytes) -> Stored {
        Stored { state, identity, verdict: OnceCell::new(), last_used_at: Cell::new(None), shared_key: None }
    }

    /// This token as its key type allows it now. Issuing and updating keep a token's scopes
    /// within its key type's `allowed_scopes`; a key type redefined narrower afterwards applies
    /// at once: the scopes it no longer lists are dropped from the verdict inputs and the
    /// identity row (the table keeps them, and they come back if the key type allows them again).
    /// Done where a row becomes a stored token; every registry change empties the caches.
    pub(super) fn within_key_type(mut self, cat: &Catalog, reg: &RegistryCache) -> Stored {
        // Rows only (JWTs are narrowed by the verdict rules); the common case allocates nothing.
        let Some(kt) = reg.key_types.get(&self.state.key_type) else { return self };
        if kt.allows_all(&self.state.scopes) {
            return self;
        }
        let allowed = kt.allowed(&self.state.scopes);
        // SAFETY: `identity` is a composite datum of the identity type, whose descriptor `cat`
        // holds; the values point into it and are copied by form_composite before it is replaced.
        let mut cols = unsafe { deform_composite(self.identity.as_bytes(), cat.identity_desc) };
        match (cat.identity_scopes.and_then(|i| cols.get_mut(i)), allowed.clone().into_datum()) {
            (Some(col), Some(datum)) => *col = (datum, false),
            _ => return self, // no scopes column to narrow: leave the row as it is
        }
        self.identity = form_composite(cat.identity_desc, cols);
        self.state.scopes = allowed;
        self
    }

    /// The identity row with this call's figures in the per-call columns, palloc'd.
    pub fn identity_with(&self, cat: &Catalog, per_call: &[Option<pg_sys::Datum>; 4]) -> pg_sys::Datum {
        form_composite_datum(cat.identity_desc, &mut self.identity_columns(cat, per_call))
    }

    /// check_token's row for this accepted token, with this call's figures, palloc'd.
    pub fn verdict_with(&self, cat: &Catalog, per_call: &[Option<pg_sys::Datum>; 4]) -> pg_sys::Datum {
        let head = [(pg_sys::Datum::from(true), false), (pg_sys::Datum::from(0), true)];
        let mut cols: Vec<_> = head.into_iter().chain(self.identity_columns(cat, per_call)).collect();
        form_composite_datum(cat.verdict_desc, &mut cols)
    }

    fn identity_columns(&self, cat: &Catalog, per_call: &[Option<pg_sys::Datum>; 4]) -> Vec<(pg_sys::Datum, bool)> {
        // SAFETY: `identity` is a composite datum of the identity type, whose descriptor `cat`
        // holds; the values point into it and are used before it can be dropped.
        let mut cols = unsafe { deform_composite(self.identity.as_bytes(), cat.identity_desc) };
        if let Some(at) = cat.identity_per_call {
            for (i, v) in at.iter().zip(per_call) {
                if let (Some(c), Some(v)) = (cols.get_mut(*i), v) {
                    *c = (*v, false);
                }
            }
        }
        cols
    }
}

impl Stateful for Stored {
    fn state(&self) -> &TokenState {
        &self.state
    }
}

impl Footprint for Stored {
    /// Every allocation an entry owns, as malloc sizes it, with room reserved for the verdict
    /// row a check_token builds later (the identity row plus two columns).
    fn footprint(&self) -> usize {
        let s = &self.state;
        let text = |x: &String| heap_chunk(x.capacity());
        heap_chunk(16 + std::mem::size_of::<Stored>()) // the Rc allocation
            + text(&s.account)
            + text(&s.key_type)
            + text(&s.environment)
            + heap_chunk(s.scopes.capacity() * std::mem::size_of::<String>())
            + s.scopes.iter().map(text).sum::<usize>()
            + heap_chunk(self.identity.footprint())
            + heap_chunk(self.identity.footprint() + 16)
            + s.networks.as_ref().map_or(0, |n| heap_chunk(n.capacity() * std::mem::size_of::<pg_token_core::network::Network>()))
            + s.rate_limits.as_ref().map_or(0, |r| heap_chunk(r.capacity() * std::mem::size_of::<pg_token_core::ratelimit::RateLimit>()))
    }
}
