pub mod cache;
pub mod format;
pub mod hash;
pub mod reason;
pub mod redact;
pub mod verdict;
