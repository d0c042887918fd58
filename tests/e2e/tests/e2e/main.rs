//! The end-to-end suite, one test binary: every module starts real processes against a real
//! broker and talks to the gatekeeper over mTLS. One binary rather than one per file keeps the
//! build small (each binary links the whole system) and the link steps few. Six suites are
//! binaries of their own: `faults`, which restarts the shared broker, so that it never runs
//! beside these; `scale_out`, which restarts the tests' PostgreSQL server; `cluster`, which
//! starts three-node broker clusters of its own and wants the machine to itself; `storage`, the
//! storage alone on both backends; and `security` and `trace`, which read what the in-process
//! components log through the process's one global log subscriber, each at its own level.

mod abuse;
mod api;
mod bad_input;
mod batches;
mod bench;
mod cancel;
mod checkpoints;
mod dashboard;
mod delays;
mod deploy;
mod events;
mod exec;
mod fair;
mod fuzz;
mod isolation;
mod lanes;
mod metrics;
mod pause;
mod postgres;
mod progress;
mod python_client;
mod rates;
mod retention;
mod sandbox;
mod schedules;
mod search;
mod singleton;
mod tenancy;
mod tls;
mod up;
mod workflows;
