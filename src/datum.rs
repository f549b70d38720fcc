//! Composite rows kept as bytes: how a cached identity row is built once and handed out on every
//! hit with one palloc and a memcpy.
//!
//! pgrx builds rows through `PgHeapTuple` and converts values through `IntoDatum`, and the rest
//! of the extension uses those. The validation hot path does not: a cache hit must return the
//! identity row without building a tuple or making a guarded call per column, so the row is
//! formed once (`form_composite`), its flat bytes kept in the cache entry (`DatumBytes`), and
//! copied out per call (`palloc_copy`). And arguments kept as the datum Postgres made
//! (`raw_argument!`). Nothing else belongs here.

use pgrx::pg_sys;

use crate::error::{Error, Kind};

/// A datum's bytes in 8-byte-aligned storage: Postgres reads the columns of a tuple at
/// aligned offsets from its start.
#[derive(Debug)]
pub struct DatumBytes {
    words: Box<[u64]>,
    len: usize,
}

impl DatumBytes {
    /// Keeps a copy of a whole datum's bytes.
    pub fn from_bytes(bytes: &[u8]) -> DatumBytes {
        DatumBytes::new(bytes)
    }

    fn new(bytes: &[u8]) -> DatumBytes {
        let mut words = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
        // SAFETY: `words` has room for at least `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        DatumBytes { words, len: bytes.len() }
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of `words` were written in `new`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    /// Heap bytes held (before malloc's own rounding).
    pub fn footprint(&self) -> usize {
        self.words.len() * 8
    }
}

/// Builds a row of `desc` as a flat composite datum (external TOAST values inlined, as a
/// composite datum requires) and keeps its bytes.
pub fn form_composite(desc: pg_sys::TupleDesc, columns: impl IntoIterator<Item = (pg_sys::Datum, bool)>) -> DatumBytes {
    let (mut values, mut nulls): (Vec<pg_sys::Datum>, Vec<bool>) = columns.into_iter().unzip();
    // SAFETY: `desc` is a live descriptor; callers pass one (value, isnull) per column of it,
    // of the column's type (checked for the count below). heap_copy_tuple_as_datum returns a
    // palloc'd varlena whose length is its varlena header; both pallocs are freed once copied.
    unsafe {
        if values.len() != (*desc).natts as usize {
            Error::new(Kind::Internal, "pg_token: a row type has changed under this session")
                .hint("Reconnect; if this persists, run ALTER EXTENSION pg_token UPDATE.")
                .raise();
        }
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let datum = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        let bytes = DatumBytes::new(std::slice::from_raw_parts(ptr.cast::<u8>(), pgrx::varlena::varsize_4b(ptr)));
        pg_sys::pfree(ptr.cast());
        pg_sys::heap_freetuple(tuple);
        bytes
    }
}

/// Builds a row of `desc` as a composite datum palloc'd in the current memory context: for a
/// row made once per call (no copy kept).
pub fn form_composite_datum(desc: pg_sys::TupleDesc, columns: &mut [(pg_sys::Datum, bool)]) -> pg_sys::Datum {
    let mut values: Vec<pg_sys::Datum> = columns.iter().map(|c| c.0).collect();
    let mut nulls: Vec<bool> = columns.iter().map(|c| c.1).collect();
    // SAFETY: as in form_composite; the tuple is freed once copied into the datum.
    unsafe {
        if values.len() != (*desc).natts as usize {
            Error::new(Kind::Internal, "pg_token: a row type has changed under this session")
                .hint("Reconnect; if this persists, run ALTER EXTENSION pg_token UPDATE.")
                .raise();
        }
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let datum = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        pg_sys::heap_freetuple(tuple);
        datum
    }
}

/// The (value, isnull) pairs of a composite datum built by `form_composite` for `desc`. The
/// values point into `bytes`.
///
/// # Safety
/// `bytes` is a whole composite datum of `desc`'s row type.
pub unsafe fn deform_composite(bytes: &[u8], desc: pg_sys::TupleDesc) -> Vec<(pg_sys::Datum, bool)> {
    // SAFETY: per the contract; heap_deform_tuple only reads `t_len` bytes from `t_data`.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
        tuple.t_len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        tuple.t_data = bytes.as_ptr().cast_mut().cast();
        pg_sys::heap_deform_tuple(&mut tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        values.into_iter().zip(nulls).collect()
    }
}

/// A palloc'd copy of a datum kept as bytes.
pub fn palloc_copy(bytes: &[u8]) -> pg_sys::Datum {
    // SAFETY: palloc returns at least `len` writable bytes (or raises); the bytes are a whole
    // varlena datum, so the copy is one too.
    unsafe {
        let p = pg_sys::palloc(bytes.len()).cast::<u8>();
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        pg_sys::Datum::from(p)
    }
}

/// Declares an argument type that keeps the datum Postgres made and passes it through to SQL
/// untouched, declared in SQL as `$sql`. `$oid` is what it says it is when handed to SPI
/// without an explicit type (InvalidOid: the caller must give one, see `with_type`).
macro_rules! raw_argument {
    ($(#[$doc:meta])* $name:ident, $sql:literal, $oid:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        pub struct $name(pg_sys::Datum);

        #[allow(dead_code)]
        impl $name {
            /// The datum as an SPI argument of type `oid`.
            pub fn with_type(self, oid: pg_sys::Oid) -> pgrx::datum::DatumWithOid<'static> {
                // SAFETY: the datum is an argument of the SQL type `oid` names, valid for the call.
                unsafe { pgrx::datum::DatumWithOid::new(self, oid) }
            }
        }

        impl pgrx::FromDatum for $name {
            unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
                (!is_null).then_some($name(datum))
            }
        }

        impl pgrx::IntoDatum for $name {
            fn into_datum(self) -> Option<pg_sys::Datum> {
                Some(self.0)
            }

            fn type_oid() -> pg_sys::Oid {
                $oid
            }
        }

        // SAFETY: an argument of this SQL type is a datum valid for the whole call;
        // unbox_arg_unchecked is only called for non-NULL arguments, kept as they are.
        unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for $name {
            unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
                // SAFETY: per the trait's contract, the argument is a non-NULL value of the type.
                unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or($name(pg_sys::Datum::from(0)))
            }
        }

        // SAFETY: the SQL type is `$sql`, which is what the datum is.
        unsafe impl pgrx::pgrx_sql_entity_graph::metadata::SqlTranslatable for $name {
            const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!($name);
            const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
                pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
            const ARGUMENT_SQL: Result<
                pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef,
                pgrx::pgrx_sql_entity_graph::metadata::ArgumentError,
            > = Ok(pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal($sql));
            const RETURN_SQL: Result<
                pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef,
                pgrx::pgrx_sql_entity_graph::metadata::ReturnsError,
            > = Ok(pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef::One(
                pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal($sql),
            ));
        }
    };
}

raw_argument!(
    /// A `jsonb` argument passed through to Postgres untouched. pgrx's `JsonB` parses the
    /// document into a `serde_json::Value`, which turns large integers into f64
    /// (`12345678901234567890123` came back as `12345678901234568000000`) and fails on numbers
    /// and depths serde_json cannot hold; this keeps the datum Postgres made, so what the caller
    /// gave is stored exactly and the checks on it (an object, at most 8 kB) are done in SQL.
    RawJsonb,
    "jsonb",
    pg_sys::JSONBOID
);

raw_argument!(
    /// A `token.rate_limit[]` argument, passed through to SQL (which reads and checks it): its
    /// type's OID is this database's, so SPI gets it through `with_type`.
    RawRateLimits,
    "token.rate_limit[]",
    pg_sys::InvalidOid
);

raw_argument!(
    /// An `inet[]` argument (a list of networks or addresses; cidr values convert to it),
    /// passed through to SQL, which checks it and stores each element's network.
    RawInets,
    "inet[]",
    pg_sys::INETARRAYOID
);
