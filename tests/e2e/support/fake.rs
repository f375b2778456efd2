//! Fake servers: any tonic service on a port-0 listener, stopped on drop, and
//! a SessionStore that only counts requests, keeps their metadata and answers
//! as told, for the client's retry and header tests.

use std::{
    net::SocketAddr,
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
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{
    Code, Request, Response, Status,
    metadata::MetadataMap,
    service::Routes,
    transport::{Server, server::TcpIncoming},
};

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

/// A tonic server implementing SessionStore that only counts requests, keeps
/// their metadata and answers as its [`Behaviour`] says.
pub(crate) struct Stub {
    pub(crate) server: FakeServer,
    state: Arc<StubState>,
}

#[derive(Debug)]
struct StubState {
    behaviour: Behaviour,
    answered: AtomicU32,
    requests: Mutex<Vec<(&'static str, MetadataMap)>>,
}

impl Stub {
    /// What GetUserSessionCount answers when it succeeds.
    pub(crate) const COUNT: u32 = 7;

    pub(crate) async fn start(behaviour: Behaviour) -> Self {
        let state = Arc::new(StubState {
            behaviour,
            answered: AtomicU32::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let service = SessionStoreServer::new(StubService(state.clone()));
        let server = FakeServer::start(Routes::new(service)).await;
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

struct StubService(Arc<StubState>);

impl StubService {
    /// Records the request and says whether to answer OK.
    fn answer<T>(&self, method: &'static str, request: &Request<T>) -> Result<(), Status> {
        let state = &self.0;
        state
            .requests
            .lock()
            .unwrap()
            .push((method, request.metadata().clone()));
        let behaviour = state.behaviour;
        let n = state.answered.fetch_add(1, Ordering::SeqCst);
        if n < behaviour.unavailable_first {
            return Err(Status::unavailable("stub: unavailable"));
        }
        match behaviour.then {
            Code::Ok => Ok(()),
            code => Err(Status::new(code, "stub")),
        }
    }
}

#[tonic::async_trait]
impl SessionStore for StubService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        self.answer("CreateSession", &request)?;
        Ok(Response::new(pb::CreateSessionResponse::default()))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        self.answer("GetSession", &request)?;
        Ok(Response::new(pb::GetSessionResponse::default()))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        self.answer("RevokeSession", &request)?;
        Ok(Response::new(pb::RevokeSessionResponse::default()))
    }

    async fn revoke_all_user_sessions(
        &self,
        request: Request<pb::RevokeAllUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeAllUserSessionsResponse>, Status> {
        self.answer("RevokeAllUserSessions", &request)?;
        Ok(Response::new(pb::RevokeAllUserSessionsResponse::default()))
    }

    async fn rotate_session(
        &self,
        request: Request<pb::RotateSessionRequest>,
    ) -> Result<Response<pb::RotateSessionResponse>, Status> {
        self.answer("RotateSession", &request)?;
        Ok(Response::new(pb::RotateSessionResponse::default()))
    }

    async fn extend_session(
        &self,
        request: Request<pb::ExtendSessionRequest>,
    ) -> Result<Response<pb::ExtendSessionResponse>, Status> {
        self.answer("ExtendSession", &request)?;
        Ok(Response::new(pb::ExtendSessionResponse::default()))
    }

    async fn get_user_session_count(
        &self,
        request: Request<pb::GetUserSessionCountRequest>,
    ) -> Result<Response<pb::GetUserSessionCountResponse>, Status> {
        self.answer("GetUserSessionCount", &request)?;
        Ok(Response::new(pb::GetUserSessionCountResponse {
            count: Stub::COUNT,
        }))
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Result<Response<pb::ListUserSessionsResponse>, Status> {
        self.answer("ListUserSessions", &request)?;
        Ok(Response::new(pb::ListUserSessionsResponse::default()))
    }

    async fn record_login_attempt(
        &self,
        request: Request<pb::RecordLoginAttemptRequest>,
    ) -> Result<Response<pb::RecordLoginAttemptResponse>, Status> {
        self.answer("RecordLoginAttempt", &request)?;
        Ok(Response::new(pb::RecordLoginAttemptResponse {
            allowed: true,
            ..Default::default()
        }))
    }

    async fn reset_login_attempts(
        &self,
        request: Request<pb::ResetLoginAttemptsRequest>,
    ) -> Result<Response<pb::ResetLoginAttemptsResponse>, Status> {
        self.answer("ResetLoginAttempts", &request)?;
        Ok(Response::new(pb::ResetLoginAttemptsResponse::default()))
    }

    async fn forget_login_devices(
        &self,
        request: Request<pb::ForgetLoginDevicesRequest>,
    ) -> Result<Response<pb::ForgetLoginDevicesResponse>, Status> {
        self.answer("ForgetLoginDevices", &request)?;
        Ok(Response::new(pb::ForgetLoginDevicesResponse::default()))
    }
    type WatchRevocationsStream =
        tokio_stream::Pending<Result<pb::WatchRevocationsResponse, Status>>;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        self.answer("WatchRevocations", &request)?;
        Ok(Response::new(tokio_stream::pending()))
    }
}
