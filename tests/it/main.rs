//! Black-box tests: a real `keyhole serve`, driven through the real CLI.
//! One binary for the whole suite, so it links once.

mod support;

mod admin;
mod attest;
mod audit;
mod cluster;
mod compose;
mod crash;
mod denials;
mod docker;
mod fleet;
mod fscore;
mod hostile;
mod index;
mod labels;
mod leased;
mod leases;
mod lifecycle;
mod limits;
mod listeners;
mod mounts;
mod operate;
mod podman;
mod pool;
mod redteam;
mod redteam2;
mod replay;
mod scale;
mod secrets;
mod strangers;
mod takeover;
mod takeover_auth;
mod tamper;
mod teams;
mod teams_reach;
mod template_actions;
mod templates;
mod vault;
mod writes;
