//! vm-operator: reconciles `VmWebapp` resources into a running, probed, secret-aware
//! vm-webapp installation.
//!
//! Flow: [`crd`] defines the resource; [`builders`] compute every desired child object
//! from it without I/O; the [`controller`] reads what exists from its caches, applies the
//! difference with server-side apply and writes the status; [`render`] prints the builders' output offline;
//! [`schedule`] reads `spec.backup`'s cron schedule;
//! [`runtime`] wires `vm-operator run` (leader election, admin server, telemetry).

pub mod admin;
pub mod builders;
pub mod cli;
pub mod consts;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod rbac;
pub mod render;
pub mod runtime;
pub mod schedule;
pub mod status;
pub mod telemetry;

#[cfg(test)]
mod fixtures;
