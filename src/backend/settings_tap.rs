//! Reads the backend's first HTTP/2 SETTINGS frame as it passes by.
//!
//! hyper does not tell its user what the peer advertised, and two of those settings decide how
//! a connection may be used: `SETTINGS_MAX_CONCURRENT_STREAMS` (how many requests it may carry
//! before another connection is needed, rather than queueing behind long watches) and
//! `SETTINGS_MAX_HEADER_LIST_SIZE` (a request over it would make the backend tear the whole
//! connection down, every other client's streams with it). The server's connection preface
//! is a SETTINGS frame (RFC 9113 section 3.4), so a wrapper that parses the first frame read
//! learns both without touching hyper's framing; every byte passes through unchanged.
//!
//! hyper's handshake returns once the client's preface is written, before the server's has
//! arrived, so a new connection waits for [`PeerSettings::preface_read`]: its first request is
//! then held to the backend's limits like every later one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::signal::Signal;

const FRAME_HEADER_LEN: usize = 9;
const FRAME_TYPE_SETTINGS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;
/// A SETTINGS frame larger than this is not a preface worth reading.
const MAX_PREFACE_LEN: usize = FRAME_HEADER_LEN + 16_384;

/// What the peer advertised; `u32::MAX` / 0 until (and unless) it says.
pub struct PeerSettings {
    max_concurrent_streams: AtomicU32,
    max_header_list_size: AtomicU32,
    /// Set once the peer's first frame has been read, or the stream ended before it was.
    preface_read: Signal<bool>,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: AtomicU32::new(u32::MAX),
            max_header_list_size: AtomicU32::new(0),
            preface_read: Signal::new(false),
        }
    }
}

impl PeerSettings {
    /// Resolves once the peer's first frame has been read (its limits are known from then
    /// on), or the stream ended or failed before it.
    pub async fn preface_read(&self) {
        self.preface_read.wait_for(|read| read).await;
    }

    /// The peer's stream limit, if it has advertised one.
    pub fn max_concurrent_streams(&self) -> Option<u32> {
        Some(self.max_concurrent_streams.load(Ordering::Relaxed)).filter(|&n| n != u32::MAX)
    }

    /// The peer's header-list limit, if it has advertised one.
    pub fn max_header_list_size(&self) -> Option<u32> {
        Some(self.max_header_list_size.load(Ordering::Relaxed)).filter(|&n| n != 0)
    }

    fn apply(&self, payload: &[u8]) {
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                SETTINGS_MAX_CONCURRENT_STREAMS => self.max_concurrent_streams.store(value, Ordering::Relaxed),
                SETTINGS_MAX_HEADER_LIST_SIZE => self.max_header_list_size.store(value.max(1), Ordering::Relaxed),
                _ => {}
            }
        }
    }
}

/// An I/O stream that notes the peer's first SETTINGS frame.
pub struct SettingsTap<T> {
    inner: T,
    settings: Arc<PeerSettings>,
    /// The first frame's bytes while it is being read; `None` once it has been.
    preface: Option<Vec<u8>>,
}

impl<T> SettingsTap<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, settings: Arc::default(), preface: Some(Vec::with_capacity(64)) }
    }

    pub fn settings(&self) -> Arc<PeerSettings> {
        self.settings.clone()
    }

    fn observe(&mut self, bytes: &[u8]) {
        let Some(preface) = self.preface.as_mut() else { return };
        preface.extend_from_slice(bytes);
        if preface.len() < FRAME_HEADER_LEN {
            return;
        }
        let length = usize::from(preface[0]) << 16 | usize::from(preface[1]) << 8 | usize::from(preface[2]);
        if preface[3] != FRAME_TYPE_SETTINGS || FRAME_HEADER_LEN + length > MAX_PREFACE_LEN {
            self.done();
            return;
        }
        if preface.len() >= FRAME_HEADER_LEN + length {
            self.settings.apply(&preface[FRAME_HEADER_LEN..FRAME_HEADER_LEN + length]);
            self.done();
        }
    }

    /// The first frame is read (or will never be): stop looking, and wake the waiter.
    fn done(&mut self) {
        self.preface = None;
        self.settings.preface_read.set(true);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SettingsTap<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.preface.is_some() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    let read = buf.filled()[before..].to_vec();
                    self.observe(&read);
                }
                // End of stream or an error before the first frame was whole.
                Poll::Ready(_) => self.done(),
                Poll::Pending => {}
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SettingsTap<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_frame(settings: &[(u16, u32)]) -> Vec<u8> {
        let len = settings.len() * 6;
        let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, FRAME_TYPE_SETTINGS, 0, 0, 0, 0, 0];
        for (id, value) in settings {
            frame.extend_from_slice(&id.to_be_bytes());
            frame.extend_from_slice(&value.to_be_bytes());
        }
        frame
    }

    #[test]
    fn the_first_settings_frame_is_read_even_split_across_reads() {
        let mut tap = SettingsTap::new(());
        let frame = settings_frame(&[
            (0x4, 65_535),
            (SETTINGS_MAX_CONCURRENT_STREAMS, 100),
            (SETTINGS_MAX_HEADER_LIST_SIZE, 16_384),
        ]);
        for byte in &frame {
            tap.observe(std::slice::from_ref(byte));
        }
        let s = tap.settings();
        assert_eq!(s.max_concurrent_streams(), Some(100));
        assert_eq!(s.max_header_list_size(), Some(16_384));
        // Later frames are not read.
        tap.observe(&settings_frame(&[(SETTINGS_MAX_CONCURRENT_STREAMS, 1)]));
        assert_eq!(s.max_concurrent_streams(), Some(100));
    }

    #[test]
    fn nothing_is_learnt_from_an_empty_preface_or_another_frame() {
        let mut tap = SettingsTap::new(());
        tap.observe(&settings_frame(&[]));
        assert_eq!((tap.settings().max_concurrent_streams(), tap.settings().max_header_list_size()), (None, None));
        let mut other = SettingsTap::new(());
        other.observe(&[0, 0, 6, 0x0, 0, 0, 0, 0, 1, 0, 3, 0, 0, 0, 1]);
        assert_eq!(other.settings().max_concurrent_streams(), None);
    }

    /// A new connection's wait: pending until the first frame is whole, then done; and done
    /// when the stream ends before it, so a dead connection never holds its dialler.
    #[tokio::test]
    async fn preface_read_resolves_once_the_first_frame_is_read_or_the_stream_ends() {
        use futures_util::FutureExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
        let (mut server, client) = tokio::io::duplex(1024);
        let mut tap = SettingsTap::new(client);
        let settings = tap.settings();
        let frame = settings_frame(&[(SETTINGS_MAX_HEADER_LIST_SIZE, 8_192)]);
        server.write_all(&frame[..5]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(tap.read(&mut buf).await.unwrap(), 5);
        assert!(settings.preface_read().now_or_never().is_none(), "half a frame is not the preface");
        server.write_all(&frame[5..]).await.unwrap();
        assert_eq!(tap.read(&mut buf).await.unwrap(), frame.len() - 5);
        tokio::time::timeout(WAIT, settings.preface_read()).await.expect("the whole frame was read");
        assert_eq!(settings.max_header_list_size(), Some(8_192));

        let (server, client) = tokio::io::duplex(1024);
        let mut tap = SettingsTap::new(client);
        let settings = tap.settings();
        drop(server);
        assert_eq!(tap.read(&mut buf).await.unwrap(), 0);
        tokio::time::timeout(WAIT, settings.preface_read()).await.expect("the stream ended");
        assert_eq!(settings.max_header_list_size(), None);
    }
}
