//! `/metrics`, `/healthz` and `/readyz` from the module's own thread (filter key
//! `metrics_addr`): the metric names and texts of `keygate authz`, so one dashboard serves
//! both data planes. A minimal HTTP/1.1 responder — one request per connection — so the
//! module links no HTTP server framework.

use std::time::Duration;

use keygate::health::HealthSources;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    health: HealthSources,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let health = health.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            answer(stream, &health),
                        )
                        .await;
                    });
                }
            }
        }
    }
}

/// The status, content type and body answering one request line.
fn respond(request_head: &str, health: &HealthSources) -> (u16, &'static str, Vec<u8>) {
    let mut parts = request_head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return (405, "text/plain", b"only GET\n".to_vec());
    }
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4", health.render()),
        "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
        "/readyz" => match health.ready() {
            Ok(t) => (200, "text/plain", t.into_bytes()),
            Err(t) => (503, "text/plain", t.into_bytes()),
        },
        _ => (404, "text/plain", b"not found\n".to_vec()),
    }
}

async fn answer(mut stream: TcpStream, health: &HealthSources) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let (status, content_type, body) = respond(head.lines().next().unwrap_or(""), health);
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let header = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate::snapshot::SnapshotCell;

    #[test]
    fn paths_and_readiness() {
        let h = HealthSources::new(SnapshotCell::new(), None, None);
        assert_eq!(
            respond("GET /readyz HTTP/1.1", &h).0,
            503,
            "no snapshot yet"
        );
        assert_eq!(respond("GET /healthz HTTP/1.1", &h).0, 200);
        let (status, _, body) = respond("GET /metrics HTTP/1.1", &h);
        assert_eq!(status, 200);
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("keygate_checks_total")
        );
        assert_eq!(respond("GET /nope HTTP/1.1", &h).0, 404);
        assert_eq!(respond("POST /metrics HTTP/1.1", &h).0, 405);
    }
}
