//! The state one `listen` address shares between its rollouts and its connected proxies: the
//! resources (one per rollout), and per xDS stream the proxy's node, its subscription, the last
//! response sent and what it ACKed or NACKed. Pure bookkeeping under one lock; the gRPC
//! service (`service.rs`) and the sink (`ecds_grpc.rs`) drive it.
//!
//! Memory per connected stream is bounded by [`Limits`]: the names a stream may subscribe to,
//! the length of each name, of the node's id, cluster and metadata summary, and of a NACK's
//! error detail; everything else per stream is fixed-size. The encoded resources are shared
//! (`Arc`), never copied per stream.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct};
use serde::Serialize;
use sluice_filter::config::FilterConfig;
use tokio::sync::{watch, Notify};

/// The only resource type this server serves.
pub const TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// Per-stream bounds; a request beyond them ends the stream with `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Resource names one stream may subscribe to.
    pub names: usize,
    /// Bytes of one resource name, node id or node cluster.
    pub name_bytes: usize,
    /// Bytes kept of the node metadata (rendered as JSON, cut at this length).
    pub metadata_bytes: usize,
    /// Bytes kept of a NACK's `error_detail.message`.
    pub detail_bytes: usize,
    /// Bytes of one encoded request (gRPC decode limit).
    pub request_bytes: usize,
    /// HTTP/2 ping interval, and how long a peer has to answer one before its connection (and
    /// its streams) are dropped.
    pub keepalive: std::time::Duration,
    /// How long a new stream may take to send its first request (Envoy sends it at once).
    pub first_request: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            names: 64,
            name_bytes: 256,
            metadata_bytes: 1024,
            detail_bytes: 2048,
            request_bytes: 64 * 1024,
            keepalive: std::time::Duration::from_secs(10),
            first_request: std::time::Duration::from_secs(30),
        }
    }
}

/// One rollout's resource as served now.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Increases with every push of this resource on this hub (also when a push repeats a
    /// version), so an ACK is matched to the push it answers.
    pub serial: u64,
    /// The push version (`version_info` of a response carrying only this resource).
    pub version: u64,
    /// The pushed configuration without its `revision`, for `in_force` comparisons.
    pub config: FilterConfig,
    /// The encoded `TypedExtensionConfig`.
    pub any: Arc<Any>,
    /// When this serial was set.
    pub set_at: Instant,
}

/// What one response carried, per resource: (serial, version).
type Carried = BTreeMap<String, (u64, u64)>;

#[derive(Debug, Clone)]
struct Sent {
    nonce: String,
    version_info: String,
    carried: Carried,
    at: Instant,
}

/// A NACK as kept for a proxy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Nack {
    /// The resources and push versions the rejected response carried.
    pub versions: BTreeMap<String, u64>,
    pub detail: String,
    #[serde(with = "unix_ms")]
    pub at: SystemTime,
    #[serde(skip)]
    serials: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Conn {
    node: Option<NodeInfo>,
    connected_since: SystemTime,
    /// When its first request said who it is.
    identified_at: Instant,
    subscribed: BTreeSet<String>,
    sent: Option<Sent>,
    /// Per resource: (serial, version) of the last ACKed response carrying it.
    acked: BTreeMap<String, (u64, u64)>,
    last_nack: Option<Nack>,
    /// Set when the stream must end with this error (a request broke the protocol).
    closing: Option<tonic::Status>,
    wake: Arc<Notify>,
}

/// Who a stream's proxy is, from the first request's `node`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    /// `node.metadata` as JSON, cut to [`Limits::metadata_bytes`].
    pub metadata: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.cluster.is_empty() {
            write!(f, "proxy {:?}", self.id)
        } else {
            write!(f, "proxy {:?} (cluster {:?})", self.id, self.cluster)
        }
    }
}

/// A connected proxy as `/status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyStatus {
    pub id: String,
    pub cluster: String,
    pub metadata: String,
    #[serde(with = "unix_ms")]
    pub connected_since: SystemTime,
    pub subscribed: Vec<String>,
    /// Per resource, the push version last ACKed.
    pub acked: BTreeMap<String, u64>,
    pub last_nack: Option<Nack>,
}

mod unix_ms {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        s.serialize_u64(ms as u64)
    }
}

#[derive(Debug, Default)]
struct State {
    resources: BTreeMap<String, Resource>,
    conns: BTreeMap<u64, Conn>,
    next_serial: u64,
    /// Per resource, the latest NACK: (serial rejected, proxy, detail). Kept when the proxy
    /// disconnects: it does not serve that push either way.
    nacks: BTreeMap<String, (u64, String, String)>,
}

/// The shared state of one ECDS server (one `listen` address).
#[derive(Debug)]
pub struct Hub {
    state: Mutex<State>,
    /// Bumped on every resource change: wakes every stream's writer.
    resources: watch::Sender<u64>,
    /// Bumped on every connect, disconnect, ACK and NACK: wakes waiting pushes.
    events: watch::Sender<u64>,
    /// Distinguishes this process's nonces from an earlier controller's.
    nonce_prefix: String,
    next_nonce: AtomicU64,
    next_conn: AtomicU64,
    pub limits: Limits,
}

/// What a confirmation check found for one resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirmation {
    /// Every subscribed proxy ACKed; this many distinct proxies are subscribed.
    Acked { proxies: usize },
    /// A proxy NACKed the push.
    Nacked { proxy: String, detail: String },
    /// Not yet: the first proxy still to ACK, with the version it has ACKed.
    Waiting { pending: (String, Option<u64>) },
}

impl Hub {
    pub fn new(limits: Limits) -> Arc<Hub> {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Arc::new(Hub {
            state: Mutex::new(State::default()),
            resources: watch::Sender::new(0),
            events: watch::Sender::new(0),
            nonce_prefix: format!("{started:x}"),
            next_nonce: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump_events(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Receives a notice on every connect, disconnect, ACK and NACK.
    pub fn events(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// Receives a notice on every resource change.
    pub fn resource_changes(&self) -> watch::Receiver<u64> {
        self.resources.subscribe()
    }

    /// Serves `any` as `name` from now on; returns its serial.
    pub fn set(&self, name: &str, version: u64, config: FilterConfig, any: Any) -> u64 {
        let serial = {
            let mut st = self.lock();
            st.next_serial += 1;
            let serial = st.next_serial;
            st.resources.insert(
                name.to_string(),
                Resource {
                    serial,
                    version,
                    config,
                    any: Arc::new(any),
                    set_at: Instant::now(),
                },
            );
            serial
        };
        self.resources.send_modify(|n| *n = n.wrapping_add(1));
        serial
    }

    pub fn resource(&self, name: &str) -> Option<Resource> {
        self.lock().resources.get(name).cloned()
    }

    /// Registers a new stream; its id and the notifier that wakes its writer.
    pub fn connect(&self) -> (u64, Arc<Notify>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        self.lock().conns.insert(
            id,
            Conn {
                node: None,
                connected_since: SystemTime::now(),
                identified_at: Instant::now(),
                subscribed: BTreeSet::new(),
                sent: None,
                acked: BTreeMap::new(),
                last_nack: None,
                closing: None,
                wake: wake.clone(),
            },
        );
        (id, wake)
    }

    pub fn disconnect(&self, conn: u64) {
        let removed = self.lock().conns.remove(&conn);
        if let Some(c) = removed {
            c.wake.notify_one();
            if let Some(node) = c.node {
                tracing::info!(proxy = %node.id, cluster = %node.cluster, "ecds stream closed");
            }
        }
        self.bump_events();
    }

    /// Ends stream `conn` with `status` (sent to the peer if it still listens).
    pub fn fail(&self, conn: u64, status: tonic::Status) {
        let mut st = self.lock();
        if let Some(c) = st.conns.get_mut(&conn) {
            c.closing = Some(status);
            c.wake.notify_one();
        }
    }

    /// Applies one request of stream `conn`. `Err` ends the stream with that status.
    pub fn receive(&self, conn: u64, req: DiscoveryRequest) -> Result<(), tonic::Status> {
        let result = self.apply(conn, req);
        // A request that changed nothing (a stale nonce, a repeat) wakes no one: a peer
        // flooding them costs the server the parsing only.
        if result.as_ref().is_ok_and(|changed| !changed) {
            return Ok(());
        }
        let mut st = self.lock();
        if let Some(c) = st.conns.get_mut(&conn) {
            if let Err(e) = &result {
                c.closing = Some(e.clone());
            }
            c.wake.notify_one();
        }
        drop(st);
        self.bump_events();
        result.map(|_| ())
    }

    /// Whether the request changed what the hub knows of the stream.
    fn apply(&self, conn: u64, req: DiscoveryRequest) -> Result<bool, tonic::Status> {
        let limits = self.limits;
        if req.type_url != TYPE_URL {
            return Err(tonic::Status::invalid_argument(format!(
                "type_url {:?}: this server serves only {TYPE_URL}",
                cut(&req.type_url, limits.name_bytes)
            )));
        }
        if req.resource_names.len() > limits.names {
            return Err(tonic::Status::invalid_argument(format!(
                "resource_names: {} names, at most {} per stream",
                req.resource_names.len(),
                limits.names
            )));
        }
        if let Some(long) = req
            .resource_names
            .iter()
            .find(|n| n.len() > limits.name_bytes)
        {
            return Err(tonic::Status::invalid_argument(format!(
                "resource_names: a name of {} bytes, at most {}",
                long.len(),
                limits.name_bytes
            )));
        }
        let mut st = self.lock();
        let Some(known) = st.conns.get(&conn).map(|c| c.node.is_some()) else {
            return Err(tonic::Status::unavailable("stream closed"));
        };
        let identified = if known {
            None
        } else {
            let node = node_info(req.node.as_ref(), &limits)?;
            tracing::info!(proxy = %node.id, cluster = %node.cluster, resources = ?req.resource_names, "ecds stream opened");
            let shared = st
                .conns
                .values()
                .filter(|o| o.node.as_ref().is_some_and(|n| n.id == node.id))
                .count();
            if shared > 0 {
                tracing::warn!(proxy = %node.id, streams = shared + 1, "several streams share this node id (a proxy reconnecting before its old connection closed, a hot restart, or proxies sharing a bootstrap's id): each must ACK every push");
            }
            Some(node)
        };
        let Some(c) = st.conns.get_mut(&conn) else {
            return Err(tonic::Status::unavailable("stream closed"));
        };
        let mut changed = identified.is_some();
        if identified.is_some() {
            c.node = identified;
            c.identified_at = Instant::now();
        }
        let subscribed: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        if subscribed != c.subscribed {
            c.subscribed = subscribed;
            changed = true;
        }
        let Some(sent) = &c.sent else {
            return Ok(changed);
        };
        // A nonce other than the last one answers a response the proxy has since been sent
        // a newer one for: it says nothing about what the proxy now runs.
        if req.response_nonce.is_empty() || req.response_nonce != sent.nonce {
            return Ok(changed);
        }
        if let Some(err) = &req.error_detail {
            let nack = Nack {
                versions: sent.carried.iter().map(|(k, v)| (k.clone(), v.1)).collect(),
                serials: sent.carried.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
                detail: cut(&err.message, limits.detail_bytes),
                at: SystemTime::now(),
            };
            let proxy = c.node.as_ref().map(|n| n.to_string()).unwrap_or_default();
            tracing::warn!(%proxy, versions = ?nack.versions, detail = %nack.detail, "ecds NACK");
            let latest: Vec<(String, u64)> =
                nack.serials.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let detail = nack.detail.clone();
            c.last_nack = Some(nack);
            for (name, serial) in latest {
                st.nacks
                    .insert(name, (serial, proxy.clone(), detail.clone()));
            }
            changed = true;
        } else if req.version_info == sent.version_info {
            let carried = sent.carried.clone();
            c.acked.extend(carried);
            changed = true;
        }
        Ok(changed)
    }

    /// The response stream `conn` should be sent next, if any: the current configuration of
    /// every known resource it subscribes to, unless that is what it was last sent. `Err`:
    /// end the stream (with the status, if any).
    pub fn next_response(
        &self,
        conn: u64,
    ) -> Result<Option<DiscoveryResponse>, Option<tonic::Status>> {
        let mut st = self.lock();
        let State {
            resources, conns, ..
        } = &mut *st;
        let Some(c) = conns.get_mut(&conn) else {
            return Err(None);
        };
        if let Some(e) = c.closing.take() {
            return Err(Some(e));
        }
        // Nothing until the proxy said who it is and what it wants.
        if c.node.is_none() {
            return Ok(None);
        }
        let want: Carried = c
            .subscribed
            .iter()
            .filter_map(|n| resources.get(n).map(|r| (n.clone(), (r.serial, r.version))))
            .collect();
        if want.is_empty() || c.sent.as_ref().is_some_and(|s| s.carried == want) {
            return Ok(None);
        }
        let version_info = match want.iter().next() {
            Some((_, (_, v))) if want.len() == 1 => v.to_string(),
            _ => want
                .iter()
                .map(|(n, (_, v))| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        };
        let nonce = format!(
            "{}-{}",
            self.nonce_prefix,
            self.next_nonce.fetch_add(1, Ordering::Relaxed)
        );
        let resources: Vec<Any> = want
            .keys()
            .filter_map(|n| resources.get(n).map(|r| (*r.any).clone()))
            .collect();
        c.sent = Some(Sent {
            nonce: nonce.clone(),
            version_info: version_info.clone(),
            carried: want,
            at: Instant::now(),
        });
        Ok(Some(DiscoveryResponse {
            version_info,
            resources,
            type_url: TYPE_URL.to_string(),
            nonce,
            ..Default::default()
        }))
    }

    /// Whether push `serial` of `name` is confirmed: every connected proxy subscribed to
    /// `name` ACKed it (or a later one), or one NACKed it.
    pub fn confirmation(&self, name: &str, serial: u64) -> Confirmation {
        let st = self.lock();
        if let Some((s, proxy, detail)) = st.nacks.get(name) {
            if *s >= serial {
                return Confirmation::Nacked {
                    proxy: proxy.clone(),
                    detail: detail.clone(),
                };
            }
        }
        // Called on every ACK while a push waits: stop at the first stream still behind, so
        // the scans of one push stay far below streams x ACKs.
        let mut proxies = BTreeSet::new();
        for (node, c) in subscribed_iter(&st, name) {
            let acked = c.acked.get(name);
            if acked.is_none_or(|(s, _)| *s < serial) {
                return Confirmation::Waiting {
                    pending: (node.to_string(), acked.map(|(_, v)| *v)),
                };
            }
            // minProxies counts proxies, not streams.
            proxies.insert(node.id.as_str());
        }
        Confirmation::Acked {
            proxies: proxies.len(),
        }
    }

    /// Proxies subscribed to `name` that were sent its current serial longer than `grace`
    /// ago and have neither ACKed it nor NACKed it, or NACKed it; with the reason.
    pub fn stragglers(&self, name: &str, grace: std::time::Duration) -> Vec<String> {
        let st = self.lock();
        let Some(r) = st.resources.get(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (node, c) in subscribed(&st, name) {
            if c.acked.get(name).is_some_and(|(s, _)| *s >= r.serial) {
                continue;
            }
            if let Some(n) = &c.last_nack {
                if n.serials.get(name).is_some_and(|s| *s >= r.serial) {
                    out.push(format!(
                        "{node} rejected version {}: {}",
                        r.version, n.detail
                    ));
                    continue;
                }
            }
            // From when it was sent the current serial, or, not yet sent it, from when it
            // could have been (a proxy that just connected, or one that does not read).
            let since = c
                .sent
                .as_ref()
                .filter(|s| s.carried.get(name).is_some_and(|(s, _)| *s >= r.serial))
                .map_or_else(|| c.identified_at.max(r.set_at), |s| s.at);
            if since.elapsed() > grace {
                let has = c
                    .acked
                    .get(name)
                    .map_or("none".to_string(), |(_, v)| v.to_string());
                out.push(format!(
                    "{node} serves version {has}, not the confirmed {}",
                    r.version
                ));
            }
        }
        out
    }

    /// Every connected stream whose proxy identified itself, for `/status`.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        let st = self.lock();
        st.conns
            .values()
            .filter_map(|c| {
                let node = c.node.as_ref()?;
                Some(ProxyStatus {
                    id: node.id.clone(),
                    cluster: node.cluster.clone(),
                    metadata: node.metadata.clone(),
                    connected_since: c.connected_since,
                    subscribed: c.subscribed.iter().cloned().collect(),
                    acked: c.acked.iter().map(|(k, v)| (k.clone(), v.1)).collect(),
                    last_nack: c.last_nack.clone(),
                })
            })
            .collect()
    }

    /// Number of open streams (identified or not).
    pub fn streams(&self) -> usize {
        self.lock().conns.len()
    }
}

/// Every identified stream subscribed to `name`. Two streams with one node id are both kept:
/// they may be two Envoys sharing a bootstrap's id, or a hot restart's parent and child, and
/// each serves traffic with what it ACKed. A proxy's previous connection whose peer vanished
/// without closing it holds confirmations back until HTTP/2 keepalive drops it.
fn subscribed<'a>(st: &'a State, name: &'a str) -> Vec<(&'a NodeInfo, &'a Conn)> {
    subscribed_iter(st, name).collect()
}

fn subscribed_iter<'a>(
    st: &'a State,
    name: &'a str,
) -> impl Iterator<Item = (&'a NodeInfo, &'a Conn)> + 'a {
    st.conns
        .values()
        .filter(move |c| c.subscribed.contains(name))
        .filter_map(|c| Some((c.node.as_ref()?, c)))
}

fn node_info(node: Option<&Node>, limits: &Limits) -> Result<NodeInfo, tonic::Status> {
    let Some(node) = node else {
        return Err(tonic::Status::invalid_argument(
            "node: the first request of a stream must carry the proxy's node",
        ));
    };
    if node.id.is_empty() {
        return Err(tonic::Status::invalid_argument(
            "node.id: must not be empty",
        ));
    }
    if node.id.len() > limits.name_bytes || node.cluster.len() > limits.name_bytes {
        return Err(tonic::Status::invalid_argument(format!(
            "node.id, node.cluster: at most {} bytes each",
            limits.name_bytes
        )));
    }
    let metadata = node
        .metadata
        .as_ref()
        .map(|m| {
            let mut out = String::new();
            render_struct(m, &mut out, limits.metadata_bytes, 0);
            cut(&out, limits.metadata_bytes)
        })
        .unwrap_or_default();
    Ok(NodeInfo {
        id: node.id.clone(),
        cluster: node.cluster.clone(),
        metadata,
    })
}

/// JSON-ish rendering of a protobuf `Struct` that stops once `out` holds `max` bytes, so a
/// huge or deeply nested metadata costs no more than that.
fn render_struct(s: &Struct, out: &mut String, max: usize, depth: usize) {
    out.push('{');
    for (i, (k, v)) in s.fields.iter().enumerate() {
        if out.len() > max {
            return;
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::from(k.as_str()).to_string());
        out.push(':');
        render_value(v.kind.as_ref(), out, max, depth + 1);
    }
    out.push('}');
}

fn render_value(v: Option<&Kind>, out: &mut String, max: usize, depth: usize) {
    if depth > 8 {
        out.push_str("\"…\"");
        return;
    }
    match v {
        None | Some(Kind::NullValue(_)) => out.push_str("null"),
        Some(Kind::NumberValue(n)) => out.push_str(&n.to_string()),
        Some(Kind::StringValue(s)) => {
            out.push_str(&serde_json::Value::from(cut(s, max).as_str()).to_string())
        }
        Some(Kind::BoolValue(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(Kind::StructValue(s)) => render_struct(s, out, max, depth),
        Some(Kind::ListValue(l)) => {
            out.push('[');
            for (i, v) in l.values.iter().enumerate() {
                if out.len() > max {
                    return;
                }
                if i > 0 {
                    out.push(',');
                }
                render_value(v.kind.as_ref(), out, max, depth + 1);
            }
            out.push(']');
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
