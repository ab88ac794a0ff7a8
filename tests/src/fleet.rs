//! An Envoy of the fleet example: `envoy/fleet/envoy.yaml`, which takes the filter config from
//! the controller's ECDS gRPC server, with its node id, its controller address and its two
//! model upstreams rewritten. The ECDS gRPC tests (plain and TLS) start their Envoys here.

use crate::envoy::EnvoyConfig;
use crate::upstream::Upstream;

/// The fleet bootstrap.
pub const BOOTSTRAP: &str = "envoy/fleet/envoy.yaml";
/// Its ingress listener.
pub const LISTENER: u16 = 10000;
/// Its admin listener.
pub const ADMIN: u16 = 9901;
/// The controller's address in the bootstrap (cluster `sluice`).
pub const XDS: u16 = 18000;
/// Its stable and canary model clusters.
const STABLE: u16 = 10001;
const CANARY: u16 = 10002;

/// The config of fleet Envoy `id` (cluster `fleet`) asking the controller at `127.0.0.1:<xds>`
/// and routing to `stable` and `canary`; not started, so a test can change it further.
pub fn envoy(id: &str, xds: u16, stable: &Upstream, canary: &Upstream) -> EnvoyConfig {
    EnvoyConfig::new(BOOTSTRAP)
        .port_to(XDS, xds)
        .port_to(STABLE, stable.port())
        .port_to(CANARY, canary.port())
        .node(id, "fleet")
}
