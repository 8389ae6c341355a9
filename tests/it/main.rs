//! Black-box tests: a real `keyhole serve`, driven through the real CLI.
//! One binary for the whole suite, so it links once.

mod support;

mod admin;
mod audit;
mod compose;
mod crash;
mod docker;
mod hostile;
mod lifecycle;
mod limits;
mod mounts;
mod operate;
mod pool;
mod secrets;
mod takeover;
mod tamper;
mod vault;
