//! Fake servers: any tonic service on a port-0 listener, stopped on drop, and
//! one fake SessionStore that keeps each request's metadata and either
//! answers as told ([`Stub`], for the client's retry and header tests) or
//! relays to a real server ([`Relay`], for the near-cache's races: it can
//! hold an answer, and mute or alter the revocation stream).

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use session_client::SessionClient;
use sessionstore::v1::{
    self as pb,
    session_store_server::{SessionStore, SessionStoreServer},
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, oneshot, watch},
};
use tokio_stream::StreamExt;
use tonic::{
    Code, Request, Response, Status,
    metadata::MetadataMap,
    service::Routes,
    transport::{Server, server::TcpIncoming},
};

use super::{rpc::Client, server::TestServer};

/// A tonic server of fake services on a port-0 listener bound before it is
/// spawned, stopped when dropped.
#[derive(Debug)]
pub(crate) struct FakeServer {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeServer {
    /// Serves `routes` (e.g. `Routes::new(SessionStoreServer::new(fake))`).
    pub(crate) async fn start(routes: Routes) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            stop: Some(stop),
        }
    }

    /// Its `http://` URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How the stub answers every call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Behaviour {
    /// Calls (of any method) answered UNAVAILABLE before `then` applies.
    pub(crate) unavailable_first: u32,
    /// The answer after those: `Code::Ok` for a default response, else that code.
    pub(crate) then: Code,
}

impl Behaviour {
    pub(crate) fn unavailable_forever() -> Self {
        Self {
            unavailable_first: u32::MAX,
            then: Code::Unavailable,
        }
    }

    pub(crate) fn ok() -> Self {
        Self {
            unavailable_first: 0,
            then: Code::Ok,
        }
    }
}

/// A fake SessionStore that only counts requests, keeps their metadata and
/// answers as its [`Behaviour`] says.
pub(crate) struct Stub {
    pub(crate) server: FakeServer,
    state: Arc<FakeState>,
}

impl Stub {
    /// What GetUserSessionCount answers when it succeeds.
    pub(crate) const COUNT: u32 = 7;

    pub(crate) async fn start(behaviour: Behaviour) -> Self {
        let (server, state) = FakeState::serve(Answers::Stub(behaviour), false).await;
        Self { server, state }
    }

    pub(crate) fn url(&self) -> String {
        self.server.url()
    }

    /// A client builder for this stub, with tiny backoffs so retries are
    /// quick, and a retry budget large enough not to interfere.
    pub(crate) fn client(&self) -> session_client::Builder {
        SessionClient::builder(self.url())
            .initial_backoff(Duration::from_millis(1))
            .max_backoff(Duration::from_millis(5))
            .retry_throttling(1000, 1.0)
    }

    /// How many requests for `method` arrived.
    pub(crate) fn calls(&self, method: &str) -> usize {
        let requests = self.state.requests.lock().unwrap();
        requests.iter().filter(|(m, _)| *m == method).count()
    }

    /// The metadata of every request, in arrival order.
    pub(crate) fn metadata(&self) -> Vec<MetadataMap> {
        let requests = self.state.requests.lock().unwrap();
        requests.iter().map(|(_, m)| m.clone()).collect()
    }
}

/// The fake SessionStore in front of a real server: it forwards every call
/// and the revocation stream, and can hold one answer of a method (already
/// read from the server) or drop the stream's messages while keeping it open,
/// a stream that silently stopped delivering.
pub(crate) struct Relay {
    server: FakeServer,
    state: Arc<FakeState>,
}

impl Relay {
    /// A relay to `server`.
    pub(crate) async fn start(server: &TestServer) -> Self {
        Self::start_with(server, false).await
    }

    /// A relay whose stream tells no Redis clock, as a server older than
    /// `redis_time`.
    pub(crate) async fn start_timeless(server: &TestServer) -> Self {
        Self::start_with(server, true).await
    }

    async fn start_with(server: &TestServer, timeless: bool) -> Self {
        let upstream = Answers::Relay(server.client().await);
        let (server, state) = FakeState::serve(upstream, timeless).await;
        Self { server, state }
    }

    pub(crate) fn url(&self) -> String {
        self.server.url()
    }

    /// From now on, the stream's messages are dropped.
    pub(crate) fn mute(&self) {
        self.state.muted.send_replace(true);
    }

    /// Holds the next answer to `method` (e.g. "GetSession": the server has
    /// answered) until [`Held::release`].
    pub(crate) fn hold_next(&self, method: &'static str) -> Held {
        let (read, read_rx) = oneshot::channel();
        let release = Arc::new(Semaphore::new(0));
        let hold = Hold {
            read,
            release: release.clone(),
        };
        self.state.holds.lock().unwrap().insert(method, hold);
        Held {
            read: Some(read_rx),
            release,
        }
    }
}

/// The relay's side of a held answer.
struct Hold {
    read: oneshot::Sender<()>,
    release: Arc<Semaphore>,
}

/// The test's side of a held answer.
pub(crate) struct Held {
    read: Option<oneshot::Receiver<()>>,
    release: Arc<Semaphore>,
}

impl Held {
    /// Waits until the server has answered the held call.
    pub(crate) async fn read(&mut self) {
        let read = self.read.take().expect("read once");
        tokio::time::timeout(Duration::from_secs(15), read)
            .await
            .expect("no call reached the relay")
            .unwrap();
    }

    /// Lets the held answer go to the client.
    pub(crate) fn release(&self) {
        self.release.add_permits(1);
    }
}

/// Where the fake's answers come from.
enum Answers {
    Stub(Behaviour),
    Relay(Client),
}

struct FakeState {
    answers: Answers,
    answered: AtomicU32,
    requests: Mutex<Vec<(&'static str, MetadataMap)>>,
    /// Answers to hold, by method, each once.
    holds: Mutex<HashMap<&'static str, Hold>>,
    muted: watch::Sender<bool>,
    /// The stream's messages lose `redis_time`, as from a server older than
    /// the field.
    timeless: bool,
}

impl FakeState {
    async fn serve(answers: Answers, timeless: bool) -> (FakeServer, Arc<Self>) {
        let state = Arc::new(Self {
            answers,
            answered: AtomicU32::new(0),
            requests: Mutex::new(Vec::new()),
            holds: Mutex::new(HashMap::new()),
            muted: watch::channel(false).0,
            timeless,
        });
        let service = SessionStoreServer::new(FakeService(state.clone()));
        (FakeServer::start(Routes::new(service)).await, state)
    }

    /// Records the request's metadata.
    fn record<T>(&self, method: &'static str, request: &Request<T>) {
        let metadata = request.metadata().clone();
        self.requests.lock().unwrap().push((method, metadata));
    }

    /// As a stub: whether to answer OK (else the error to answer).
    fn behave(&self, behaviour: Behaviour) -> Result<(), Status> {
        let n = self.answered.fetch_add(1, Ordering::SeqCst);
        if n < behaviour.unavailable_first {
            return Err(Status::unavailable("stub: unavailable"));
        }
        match behaviour.then {
            Code::Ok => Ok(()),
            code => Err(Status::new(code, "stub")),
        }
    }

    /// Waits for the test's release when an answer to `method` is to be
    /// held (once).
    async fn held(&self, method: &'static str) {
        let hold = self.holds.lock().unwrap().remove(method);
        if let Some(hold) = hold {
            let _ = hold.read.send(());
            hold.release.acquire().await.unwrap().forget();
        }
    }

    /// The revocation stream: pending for a stub, the server's (muted or
    /// stripped of its clock as told) for a relay.
    async fn watch(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<RevocationStream, Status> {
        let mut upstream = match &self.answers {
            Answers::Stub(behaviour) => {
                self.behave(*behaviour)?;
                return Ok(Box::pin(tokio_stream::pending()));
            }
            Answers::Relay(upstream) => upstream.clone(),
        };
        let messages = upstream
            .watch_revocations(request.into_inner())
            .await?
            .into_inner();
        let muted = self.muted.subscribe();
        let timeless = self.timeless;
        let relayed = messages
            .filter(move |_| !*muted.borrow())
            .map(move |message| {
                message.map(|mut message| {
                    if timeless {
                        message.redis_time = None;
                    }
                    message
                })
            });
        Ok(Box::pin(relayed))
    }
}

type RevocationStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchRevocationsResponse, Status>> + Send>>;

struct FakeService(Arc<FakeState>);

/// Implements every unary method of SessionStore the one way: record the
/// request, then answer as the stub's behaviour says (with the given answer
/// when OK) or relay to the server, and hold the answer if the test asked.
macro_rules! fake_session_store {
    ($($name:literal: $method:ident($request:ident) -> $response:ident = $stubbed:expr;)*) => {
        #[tonic::async_trait]
        impl SessionStore for FakeService {
            $(
                async fn $method(
                    &self,
                    request: Request<pb::$request>,
                ) -> Result<Response<pb::$response>, Status> {
                    let state = &self.0;
                    state.record($name, &request);
                    let answer = match &state.answers {
                        Answers::Stub(behaviour) => {
                            state.behave(*behaviour)?;
                            Response::new($stubbed)
                        }
                        Answers::Relay(upstream) => {
                            upstream.clone().$method(request.into_inner()).await?
                        }
                    };
                    state.held($name).await;
                    Ok(answer)
                }
            )*

            async fn watch_revocations(
                &self,
                request: Request<pb::WatchRevocationsRequest>,
            ) -> Result<Response<tonic::codegen::BoxStream<pb::WatchRevocationsResponse>>, Status> {
                let state = &self.0;
                state.record("WatchRevocations", &request);
                Ok(Response::new(Box::pin(state.watch(request).await?)))
            }
        }
    };
}

fake_session_store! {
    "CreateSession": create_session(CreateSessionRequest) -> CreateSessionResponse = Default::default();
    "GetSession": get_session(GetSessionRequest) -> GetSessionResponse = Default::default();
    "RevokeSession": revoke_session(RevokeSessionRequest) -> RevokeSessionResponse = Default::default();
    "RevokeAllUserSessions": revoke_all_user_sessions(RevokeAllUserSessionsRequest) -> RevokeAllUserSessionsResponse = Default::default();
    "RotateSession": rotate_session(RotateSessionRequest) -> RotateSessionResponse = Default::default();
    "ExtendSession": extend_session(ExtendSessionRequest) -> ExtendSessionResponse = Default::default();
    "GetUserSessionCount": get_user_session_count(GetUserSessionCountRequest) -> GetUserSessionCountResponse = pb::GetUserSessionCountResponse { count: Stub::COUNT };
    "ListUserSessions": list_user_sessions(ListUserSessionsRequest) -> ListUserSessionsResponse = Default::default();
    "RecordLoginAttempt": record_login_attempt(RecordLoginAttemptRequest) -> RecordLoginAttemptResponse = pb::RecordLoginAttemptResponse { allowed: true, ..Default::default() };
    "ResetLoginAttempts": reset_login_attempts(ResetLoginAttemptsRequest) -> ResetLoginAttemptsResponse = Default::default();
    "ForgetLoginDevices": forget_login_devices(ForgetLoginDevicesRequest) -> ForgetLoginDevicesResponse = Default::default();
}
