//! A file on disk as an HTTP body, read ahead on a blocking thread.
//!
//! `tokio::fs::File` behind a `ReaderStream` costs, per block, a trip to the blocking
//! pool and a copy from tokio's own buffer into the stream's, and reads nothing while
//! the block before is being sent. [`FileBody`] reads the file with std's I/O on one
//! blocking thread straight into the blocks it sends, [`READ_AHEAD`] blocks ahead of
//! the socket, so reading and sending overlap; its exact length lets the server end
//! the answer with its last block (no read of the end of the file, no wait for it).
//! Memory stays constant: at most `READ_AHEAD + 1` blocks of [`IO_BLOCK`] at a time.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::IO_BLOCK;

/// How many blocks the reading thread may be ahead of the socket.
pub const READ_AHEAD: usize = 2;

/// The first `len` bytes of a file, as a body (see the module's documentation).
#[derive(Debug)]
pub struct FileBody {
    blocks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    left: u64,
}

impl FileBody {
    /// Streams the first `len` bytes of `file` (from its current position), read on a
    /// blocking thread that also holds `keep` until it has read the last byte or the
    /// body is dropped, and drops it there: what `keep` frees (a spool directory
    /// removed, say) does not hold up the async threads. A file shorter than `len`
    /// ends the body with an error. Must be called within a tokio runtime.
    pub fn new<K: Send + 'static>(mut file: std::fs::File, len: u64, keep: K) -> FileBody {
        let (tx, blocks) = tokio::sync::mpsc::channel(READ_AHEAD);
        tokio::task::spawn_blocking(move || {
            let _keep = keep;
            let mut left = len;
            while left > 0 {
                let n = (IO_BLOCK as u64).min(left) as usize;
                // Read whole blocks: one read a block from the page cache (a reader that
                // grows its reads from 8 KiB makes five).
                let mut block = vec![0u8; n];
                let mut got = 0;
                let read = loop {
                    match file.read(&mut block[got..]) {
                        Ok(0) => {
                            break Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                format!("the file ended {} bytes early", left - got as u64),
                            ))
                        }
                        Ok(k) => {
                            got += k;
                            if got == n {
                                break Ok(Bytes::from(block));
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
                left -= n as u64;
            }
        });
        FileBody { blocks, left: len }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.blocks.poll_recv(cx) {
            Poll::Ready(Some(Ok(block))) => {
                self.left = self.left.saturating_sub(block.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(block))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.left = 0;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.left = 0;
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file's reader ended before its last byte",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;

    #[tokio::test]
    async fn a_file_is_streamed_whole_in_blocks_and_what_it_keeps_goes_after_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..(3 * IO_BLOCK + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        /// Says when it is dropped.
        struct Kept(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Kept {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel();
        let keep = Kept(Some(dropped_tx));
        let mut body = FileBody::new(
            std::fs::File::open(&path).unwrap(),
            bytes.len() as u64,
            keep,
        );
        assert_eq!(body.size_hint().exact(), Some(bytes.len() as u64));
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= IO_BLOCK);
            got.extend_from_slice(&data);
            frames += 1;
        }
        assert_eq!(got, bytes);
        assert_eq!(frames, 4);
        assert!(body.is_end_stream());
        // The reading thread lets go of what it kept once it has read the end, while
        // the body is still alive.
        tokio::time::timeout(std::time::Duration::from_secs(60), dropped)
            .await
            .expect("the reading thread keeps what it was given")
            .unwrap();
        drop(body);
    }

    #[tokio::test]
    async fn a_file_shorter_than_said_ends_the_body_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"short").unwrap();
        let mut body = FileBody::new(std::fs::File::open(&path).unwrap(), 10, ());
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(body.frame().await.is_none());
    }
}
