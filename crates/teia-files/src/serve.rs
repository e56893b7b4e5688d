//! Serving a `files` data stream: answer `GET` with the file's size and outboard (after the
//! approval policy), then each `CHUNKS` with the chunks' bytes read from disk a piece at a
//! time (never a whole file, nor a whole large chunk, in memory).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use teia_node::stream::{DataStream, StreamError};

use crate::proto::exchange::{AwaitingGet, Refusal, Serving};
use crate::proto::msg::{self, code, Reply, Request, MAX_STREAM_LINE};
use crate::proto::tree::Hash;
use crate::share;
use crate::state::{Approval, DialBack, FilesEvent, Inner};
use crate::store::SharedFile;
use std::net::SocketAddr;
use teia_core::identity::PublicKey;
use teia_node::sync::lock;

/// Time a requester may stay silent between requests before the stream is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub use crate::state::APPROVAL_TIMEOUT;
/// Bytes read from disk and sealed at once.
const PIECE: usize = 1024 * 1024;

/// Counts a stream served to one peer; released on drop.
struct Slot {
    inner: Arc<Inner>,
    peer: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.inner.serving).release(&self.peer);
    }
}

/// A slot to serve `peer`, unless [`crate::state::MAX_SERVING`] streams are served or
/// [`crate::state::MAX_STREAMS_PER_PEER`] to this peer.
fn take_slot(inner: &Arc<Inner>, peer: &str) -> Option<Slot> {
    if !lock(&inner.serving).take(peer) {
        return None;
    }
    Some(Slot {
        inner: Arc::clone(inner),
        peer: peer.to_owned(),
    })
}

/// Why a requester's line is not a request.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The line is not a request.
    #[error("bad request: {0}")]
    Malformed(#[from] serde_json::Error),
}

async fn read_request(stream: &mut DataStream) -> Result<Option<Request>, RequestError> {
    let line = match tokio::time::timeout(IDLE_TIMEOUT, stream.read_line(MAX_STREAM_LINE)).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) | Err(_) => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
    };
    Ok(Some(serde_json::from_slice(&line)?))
}

async fn refuse(stream: &mut DataStream, code: &str, detail: String) {
    let _ = stream
        .write_all(&msg::line(&Reply::error(code, detail)))
        .await;
    stream.shutdown().await;
}

/// Writes the stream state's refusal and closes the stream.
async fn refuse_with(stream: &mut DataStream, refusal: Refusal) {
    let _ = stream.write_all(&msg::line(&refusal.reply())).await;
    stream.shutdown().await;
}

/// Serves one stream until the requester closes it, goes idle, or errs.
pub(crate) async fn serve(inner: Arc<Inner>, mut stream: DataStream) {
    match stream.service() {
        msg::SERVICE => serve_requests(inner, stream).await,
        msg::DIAL_BACK_STREAM => take_offer(&inner, stream).await,
        _ => refuse(&mut stream, code::BAD_REQUEST, "unknown service".into()).await,
    }
}

/// A holder we asked to dial back opened this stream: hand it to the download waiting for
/// it, if the token is ours and the holder proved the key we expect.
async fn take_offer(inner: &Arc<Inner>, mut stream: DataStream) {
    let line = tokio::time::timeout(IDLE_TIMEOUT, stream.read_line(MAX_STREAM_LINE)).await;
    let Ok(Ok(Some(line))) = line else {
        return;
    };
    let Ok(Reply::Offer { token }) = serde_json::from_slice::<Reply>(&line) else {
        return refuse(&mut stream, code::BAD_REQUEST, "OFFER comes first".into()).await;
    };
    let waiting = lock(&inner.dial_backs).answered(&token);
    match waiting {
        Some((key, reply)) if key == stream.key() => {
            let _ = reply.send(stream);
        }
        _ => refuse(&mut stream, code::NOT_FOUND, "no such request".into()).await,
    }
}

/// Serves the requests of a stream: GET, then CHUNKS.
pub(crate) async fn serve_requests(inner: Arc<Inner>, mut stream: DataStream) {
    let peer = stream.peer_id().to_owned();
    // Streams are counted per key: a peer id costs nothing to change, a key proves itself.
    let Some(_slot) = take_slot(&inner, &stream.key().to_string()) else {
        return refuse(
            &mut stream,
            code::BUSY,
            "too many transfers; retry later".into(),
        )
        .await;
    };
    let hash = match read_request(&mut stream).await {
        Ok(Some(request)) => match AwaitingGet.on_request(request) {
            Ok(hash) => hash,
            Err(refusal) => return refuse_with(&mut stream, refusal).await,
        },
        Ok(None) => return,
        Err(e) => return refuse(&mut stream, code::BAD_REQUEST, e.to_string()).await,
    };
    let found = lock(&inner.store).by_hash(&hash);
    let (file, outboard) = match found {
        Ok(Some(found)) => found,
        Ok(None) => return refuse(&mut stream, code::NOT_FOUND, hash.to_hex()).await,
        Err(e) => return refuse(&mut stream, code::IO, e.to_string()).await,
    };
    let key = stream.key();
    if !inner
        .approve(&peer, Some(key), &file, Some(&mut stream))
        .await
    {
        tracing::info!(%peer, file = %file.name, "download refused by the approval policy");
        return refuse(
            &mut stream,
            code::DENIED,
            "the holder did not approve".into(),
        )
        .await;
    }
    let opened = match share::open_served(&file) {
        Ok(opened) => opened,
        Err(e @ share::ServeError::Changed(_)) => {
            return refuse(&mut stream, code::CHANGED, e.to_string()).await
        }
        Err(e) => return refuse(&mut stream, code::NOT_FOUND, e.to_string()).await,
    };
    let ok = Reply::Ok {
        size: file.size,
        outboard: outboard.len() as u64,
    };
    let mut head = msg::line(&ok);
    head.extend_from_slice(&outboard);
    if stream.write_all(&head).await.is_err() {
        return;
    }
    tracing::info!(%peer, file = %file.name, "serving");
    let started = std::time::Instant::now();
    let bytes = send_chunks(&inner, &mut stream, &file, &opened).await;
    if bytes > 0 {
        inner
            .emit(FilesEvent::Served {
                peer,
                name: file.name.clone(),
                size: file.size,
                bytes,
                seconds: started.elapsed().as_secs_f64(),
            })
            .await;
    }
}

/// Sends the chunks `stream` asks for until it ends or errs; the file's bytes sent.
async fn send_chunks(
    inner: &Inner,
    stream: &mut DataStream,
    file: &SharedFile,
    opened: &std::fs::File,
) -> u64 {
    let serving = Serving::new(file.size);
    let piece_max = PIECE.min(serving.layout().chunk as usize);
    let mut total = 0u64;
    loop {
        let chunks = match read_request(stream).await {
            Ok(Some(request)) => match serving.on_request(request) {
                Ok(chunks) => chunks,
                Err(refusal) => {
                    refuse_with(stream, refusal).await;
                    return total;
                }
            },
            Ok(None) => return total,
            Err(e) => {
                refuse(stream, code::BAD_REQUEST, e.to_string()).await;
                return total;
            }
        };
        for index in chunks {
            let (offset, len) = match serving.chunk(index) {
                Ok(range) => range,
                Err(refusal) => {
                    refuse_with(stream, refusal).await;
                    return total;
                }
            };
            let header = msg::line(&Reply::Data { chunk: index, len });
            if stream.queue(&header).is_err() {
                return total;
            }
            let mut sent = 0u64;
            while sent < len {
                let want = ((len - sent) as usize).min(piece_max);
                if let Some(throttle) = &inner.throttle {
                    throttle.take(want).await;
                }
                // The file is read straight into the frames that carry it.
                let mut at = offset + sent;
                let read = stream.queue_from(want, |frame| {
                    opened.read_exact_at(frame, at)?;
                    at += frame.len() as u64;
                    Ok(())
                });
                match read {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        refuse(stream, code::IO, format!("{}: {e}", file.name)).await;
                        return total;
                    }
                    Err(_) => return total,
                }
                if stream.flush().await.is_err() {
                    return total;
                }
                sent += want as u64;
                total += want as u64;
            }
        }
    }
}

/// Opens a stream back to `asker`, which cannot reach us, and serves `hash` on it
/// (directly at one of `addrs`, or spliced by the first of `relays` that is our
/// neighbour): only for content we share, with a policy that serves someone, within the
/// dial-back budget, to an asker proving `key`.
pub(crate) async fn dial_back(inner: &Arc<Inner>, asker: &str, request: DialBack) {
    let DialBack {
        hash,
        key,
        addrs,
        token,
        relays,
    } = request;
    let (Some(hash), Ok(key)) = (Hash::from_hex(&hash), PublicKey::parse(&key)) else {
        return;
    };
    if inner.config.approval == Approval::None
        || !matches!(lock(&inner.store).by_hash(&hash), Ok(Some(_)))
    {
        return;
    }
    if !lock(&inner.dial_backs).may_open_back() {
        tracing::warn!("dial-back request ignored: too many");
        return;
    }
    if let Some(relays) = relays {
        let Ok(snapshot) = inner.node.snapshot().await else {
            return;
        };
        let relay = relays.iter().take(msg::MAX_RELAYS).find(|relay| {
            snapshot
                .neighbours
                .iter()
                .any(|n| n.peer == **relay && n.teia && n.key.is_some())
        });
        let Some(relay) = relay else {
            tracing::debug!(%asker, "splice asked through no neighbour of ours");
            return;
        };
        match inner
            .node
            .accept_spliced_stream(relay, asker, &token, key)
            .await
        {
            Ok(stream) => serve_requests(Arc::clone(inner), stream).await,
            Err(e) => tracing::debug!(%relay, error = %e, "splice failed"),
        }
        return;
    }
    for addr in addrs
        .iter()
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .take(4)
    {
        match inner
            .node
            .open_stream(addr, msg::DIAL_BACK_STREAM, Some(key))
            .await
        {
            Ok(mut stream) => {
                let offer = msg::line(&msg::Reply::Offer { token });
                if stream.write_all(&offer).await.is_ok() {
                    serve_requests(Arc::clone(inner), stream).await;
                }
                return;
            }
            Err(e) => tracing::debug!(%addr, error = %e, "dial-back failed"),
        }
    }
}
