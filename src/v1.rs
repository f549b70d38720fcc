//! Hand-declared V1 C functions: the calling-convention record Postgres asks for, and reading
//! a text argument as the bytes that arrived.
//!
//! Most SQL functions are `#[pg_extern]`. The validation entry points and `current_identity`
//! are declared by hand in `sql/validation.sql` instead, for the reasons `validation` gives;
//! this is the only place that deals with their `fcinfo`.

use pgrx::pg_sys;

/// Declares the Postgres V1 calling convention for a hand-written C function.
macro_rules! v1_function_info {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            static V1: ::pgrx::pg_sys::Pg_finfo_record = ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use v1_function_info;

/// Argument `i` of a V1 call as the bytes that arrived, or `None` for SQL NULL. Compressed or
/// out-of-line values (only a table column can hand us one) are detoasted first.
///
/// # Safety
/// `fcinfo` is the live call's, and argument `i`, if present, is of a varlena type.
pub unsafe fn text_arg<'a>(fcinfo: pg_sys::FunctionCallInfo, i: usize) -> Option<&'a [u8]> {
    // SAFETY: per the contract; the bytes live in the call's memory context, which outlives
    // the call that borrows them.
    unsafe {
        let fc = &*fcinfo;
        if i >= usize::try_from(fc.nargs).unwrap_or(0) {
            return None;
        }
        let arg = *fc.args.as_ptr().add(i);
        if arg.isnull {
            return None;
        }
        let mut p = arg.value.cast_mut_ptr::<pg_sys::varlena>();
        if pgrx::varlena::varatt_is_1b_e(p) || pgrx::varlena::varatt_is_4b_c(p) {
            p = pg_sys::pg_detoast_datum_packed(p);
        }
        Some(pgrx::varlena::varlena_to_byte_slice(p))
    }
}

/// Marks the call's result as SQL NULL.
///
/// # Safety
/// `fcinfo` is the live call's.
pub unsafe fn return_null(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: per the contract.
    unsafe { (*fcinfo).isnull = true };
    pg_sys::Datum::from(0)
}
