//! One task per connection: handshake checks, the session's message loop, and
//! update streams read into pooled buffers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fedquic_net::io::{
    IoError, read_message, read_message_sized, read_tensor_body_with_norm, read_tensor_header,
    send_encoded, send_shared_tensors, write_message,
};
use fedquic_protocol::{
    Codec, Hello, Message, PROTOCOL_VERSION, Reject, StreamKind, TensorHeader, Welcome,
    negotiate_codec, negotiate_version,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Shared;
use super::hub::{QueuedControl, ToHub};
use crate::engine::{ClientId, RejectCause};
use crate::logging::{MAX_LOGGED_CHARS, sanitize};
use crate::metrics::HandshakeRefusal;

pub(super) enum ToConn {
    /// A fit or evaluate task, followed by the global model on its own stream.
    Task {
        message: Message,
        header: TensorHeader,
        model: ModelBody,
    },
    Send(Message),
    Close {
        reason: String,
        finished: bool,
    },
}

/// A model on its way to clients, shared by every transfer of it.
#[derive(Clone)]
pub(super) enum ModelBody {
    /// f32: the values are their own encoding.
    F32(Arc<Vec<f32>>),
    /// Encoded once (f16, bf16) for every client on that codec.
    Encoded(bytes::Bytes),
}

/// The codecs for a client: the aggregator's first choice it offers, each way.
fn negotiate_codecs(shared: &Shared, hello: &Hello) -> Result<(Codec, Codec), String> {
    let pick = |what: &str, preference: &[Codec]| {
        negotiate_codec(preference, &hello.codecs).ok_or_else(|| {
            let list = |l: &[Codec]| {
                l.iter()
                    .map(Codec::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "no common {what} codec: the client offers [{}], the aggregator allows [{}]",
                list(&hello.codecs),
                list(preference)
            )
        })
    };
    Ok((
        pick("uplink", &shared.codecs.uplink)?,
        pick("downlink", &shared.codecs.downlink)?,
    ))
}

pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    admission: Arc<fedquic_net::admission::Admission>,
) {
    while let Some(incoming) = endpoint.accept().await {
        // Retry, the handshake cap, the handshake timeout and rate-limited
        // refusal logs live in net's Admission; a flood spawns no task.
        let started = shared.revocation.as_ref().map(|r| r.handshake_start());
        let Some(handshake) = admission.screen(incoming) else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Some(conn) = handshake.complete().await {
                serve_connection(conn, shared, started).await;
            }
        });
    }
}

/// Decrements the connected-clients count however the connection ends.
struct ConnectedGuard<'a>(&'a AtomicUsize);
impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    started: Option<fedquic_net::revocation::HandshakeStart>,
) {
    let remote = conn.remote_address();
    let Some(client) = fedquic_net::tls::peer_name(&conn) else {
        warn!(%remote, "refused connection: client certificate has no usable name");
        shared.metrics.handshake_refused(HandshakeRefusal::NoName);
        conn.close(1u32.into(), b"certificate has no name");
        return;
    };
    // Until the session ends: a CRL reload that revokes the certificate, or
    // its expiry, closes the connection.
    let _watch = shared
        .revocation
        .as_ref()
        .zip(started)
        .map(|(r, started)| r.watch(&conn, started));
    let (mut send, mut recv, (backend, (uplink, downlink))) = match tokio::time::timeout(
        shared.handshake_timeout,
        async {
            let (send, mut recv) = conn.accept_bi().await?;
            let hello = read_message(&mut recv).await?;
            Ok::<_, IoError>((send, recv, hello))
        },
    )
    .await
    {
        Ok(Ok((send, recv, Some(Message::Hello(hello))))) => {
            let agreed = negotiate_version(&hello.versions)
                .map_err(|e| (HandshakeRefusal::Version, e.to_string()))
                .and_then(|_| {
                    hello
                        .validate()
                        .map_err(|e| (HandshakeRefusal::BadHello, e.to_string()))
                })
                .and_then(|()| {
                    negotiate_codecs(&shared, &hello).map_err(|e| (HandshakeRefusal::Codec, e))
                });
            match agreed {
                Ok(codecs) => (send, recv, (hello.backend, codecs)),
                Err((refusal, e)) => {
                    shared.metrics.handshake_refused(refusal);
                    let mut send = send;
                    reject(&conn, &mut send, &client, &e, None).await;
                    return;
                }
            }
        }
        Ok(Ok((mut send, _, other))) => {
            shared.metrics.handshake_refused(HandshakeRefusal::NoHello);
            let what = other
                .map(|m| format!("{m:?}"))
                .unwrap_or_else(|| "end of stream".into());
            reject(
                &conn,
                &mut send,
                &client,
                &format!("expected Hello, got {what:.60}"),
                None,
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            shared.metrics.handshake_refused(HandshakeRefusal::NoHello);
            warn!(%client, %remote, error = %e, "refused connection during hello");
            return;
        }
        Err(_) => {
            shared
                .metrics
                .handshake_refused(HandshakeRefusal::HelloTimeout);
            warn!(%client, %remote, "refused connection: no hello within the handshake timeout");
            conn.close(2u32.into(), b"handshake timeout");
            return;
        }
    };
    if shared
        .allowlist
        .as_ref()
        .is_some_and(|names| !names.contains(&client))
    {
        shared
            .metrics
            .handshake_refused(HandshakeRefusal::Allowlist);
        reject(
            &conn,
            &mut send,
            &client,
            &format!("client '{client}' is not on the aggregator's allowlist"),
            None,
        )
        .await;
        return;
    }
    let count = shared.connected.fetch_add(1, Ordering::Relaxed) + 1;
    let _guard = ConnectedGuard(&shared.connected);
    if count > shared.max_clients {
        shared.metrics.handshake_refused(HandshakeRefusal::Full);
        let reason = format!(
            "aggregator is full ({} clients connected)",
            shared.max_clients
        );
        reject(&conn, &mut send, &client, &reason, Some(5_000)).await;
        return;
    }
    let welcome = Message::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        uplink,
        downlink,
        model_spec: shared.model_spec.clone(),
        client_name: client.clone(),
        run: shared.run_id.clone(),
    });
    if let Err(e) = write_message(&mut send, &welcome).await {
        warn!(%client, error = %e, "lost connection while welcoming");
        return;
    }
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let (to_conn, mut commands) = mpsc::unbounded_channel();
    if shared
        .hub
        .send(ToHub::Joined {
            client: client.clone(),
            conn_id,
            handle: to_conn,
            backend: backend.clone(),
            uplink,
            downlink,
        })
        .is_err()
    {
        return;
    }
    info!(%client, %remote, %backend, %uplink, %downlink, "client connected");

    // Every task this session starts (the control-stream reader, update
    // receivers) lives in `tasks` and is aborted when the session ends, so
    // nothing keeps the connection alive after it; model transfers are
    // polled by the loop itself and dropped with it.
    let mut tasks = JoinSet::new();
    // The control stream is read by its own task: reads are not cancel-safe
    // inside select!, channel receives are.
    let (msg_tx, mut messages) = mpsc::channel(16);
    tasks.spawn(async move {
        loop {
            let msg = read_message_sized(&mut recv).await;
            let stop = !matches!(msg, Ok(Some(_)));
            if msg_tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });

    // The model transfer in progress and the next one, if any: each holds
    // a model version, so a client that does not take its models must not
    // make them pile up (see `model_transfer`).
    let mut transfer: Option<ModelTransfer> = None;
    let queued = Arc::new(tokio::sync::Semaphore::new(MAX_QUEUED_CONTROL));
    let mut waiting: Option<(TensorHeader, ModelBody)> = None;
    let end_reason: String = loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(ToConn::Task { message, header, model }) => {
                    if transfer.is_some() && waiting.is_some() {
                        let reason = "client is not taking its models: a third task came \
                                      while two model transfers were pending".to_string();
                        warn!(%client, %reason, "closing the session");
                        break reason;
                    }
                    if let Err(e) = write_message(&mut send, &message).await {
                        break format!("write failed: {e}");
                    }
                    // Models go one at a time, in task order (the client
                    // takes each task's model stream in turn).
                    match transfer {
                        None => transfer = Some(model_transfer(&conn, &shared, header, model)),
                        Some(_) => waiting = Some((header, model)),
                    }
                }
                Some(ToConn::Send(message)) => {
                    if let Err(e) = write_message(&mut send, &message).await {
                        break format!("write failed: {e}");
                    }
                }
                Some(ToConn::Close { reason, finished }) => {
                    let _ = write_message(&mut send, &Message::Bye { reason: reason.clone(), finished }).await;
                    let _ = send.finish();
                    // Wait (briefly) for the client to close, so the goodbye is delivered.
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    break reason;
                }
                None => break "aggregator stopped".into(),
            },
            msg = messages.recv() => match msg {
                Some(Ok(Some((Message::EvalResult(result), _)))) => {
                    let Some(_queued) = queue_slot(&queued).await else { break "aggregator stopped".into() };
                    let _ = shared.hub.send(ToHub::Eval { client: client.clone(), conn_id, result, _queued });
                }
                Some(Ok(Some((Message::TaskFailed { task_id, reason }, _)))) => {
                    let Some(_queued) = queue_slot(&queued).await else { break "aggregator stopped".into() };
                    let _ = shared.hub.send(ToHub::TaskFailed { client: client.clone(), conn_id, task_id, reason, _queued });
                }
                Some(Ok(Some((Message::SecAgg { task_id, step }, bytes)))) => {
                    if let Err(e) = step.validate() {
                        let reason = format!("bad secure-aggregation step: {e}");
                        reject(&conn, &mut send, &client, &reason, None).await;
                        break reason;
                    }
                    let Some(_queued) = queue_slot(&queued).await else { break "aggregator stopped".into() };
                    let _ = shared.hub.send(ToHub::SecAgg { client: client.clone(), conn_id, task_id, step, bytes, _queued });
                }
                Some(Ok(Some((Message::Heartbeat, _)))) => {}
                Some(Ok(Some((Message::Bye { reason, .. }, _)))) => {
                    break format!("client said bye: {}", sanitize(&reason, 80));
                }
                Some(Ok(Some((other, _)))) => {
                    let reason = format!("unexpected message from client: {:.80}", format!("{other:?}"));
                    reject(&conn, &mut send, &client, &reason, None).await;
                    break reason;
                }
                Some(Ok(None)) | None => break "client closed the control stream".into(),
                Some(Err(e)) => {
                    if matches!(e, IoError::Protocol(_)) {
                        reject(&conn, &mut send, &client, &e.to_string(), None).await;
                    }
                    break e.to_string();
                }
            },
            uni = conn.accept_uni() => match uni {
                Ok(stream) => {
                    tasks.spawn(receive_update(stream, client.clone(), conn_id, uplink, Arc::clone(&shared)));
                }
                Err(e) => break format!("connection lost: {e}"),
            },
            (sent, deadline) = poll_transfer(&mut transfer), if transfer.is_some() => {
                transfer = None;
                match sent {
                    Ok(Ok(bytes)) => {
                        shared.bytes_down.fetch_add(bytes, Ordering::Relaxed);
                        shared.metrics.add_bytes_out(bytes);
                    }
                    // A client may stop a refused task's model stream.
                    Ok(Err(e)) => debug!(%client, error = %e, "model transfer failed"),
                    Err(_) => {
                        let reason = format!(
                            "client did not take the model within {:.0} s",
                            deadline.as_secs_f64()
                        );
                        warn!(%client, %reason, "closing the session");
                        break reason;
                    }
                }
                if let Some((header, model)) = waiting.take() {
                    transfer = Some(model_transfer(&conn, &shared, header, model));
                }
            },
            // Reap finished tasks so the set does not grow over a long session.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    };
    tasks.abort_all();
    conn.close(0u32.into(), b"session ended");
    info!(%client, reason = %sanitize(&end_reason, MAX_LOGGED_CHARS), "client disconnected");
    let _ = shared.hub.send(ToHub::Left { client, conn_id });
}

/// Most control messages (task failures, evaluation results, secure-aggregation
/// steps) of one session waiting for the hub at once. An honest client has a
/// handful in flight; past this the session stops reading its control stream
/// until the hub catches up, so a flood waits in the client's QUIC send buffer,
/// not in the aggregator's memory.
const MAX_QUEUED_CONTROL: usize = 16;

/// A place for one more control message in the hub's queue (see
/// [`MAX_QUEUED_CONTROL`]); waits while the session has them all in use.
async fn queue_slot(queued: &Arc<tokio::sync::Semaphore>) -> Option<QueuedControl> {
    Arc::clone(queued)
        .acquire_owned()
        .await
        .ok()
        .map(QueuedControl::new)
}

/// How a model transfer ended (`Err` when its time ran out), and the time
/// it was given.
type TransferEnd = (
    Result<Result<u64, IoError>, tokio::time::error::Elapsed>,
    Duration,
);
/// A model on its way to one client.
type ModelTransfer = Pin<Box<dyn Future<Output = TransferEnd> + Send>>;

/// How long a transfer of `bytes` either way may take: the upload grace plus
/// its size at the minimum upload rate (`limits.upload_grace_secs`,
/// `limits.min_upload_bytes_per_sec`).
fn transfer_deadline(shared: &Shared, bytes: u64) -> Duration {
    let at_rate =
        Duration::try_from_secs_f64(bytes as f64 / shared.min_upload_rate).unwrap_or(Duration::MAX);
    shared.upload_grace.saturating_add(at_rate)
}

/// Sends a task's model on its own stream. A client that never takes it
/// (never reads the stream, or allows no streams at all) would pin the model
/// for the whole session, so the transfer must finish within the upload rule
/// applied to the model's size: the upload grace plus its size at the
/// minimum upload rate.
fn model_transfer(
    conn: &quinn::Connection,
    shared: &Shared,
    header: TensorHeader,
    model: ModelBody,
) -> ModelTransfer {
    let deadline = transfer_deadline(shared, header.body_len);
    let conn = conn.clone();
    Box::pin(async move {
        let sent = tokio::time::timeout(deadline, async {
            match model {
                ModelBody::F32(values) => send_shared_tensors(&conn, &header, values).await,
                ModelBody::Encoded(body) => send_encoded(&conn, &header, body).await,
            }
        })
        .await;
        (sent, deadline)
    })
}

/// Awaits the transfer in progress (never resolves without one).
async fn poll_transfer(transfer: &mut Option<ModelTransfer>) -> TransferEnd {
    match transfer {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

async fn reject(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    client: &str,
    reason: &str,
    retry_after_ms: Option<u64>,
) {
    warn!(%client, reason = %sanitize(reason, MAX_LOGGED_CHARS), "rejecting client");
    let msg = Message::Reject(Reject {
        reason: reason.to_string(),
        retry_after_ms,
    });
    let _ = write_message(send, &msg).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    conn.close(3u32.into(), b"rejected");
}

/// QUIC error code on update streams the aggregator stops reading.
const STREAM_REFUSED: u32 = 1;

/// Resolves once the fit phase that `epoch` names has closed (or the hub is
/// gone): the upload is for a round that no longer collects updates.
async fn fit_phase_closed(mut epochs: watch::Receiver<u64>, epoch: u64) {
    loop {
        if *epochs.borrow_and_update() != epoch {
            return;
        }
        if epochs.changed().await.is_err() {
            return;
        }
    }
}

/// Reads one update stream into a pooled buffer, validating as it goes, and
/// hands it to the hub. The header must arrive within the header timeout,
/// and the hub must confirm that the round and task are current and that
/// this client owes this update and has no other upload in flight, before a
/// buffer is taken. The body is decoded with the session's uplink codec
/// straight into the buffer. The body must then arrive within its deadline, and the
/// read is cut off when the round closes. Nothing reaches the accumulator
/// unless the whole update arrived and passed every check.
async fn receive_update(
    mut stream: quinn::RecvStream,
    client: ClientId,
    conn_id: u64,
    uplink: Codec,
    shared: Arc<Shared>,
) {
    let fail = |task_id: Option<u64>, cause: RejectCause, reason: String| {
        let _ = shared.hub.send(ToHub::UpdateFailed {
            client: client.clone(),
            conn_id,
            task_id,
            cause,
            reason,
        });
    };
    let header = match tokio::time::timeout(
        shared.header_timeout,
        read_tensor_header(&mut stream, &shared.limits),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return fail(
                None,
                RejectCause::Malformed,
                format!("bad update header: {e}"),
            );
        }
        Err(_) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return fail(
                None,
                RejectCause::UploadTimeout,
                format!(
                    "no update header within {:.0} s",
                    shared.header_timeout.as_secs_f64()
                ),
            );
        }
    };
    if header.kind != StreamKind::Update {
        let _ = stream.stop(STREAM_REFUSED.into());
        return fail(
            Some(header.task_id),
            RejectCause::Malformed,
            "expected an update stream".into(),
        );
    }
    // With secure aggregation every update is a masked input.
    let uplink = match shared.secure_aggregation {
        true => Codec::Ring32,
        false => uplink,
    };
    if header.codec != uplink {
        let _ = stream.stop(STREAM_REFUSED.into());
        return fail(
            Some(header.task_id),
            RejectCause::Malformed,
            format!(
                "update encoded as {}, the session agreed on {uplink}",
                header.codec
            ),
        );
    }
    if let Err(e) = header.check_layout(&shared.update_layout) {
        let _ = stream.stop(STREAM_REFUSED.into());
        return fail(Some(header.task_id), RejectCause::Malformed, e.to_string());
    }
    let (reply_tx, reply_rx) = oneshot::channel();
    let asked = shared.hub.send(ToHub::UploadRequest {
        client: client.clone(),
        conn_id,
        round: header.round,
        task_id: header.task_id,
        reply: reply_tx,
    });
    let epoch = match (asked, reply_rx.await) {
        (Ok(()), Ok(Ok(epoch))) => epoch,
        // The hub refused (and told the client why), or is gone.
        _ => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return;
        }
    };
    let closed = fit_phase_closed(shared.fit_epochs.clone(), epoch);
    tokio::pin!(closed);
    let mut delta = tokio::select! {
        buffer = shared.pool.acquire() => match buffer {
            Some(b) => b,
            None => return,
        },
        _ = &mut closed => {
            let _ = stream.stop(STREAM_REFUSED.into());
            return;
        }
    };
    let deadline = transfer_deadline(&shared, header.body_len);
    let body = tokio::select! {
        body = tokio::time::timeout(deadline, read_tensor_body_with_norm(&mut stream, &header, &mut delta.buf)) => body,
        _ = &mut closed => {
            // The round closed while this upload was in flight: free the
            // buffer now, there is nothing to fold it into.
            let _ = stream.stop(STREAM_REFUSED.into());
            return;
        }
    };
    match body {
        Ok(Ok(norm)) => {
            shared
                .bytes_up
                .fetch_add(header.body_len, Ordering::Relaxed);
            shared.metrics.add_bytes_in(header.body_len);
            let _ = shared.hub.send(ToHub::Update {
                client: client.clone(),
                conn_id,
                header,
                delta,
                norm,
            });
        }
        Ok(Err(e)) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            fail(
                Some(header.task_id),
                RejectCause::Malformed,
                format!("update discarded: {e}"),
            );
        }
        Err(_) => {
            let _ = stream.stop(STREAM_REFUSED.into());
            fail(
                Some(header.task_id),
                RejectCause::UploadTimeout,
                format!(
                    "update of {} bytes not received within {:.0} s",
                    header.body_len,
                    deadline.as_secs_f64()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_queues_at_most_its_share_of_control_messages() {
        let queued = Arc::new(tokio::sync::Semaphore::new(MAX_QUEUED_CONTROL));
        let mut held = Vec::new();
        for _ in 0..MAX_QUEUED_CONTROL {
            held.push(queue_slot(&queued).await.expect("a free place"));
        }
        // The next message waits until the hub has handled one.
        let waiting = tokio::time::timeout(Duration::from_millis(50), queue_slot(&queued)).await;
        assert!(waiting.is_err(), "a 17th message was queued");
        drop(held.pop());
        let freed = tokio::time::timeout(Duration::from_secs(5), queue_slot(&queued)).await;
        assert!(matches!(freed, Ok(Some(_))));
    }
}
