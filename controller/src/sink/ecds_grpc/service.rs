//! The gRPC face of a [`Hub`]: Envoy's `ExtensionConfigDiscoveryService`, state of the world
//! only (delta and fetch answer `UNIMPLEMENTED`, so a proxy configured for them fails loudly).
//!
//! Each stream has a reader task that applies the proxy's requests to the hub, and a response
//! stream that tonic pulls from: it builds a response only when it is polled and only from the
//! hub's current state. A proxy that reads slowly therefore never makes responses pile up; it
//! skips straight to the newest configuration when it reads again.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status, Streaming};

use super::hub::Hub;

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The service over one hub; `stop` turning true ends every stream.
#[derive(Debug, Clone)]
pub struct Ecds {
    hub: Arc<Hub>,
    stop: watch::Receiver<bool>,
}

impl Ecds {
    pub fn new(hub: Arc<Hub>, stop: watch::Receiver<bool>) -> Ecds {
        Ecds { hub, stop }
    }
}

/// Removes the stream from the hub however the response stream ends (finished, or dropped
/// by tonic when the connection goes).
struct Registered {
    hub: Arc<Hub>,
    conn: u64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.reader.abort();
        self.hub.disconnect(self.conn);
    }
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for Ecds {
    type StreamExtensionConfigsStream = Responses<DiscoveryResponse>;
    type DeltaExtensionConfigsStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        let mut requests = request.into_inner();
        let hub = self.hub.clone();
        let (conn, wake) = hub.connect();
        let reader = {
            let hub = hub.clone();
            let wake = wake.clone();
            let first = hub.limits.first_request;
            tokio::spawn(async move {
                // A stream that never says who it is would be held for nothing.
                match tokio::time::timeout(first, requests.message()).await {
                    Ok(Ok(Some(req))) => {
                        if hub.receive(conn, req).is_err() {
                            return;
                        }
                    }
                    Ok(Ok(None)) => {
                        hub.disconnect(conn);
                        wake.notify_one();
                        return;
                    }
                    Ok(Err(status)) => {
                        hub.fail(conn, status);
                        return;
                    }
                    Err(_) => {
                        hub.fail(
                            conn,
                            Status::deadline_exceeded(format!(
                                "no request within {first:?} of opening the stream"
                            )),
                        );
                        return;
                    }
                }
                loop {
                    match requests.message().await {
                        Ok(Some(req)) => {
                            if hub.receive(conn, req).is_err() {
                                return;
                            }
                        }
                        // A request tonic cannot decode (malformed, over the size limit):
                        // the stream ends with that error, so the peer learns why.
                        Err(status) => {
                            hub.fail(conn, status);
                            return;
                        }
                        // The proxy closed its side: the writer ends too (the hub no longer
                        // knows the stream).
                        Ok(None) => {
                            hub.disconnect(conn);
                            wake.notify_one();
                            return;
                        }
                    }
                }
            })
        };
        let registered = Registered {
            hub: hub.clone(),
            conn,
            reader,
        };
        let state = (
            registered,
            wake,
            hub.resource_changes(),
            self.stop.clone(),
            false,
        );
        let responses = futures_util::stream::unfold(
            state,
            |(reg, wake, mut changes, mut stop, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if *stop.borrow() {
                        return None;
                    }
                    changes.borrow_and_update();
                    match reg.hub.next_response(reg.conn) {
                        Ok(Some(r)) => return Some((Ok(r), (reg, wake, changes, stop, false))),
                        Ok(None) => {}
                        Err(None) => return None,
                        Err(Some(status)) => {
                            return Some((Err(status), (reg, wake, changes, stop, true)))
                        }
                    }
                    tokio::select! {
                        _ = wake.notified() => {}
                        r = changes.changed() => if r.is_err() { return None },
                        _ = stop.changed() => {}
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(responses)))
    }

    async fn delta_extension_configs(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Err(Status::unimplemented(
            "this server speaks the state-of-the-world protocol (api_type: GRPC)",
        ))
    }

    async fn fetch_extension_configs(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "this server speaks the state-of-the-world protocol (api_type: GRPC)",
        ))
    }
}

/// Streams one HTTP/2 connection may open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;

/// Binds `addr`; the error names the address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for the ecdsGrpc server: {e}"),
        )
    })
}

/// Serves `hub` on `listener` until `stop` turns true; over TLS with `tls`.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    stop: watch::Receiver<bool>,
    tls: Option<ServerTlsConfig>,
) -> Result<(), tonic::transport::Error> {
    let (limit, keepalive) = (hub.limits.request_bytes, hub.limits.keepalive);
    let svc = ExtensionConfigDiscoveryServiceServer::new(Ecds::new(hub, stop.clone()))
        .max_decoding_message_size(limit);
    let mut until = stop.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        // A proxy that vanished without closing its connection is found within ~20 s and its
        // stream dropped, so it no longer holds confirmations back.
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .tcp_nodelay(true)
        // Requests are small: a small receive window bounds what a proxy can make the server
        // hold unread. Responses are bounded by the proxy's window (the response stream is
        // polled only when there is room), and by hyper's send buffer (400 KiB per stream).
        .initial_stream_window_size(Some(64 * 1024))
        .initial_connection_window_size(Some(1024 * 1024))
        // Envoy opens one stream per subscription; the limit (tonic sets none) bounds what one
        // connection can make the server hold, with room for clients multiplexing many.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async move {
                let _ = until.wait_for(|s| *s).await;
            },
        )
        .await
}
