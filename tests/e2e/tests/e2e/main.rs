//! The end-to-end suite, one test binary: every module starts real processes against a real
//! broker and talks to the gatekeeper over mTLS. One binary rather than one per file keeps the
//! build small (each binary links the whole system) and the link steps few. The fault suite,
//! which restarts the shared broker, is its own binary (`--test faults`) so that it never runs
//! beside these.

mod api;
mod bad_input;
mod bench;
mod deploy;
mod exec;
mod isolation;
mod metrics;
mod security;
mod tenancy;
mod tls;
mod trace;
mod up;
