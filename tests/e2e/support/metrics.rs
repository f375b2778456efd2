//! The Prometheus endpoint, scraped over a plain TCP connection, and the
//! value of one series in what it showed.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, ToSocketAddrs},
};

/// The whole HTTP response of `GET /metrics` at `addr`, asserted to be a 200.
pub(crate) async fn scrape(addr: impl ToSocketAddrs) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample named exactly `series` (name and labels, as
/// Prometheus prints them) in the scraped `text`, if the series is there.
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

/// The value of `series` at `addr` now, if the series is there.
pub(crate) async fn metric(addr: impl ToSocketAddrs, series: &str) -> Option<f64> {
    sample(&scrape(addr).await, series)
}
