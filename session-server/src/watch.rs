//! The WatchRevocations response stream: one broadcast receiver of the
//! store's revocation subscriber, turned into messages. Whatever is ready when
//! the transport asks for the next message goes into one message, so a burst
//! of revocations costs a receiver a few messages rather than one each.
//! Resets and heartbeats carry Redis's clock (`redis_time`), read from the
//! heartbeat that proved the subscription as the message is built (see
//! `store::RedisClock`).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use sessionstore::v1 as pb;
use tokio_stream::{
    Stream,
    wrappers::{BroadcastStream, errors::BroadcastStreamRecvError},
};
use tonic::Status;

use crate::{
    convert,
    metrics::REVOCATION_WATCHERS_DROPPED,
    store::{REVOCATION_BACKLOG, RedisClock, RevocationEvent, RevocationFeed},
};

/// Most revocations in one message (about 60 bytes each on the wire).
const MAX_BATCH: usize = 512;

/// A receiver's WatchRevocations responses.
#[derive(Debug)]
pub struct RevocationStream {
    events: BroadcastStream<RevocationEvent>,
    /// False until the stream's reset was sent: at once when the server's
    /// subscription was proven alive at open (a heartbeat came back within
    /// the last one and a half beats), else with the next proof (a reset or a
    /// heartbeat). Nothing before it is sent.
    started: bool,
    /// The first message goes out without waiting for an event.
    reset_now: bool,
    /// The clock of the proof behind `reset_now`.
    clock: Option<RedisClock>,
    done: bool,
}

impl RevocationStream {
    /// The stream of `feed`.
    pub fn new(feed: RevocationFeed) -> Self {
        Self {
            events: BroadcastStream::new(feed.events),
            started: false,
            reset_now: feed.subscribed,
            clock: feed.clock,
            done: false,
        }
    }
}

impl Stream for RevocationStream {
    type Item = Result<pb::WatchRevocationsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let mut message = pb::WatchRevocationsResponse::default();
        let mut ready = false;
        // The latest clock reading among the events taken into this message.
        let mut clock = None;
        if std::mem::take(&mut this.reset_now) {
            this.started = true;
            message.reset = true;
            clock = this.clock.take();
            ready = true;
        }
        while message.revocations.len() + message.shortened.len() < MAX_BATCH {
            match Pin::new(&mut this.events).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => match event {
                    RevocationEvent::Reset(reading) => {
                        // What came before the reset is moot: receivers drop
                        // everything they cached.
                        this.started = true;
                        message.revocations.clear();
                        message.shortened.clear();
                        message.reset = true;
                        // The new subscription's clock (perhaps another
                        // master's, after a failover) replaces the old one's.
                        clock = reading;
                        ready = true;
                    }
                    // A stream opened while the subscription was unproven
                    // starts with the first proof that it works.
                    RevocationEvent::Heartbeat(reading) if !this.started => {
                        this.started = true;
                        message.reset = true;
                        clock = reading;
                        ready = true;
                    }
                    RevocationEvent::Heartbeat(reading) => {
                        clock = reading.or(clock);
                        ready = true;
                    }
                    RevocationEvent::Revoked(revocation) if this.started => {
                        message
                            .revocations
                            .push(convert::revocation_to_proto(&revocation));
                        ready = true;
                    }
                    RevocationEvent::Revoked(_) => {}
                    RevocationEvent::Shortened(shortened) if this.started => {
                        message
                            .shortened
                            .push(convert::shortened_to_proto(&shortened));
                        ready = true;
                    }
                    RevocationEvent::Shortened(_) => {}
                },
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    this.done = true;
                    metrics::counter!(REVOCATION_WATCHERS_DROPPED).increment(1);
                    tracing::info!(
                        missed,
                        "revocation stream: dropped a receiver that fell behind"
                    );
                    return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                        "the revocation stream's receiver fell more than {REVOCATION_BACKLOG} events behind \
                         and missed {missed}; reconnect (the new stream starts with a reset)"
                    )))));
                }
                // The subscriber never stops while a receiver is open; should
                // it end, so does the stream, and the receiver reconnects.
                Poll::Ready(None) => {
                    this.done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if ready {
            message.redis_time = clock.map(|clock| clock.now().into());
            Poll::Ready(Some(Ok(message)))
        } else if this.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}
