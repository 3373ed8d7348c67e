//! Creating communicators: from a launcher's environment, from a unique id,
//! from a store the application brings, and as an in-process group.
//!
//! Ranks meet through a key-value store: each publishes the address of its
//! listening socket, connects to the next rank and accepts the previous one
//! (both handshakes checked, strays refused). Rank 0 serves the TCP store,
//! or the ranks share a directory ([`Config::file_store`]), or, under
//! torchrun, they are clients of the store torchrun's agent serves. Each ring
//! connection then offers shared memory ([`Config::transport`]): neighbours
//! on one host move their bytes through a mapped segment and keep the socket
//! as doorbell and death notice.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oxccl_transport::auth::JobSecret;
use oxccl_transport::codec::{DecodeError, Reader, Writer};
use oxccl_transport::store::{
    FileStore, MemStore, PrefixStore, Store, StoreError, TcpStore, TcpStoreServer, TorchStore,
};
use oxccl_transport::tcp::{self, Listener, Parked, TcpOptions};
use std::os::unix::net::UnixStream;

use oxccl_transport::{MessageLink, StreamLink, TransportError, shm};

use crate::comm::{Communicator, Parts};
use crate::config::{self, Config, Launch, Rendezvous, Transport};
use crate::lazy::{Connector, LAZY, MakePair, MemConnector, TcpConnector};
use crate::links::Links;
use crate::upgrade::Upgrader;
use crate::{Error, Result};

/// Prefix of every key oxccl writes to a store.
const PREFIX: &str = "oxccl";
/// The purpose code of ring connections in the handshake.
const RING: u32 = 1;
/// The purpose of a connection between two ranks that are not ring neighbours.
const PAIR: u32 = 2;

/// What every rank needs to find the others: the address of a store, a
/// job id and the job's secret. Rank 0 (or any one process) creates it and
/// hands it to the others, as with NCCL's `ncclGetUniqueId`. Its 128-byte
/// form crosses process boundaries ([`UniqueId::to_bytes`],
/// [`UniqueId::from_bytes`]); it holds the secret, so hand it over as a
/// secret (a pipe, MPI, a file only this user reads), not on a command
/// line. Its `Debug` form does not show the secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId {
    addr: SocketAddr,
    job: u64,
    /// The key of the job's secret, if it has one.
    secret: Option<[u8; 32]>,
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UniqueId")
            .field("addr", &self.addr)
            .field("job", &self.job)
            .field("secret", &self.secret.map(|_| ".."))
            .finish()
    }
}

/// Stores served by unique ids created in this process, oldest first,
/// until rank 0 of the id takes its own over.
static SERVED: Mutex<Vec<(u64, TcpStoreServer)>> = Mutex::new(Vec::new());

/// Communicators made so far from a launcher's environment, per rank 0's
/// store address and rank: each one's job id goes under its round, so that
/// a job that builds one after another on the same port (in the same order
/// on every rank, as frameworks re-initialise) never reads the job id of
/// an earlier round from rank 0's earlier store while that still serves.
/// Per rank too, because tests run several ranks of a job in one process.
static ROUNDS: Mutex<Vec<((SocketAddr, usize), u64)>> = Mutex::new(Vec::new());

/// This communicator's round at `master` for `rank` (0 for the first).
fn next_round(master: SocketAddr, rank: usize) -> u64 {
    let mut rounds = ROUNDS.lock().unwrap_or_else(|p| p.into_inner());
    match rounds.iter_mut().find(|(k, _)| *k == (master, rank)) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            rounds.push(((master, rank), 0));
            0
        }
    }
}

/// The most unique ids a process serves unclaimed: each costs a listening
/// socket and a thread, and an id that is made and never used (as NCCL's
/// `ncclGetUniqueId` allows) would otherwise keep them for the life of the
/// process. Beyond it the oldest unclaimed id stops being served, with a
/// warning; a communicator made from it then fails to reach its store.
const MAX_SERVED: usize = 64;

const ID_MAGIC: [u8; 8] = *b"OXCCLUID";

impl UniqueId {
    /// Size of the byte form.
    pub const LEN: usize = 128;

    /// Starts a store on `OXCCL_BOOTSTRAP_ADDR` (default 127.0.0.1) and
    /// returns its id. The id carries the job's secret: `OXCCL_JOB_SECRET`'s
    /// (or `OXCCL_JOB_SECRET_FILE`'s) if set, else a fresh random one; none
    /// with `OXCCL_AUTH=off`.
    pub fn new() -> Result<UniqueId> {
        let config = Config::from_env()?;
        let secret = match config.auth {
            config::AuthMode::Off => None,
            _ => Some(match config.job_secret {
                Some(s) => s,
                None => random_secret()?,
            }),
        };
        UniqueId::new_with(config.bootstrap_addr, secret)
    }

    /// Starts a store on `ip` (port chosen by the system) and returns its
    /// id, which carries a fresh random secret.
    pub fn new_on(ip: IpAddr) -> Result<UniqueId> {
        UniqueId::new_with(ip, Some(random_secret()?))
    }

    /// Starts a store on `ip` whose clients must know `secret` (none: an
    /// unauthenticated job) and returns its id, which carries it.
    pub fn new_with(ip: IpAddr, secret: Option<JobSecret>) -> Result<UniqueId> {
        let server = TcpStoreServer::bind_with_secret(SocketAddr::new(ip, 0), secret.clone())
            .map_err(|source| Error::Store { rank: 0, source })?;
        let id = UniqueId {
            addr: server.local_addr(),
            job: random_job()?,
            secret: secret.map(|s| *s.key()),
        };
        let evicted = {
            let mut served = SERVED.lock().unwrap_or_else(|p| p.into_inner());
            served.push((id.job, server));
            (served.len() > MAX_SERVED).then(|| served.remove(0))
        };
        // Dropped outside the lock: stopping a server waits for its thread.
        if let Some((job, old)) = evicted {
            tracing::warn!(
                "{MAX_SERVED} unique ids of this process are unclaimed: the oldest (job {job:#x}, store {}) is no longer served",
                old.local_addr()
            );
        }
        Ok(id)
    }

    /// The format's name in decoding errors.
    pub(crate) const FORMAT: &'static str = "unique id";

    /// The 128-byte form: magic, port (u16), address family (4 or 6), five
    /// bytes of padding, the address (16 bytes, an IPv4 one in the first 4),
    /// the job (u64), flags (u8: 1 when a secret follows, else 0), seven
    /// bytes of padding, the secret's key (32 bytes, zeros without one), and
    /// zeros up to 128 bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut w = Writer::with_capacity(Self::LEN);
        w.bytes(&ID_MAGIC).u16(self.addr.port());
        match self.addr.ip() {
            IpAddr::V4(v4) => w.u8(4).zeros(5).bytes(&v4.octets()).zeros(12),
            IpAddr::V6(v6) => w.u8(6).zeros(5).bytes(&v6.octets()),
        };
        w.u64(self.job);
        match &self.secret {
            Some(key) => w.u8(1).zeros(7).bytes(key),
            None => w.u8(0).zeros(7 + 32),
        };
        w.zeros(Self::LEN - 80);
        w.into_array()
    }

    /// Parses the 128-byte form; padding and reserved bytes are not checked.
    pub fn from_bytes(b: &[u8; Self::LEN]) -> Result<UniqueId> {
        UniqueId::parse(b).map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// An id of these parts, serving nothing (for tests of its byte form).
    #[cfg(test)]
    pub(crate) fn from_parts(addr: SocketAddr, job: u64, secret: Option<[u8; 32]>) -> UniqueId {
        UniqueId { addr, job, secret }
    }

    pub(crate) fn parse(b: &[u8; Self::LEN]) -> std::result::Result<UniqueId, DecodeError> {
        let mut r = Reader::new(Self::FORMAT, b);
        r.magic(&ID_MAGIC)?;
        let port = r.u16("port")?;
        let family = r.u8("address family")?;
        r.skip("padding", 5)?;
        let ip: [u8; 16] = r.array("address")?;
        let ip = match family {
            4 => IpAddr::from([ip[0], ip[1], ip[2], ip[3]]),
            6 => IpAddr::from(ip),
            f => {
                return Err(r.invalid("address family", format!("unknown address family {f}")));
            }
        };
        let job = r.u64("job")?;
        let flags = r.u8("flags")?;
        r.skip("padding", 7)?;
        let key: [u8; 32] = r.array("secret")?;
        let secret = match flags {
            0 => None,
            1 => Some(key),
            f => return Err(r.invalid("flags", format!("unknown flags {f:#04x}"))),
        };
        r.skip("reserved", Self::LEN - 80)?;
        r.finish()?;
        Ok(UniqueId {
            addr: SocketAddr::new(ip, port),
            job,
            secret,
        })
    }

    /// The store's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the id carries a job secret (its connections are authenticated).
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }
}

fn random_secret() -> Result<JobSecret> {
    JobSecret::random().map_err(|e| Error::Internal(e.to_string()))
}

fn random_job() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::Internal(format!("no randomness for a job id: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

impl Communicator {
    /// Creates this process's communicator from its launcher's environment
    /// (oxrun, torchrun, mpirun, srun; see [`config`](crate::config)).
    pub fn from_env() -> Result<Communicator> {
        let config = Config::from_env()?;
        let launch = config::launch_from_lookup(&config::ProcessEnv)?;
        Communicator::from_launch(&launch, config)
    }

    /// Creates a communicator for `launch` with `config`.
    pub fn from_launch(launch: &Launch, config: Config) -> Result<Communicator> {
        config.validate()?;
        let (rank, world) = (launch.rank, launch.world);
        let secret = if world == 1 {
            None
        } else {
            config.secret_in_use(None)?
        };
        tracing::info!(
            "rank {rank} of {world}: bootstrap from {} variables",
            launch.source
        );
        let deadline = crate::deadline_in(config.timeout);
        if world == 1 {
            return Communicator::with_store(Arc::new(MemStore::new()), rank, world, config);
        }
        if let Some(dir) = &config.file_store {
            // The directory holds addresses and settings, never the secret:
            // the ring links prove it to each other.
            let store =
                FileStore::new(dir.clone()).map_err(|source| Error::Store { rank, source })?;
            return Communicator::with_store(Arc::new(store), rank, world, config);
        }
        let Some((host, port)) = &launch.master else {
            return Err(Error::Config {
                variable: "OXCCL_MASTER_ADDR".into(),
                reason: format!(
                    "is not set (nor MASTER_ADDR), and a world of {world} needs the address of rank 0 (or OXCCL_FILE_STORE)"
                ),
            });
        };
        let master = (host.as_str(), *port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Error::Config {
                variable: "OXCCL_MASTER_ADDR".into(),
                reason: format!("cannot resolve '{host}'"),
            })?;
        if let Rendezvous::Torch { prefix } = &launch.rendezvous {
            return Communicator::through_torch_store(master, prefix, rank, world, config, secret);
        }
        let server = if rank == 0 {
            let server = serve_store(host, master, secret.clone())
                .map_err(|source| Error::Store { rank, source })?;
            server.limit_clients(client_limit(world));
            Some(server)
        } else {
            None
        };
        let key = format!("{PREFIX}/job/{}", next_round(master, rank));
        let (store, job) = loop {
            let store = TcpStore::connect_with_secret(master, deadline, secret.as_ref())
                .map_err(|source| Error::Store { rank, source })?;
            match job_id(&store, &key, rank, deadline) {
                Ok(job) => break (store, job),
                // An earlier round's store, which held no job id of this
                // round, closed: rank 0's store for this round takes the
                // port next.
                Err(Error::Store {
                    source: StoreError::Closed { .. },
                    ..
                }) if rank != 0 && Instant::now() < deadline => {
                    tracing::debug!(
                        "rank {rank}: the store at {master} closed before it held {key}; again"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        let local_ip = store.local_addr().ip();
        connect(
            Arc::new(store),
            server,
            rank,
            world,
            config,
            job,
            Some(local_ip),
            secret,
            Some(0),
            false,
        )
    }

    /// Rendezvous through a PyTorch `TCPStore` that serves at `master`
    /// already (torchrun's agent store), as one of its clients.
    ///
    /// Keys go under `prefix` and then under a count of the communicators
    /// this rank made through that store, so that a process that creates
    /// several communicators in turn (the same order on every rank) never
    /// reads an earlier one's job id.
    fn through_torch_store(
        master: SocketAddr,
        prefix: &str,
        rank: usize,
        world: usize,
        config: Config,
        secret: Option<JobSecret>,
    ) -> Result<Communicator> {
        let deadline = crate::deadline_in(config.timeout);
        let store_err = |source| Error::Store { rank, source };
        // Torch's store speaks torch's protocol, which has no place for
        // authentication: say so, once per communicator.
        tracing::warn!(
            "rank {rank}: torchrun's store at {master} is not authenticated (its protocol is \
             torch's); {}",
            if secret.is_some() {
                "ring links are, with the job secret"
            } else {
                "nor are ring links: no job secret (set OXCCL_JOB_SECRET on every rank)"
            }
        );
        let client = TorchStore::connect(master, deadline).map_err(store_err)?;
        let local_ip = client.local_addr().ip();
        let client: Arc<dyn Store> = Arc::new(client);
        let n = client
            .add(&format!("{prefix}/communicators/{rank}"), 1)
            .map_err(store_err)?;
        tracing::info!(
            "rank {rank}: rendezvous through torchrun's store at {master} (communicator {n} of this rank)"
        );
        let store: Arc<dyn Store> = Arc::new(PrefixStore::new(client, &format!("{prefix}/{n}")));
        let job = job_id(store.as_ref(), JOB_KEY, rank, deadline)?;
        connect(
            store,
            None,
            rank,
            world,
            config,
            job,
            Some(local_ip),
            secret,
            None,
            false,
        )
    }

    /// Creates rank `rank` of a world of `world` from a unique id (NCCL style).
    pub fn init(id: &UniqueId, rank: usize, world: usize) -> Result<Communicator> {
        Communicator::init_with_config(id, rank, world, Config::from_env()?)
    }

    /// [`init`](Self::init) with explicit settings.
    pub fn init_with_config(
        id: &UniqueId,
        rank: usize,
        world: usize,
        config: Config,
    ) -> Result<Communicator> {
        config.validate()?;
        check_rank(rank, world)?;
        let secret = config.secret_in_use(id.secret.map(JobSecret::from_key))?;
        let deadline = crate::deadline_in(config.timeout);
        let server = if rank == 0 {
            let mut served = SERVED.lock().unwrap_or_else(|p| p.into_inner());
            served
                .iter()
                .position(|(j, _)| *j == id.job)
                .map(|i| served.remove(i).1)
        } else {
            None
        };
        if let Some(server) = &server {
            server.limit_clients(client_limit(world));
        }
        let store = TcpStore::connect_with_secret(id.addr, deadline, secret.as_ref())
            .map_err(|source| Error::Store { rank, source })?;
        let local_ip = store.local_addr().ip();
        connect(
            Arc::new(store),
            server,
            rank,
            world,
            config,
            id.job,
            Some(local_ip),
            secret,
            None,
            false,
        )
    }

    /// Creates rank `rank` of `world` through a store the application brings
    /// (Gloo style). Every rank must pass a store that reaches the same data.
    pub fn with_store(
        store: Arc<dyn Store>,
        rank: usize,
        world: usize,
        config: Config,
    ) -> Result<Communicator> {
        config.validate()?;
        check_rank(rank, world)?;
        let secret = if world == 1 {
            None
        } else {
            config.secret_in_use(None)?
        };
        join(store, rank, world, config, secret, false)
    }

    /// Creates a group of `world` communicators in this process, connected by
    /// socket pairs, to be driven by one thread each.
    pub fn in_process(world: usize, config: Config) -> Result<Vec<Communicator>> {
        config.validate()?;
        if world == 0 {
            return Err(Error::InvalidArgument(
                "in_process: world must be at least 1".into(),
            ));
        }
        #[cfg(feature = "ucx")]
        if config.transport == Transport::Ucx {
            return Err(Error::InvalidUsage(
                "OXCCL_TRANSPORT=ucx links ranks in separate processes; an in-process group \
                 uses socket pairs (tcp) or shared memory (shm, auto)"
                    .into(),
            ));
        }
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let boot = |source| Error::Bootstrap { rank: 0, source };
        // Once for the world: it reads the host's CPUs.
        let crowded = crate::config::crowded(world);
        let make: Arc<MakePair> = if config.transport == Transport::Tcp {
            Arc::new(|a, b| {
                let (x, y) = UnixStream::pair()
                    .map_err(|e| TransportError::io("creating a socket pair", e))?;
                Ok((
                    Box::new(StreamLink::unix(b, x)?) as Box<dyn MessageLink>,
                    Box::new(StreamLink::unix(a, y)?) as Box<dyn MessageLink>,
                ))
            })
        } else {
            let (bytes, single_copy) =
                (config.shm_bytes, config.shm_single_copy.threshold(crowded));
            Arc::new(move |a, b| {
                let (mut x, mut y) = shm::pair(a, b, bytes)?;
                x.set_single_copy(single_copy);
                y.set_single_copy(single_copy);
                Ok((
                    Box::new(x) as Box<dyn MessageLink>,
                    Box::new(y) as Box<dyn MessageLink>,
                ))
            })
        };
        let links = if config.transport == Transport::Tcp {
            crate::links::in_process(world, |a, b| {
                let (x, y) = UnixStream::pair()
                    .map_err(|e| TransportError::io("creating a socket pair", e))?;
                Ok((StreamLink::unix(b, x)?, StreamLink::unix(a, y)?))
            })
        } else {
            let single_copy = config.shm_single_copy.threshold(crowded);
            crate::links::in_process(world, |a, b| {
                let (mut x, mut y) = shm::pair(a, b, config.shm_bytes)?;
                x.set_single_copy(single_copy);
                y.set_single_copy(single_copy);
                Ok((x, y))
            })
        }
        .map_err(boot)?;
        let left = Arc::new(Mutex::new(std::collections::HashMap::new()));
        links
            .into_iter()
            .enumerate()
            .map(|(rank, links)| {
                Communicator::assemble(Parts {
                    rank,
                    world,
                    config: config.clone(),
                    links,
                    store: store.clone(),
                    key_prefix: PREFIX.into(),
                    server: None,
                    refused: 0,
                    secret: None,
                    store_host: None,
                    crowded,
                    connector: (world > 1).then(|| {
                        Box::new(MemConnector {
                            rank,
                            left: left.clone(),
                            make: make.clone(),
                        }) as Box<dyn Connector>
                    }),
                })
            })
            .collect()
    }
}

/// Runs `f` on each rank of an in-process group of `world`, one thread per
/// rank, and returns the results in rank order.
pub fn run_in_process<T, F>(world: usize, config: Config, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&mut Communicator) -> T + Sync,
{
    let comms = Communicator::in_process(world, config)?;
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| s.spawn(move || f(&mut c)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .map_err(|_| Error::Internal(format!("in-process rank {r} panicked")))
            })
            .collect()
    })
}

fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} is not in a world of {world}"
        )));
    }
    Ok(())
}

/// Where rank 0 writes the job id in a store of one communicator's own.
const JOB_KEY: &str = "oxccl/job";

/// The job id of a group meeting through `store`: rank 0 makes one and
/// writes it at `key` first thing; the others read it.
fn job_id(store: &dyn Store, key: &str, rank: usize, deadline: Instant) -> Result<u64> {
    if rank == 0 {
        let job = random_job()?;
        store
            .set(key, &job.to_le_bytes())
            .map_err(|source| Error::Store { rank, source })?;
        return Ok(job);
    }
    read_job(store, key, rank, deadline)
}

pub(crate) fn read_job(
    store: &dyn Store,
    key: &str,
    rank: usize,
    deadline: Instant,
) -> Result<u64> {
    let v = match store.get(key, deadline) {
        Ok(v) => v,
        // Rank 0 writes the job id first thing: it never came.
        Err(StoreError::Timeout { waited, .. }) => {
            return Err(Error::Timeout {
                rank,
                call: "bootstrap".into(),
                what: format!(
                    "rank 0 to start the job in {} (its id at {key:?}): it never did; was it \
                     started, with the same master address and port, and (for a job that makes \
                     communicators one after another) has every rank made as many?",
                    store.describe()
                ),
                waited,
            });
        }
        Err(source) => return Err(Error::Store { rank, source }),
    };
    let b: [u8; 8] = v
        .as_slice()
        .try_into()
        .map_err(|_| Error::Internal(format!("rank {rank}: malformed job id in the store")))?;
    Ok(u64::from_le_bytes(b))
}

/// Publishes this rank's listener, connects to the next rank and accepts
/// the previous one; every link proves knowledge of `secret` both ways.
#[allow(clippy::too_many_arguments)]
fn connect(
    store: Arc<dyn Store>,
    server: Option<TcpStoreServer>,
    rank: usize,
    world: usize,
    config: Config,
    job: u64,
    local_ip: Option<IpAddr>,
    secret: Option<JobSecret>,
    store_host: Option<usize>,
    mut crowded: bool,
) -> Result<Communicator> {
    let deadline = crate::deadline_in(config.timeout);
    let boot = |source: TransportError| Error::Bootstrap { rank, source };
    let mut refused = 0;
    let mut connector: Option<Box<dyn Connector>> = None;
    let links = if world > 1 {
        let ip = config
            .socket_addr
            .or(local_ip)
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let listener = Listener::bind(ip).map_err(boot)?;
        let prefix = format!("{PREFIX}/{job:x}");
        store
            .set(
                &format!("{prefix}/addr/{rank}"),
                listener.local_addr().to_string().as_bytes(),
            )
            .map_err(|source| Error::Store { rank, source })?;
        // Connections that arrive meanwhile wait in the listener's backlog.
        crowded |= agree(
            store.as_ref(),
            server.as_ref(),
            job,
            rank,
            world,
            &config,
            deadline,
        )?;
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let addr_of = |peer: usize| -> Result<SocketAddr> {
            let raw = store
                .get(&format!("{prefix}/addr/{peer}"), deadline)
                .map_err(|source| Error::Store { rank, source })?;
            String::from_utf8_lossy(&raw).parse().map_err(|_| {
                Error::Internal(format!(
                    "rank {rank}: malformed address of rank {peer} in the store"
                ))
            })
        };
        let options = TcpOptions {
            send_buffer: config.socket_buffer,
            recv_buffer: config.socket_buffer,
            unsent_limit: config.socket_unsent,
        };
        // Links to the peers other algorithms talk to: the lower rank of a
        // pair connects, the higher accepts.
        let pair_peers = crate::algo::pair_peers(rank, world);
        let (higher, lower): (Vec<usize>, Vec<usize>) = pair_peers.iter().partition(|&&q| q > rank);
        let next_addr = addr_of(next)?;
        let pending = tcp::connect_start(
            next_addr,
            tcp::hello(job, world, rank, next, RING),
            secret.as_ref(),
            options,
            deadline,
        )
        .map_err(boot)?;
        let mut pending_pairs = Vec::with_capacity(higher.len());
        for &q in &higher {
            let hello = tcp::hello(job, world, rank, q, PAIR);
            pending_pairs.push(
                tcp::connect_start(addr_of(q)?, hello, secret.as_ref(), options, deadline)
                    .map_err(boot)?,
            );
        }
        // One accept for every expected peer: a connection that comes early
        // is never taken for a stray.
        let mut expect = vec![tcp::hello(job, world, prev, rank, RING)];
        expect.extend(lower.iter().map(|&q| tcp::hello(job, world, q, rank, PAIR)));
        let (accepted, n) = listener
            .accept_peers(&expect, secret.as_ref(), options, deadline)
            .map_err(|e| {
                // A connection of this rank's own that was refused (another
                // job's secret, say) explains the wait in vain best.
                let own = std::iter::once(&pending)
                    .chain(&pending_pairs)
                    .find_map(tcp::PendingConnect::failed_now);
                boot(own.unwrap_or(e))
            })?;
        refused = n;
        let mut accepted = accepted.into_iter();
        let prev_link = accepted
            .next()
            .ok_or_else(|| Error::Internal(format!("rank {rank}: no link from rank {prev}")))?;
        let next_link = pending.finish(deadline).map_err(boot)?;
        let mut pairs: Vec<(StreamLink, bool)> = accepted.map(|l| (l, false)).collect();
        for p in pending_pairs {
            pairs.push((p.finish(deadline).map_err(boot)?, true));
        }
        tracing::info!(
            "rank {rank}: ring connected over tcp (next rank {next} at {next_addr}, listening on {}); {} more links",
            listener.local_addr(),
            pairs.len()
        );
        tracing::info!(
            "rank {rank}: every link {}",
            if secret.is_some() {
                "authenticated with the job secret"
            } else {
                "unauthenticated (no job secret)"
            }
        );
        let upgrader = Upgrader::new(&config, crowded).map_err(boot)?;
        let (next_up, prev_up) = upgrader
            .ring(next_link, prev_link, deadline)
            .map_err(boot)?;
        let pairs = upgrader.pairs(pairs, deadline).map_err(boot)?;
        tracing::info!(
            "rank {rank}: to rank {next} over {}; from rank {prev} over {}",
            next_up.describe(),
            prev_up.describe()
        );
        for l in &pairs {
            tracing::debug!("rank {rank}: with rank {} over {}", l.peer(), l.describe());
        }
        connector = Some(Box::new(TcpConnector {
            rank,
            world,
            job,
            store: store.clone(),
            prefix: prefix.clone(),
            listener,
            secret: secret.clone(),
            options,
            upgrader,
            parked: Parked::new(tcp::hello(job, world, 0, rank, LAZY)),
        }));
        Some(Links::new(next_up, prev_up, pairs))
    } else {
        None
    };
    let mut comm = Communicator::assemble(Parts {
        rank,
        world,
        config,
        links,
        store,
        key_prefix: format!("{PREFIX}/{job:x}"),
        server,
        refused,
        secret,
        store_host,
        connector,
        crowded,
    })?;
    comm.agree_link_model()?;
    Ok(comm)
}

/// Creates rank `rank` of `world` through `store`, whose connections prove
/// `secret` (checked by the caller): [`Communicator::with_store`], and the
/// communicators split from another.
pub(crate) fn join(
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    config: Config,
    secret: Option<JobSecret>,
    crowded: bool,
) -> Result<Communicator> {
    let deadline = crate::deadline_in(config.timeout);
    let job = if world == 1 {
        0
    } else {
        job_id(store.as_ref(), JOB_KEY, rank, deadline)?
    };
    connect(
        store, None, rank, world, config, job, None, secret, None, crowded,
    )
}

/// Checks, before any link exists, that every rank came and that the ranks
/// agree on the settings they must share ([`Config::agreed`]), and counts
/// the ranks host by host: returns whether this rank's host has more of
/// them than CPUs ([`crate::config::crowded_hosts`]).
///
/// Every rank publishes its agreed settings; rank 0 reads them all and
/// publishes a verdict, which every other rank waits for. So a mismatch is
/// an error on every rank naming the setting, both ranks and both values
/// (not a frame error later), and rank 0 names the ranks that never came.
fn agree(
    store: &dyn Store,
    server: Option<&TcpStoreServer>,
    job: u64,
    rank: usize,
    world: usize,
    config: &Config,
    deadline: Instant,
) -> Result<bool> {
    let store_err = |source| Error::Store { rank, source };
    let key = |what: &str| format!("{PREFIX}/{job:x}/settings/{what}");
    let mine = config.agreed();
    // The first line tells rank 0 this rank's host and its CPUs.
    let host = crate::config::host_key();
    let host_line = format!("{host} {}", crate::config::host_cpus());
    store
        .set(
            &key(&rank.to_string()),
            format!("{host_line}\n{mine}").as_bytes(),
        )
        .map_err(store_err)?;
    // Whether this rank's host is in the list rank 0 published.
    let crowded_here = |list: &[u8]| {
        let list = String::from_utf8_lossy(list);
        let Some(line) = list
            .lines()
            .find(|l| l.split(' ').next() == Some(host.as_str()))
        else {
            return false;
        };
        let mut counts = line.split(' ').skip(1);
        tracing::info!(
            "rank {rank}: this host has {} of the job's ranks and {} CPUs: idle ranks yield the \
             CPU at once over shared memory, and single copies (auto) start at 64 KiB",
            counts.next().unwrap_or("?"),
            counts.next().unwrap_or("?")
        );
        true
    };
    let start = Instant::now();
    if rank != 0 {
        let verdict = match store.get(&key("verdict"), deadline) {
            Ok(v) => v,
            Err(StoreError::Timeout { waited, .. }) => {
                return Err(Error::Timeout {
                    rank,
                    call: "bootstrap".into(),
                    what:
                        "rank 0 to see every rank register (rank 0 names the ranks that never came)"
                            .into(),
                    waited,
                });
            }
            Err(e) => return Err(store_err(e)),
        };
        if let Some((variable, reason)) = String::from_utf8_lossy(&verdict).split_once('\n') {
            return Err(Error::Config {
                variable: variable.into(),
                reason: reason.into(),
            });
        }
        // Published before the verdict.
        let list = store.get(&key("crowded"), deadline).map_err(store_err)?;
        return Ok(crowded_here(&list));
    }
    let mut missing = Vec::new();
    let mut verdict: Option<(String, String)> = None;
    let mut hosts = vec![host_line.clone()];
    for r in 1..world {
        // Once one rank is missing the deadline has passed: ask the rest once.
        let theirs = if missing.is_empty() {
            match store.get(&key(&r.to_string()), deadline) {
                Ok(v) => Some(v),
                Err(StoreError::Timeout { .. }) => None,
                Err(e) => return Err(store_err(e)),
            }
        } else {
            store.try_get(&key(&r.to_string())).map_err(store_err)?
        };
        let Some(theirs) = theirs else {
            missing.push(r);
            continue;
        };
        let theirs = String::from_utf8_lossy(&theirs);
        let (their_host, their_settings) = theirs.split_once('\n').unwrap_or(("", &theirs));
        hosts.push(their_host.to_owned());
        if verdict.is_none() {
            verdict = differ(&mine, their_settings, r);
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|r| r.to_string()).collect();
        // Ranks refused by the store's authentication never register.
        let refusals = match server.map(TcpStoreServer::auth_refusals) {
            Some((n, Some(why))) if n > 0 => format!(
                "; the store refused {n} connections that failed authentication, the last: {why}"
            ),
            _ => String::new(),
        };
        return Err(Error::Timeout {
            rank,
            call: "bootstrap".into(),
            what: format!(
                "every rank to register: {} of {world} ranks never did ({}); was every rank started \
                 (srun -n {world}, torchrun --nproc-per-node, mpirun -np {world}), with the same \
                 master address and port?{refusals}",
                missing.len(),
                list.join(", ")
            ),
            waited: start.elapsed(),
        });
    }
    let crowded: Vec<String> = crate::config::crowded_hosts(hosts.iter().map(String::as_str))
        .into_iter()
        .map(|(key, ranks, cpus)| format!("{key} {ranks} {cpus}"))
        .collect();
    let crowded = crowded.join("\n");
    store
        .set(&key("crowded"), crowded.as_bytes())
        .map_err(store_err)?;
    let text = verdict
        .as_ref()
        .map(|(v, r)| format!("{v}\n{r}"))
        .unwrap_or_default();
    store
        .set(&key("verdict"), text.as_bytes())
        .map_err(store_err)?;
    match verdict {
        None => Ok(crowded_here(crowded.as_bytes())),
        Some((variable, reason)) => Err(Error::Config { variable, reason }),
    }
}

/// The first setting in which rank 0's `mine` and rank `r`'s `theirs`
/// differ, as (variable, reason); both are `NAME=value` lines.
pub(crate) fn differ(mine: &str, theirs: &str, r: usize) -> Option<(String, String)> {
    let parse = |s: &str| -> Vec<(String, String)> {
        s.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let theirs = parse(theirs);
    for (name, ours) in parse(mine) {
        let other = theirs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("(not set: an older oxccl?)");
        if other != ours {
            return Some((
                name,
                format!(
                    "rank 0 has {ours} but rank {r} has {other}; every rank must use the same value"
                ),
            ));
        }
    }
    None
}

/// How many connections rank 0's store serves at once: one per rank, and
/// as many again for a rank's retry racing its own closed attempt.
fn client_limit(world: usize) -> usize {
    world.saturating_mul(2).saturating_add(8)
}

/// Where rank 0's store listens, given the master address as the launcher
/// spelled it (`host`) and as it resolved here (`master`).
///
/// The master address itself, so that `MASTER_ADDR=127.0.0.1` keeps the
/// store off every other interface and a routable address keeps it off the
/// others; every interface only when a host name resolves to loopback here
/// but cannot elsewhere (Debian's /etc/hosts maps a machine's own name to
/// 127.0.1.1, while the other hosts resolve it to the real address).
fn store_bind_addr(host: &str, master: SocketAddr) -> SocketAddr {
    let literal = host.parse::<IpAddr>().is_ok();
    let localhost = host.eq_ignore_ascii_case("localhost");
    if master.ip().is_loopback() && !literal && !localhost {
        SocketAddr::new(unspecified(master.ip()), master.port())
    } else {
        master
    }
}

/// The "any address" of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// Starts rank 0's store at [`store_bind_addr`]; on every interface, with a
/// warning, when the master address is not one of this host's (a name that
/// resolves to a NAT address here, say), where the others still reach it.
fn serve_store(
    host: &str,
    master: SocketAddr,
    secret: Option<JobSecret>,
) -> std::result::Result<TcpStoreServer, StoreError> {
    let want = store_bind_addr(host, master);
    match TcpStoreServer::bind_with_secret(want, secret.clone()) {
        Err(StoreError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::AddrNotAvailable =>
        {
            let any = SocketAddr::new(unspecified(want.ip()), want.port());
            tracing::warn!(
                "the master address {want} ('{host}') is not one of this host's; \
                 the rendezvous store listens on {any}, every interface"
            );
            TcpStoreServer::bind_with_secret(any, secret)
        }
        r => r,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unique_ids_never_claimed_stop_being_served_beyond_a_bound() {
        let ids: Vec<UniqueId> = (0..MAX_SERVED + 3)
            .map(|_| UniqueId::new_on(IpAddr::from([127, 0, 0, 1])).unwrap())
            .collect();
        let served = |id: &UniqueId| SERVED.lock().unwrap().iter().any(|(j, _)| *j == id.job);
        // Other tests make ids too, so only this test's oldest and newest
        // are compared: the newest is served, the first three are not (at
        // most MAX_SERVED are, and they are the newest).
        assert!(served(ids.last().unwrap()));
        assert!(ids[..3].iter().all(|id| !served(id)));
        assert!(SERVED.lock().unwrap().len() <= MAX_SERVED);
        assert!(
            std::net::TcpStream::connect(ids[0].addr).is_err(),
            "the oldest still listens"
        );
        assert!(std::net::TcpStream::connect(ids.last().unwrap().addr).is_ok());
    }

    #[test]
    fn the_store_listens_on_the_master_address_it_was_given() {
        let at = |ip: [u8; 4]| SocketAddr::new(IpAddr::from(ip), 29500);
        // Loopback given as such stays on loopback: nobody else gets in.
        assert_eq!(
            store_bind_addr("127.0.0.1", at([127, 0, 0, 1])),
            at([127, 0, 0, 1])
        );
        assert_eq!(
            store_bind_addr("localhost", at([127, 0, 0, 1])),
            at([127, 0, 0, 1])
        );
        // A routable address: that interface only.
        assert_eq!(
            store_bind_addr("10.1.2.3", at([10, 1, 2, 3])),
            at([10, 1, 2, 3])
        );
        assert_eq!(
            store_bind_addr("node7", at([10, 1, 2, 3])),
            at([10, 1, 2, 3])
        );
        // A host name that resolves to loopback here only (/etc/hosts):
        // every interface, or the other hosts could not reach it.
        assert_eq!(
            store_bind_addr("node7", at([127, 0, 1, 1])),
            at([0, 0, 0, 0])
        );
        let v6 = SocketAddr::new(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), 1);
        assert_eq!(store_bind_addr("::1", v6), v6);
        assert!(store_bind_addr("node7", v6).ip().is_unspecified());
    }

    #[test]
    fn a_store_on_loopback_is_not_reachable_from_another_interface() {
        // The address the machine reaches others with, if it has one.
        let Some(other) = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|u| u.connect("192.0.2.1:9").map(|()| u))
            .and_then(|u| u.local_addr())
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        else {
            eprintln!("skipping: this machine has no address but loopback to test from");
            return;
        };
        let server = serve_store("127.0.0.1", "127.0.0.1:0".parse().unwrap(), None).unwrap();
        let port = server.local_addr().port();
        assert!(server.local_addr().ip().is_loopback());
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(other, port),
                std::time::Duration::from_secs(2)
            )
            .is_err(),
            "the store answered on {other}"
        );
    }

    #[test]
    fn a_master_address_of_another_host_falls_back_to_every_interface() {
        // 192.0.2.1 (TEST-NET-1) is nobody's address here.
        let server = serve_store("192.0.2.1", "192.0.2.1:0".parse().unwrap(), None).unwrap();
        assert!(server.local_addr().ip().is_unspecified());
    }

    #[test]
    fn unique_id_layout_is_fixed() {
        let mut id = UniqueId {
            addr: SocketAddr::new(IpAddr::from([10, 1, 2, 3]), 0x1234),
            job: 0x0102_0304_0506_0708,
            secret: None,
        };
        let b = id.to_bytes();
        let mut want = [0u8; UniqueId::LEN];
        want[0..8].copy_from_slice(b"OXCCLUID");
        want[8..10].copy_from_slice(&[0x34, 0x12]);
        want[10] = 4;
        want[16..20].copy_from_slice(&[10, 1, 2, 3]);
        want[32..40].copy_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(b, want);
        // With a secret: flags 1 at byte 40, the key at 48..80.
        id.secret = Some([0xA5; 32]);
        let b = id.to_bytes();
        want[40] = 1;
        want[48..80].copy_from_slice(&[0xA5; 32]);
        assert_eq!(b, want);
        assert_eq!(UniqueId::from_bytes(&b).unwrap(), id);
        assert!(!format!("{id:?}").contains("165"), "{id:?}");
        let mut bad_flags = b;
        bad_flags[40] = 2;
        assert!(UniqueId::from_bytes(&bad_flags).is_err());
        let mut bad = b;
        bad[10] = 5;
        let e = UniqueId::from_bytes(&bad).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "invalid argument: unique id: invalid address family: unknown address family 5"
        );
    }

    proptest! {
        #[test]
        fn unique_ids_round_trip(v6 in any::<bool>(), ip in any::<[u8; 16]>(), port in any::<u16>(), job in any::<u64>(), secret in any::<Option<[u8; 32]>>()) {
            let ip = if v6 { IpAddr::from(ip) } else { IpAddr::from([ip[0], ip[1], ip[2], ip[3]]) };
            let id = UniqueId { addr: SocketAddr::new(ip, port), job, secret };
            prop_assert_eq!(UniqueId::from_bytes(&id.to_bytes()).unwrap(), id);
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail(fill in any::<u8>(), head in any::<[u8; 32]>(), at in 0..UniqueId::LEN, flip in 1u8..=255) {
            let mut b = [fill; UniqueId::LEN];
            b[..32].copy_from_slice(&head);
            let _ = UniqueId::from_bytes(&b);
            let id = UniqueId { addr: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 9), job: 5, secret: None };
            let mut m = id.to_bytes();
            m[at] ^= flip;
            // A flipped magic, family or flags byte is refused; other bytes decode.
            let refused = at < 8 || (at == 10 && m[10] != 6) || (at == 40 && m[40] != 1);
            prop_assert_eq!(UniqueId::from_bytes(&m).is_err(), refused);
        }
    }
}
