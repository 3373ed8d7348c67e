//! Every setting of oxccl, read from the environment in this one module.
//!
//! [`SETTINGS`] defines each `OXCCL_*` variable once: its default, its
//! doc, its parser (which validates), and whether ranks must agree on it.
//! The README's table is generated from it ([`settings_table`]) and a test
//! checks that the README holds exactly that table. Programmatic settings
//! override the environment: build a [`Config`] with [`Config::from_env`]
//! and change its fields, or start from [`Config::default`];
//! [`Config::validate`] checks them as the environment's are checked.
//!
//! Launchers are recognised by their variables, innermost first: our own
//! (`OXCCL_RANK`, `OXCCL_WORLD_SIZE`), torchrun (`RANK`, `WORLD_SIZE`),
//! Open MPI (`OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`), PMI
//! (`PMI_RANK`, `PMI_SIZE`) and Slurm (`SLURM_PROCID`, `SLURM_NTASKS`).
//! The first family set wins (the launcher that started this process; the
//! outer ones are ignored, see [`launch_from_lookup`]); a family set by half
//! is an error.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oxccl_transport::auth::JobSecret;

use crate::{Error, Result};

/// Whether connections are authenticated with the job's secret (`OXCCL_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// A secret is required: init fails without one.
    Require,
    /// With a secret, authenticate; without one, run unauthenticated and
    /// warn once.
    #[default]
    Auto,
    /// Never authenticate (a peer that does is refused, by name).
    Off,
}

impl AuthMode {
    /// The name `OXCCL_AUTH` takes.
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Require => "require",
            AuthMode::Auto => "auto",
            AuthMode::Off => "off",
        }
    }
}

/// The variables that supply a job secret, for messages.
pub(crate) const SECRET_VARIABLES: &str = "OXCCL_JOB_SECRET (or OXCCL_JOB_SECRET_FILE)";

/// The largest secret file read.
const MAX_SECRET_FILE: u64 = 64 << 10;

/// Reads a job secret from `path`: a regular file owned by this user that
/// nobody else may read or write (mode 0600 or stricter).
fn read_secret_file(variable: &str, path: &Path) -> Result<JobSecret> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| {
        bad(
            variable,
            format!("cannot open the secret file {shown}: {e}"),
        )
    })?;
    let meta = file.metadata().map_err(|e| {
        bad(
            variable,
            format!("cannot read the secret file {shown}: {e}"),
        )
    })?;
    if !meta.is_file() {
        return Err(bad(
            variable,
            format!("the secret file {shown} is not a regular file"),
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(
            variable,
            format!(
                "the secret file {shown} has mode {mode:04o}: others may read it; \
                 it must be 0600 or stricter (chmod 600 {shown})"
            ),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(bad(
            variable,
            format!(
                "the secret file {shown} belongs to user {}, not to this user ({me})",
                meta.uid()
            ),
        ));
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE)
        .read_to_string(&mut text)
        .map_err(|e| {
            bad(
                variable,
                format!("cannot read the secret file {shown}: {e}"),
            )
        })?;
    JobSecret::from_text(&text)
        .map_err(|why| bad(variable, format!("the secret file {shown} {why}")))
}

/// How ring neighbours connect (`OXCCL_TRANSPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Shared memory with neighbours on this host, TCP with the others.
    #[default]
    Auto,
    /// TCP (or socket pairs in process) everywhere.
    Tcp,
    /// Shared memory everywhere; an error if a neighbour cannot share memory.
    Shm,
    /// UCX everywhere (InfiniBand, RoCE, or what `UCX_TLS` allows).
    #[cfg(feature = "ucx")]
    Ucx,
}

/// Which algorithm runs a collective (`OXCCL_ALGO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algo {
    /// For each call, the algorithm the cost model finds fastest
    /// ([`crate::algo::select`]).
    #[default]
    Auto,
    /// The named algorithm (one of [`crate::algo::ALL`]) wherever it can
    /// run the call, the automatic choice elsewhere.
    Only(&'static str),
}

impl Algo {
    /// `OXCCL_ALGO=ring`, the pipelined ring for every call.
    pub const RING: Algo = Algo::Only("ring");

    /// The name `OXCCL_ALGO` takes.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Auto => "auto",
            Algo::Only(name) => name,
        }
    }
}

/// One setting: an `OXCCL_*` variable, its default, what it does and how
/// its text becomes part of a [`Config`]. Each variable is defined here
/// once; [`Config::default`], [`Config::from_lookup`], [`Config::validate`],
/// the cross-rank check at init and the README's table all come from it.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The variable's name.
    pub name: &'static str,
    /// The default, as text the parser takes (empty: unset). Launcher
    /// variables, which [`launch_from_lookup`] reads, describe theirs.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
    /// Whether every rank of a communicator must use the same value: such
    /// settings are compared at init, and a mismatch is an error naming the
    /// setting, both ranks and both values.
    pub agree: bool,
    /// Parses and validates a value into a config; `None` for launcher
    /// variables, which are not part of a [`Config`].
    parse: Option<fn(&mut Config, &str) -> Result<()>>,
    /// The config's value as text that `parse` takes back.
    show: Option<fn(&Config) -> String>,
}

impl Setting {
    const fn launcher(name: &'static str, default: &'static str, doc: &'static str) -> Setting {
        Setting {
            name,
            default,
            doc,
            agree: false,
            parse: None,
            show: None,
        }
    }

    /// This setting's value in `config`, as text (`None` for launcher variables).
    pub fn value(&self, config: &Config) -> Option<String> {
        self.show.map(|show| show(config))
    }

    /// The default as the README shows it.
    pub fn shown_default(&self) -> &'static str {
        if self.default.is_empty() {
            "(unset)"
        } else {
            self.default
        }
    }
}

fn show_secs(d: Duration) -> String {
    d.as_secs_f64().to_string()
}

fn show_opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

fn show_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn opt_path(v: &str) -> Option<PathBuf> {
    let v = v.trim();
    (!v.is_empty()).then(|| PathBuf::from(v))
}

fn opt_ip(name: &str, v: &str) -> Result<Option<IpAddr>> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| bad(name, format!("'{v}' is not an IP address")))
}

/// Every `OXCCL_*` variable oxccl reads, in the README's order.
pub const SETTINGS: &[Setting] = &[
    Setting::launcher(
        "OXCCL_RANK",
        "(from the launcher)",
        "This process's rank. Also read: RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID.",
    ),
    Setting::launcher(
        "OXCCL_WORLD_SIZE",
        "(from the launcher)",
        "Number of ranks. Also read: WORLD_SIZE, OMPI_COMM_WORLD_SIZE, PMI_SIZE, SLURM_NTASKS.",
    ),
    Setting::launcher(
        "OXCCL_LOCAL_RANK",
        "(from the launcher)",
        "Rank among the processes of this host. Also read: LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID.",
    ),
    Setting::launcher(
        "OXCCL_MASTER_ADDR",
        "(required if world > 1)",
        "Host of rank 0, which serves the rendezvous store. Also read: MASTER_ADDR.",
    ),
    Setting::launcher(
        "OXCCL_MASTER_PORT",
        "(required if world > 1)",
        "Port of the rendezvous store on rank 0. Also read: MASTER_PORT.",
    ),
    Setting {
        name: "OXCCL_FILE_STORE",
        default: "",
        doc: "Directory on a shared filesystem to rendezvous through instead of rank 0's TCP store.",
        agree: false,
        parse: Some(|c, v| {
            c.file_store = opt_path(v);
            Ok(())
        }),
        show: Some(|c| show_path(&c.file_store)),
    },
    Setting {
        name: "OXCCL_AUTH",
        default: "auto",
        doc: "Whether connections (the TCP store, ring links, the shared-memory handshake that runs on them) are authenticated with the job's secret: require (init fails without a secret), auto (authenticate with a secret; without one run unauthenticated and warn once), or off. Ranks that disagree fail at connect time naming why.",
        agree: false,
        parse: Some(|c, v| {
            c.auth = match v.trim().to_ascii_lowercase().as_str() {
                "require" => AuthMode::Require,
                "auto" => AuthMode::Auto,
                "off" => AuthMode::Off,
                _ => {
                    return Err(bad(
                        "OXCCL_AUTH",
                        format!("'{v}' is not one of require, auto, off"),
                    ));
                }
            };
            Ok(())
        }),
        show: Some(|c| c.auth.name().into()),
    },
    Setting {
        name: "OXCCL_JOB_SECRET",
        default: "",
        doc: "The job's secret, the same on every rank (oxrun sets a fresh one per job): 64 hex digits, or any text (hashed to a key). Never logged, never written to a store.",
        agree: false,
        parse: Some(|c, v| {
            c.job_secret = match v.trim() {
                "" => None,
                t => Some(JobSecret::from_text(t).map_err(|why| bad("OXCCL_JOB_SECRET", why))?),
            };
            Ok(())
        }),
        show: None,
    },
    Setting {
        name: "OXCCL_JOB_SECRET_FILE",
        default: "",
        doc: "A file holding the job's secret (as OXCCL_JOB_SECRET's text), owned by this user with mode 0600 or stricter; instead of OXCCL_JOB_SECRET.",
        agree: false,
        parse: Some(|c, v| {
            let Some(path) = opt_path(v) else {
                return Ok(());
            };
            if c.job_secret.is_some() {
                return Err(bad(
                    "OXCCL_JOB_SECRET_FILE",
                    "is set, and so is OXCCL_JOB_SECRET: set only one",
                ));
            }
            c.job_secret = Some(read_secret_file("OXCCL_JOB_SECRET_FILE", &path)?);
            Ok(())
        }),
        show: None,
    },
    Setting {
        name: "OXCCL_SOCKET_ADDR",
        default: "",
        doc: "Local IP address that ranks listen on for ring connections; unset: the address that reaches the master.",
        agree: false,
        parse: Some(|c, v| {
            c.socket_addr = opt_ip("OXCCL_SOCKET_ADDR", v)?;
            Ok(())
        }),
        show: Some(|c| show_opt(&c.socket_addr)),
    },
    Setting {
        name: "OXCCL_BOOTSTRAP_ADDR",
        default: "127.0.0.1",
        doc: "IP address a unique id (UniqueId::new) serves its store on; set it to an address other hosts can reach.",
        agree: false,
        parse: Some(|c, v| {
            c.bootstrap_addr = opt_ip("OXCCL_BOOTSTRAP_ADDR", v)?
                .ok_or_else(|| bad("OXCCL_BOOTSTRAP_ADDR", "is empty"))?;
            Ok(())
        }),
        show: Some(|c| c.bootstrap_addr.to_string()),
    },
    Setting {
        name: "OXCCL_TIMEOUT",
        default: "300",
        doc: "Seconds any wait may go without progress (bootstrap, every collective) before it fails naming what it awaited.",
        agree: false,
        parse: Some(|c, v| {
            c.timeout = Duration::from_secs_f64(parse_secs("OXCCL_TIMEOUT", v, false)?);
            Ok(())
        }),
        show: Some(|c| show_secs(c.timeout)),
    },
    Setting {
        name: "OXCCL_SLICE_BYTES",
        default: "512K",
        doc: "Largest pipeline slice in bytes (suffixes K, M), at most 1G; smaller slices overlap more, larger ones cost fewer frames.",
        agree: true,
        parse: Some(|c, v| {
            c.slice_bytes = parse_bytes_in("OXCCL_SLICE_BYTES", v, 1, 1 << 30)?;
            Ok(())
        }),
        show: Some(|c| c.slice_bytes.to_string()),
    },
    Setting {
        name: "OXCCL_SPIN_US",
        default: "200",
        doc: "Microseconds a rank polls its links before sleeping in poll (spinning for the first 2, then yielding its core between checks; over shared memory on a host with more of the job's ranks than CPUs, yielding from the first): a wake-up from poll costs tens of microseconds, more than a small message or, with more ranks than cores, a turn of the other ranks takes; 0 never spins.",
        agree: false,
        parse: Some(|c, v| {
            c.spin = Duration::from_micros(parse_usize("OXCCL_SPIN_US", v)? as u64);
            Ok(())
        }),
        show: Some(|c| c.spin.as_micros().to_string()),
    },
    Setting {
        name: "OXCCL_SMALL_BYTES",
        default: "64K",
        doc: "The small-message path (one allgather, then a local reduction in rank order) may run allreduces whose gathered size (bytes times ranks) is at most this (at most 1G), where the cost model prefers it.",
        agree: true,
        parse: Some(|c, v| {
            c.small_bytes = parse_bytes_in("OXCCL_SMALL_BYTES", v, 0, 1 << 30)?;
            Ok(())
        }),
        show: Some(|c| c.small_bytes.to_string()),
    },
    Setting {
        name: "OXCCL_ALGO",
        default: "auto",
        doc: "Which algorithm runs each collective: auto (the one the cost model predicts fastest for the call's size, the world and the link), or one of ring, gather_reduce, halving_doubling, recursive_doubling, tree for every call it can run (auto for the rest).",
        agree: true,
        parse: Some(|c, v| {
            let want = v.trim().to_ascii_lowercase().replace('-', "_");
            c.algo = match want.as_str() {
                "auto" => Algo::Auto,
                "small" => Algo::Only("gather_reduce"),
                name => match crate::algo::ALL.iter().find(|a| a.name() == name) {
                    Some(a) => Algo::Only(a.name()),
                    None => {
                        let names: Vec<&str> = crate::algo::ALL.iter().map(|a| a.name()).collect();
                        return Err(bad(
                            "OXCCL_ALGO",
                            format!("'{v}' is not one of auto, {}", names.join(", ")),
                        ));
                    }
                },
            };
            Ok(())
        }),
        show: Some(|c| c.algo.name().into()),
    },
    Setting {
        name: "OXCCL_WGPU_ADAPTER",
        default: "",
        doc: "Use only a wgpu adapter whose name contains this (case-insensitive), e.g. llvmpipe or nvidia; unset: any adapter.",
        agree: false,
        parse: Some(|c, v| {
            c.wgpu_adapter = Some(v.trim().to_string()).filter(|v| !v.is_empty());
            Ok(())
        }),
        show: Some(|c| show_opt(&c.wgpu_adapter)),
    },
    Setting {
        name: "OXCCL_WGPU_POWER",
        default: "high",
        doc: "Which wgpu adapter to prefer among those that match: high (discrete GPU) or low (integrated).",
        agree: false,
        parse: Some(|c, v| {
            c.wgpu_low_power = match v.trim().to_ascii_lowercase().as_str() {
                "low" => true,
                "high" => false,
                _ => return Err(bad("OXCCL_WGPU_POWER", format!("'{v}' is not low or high"))),
            };
            Ok(())
        }),
        show: Some(|c| if c.wgpu_low_power { "low" } else { "high" }.into()),
    },
    Setting {
        name: "OXCCL_CUDA_DEVICE",
        default: "",
        doc: "CUDA device ordinal for device buffers; unset: OXCCL_LOCAL_RANK, so each rank of a host takes its own GPU.",
        agree: false,
        parse: Some(|c, v| {
            c.cuda_device = match v.trim() {
                "" => None,
                t => Some(parse_usize("OXCCL_CUDA_DEVICE", t)?),
            };
            Ok(())
        }),
        show: Some(|c| show_opt(&c.cuda_device)),
    },
    Setting {
        name: "OXCCL_CUDA_INCLUDE",
        default: "",
        doc: "Directories (colon-separated) holding cuda_fp16.h and cuda_bf16.h, for compiling the CUDA kernels with NVRTC at run time; unset: /usr/local/cuda/include.",
        agree: false,
        parse: Some(|c, v| {
            c.cuda_include = v
                .split(':')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect();
            Ok(())
        }),
        show: Some(|c| {
            c.cuda_include
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        }),
    },
    Setting {
        name: "OXCCL_TRANSPORT",
        default: "auto",
        doc: "How ranks connect: auto (shared memory when both ranks map the same segment, i.e. share a host; else UCX where the library is built with feature ucx and both hosts have an RDMA device; else TCP), tcp, shm (fail if a neighbour cannot share memory), or ucx (UCX to every peer, over what UCX_TLS allows; needs feature ucx). UCX's own variables (UCX_TLS, UCX_NET_DEVICES, ...) pass through to it.",
        agree: true,
        parse: Some(|c, v| {
            c.transport = match v.trim().to_ascii_lowercase().as_str() {
                "auto" => Transport::Auto,
                "tcp" | "socket" => Transport::Tcp,
                "shm" => Transport::Shm,
                #[cfg(feature = "ucx")]
                "ucx" => Transport::Ucx,
                #[cfg(not(feature = "ucx"))]
                "ucx" => {
                    return Err(bad(
                        "OXCCL_TRANSPORT",
                        "ucx: this build of oxccl has no UCX link (build it with feature ucx)",
                    ));
                }
                _ => {
                    return Err(bad(
                        "OXCCL_TRANSPORT",
                        format!("'{v}' is not one of auto, tcp, shm, ucx"),
                    ));
                }
            };
            Ok(())
        }),
        show: Some(|c| {
            match c.transport {
                Transport::Auto => "auto",
                Transport::Tcp => "tcp",
                Transport::Shm => "shm",
                #[cfg(feature = "ucx")]
                Transport::Ucx => "ucx",
            }
            .into()
        }),
    },
    Setting {
        name: "OXCCL_SHM_BYTES",
        default: "1M",
        doc: "Capacity of each direction's ring in a shared-memory link, in bytes (suffixes K, M), between 4K and 1G.",
        agree: true,
        parse: Some(|c, v| {
            c.shm_bytes = parse_bytes_in("OXCCL_SHM_BYTES", v, 4096, 1 << 30)?;
            Ok(())
        }),
        show: Some(|c| c.shm_bytes.to_string()),
    },
    Setting {
        name: "OXCCL_SHM_SINGLE_COPY",
        default: "auto",
        doc: "Over shared memory, buffers of at least this many bytes go by a single copy: the receiver reads them straight from the sender's memory (process_vm_readv, where the kernel allows it) instead of through the ring; 0 disables it; auto takes 16K where this host has no more of the job's ranks than CPUs, 64K where it has more (a single copy keeps the sender waiting until the receiver runs).",
        agree: false,
        parse: Some(|c, v| {
            c.shm_single_copy = if v.trim().eq_ignore_ascii_case("auto") {
                SingleCopy::Auto
            } else {
                match parse_bytes("OXCCL_SHM_SINGLE_COPY", v)? {
                    0 => SingleCopy::Never,
                    n => SingleCopy::From(n),
                }
            };
            Ok(())
        }),
        show: Some(|c| match c.shm_single_copy {
            SingleCopy::Never => "0".to_string(),
            SingleCopy::From(n) => n.to_string(),
            SingleCopy::Auto => "auto".to_string(),
        }),
    },
    Setting {
        name: "OXCCL_SOCKET_BUFFER",
        default: "0",
        doc: "SO_SNDBUF and SO_RCVBUF of TCP links in bytes; 0 leaves the kernel's autotuning on.",
        agree: false,
        parse: Some(|c, v| {
            let n = parse_bytes("OXCCL_SOCKET_BUFFER", v)?;
            c.socket_buffer = (n > 0).then_some(n);
            Ok(())
        }),
        show: Some(|c| c.socket_buffer.unwrap_or(0).to_string()),
    },
    Setting {
        name: "OXCCL_SOCKET_UNSENT",
        default: "128K",
        doc: "Most bytes a TCP link to another host keeps queued unsent in the kernel (TCP_NOTSENT_LOWAT), so that frames to different peers leave in the order the algorithm sends them instead of sharing the wire; 0 leaves the system's default (no limit).",
        agree: false,
        parse: Some(|c, v| {
            let n = parse_bytes("OXCCL_SOCKET_UNSENT", v)?;
            c.socket_unsent = (n > 0).then_some(n);
            Ok(())
        }),
        show: Some(|c| c.socket_unsent.unwrap_or(0).to_string()),
    },
    Setting {
        name: "OXCCL_DEBUG",
        default: "warn",
        doc: "Log level of oxccl's binaries and C library (a Rust program installs its own tracing subscriber): off, error, warn, info (bootstrap, peers, transport), debug, trace (every frame).",
        agree: false,
        parse: Some(|c, v| {
            let l = v.trim().to_ascii_lowercase();
            c.debug = match l.as_str() {
                "version" | "warning" => "warn".to_string(),
                "none" | "off" => "off".to_string(),
                "error" | "warn" | "info" | "debug" | "trace" => l,
                _ => {
                    return Err(bad(
                        "OXCCL_DEBUG",
                        format!("'{v}' is not one of off, error, warn, info, debug, trace"),
                    ));
                }
            };
            Ok(())
        }),
        show: Some(|c| c.debug.clone()),
    },
    Setting {
        name: "OXCCL_CYCLE_TIME_MS",
        default: "5",
        doc: "Milliseconds between two negotiation cycles of the fusion engine (an enqueue on an idle engine starts one at once; an engine with nothing submitted cycles every 16 times this, for the other ranks' stall checks and shutdown).",
        agree: false,
        parse: Some(|c, v| {
            c.cycle_time =
                Duration::from_secs_f64(parse_secs("OXCCL_CYCLE_TIME_MS", v, true)? / 1e3);
            Ok(())
        }),
        show: Some(|c| (c.cycle_time.as_secs_f64() * 1e3).to_string()),
    },
    Setting {
        name: "OXCCL_FUSION_THRESHOLD",
        default: "8M",
        doc: "Largest fusion buffer in bytes (suffixes K, M, G); larger tensors are reduced alone, in place; 0 disables fusion.",
        agree: false,
        parse: Some(|c, v| {
            c.fusion_threshold = parse_bytes("OXCCL_FUSION_THRESHOLD", v)?;
            Ok(())
        }),
        show: Some(|c| c.fusion_threshold.to_string()),
    },
    Setting {
        name: "OXCCL_FUSION_DIRECT_BYTES",
        default: "128K",
        doc: "Tensors of at least this many bytes skip the fusion buffer and are reduced in place in a call of their own, which costs less than copying them in and out.",
        agree: false,
        parse: Some(|c, v| {
            c.fusion_direct = parse_bytes("OXCCL_FUSION_DIRECT_BYTES", v)?;
            Ok(())
        }),
        show: Some(|c| c.fusion_direct.to_string()),
    },
    Setting {
        name: "OXCCL_STALL_WARNING_SECS",
        default: "60",
        doc: "Seconds a tensor may wait for other ranks to submit it before rank 0 warns which ranks miss which tensors.",
        agree: false,
        parse: Some(|c, v| {
            c.stall_warning =
                Duration::from_secs_f64(parse_secs("OXCCL_STALL_WARNING_SECS", v, false)?);
            Ok(())
        }),
        show: Some(|c| show_secs(c.stall_warning)),
    },
    Setting {
        name: "OXCCL_STALL_SHUTDOWN_SECS",
        default: "0",
        doc: "Seconds after which a stalled tensor fails every pending handle of the fusion engine on every rank; 0 never does.",
        agree: false,
        parse: Some(|c, v| {
            let secs = parse_secs("OXCCL_STALL_SHUTDOWN_SECS", v, true)?;
            c.stall_shutdown = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
            Ok(())
        }),
        show: Some(|c| {
            c.stall_shutdown
                .map(show_secs)
                .unwrap_or_else(|| "0".into())
        }),
    },
    Setting {
        name: "OXCCL_TIMELINE",
        default: "",
        doc: "Path of a Chrome trace (JSON) of the fusion engine's phases per tensor; rank r > 0 writes PATH.r.",
        agree: false,
        parse: Some(|c, v| {
            c.timeline = opt_path(v);
            Ok(())
        }),
        show: Some(|c| show_path(&c.timeline)),
    },
];

/// The README's table of settings, as markdown, generated from [`SETTINGS`].
pub fn settings_table() -> String {
    let mut t = String::from("| variable | default | what it does |\n|---|---|---|\n");
    for s in SETTINGS {
        let default = if s.default.is_empty() || s.default.starts_with('(') {
            s.shown_default().to_string()
        } else {
            format!("`{}`", s.default)
        };
        let agree = if s.agree {
            " Every rank must use the same value (checked at init)."
        } else {
            ""
        };
        t.push_str(&format!(
            "| `{}` | {default} | {}{agree} |\n",
            s.name, s.doc
        ));
    }
    t
}

/// Settings of a communicator.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long any wait may go without progress.
    pub timeout: Duration,
    /// Largest pipeline slice in bytes.
    pub slice_bytes: usize,
    /// SO_SNDBUF/SO_RCVBUF of TCP links; `None` for kernel autotuning.
    pub socket_buffer: Option<usize>,
    /// TCP_NOTSENT_LOWAT of TCP links; `None` for the system's default.
    pub socket_unsent: Option<usize>,
    /// How ring neighbours connect.
    pub transport: Transport,
    /// Capacity of each direction's ring of a shared-memory link.
    pub shm_bytes: usize,
    /// Shared memory: which writes go by a single copy.
    pub shm_single_copy: SingleCopy,
    /// How long to busy-poll links before sleeping.
    pub spin: Duration,
    /// wgpu: only adapters whose name contains this.
    pub wgpu_adapter: Option<String>,
    /// wgpu: prefer a low-power adapter.
    pub wgpu_low_power: bool,
    /// CUDA device ordinal (`None`: the local rank).
    pub cuda_device: Option<usize>,
    /// Include directories for NVRTC (empty: the CUDA toolkit's default).
    pub cuda_include: Vec<PathBuf>,
    /// Largest gathered size (bytes times ranks) of an allreduce on the small-message path.
    pub small_bytes: usize,
    /// Which algorithm runs each collective.
    pub algo: Algo,
    /// Local address to listen on for ring connections.
    pub socket_addr: Option<IpAddr>,
    /// Address a unique id's store is served on.
    pub bootstrap_addr: IpAddr,
    /// Directory of a file store, instead of the TCP store.
    pub file_store: Option<PathBuf>,
    /// Log level (a `tracing` level name).
    pub debug: String,
    /// Fusion engine: time between negotiation cycles.
    pub cycle_time: Duration,
    /// Fusion engine: largest fusion buffer in bytes (0: no fusion).
    pub fusion_threshold: usize,
    /// Fusion engine: tensors of at least this many bytes are reduced alone, in place.
    pub fusion_direct: usize,
    /// Fusion engine: how long a tensor may wait for other ranks before a warning.
    pub stall_warning: Duration,
    /// Fusion engine: how long a tensor may wait before every handle fails (`None`: never).
    pub stall_shutdown: Option<Duration>,
    /// Fusion engine: path of the Chrome trace to write.
    pub timeline: Option<PathBuf>,
    /// Whether connections are authenticated.
    pub auth: AuthMode,
    /// The job's secret (from `OXCCL_JOB_SECRET` or `OXCCL_JOB_SECRET_FILE`;
    /// a unique id's own secret takes its place).
    pub job_secret: Option<JobSecret>,
}

impl Default for Config {
    /// Every setting at its default from [`SETTINGS`].
    fn default() -> Config {
        let mut c = Config::blank();
        for s in SETTINGS {
            if let Some(parse) = s.parse {
                // The defaults parse: `defaults_parse_and_round_trip` checks each.
                let _ = parse(&mut c, s.default);
            }
        }
        c
    }
}

impl Config {
    /// Placeholders that every setting's default replaces.
    fn blank() -> Config {
        Config {
            timeout: Duration::ZERO,
            slice_bytes: 0,
            socket_buffer: None,
            socket_unsent: None,
            transport: Transport::Auto,
            shm_bytes: 0,
            shm_single_copy: SingleCopy::Never,
            spin: Duration::ZERO,
            wgpu_adapter: None,
            wgpu_low_power: false,
            cuda_device: None,
            cuda_include: Vec::new(),
            small_bytes: 0,
            algo: Algo::Auto,
            socket_addr: None,
            bootstrap_addr: IpAddr::from([127, 0, 0, 1]),
            file_store: None,
            debug: String::new(),
            cycle_time: Duration::ZERO,
            fusion_threshold: 0,
            fusion_direct: 0,
            stall_warning: Duration::ZERO,
            stall_shutdown: None,
            timeline: None,
            auth: AuthMode::Auto,
            job_secret: None,
        }
    }

    /// The secret this rank's connections use: `carried` (a unique id's)
    /// or this config's, none with `OXCCL_AUTH=off`. Without one, `require`
    /// is an error naming the variables to set, and `auto` warns once.
    pub(crate) fn secret_in_use(&self, carried: Option<JobSecret>) -> Result<Option<JobSecret>> {
        static WARNED: std::sync::Once = std::sync::Once::new();
        if self.auth == AuthMode::Off {
            return Ok(None);
        }
        let secret = carried.or_else(|| self.job_secret.clone());
        if secret.is_none() {
            if self.auth == AuthMode::Require {
                return Err(bad(
                    "OXCCL_AUTH",
                    format!(
                        "is require, but this rank has no job secret: set {SECRET_VARIABLES} to \
                         the same secret on every rank (oxrun does), or make the communicator \
                         from a unique id, which carries one"
                    ),
                ));
            }
            WARNED.call_once(|| {
                tracing::warn!(
                    "no job secret: connections are not authenticated, and any process that \
                     reaches this job's ports can join it; set OXCCL_JOB_SECRET (the same on \
                     every rank) to authenticate, or OXCCL_AUTH=off to silence this"
                );
            });
        }
        Ok(secret)
    }
}

/// Where a process sits in its job, as a launcher describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Rank among the processes of this host, if the launcher says.
    pub local_rank: Option<usize>,
    /// Host and port of rank 0's store, if given.
    pub master: Option<(String, u16)>,
    /// Which launcher's variables were used ("oxccl", "torchrun", ...).
    pub source: &'static str,
    /// Who serves the rendezvous store at the master address.
    pub rendezvous: Rendezvous,
}

/// Who serves the rendezvous store at a launch's master address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// Rank 0 serves oxccl's TCP store there.
    Oxccl,
    /// A PyTorch `TCPStore` serves there already: torchrun's agent, which
    /// says so with `TORCHELASTIC_USE_AGENT_STORE=True`. Ranks are its
    /// clients and keep their keys under `prefix` (the run and its restart).
    Torch {
        /// Key prefix for this job's attempt.
        prefix: String,
    },
}

/// Reads variables through a lookup function, so that tests need not touch
/// the process environment.
pub trait Env {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

fn bad(variable: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        variable: variable.into(),
        reason: reason.into(),
    }
}

fn parse_usize(variable: &str, v: &str) -> Result<usize> {
    v.trim()
        .parse()
        .map_err(|_| bad(variable, format!("'{v}' is not a non-negative integer")))
}

/// Parses a finite, non-negative number (positive unless `zero_ok`), at most 1e9.
fn parse_secs(variable: &str, v: &str, zero_ok: bool) -> Result<f64> {
    v.trim()
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && (*s > 0.0 || (zero_ok && *s == 0.0)))
        .map(|s| s.min(1e9))
        .ok_or_else(|| {
            let what = if zero_ok { "non-negative" } else { "positive" };
            bad(variable, format!("'{v}' is not a {what} number"))
        })
}

/// Which frames go by a single copy over shared memory
/// (`OXCCL_SHM_SINGLE_COPY`), where the receiver reads them straight from
/// the sender's memory instead of through the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleCopy {
    /// None: every byte through the ring.
    Never,
    /// Frames of at least this many bytes.
    From(usize),
    /// From 16 KiB where the job has no more ranks on this host than it has
    /// CPUs, from 64 KiB where it has more: a single copy holds the sender
    /// until the receiver runs, which with more ranks than cores waits for
    /// a turn of the scheduler (benches/RESULTS.md: on 2 ranks 16 KiB took
    /// a 64 KiB alltoall from 4.9 to 3.4 µs, on 4 ranks over 2 cores it
    /// took a 64 KiB allgather from 15.7 to 38.1).
    Auto,
}

impl SingleCopy {
    /// The smallest frame that goes by single copy on a host that is
    /// `crowded` (has more of the job's ranks than CPUs, as the ranks count
    /// themselves at bootstrap); `None`: none does.
    pub fn threshold(self, crowded: bool) -> Option<usize> {
        match self {
            SingleCopy::Never => None,
            SingleCopy::From(n) => Some(n),
            SingleCopy::Auto if !crowded => Some(16 << 10),
            SingleCopy::Auto => Some(64 << 10),
        }
    }
}

/// Whether `world` ranks all on this host outnumber its CPUs online: the
/// rule for an in-process group. A job of processes counts its ranks host
/// by host at bootstrap instead ([`crowded_hosts`]). Where ranks outnumber
/// CPUs a rank that waits over shared memory may be waiting for its own
/// core, so it yields it at once, and single copies start larger
/// ([`SingleCopy::Auto`]).
pub(crate) fn crowded(world: usize) -> bool {
    crowded_on(world, host_cpus())
}

fn crowded_on(ranks: usize, cpus: usize) -> bool {
    ranks > cpus
}

/// Which CPUs this rank shares with other ranks, as rank 0 counts them: the
/// kernel's boot id, which containers and network namespaces of one machine
/// share (the host name where there is none); no whitespace.
pub(crate) fn host_key() -> String {
    let read = |f: &str| {
        std::fs::read_to_string(f)
            .ok()
            .map(|s| {
                s.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
                    .collect::<String>()
            })
            .filter(|s| !s.is_empty())
    };
    read("/proc/sys/kernel/random/boot_id")
        .or_else(|| read("/proc/sys/kernel/hostname"))
        .unwrap_or_else(|| "unknown-host".into())
}

/// Of the hosts the ranks registered (`<host key> <CPUs>`, one line a rank),
/// those with more of the job's ranks than CPUs, as (key, ranks, CPUs). A
/// line that does not parse counts for no host.
pub(crate) fn crowded_hosts<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> Vec<(&'a str, usize, usize)> {
    let mut hosts: std::collections::HashMap<&str, (usize, usize)> = Default::default();
    for line in lines {
        let Some((key, cpus)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(cpus) = cpus.parse::<usize>() else {
            continue;
        };
        hosts.entry(key).or_insert((0, cpus)).0 += 1;
    }
    hosts
        .into_iter()
        .filter(|&(_, (ranks, cpus))| crowded_on(ranks, cpus))
        .map(|(key, (ranks, cpus))| (key, ranks, cpus))
        .collect()
}

/// The CPUs this host has online (`/sys/devices/system/cpu/online`), not
/// only those this process may run on: a launcher that pins each rank to a
/// core (oxrun, `mpirun --bind-to core`) leaves each one CPU of its own.
/// Where the file is missing, what this process may use.
pub(crate) fn host_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| count_cpus(&list))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// How many CPUs a kernel CPU list names (`0-3,8-11`, `0`); `None` if it
/// names none or does not parse.
fn count_cpus(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
        n += hi.checked_sub(lo)? + 1;
    }
    (n > 0).then_some(n)
}

/// Parses a byte count with an optional K, M or G suffix (powers of 1024).
pub fn parse_bytes(variable: &str, v: &str) -> Result<usize> {
    let t = v.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    parse_usize(variable, num)?
        .checked_mul(mult)
        .ok_or_else(|| bad(variable, format!("'{v}' is too large")))
}

/// Parses a byte count (see [`parse_bytes`]) between `min` and `max`.
fn parse_bytes_in(variable: &str, v: &str, min: usize, max: usize) -> Result<usize> {
    let n = parse_bytes(variable, v)?;
    if !(min..=max).contains(&n) {
        return Err(bad(
            variable,
            format!(
                "'{v}' must be between {} and {}",
                show_bytes(min),
                show_bytes(max)
            ),
        ));
    }
    Ok(n)
}

/// A byte count with the largest suffix that divides it.
fn show_bytes(n: usize) -> String {
    match n {
        0 => "0".into(),
        n if n % (1 << 30) == 0 => format!("{}G", n >> 30),
        n if n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n % (1 << 10) == 0 => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(&ProcessEnv)
    }

    /// Reads settings through `env`: each variable that is set replaces its
    /// default; a malformed value is an error naming the variable.
    pub fn from_lookup(env: &dyn Env) -> Result<Config> {
        let mut c = Config::default();
        for s in SETTINGS {
            if let (Some(parse), Some(v)) = (s.parse, env.var(s.name)) {
                parse(&mut c, &v)?;
            }
        }
        Ok(c)
    }

    /// Checks settings built in code as the environment's are checked: each
    /// value must be one its variable would accept (a slice of at least one
    /// byte, a positive timeout, a shared-memory ring of 4K to 1G, ...).
    /// Every constructor of a communicator calls it.
    pub fn validate(&self) -> Result<()> {
        let mut scratch = self.clone();
        for s in SETTINGS {
            if let (Some(parse), Some(show)) = (s.parse, s.show) {
                parse(&mut scratch, &show(self))?;
            }
        }
        Ok(())
    }

    /// The settings every rank must agree on, as `NAME=value` lines.
    pub(crate) fn agreed(&self) -> String {
        SETTINGS
            .iter()
            .filter(|s| s.agree)
            .filter_map(|s| Some(format!("{}={}\n", s.name, s.value(self)?)))
            .collect()
    }
}

/// One launcher's pair of variables.
struct Family {
    source: &'static str,
    rank: &'static str,
    world: &'static str,
    local: &'static str,
}

const FAMILIES: &[Family] = &[
    Family {
        source: "oxccl",
        rank: "OXCCL_RANK",
        world: "OXCCL_WORLD_SIZE",
        local: "OXCCL_LOCAL_RANK",
    },
    Family {
        source: "torchrun",
        rank: "RANK",
        world: "WORLD_SIZE",
        local: "LOCAL_RANK",
    },
    Family {
        source: "Open MPI",
        rank: "OMPI_COMM_WORLD_RANK",
        world: "OMPI_COMM_WORLD_SIZE",
        local: "OMPI_COMM_WORLD_LOCAL_RANK",
    },
    Family {
        source: "PMI",
        rank: "PMI_RANK",
        world: "PMI_SIZE",
        local: "MPI_LOCALRANKID",
    },
    Family {
        source: "Slurm",
        rank: "SLURM_PROCID",
        world: "SLURM_NTASKS",
        local: "SLURM_LOCALID",
    },
];

/// Reads the rank, world and master address from launcher variables.
///
/// Launchers nest: `mpirun` inside an `sbatch` script or `salloc` shell,
/// torchrun inside `srun`, oxrun inside either. A process sees the variables
/// of every launcher above it, and only the innermost one (the launcher that
/// started this process) describes it. They are tried innermost
/// first: oxrun (or variables set by hand), torchrun, Open MPI, PMI
/// (MPICH's and Slurm's `--mpi=pmi2`), Slurm. The first family that is set
/// wins; the outer ones are ignored and logged at info.
pub fn launch_from_lookup(env: &dyn Env) -> Result<Launch> {
    let mut found: Option<(&Family, usize, usize)> = None;
    // A family set by half is an error only when no launcher is complete:
    // `sbatch` without `-n` sets SLURM_PROCID but not SLURM_NTASKS.
    let mut half: Option<Error> = None;
    for f in FAMILIES {
        let (rank, world) = match (env.var(f.rank), env.var(f.world)) {
            (None, None) => continue,
            (Some(_), None) => {
                half.get_or_insert_with(|| bad(f.world, format!("is not set, but {} is", f.rank)));
                continue;
            }
            (None, Some(_)) => {
                half.get_or_insert_with(|| bad(f.rank, format!("is not set, but {} is", f.world)));
                continue;
            }
            (Some(r), Some(w)) => (r, w),
        };
        if let Some((inner, r0, w0)) = found {
            tracing::info!(
                "{}={rank} and {}={world} ({}, an outer launcher) are ignored: {} started this process as rank {r0} of {w0}",
                f.rank,
                f.world,
                f.source,
                inner.source
            );
            continue;
        }
        let (rank, world) = (parse_usize(f.rank, &rank)?, parse_usize(f.world, &world)?);
        if world == 0 {
            return Err(bad(f.world, "must be at least 1"));
        }
        if rank >= world {
            return Err(bad(
                f.rank,
                format!("rank {rank} is not below {}={world}", f.world),
            ));
        }
        found = Some((f, rank, world));
    }
    let Some((family, rank, world)) = found else {
        return Err(half.unwrap_or_else(|| {
            bad(
                "OXCCL_RANK",
                "no launcher variables found: set OXCCL_RANK and OXCCL_WORLD_SIZE, or start the job with oxrun, torchrun, mpirun or srun",
            )
        }));
    };
    let local_rank = match env
        .var(family.local)
        .or_else(|| env.var("OXCCL_LOCAL_RANK"))
    {
        Some(v) => Some(parse_usize(family.local, &v)?),
        None => None,
    };
    let addr = pick(env, "OXCCL_MASTER_ADDR", "MASTER_ADDR")?;
    let port = pick(env, "OXCCL_MASTER_PORT", "MASTER_PORT")?;
    let master = match (addr, port) {
        (Some((_, a)), Some((pv, p))) => {
            let port: u16 = p
                .trim()
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(pv, format!("'{p}' is not a port number (1-65535)")))?;
            Some((a.trim().to_string(), port))
        }
        (None, None) => derived_master(env, family.source, world)?,
        (Some((av, _)), None) => {
            return Err(bad(
                "OXCCL_MASTER_PORT",
                format!("is not set (nor MASTER_PORT), but {av} is"),
            ));
        }
        (None, Some((pv, _))) => {
            return Err(bad(
                "OXCCL_MASTER_ADDR",
                format!("is not set (nor MASTER_ADDR), but {pv} is"),
            ));
        }
    };
    // torchrun's agent serves a TCPStore on MASTER_PORT for its workers
    // (and keeps it across restarts of the workers).
    let agent_store = env
        .var("TORCHELASTIC_USE_AGENT_STORE")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let rendezvous = if family.source == "torchrun" && agent_store {
        let run = env
            .var("TORCHELASTIC_RUN_ID")
            .unwrap_or_else(|| "none".into());
        let attempt = env
            .var("TORCHELASTIC_RESTART_COUNT")
            .unwrap_or_else(|| "0".into());
        Rendezvous::Torch {
            prefix: format!(
                "oxccl/torchelastic/{}/attempt_{}",
                run.trim(),
                attempt.trim()
            ),
        }
    } else {
        Rendezvous::Oxccl
    };
    Ok(Launch {
        rank,
        world,
        local_rank,
        master,
        source: family.source,
        rendezvous,
    })
}

/// Rank 0's address when no variable names it, from what the launcher says
/// of the job: all ranks on one node (Open MPI's local size is the world,
/// Slurm's step has one node) meet on 127.0.0.1; a Slurm step on several
/// nodes meets on the first node of its node list, where Slurm places rank
/// 0. The port comes from the job's id (Slurm's job and step, Open MPI's
/// job id), so that two jobs on one node do not meet on one port. `None`
/// where the launcher does not say enough.
fn derived_master(env: &dyn Env, source: &str, world: usize) -> Result<Option<(String, u16)>> {
    let num = |name: &str| env.var(name).and_then(|v| v.trim().parse::<u64>().ok());
    let (host, job) = match source {
        "Open MPI" => {
            let one_node = num("OMPI_COMM_WORLD_LOCAL_SIZE") == Some(world as u64);
            let job = env
                .var("OMPI_MCA_ess_base_jobid")
                .or_else(|| env.var("PMIX_NAMESPACE"));
            (one_node.then(|| "127.0.0.1".to_string()), job)
        }
        "Slurm" | "PMI" if env.var("SLURM_JOB_ID").is_some() => {
            let nodes = num("SLURM_STEP_NUM_NODES").or_else(|| num("SLURM_JOB_NUM_NODES"));
            let host = if nodes == Some(1) {
                Some("127.0.0.1".to_string())
            } else {
                env.var("SLURM_STEP_NODELIST")
                    .or_else(|| env.var("SLURM_JOB_NODELIST"))
                    .and_then(|l| first_host(&l))
            };
            let step = env.var("SLURM_STEP_ID").unwrap_or_default();
            let job = env
                .var("SLURM_JOB_ID")
                .map(|j| format!("{}.{}", j.trim(), step.trim()));
            (host, job)
        }
        _ => (None, None),
    };
    let (Some(host), Some(job)) = (host, job) else {
        return Ok(None);
    };
    tracing::info!("no MASTER_ADDR: rank 0 of {source} job {job} serves on {host}");
    Ok(Some((host, derived_port(&job))))
}

/// A port for job `job` (an id the launcher gives every rank alike), in
/// 20000..60000: FNV-1a of the id, so that jobs of one node differ.
fn derived_port(job: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    20_000 + (h % 40_000) as u16
}

/// The first host of a Slurm host list: `node[03-05,9],gpu1` is `node03`.
fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let inside = &list[end + 1..];
        let first = inside.split([',', '-', ']']).next()?;
        return Some(format!("{prefix}{first}")).filter(|h| !h.is_empty());
    }
    Some(prefix.to_string()).filter(|h| !h.is_empty())
}

/// The value of `ours` or else `theirs`; an error naming both if they differ.
fn pick(
    env: &dyn Env,
    ours: &'static str,
    theirs: &'static str,
) -> Result<Option<(&'static str, String)>> {
    match (env.var(ours), env.var(theirs)) {
        (Some(a), Some(b)) if a.trim() != b.trim() => {
            Err(bad(ours, format!("'{a}' contradicts {theirs}='{b}'")))
        }
        (Some(a), _) => Ok(Some((ours, a))),
        (None, Some(b)) => Ok(Some((theirs, b))),
        (None, None) => Ok(None),
    }
}

impl Config {
    /// The wgpu adapter choice these settings describe.
    #[cfg(feature = "wgpu")]
    pub fn wgpu_settings(&self) -> oxccl_kernels::wgpu::WgpuSettings {
        oxccl_kernels::wgpu::WgpuSettings {
            adapter_name: self.wgpu_adapter.clone(),
            timeout: self.timeout,
            power_preference: if self.wgpu_low_power {
                wgpu_power::LowPower
            } else {
                wgpu_power::HighPerformance
            },
            ..Default::default()
        }
    }
}

#[cfg(feature = "wgpu")]
use oxccl_kernels::wgpu::PowerPreference as wgpu_power;

/// The `tracing` filter directive that shows oxccl's messages at `level`
/// (an [`OXCCL_DEBUG`](SETTINGS) level), for a program's own subscriber:
/// `EnvFilter::new(oxccl::config::log_filter(&config.debug))`.
pub fn log_filter(level: &str) -> String {
    format!("oxccl={level},oxccl_transport={level},oxccl_kernels={level}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| m.get(k).cloned()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        launch_from_lookup(&env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn each_launcher_is_recognised() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("OXCCL_RANK", "1"), ("OXCCL_WORLD_SIZE", "4")], "oxccl"),
            (
                &[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")],
                "torchrun",
            ),
            (
                &[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")],
                "Open MPI",
            ),
            (&[("PMI_RANK", "1"), ("PMI_SIZE", "4")], "PMI"),
            (
                &[
                    ("SLURM_PROCID", "1"),
                    ("SLURM_NTASKS", "4"),
                    ("SLURM_LOCALID", "0"),
                ],
                "Slurm",
            ),
        ];
        for (vars, source) in cases {
            let l = launch_from_lookup(&env(vars)).unwrap();
            assert_eq!((l.rank, l.world, l.source), (1, 4, source));
        }
    }

    /// Launchers nest as clusters use them; the innermost one describes
    /// this process, whatever the outer ones say.
    #[test]
    fn the_innermost_launcher_wins() {
        // mpirun inside an sbatch script (the batch step is Slurm task 0 of 4).
        let mpirun_in_sbatch = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "0"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ];
        // torchrun inside srun -n 2: the agent is Slurm task 1 of 2 and
        // starts 4 workers of a world of 8.
        let torchrun_in_srun = [
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("RANK", "6"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "2"),
        ];
        // oxrun inside torchrun inside srun; an sbatch without -n sets
        // SLURM_PROCID alone.
        let oxrun_in_everything = [
            ("SLURM_PROCID", "0"),
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("OXCCL_RANK", "3"),
            ("OXCCL_WORLD_SIZE", "5"),
        ];
        // MPICH's mpiexec inside salloc -n 3 (which ran on task 2).
        let mpich_in_salloc = [
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "3"),
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
        ];
        let cases: [(&[(&str, &str)], _); 4] = [
            (&mpirun_in_sbatch, (1, 4, Some(1), "Open MPI")),
            (&torchrun_in_srun, (6, 8, Some(2), "torchrun")),
            (&oxrun_in_everything, (3, 5, None, "oxccl")),
            (&mpich_in_salloc, (0, 2, None, "PMI")),
        ];
        for (vars, want) in cases {
            let l = launch_from_lookup(&env(vars)).unwrap();
            assert_eq!((l.rank, l.world, l.local_rank, l.source), want, "{vars:?}");
        }
        // An outer launcher's garbage is not read at all.
        let l = launch_from_lookup(&env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("SLURM_PROCID", "x"),
            ("SLURM_NTASKS", "0"),
        ]))
        .unwrap();
        assert_eq!((l.rank, l.world), (1, 2));
    }

    /// Under torchrun the agent's store already holds MASTER_PORT: ranks
    /// become its clients, with keys under the run and restart.
    #[test]
    fn torchrun_agent_store_is_used() {
        let mut vars = vec![
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RUN_ID", "abc"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ];
        let l = launch_from_lookup(&env(&vars)).unwrap();
        assert_eq!(l.rendezvous, Rendezvous::Oxccl, "no agent store announced");
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        let l = launch_from_lookup(&env(&vars)).unwrap();
        assert_eq!(
            l.rendezvous,
            Rendezvous::Torch {
                prefix: "oxccl/torchelastic/abc/attempt_2".into()
            }
        );
        // oxrun inside torchrun: oxrun's rank 0 serves its own store.
        vars.extend([("OXCCL_RANK", "0"), ("OXCCL_WORLD_SIZE", "2")]);
        let l = launch_from_lookup(&env(&vars)).unwrap();
        assert_eq!((l.source, l.rendezvous), ("oxccl", Rendezvous::Oxccl));
    }

    /// Without MASTER_ADDR, a job whose launcher says it runs on one node
    /// meets on 127.0.0.1, a multi-node Slurm step on its first node; the
    /// port comes from the job's id.
    #[test]
    fn rank_zero_is_found_from_the_launcher_without_master_addr() {
        let srun_one_node = [
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_ID", "812"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NUM_NODES", "1"),
            ("SLURM_STEP_NODELIST", "vm"),
        ];
        let l = launch_from_lookup(&env(&srun_one_node)).unwrap();
        let (host, port) = l.master.clone().unwrap();
        assert_eq!(host, "127.0.0.1");
        assert!((20_000..60_000).contains(&port));
        // Another step of the job, or another job, gets another port.
        let mut next_step = srun_one_node;
        next_step[3] = ("SLURM_STEP_ID", "1");
        let other = launch_from_lookup(&env(&next_step))
            .unwrap()
            .master
            .unwrap();
        assert_ne!(other.1, port);
        let srun_two_nodes = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_ID", "812"),
            ("SLURM_STEP_NUM_NODES", "2"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
        ];
        let l = launch_from_lookup(&env(&srun_two_nodes)).unwrap();
        assert_eq!(l.master.unwrap().0, "gpu07");
        let mpirun_one_node = [
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("OMPI_MCA_ess_base_jobid", "220725249"),
        ];
        let l = launch_from_lookup(&env(&mpirun_one_node)).unwrap();
        assert_eq!(l.master.unwrap().0, "127.0.0.1");
        // mpirun across nodes says nothing of rank 0's host: still unset.
        let mut two_nodes = mpirun_one_node;
        two_nodes[2] = ("OMPI_COMM_WORLD_LOCAL_SIZE", "1");
        assert_eq!(launch_from_lookup(&env(&two_nodes)).unwrap().master, None);
        // A port given alone is still an error naming the missing address.
        let mut port_only = srun_one_node.to_vec();
        port_only.push(("MASTER_PORT", "1234"));
        assert!(err(&port_only).starts_with("OXCCL_MASTER_ADDR: is not set"));
    }

    #[test]
    fn first_hosts_of_slurm_host_lists() {
        for (list, first) in [
            ("vm", "vm"),
            ("node[03-05,9],gpu1", "node03"),
            ("a1,a2", "a1"),
            ("n[7]", "n7"),
            ("rack1-n[002-010]", "rack1-n002"),
        ] {
            assert_eq!(first_host(list).as_deref(), Some(first), "{list}");
        }
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn master_from_either_name() {
        let l = launch_from_lookup(&env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(l.master, Some(("h".into(), 29500)));
        let l = launch_from_lookup(&env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("OXCCL_MASTER_ADDR", "h"),
            ("OXCCL_MASTER_PORT", "1"),
        ]))
        .unwrap();
        assert_eq!(l.master, Some(("h".into(), 1)));
    }

    #[test]
    fn missing_and_contradictory_settings_name_the_variable() {
        assert!(err(&[]).starts_with("OXCCL_RANK: no launcher variables found"));
        assert!(err(&[("RANK", "0")]).starts_with("WORLD_SIZE: is not set, but RANK is"));
        assert!(
            err(&[("OXCCL_RANK", "4"), ("OXCCL_WORLD_SIZE", "4")])
                .contains("OXCCL_RANK: rank 4 is not below OXCCL_WORLD_SIZE=4")
        );
        assert!(
            err(&[("OXCCL_RANK", "x"), ("OXCCL_WORLD_SIZE", "4")])
                .contains("OXCCL_RANK: 'x' is not a non-negative integer")
        );
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("OXCCL_MASTER_ADDR", "a"),
            ("MASTER_ADDR", "b"),
            ("MASTER_PORT", "1"),
        ]);
        assert!(
            e.starts_with("OXCCL_MASTER_ADDR: 'a' contradicts MASTER_ADDR='b'"),
            "{e}"
        );
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]);
        assert!(e.starts_with("OXCCL_MASTER_PORT: is not set"), "{e}");
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "99999"),
        ]);
        assert!(e.starts_with("MASTER_PORT: '99999' is not a port"), "{e}");
    }

    #[test]
    fn settings_parse_and_reject_garbage() {
        let c = Config::from_lookup(&env(&[
            ("OXCCL_TIMEOUT", "2.5"),
            ("OXCCL_SLICE_BYTES", "64K"),
            ("OXCCL_DEBUG", "INFO"),
            ("OXCCL_SOCKET_BUFFER", "4M"),
        ]))
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.slice_bytes, 65536);
        assert_eq!(c.socket_buffer, Some(4 << 20));
        assert_eq!(c.debug, "info");
        assert_eq!(Config::from_lookup(&env(&[])).unwrap(), Config::default());
        for (k, v) in [
            ("OXCCL_TIMEOUT", "-1"),
            ("OXCCL_TIMEOUT", "soon"),
            ("OXCCL_SLICE_BYTES", "0"),
            ("OXCCL_DEBUG", "loud"),
            ("OXCCL_SOCKET_ADDR", "here"),
        ] {
            let e = Config::from_lookup(&env(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(k), "{e}");
        }
    }

    #[test]
    fn fusion_settings_parse_and_reject_garbage() {
        let c = Config::from_lookup(&env(&[
            ("OXCCL_CYCLE_TIME_MS", "2.5"),
            ("OXCCL_FUSION_THRESHOLD", "1M"),
            ("OXCCL_STALL_WARNING_SECS", "0.5"),
            ("OXCCL_STALL_SHUTDOWN_SECS", "3"),
            ("OXCCL_TIMELINE", "/tmp/t.json"),
        ]))
        .unwrap();
        assert_eq!(c.cycle_time, Duration::from_micros(2500));
        assert_eq!(c.fusion_threshold, 1 << 20);
        assert_eq!(c.stall_warning, Duration::from_millis(500));
        assert_eq!(c.stall_shutdown, Some(Duration::from_secs(3)));
        assert_eq!(c.timeline, Some(PathBuf::from("/tmp/t.json")));
        let c = Config::from_lookup(&env(&[("OXCCL_STALL_SHUTDOWN_SECS", "0")])).unwrap();
        assert_eq!(c.stall_shutdown, None);
        for (k, v) in [
            ("OXCCL_CYCLE_TIME_MS", "-1"),
            ("OXCCL_FUSION_THRESHOLD", "big"),
            ("OXCCL_STALL_WARNING_SECS", "0"),
            ("OXCCL_STALL_SHUTDOWN_SECS", "never"),
        ] {
            let e = Config::from_lookup(&env(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(k), "{e}");
        }
    }

    #[test]
    fn readme_holds_the_generated_table() {
        let readme = include_str!("../../README.md");
        let table = settings_table();
        assert!(
            readme.contains(&table),
            "README's settings table differs from config::settings_table(); replace it with:\n{table}"
        );
    }

    /// Every default parses, and every value shows as text that parses
    /// back to itself, so validation and the cross-rank check see what the
    /// config holds.
    #[test]
    fn defaults_parse_and_round_trip() {
        let d = Config::default();
        for s in SETTINGS {
            if let Some(parse) = s.parse {
                let mut c = Config::blank();
                parse(&mut c, s.default).unwrap_or_else(|e| panic!("default of {}: {e}", s.name));
                // Secrets are never shown.
                let Some(shown) = s.value(&d) else {
                    assert!(s.name.contains("SECRET"), "{} has no show", s.name);
                    continue;
                };
                let mut back = d.clone();
                parse(&mut back, &shown).unwrap();
                assert_eq!(back, d, "{} shows as {shown:?}", s.name);
            }
        }
        d.validate().unwrap();
        assert_eq!(d.timeout, Duration::from_secs(300));
        assert_eq!(d.slice_bytes, 512 << 10);
        assert_eq!(d.small_bytes, 64 << 10);
        assert_eq!(d.shm_single_copy, SingleCopy::Auto);
        assert_eq!(d.socket_buffer, None);
        assert_eq!(d.debug, "warn");
    }

    /// Auto takes 16 KiB while the ranks fit the cores, 64 KiB beyond.
    #[test]
    fn single_copy_auto_follows_ranks_per_core() {
        assert_eq!(SingleCopy::Auto.threshold(false), Some(16 << 10));
        assert_eq!(SingleCopy::Auto.threshold(true), Some(64 << 10));
        assert_eq!(SingleCopy::From(100).threshold(true), Some(100));
        assert_eq!(SingleCopy::Never.threshold(false), None);
        assert!(!crowded_on(2, 2) && !crowded_on(8, 64) && crowded_on(4, 2));
        assert_eq!(count_cpus("0-1\n"), Some(2));
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-3,8-11"), Some(8));
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus("x"), None);
        assert!(host_cpus() >= 1);
        let mut c = Config::default();
        for (v, want) in [
            ("auto", SingleCopy::Auto),
            ("AUTO", SingleCopy::Auto),
            ("0", SingleCopy::Never),
            ("32K", SingleCopy::From(32 << 10)),
        ] {
            let s = SETTINGS
                .iter()
                .find(|s| s.name == "OXCCL_SHM_SINGLE_COPY")
                .unwrap();
            (s.parse.unwrap())(&mut c, v).unwrap();
            assert_eq!(c.shm_single_copy, want, "{v}");
        }
    }

    /// Ranks are counted host by host: a job of many ranks over hosts
    /// with a CPU for each is not crowded, one host with too many is, and
    /// only that one.
    #[test]
    fn crowded_hosts_count_ranks_per_host() {
        let job = |hosts: &[(&str, usize, usize)]| -> Vec<String> {
            let mut lines = Vec::new();
            for &(key, ranks, cpus) in hosts {
                lines.extend(std::iter::repeat_n(format!("{key} {cpus}"), ranks));
            }
            let mut v: Vec<String> = crowded_hosts(lines.iter().map(String::as_str))
                .into_iter()
                .map(|(key, ..)| key.to_owned())
                .collect();
            v.sort();
            v
        };
        // 16 ranks on two hosts of 8 CPUs: the old rule (world > CPUs) said crowded.
        assert!(job(&[("a", 8, 8), ("b", 8, 8)]).is_empty());
        assert_eq!(job(&[("a", 8, 8), ("b", 9, 8)]), ["b"]);
        assert_eq!(job(&[("a", 4, 2), ("b", 4, 2), ("c", 1, 1)]), ["a", "b"]);
        assert!(job(&[("a", 1, 1)]).is_empty());
        // Lines that do not parse count for no host.
        assert!(crowded_hosts(["a x", "a", "", "a 0x1"]).is_empty());
        assert_eq!(crowded_hosts(["a b 1", "a b 1"]), [("a b", 2, 1)]);
        assert_eq!(crowded_hosts(["h 2", "h 2", "h 2"]), [("h", 3, 2)]);
        let key = host_key();
        assert!(
            !key.is_empty() && !key.contains(char::is_whitespace),
            "{key}"
        );
    }

    /// Settings built in code are checked like the environment's.
    #[test]
    fn validate_refuses_what_the_environment_would() {
        type Breaker = fn(&mut Config);
        let cases: [(&str, Breaker); 6] = [
            ("OXCCL_SLICE_BYTES", |c| c.slice_bytes = 0),
            ("OXCCL_SLICE_BYTES", |c| c.slice_bytes = 2 << 30),
            ("OXCCL_TIMEOUT", |c| c.timeout = Duration::ZERO),
            ("OXCCL_SHM_BYTES", |c| c.shm_bytes = 100),
            ("OXCCL_SMALL_BYTES", |c| c.small_bytes = 4 << 30),
            ("OXCCL_DEBUG", |c| c.debug = "loud".into()),
        ];
        for (name, break_it) in cases {
            let mut c = Config::default();
            break_it(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(name), "{e}");
        }
        // A timeout too long to add to a clock is valid (waits saturate).
        let c = Config {
            timeout: Duration::MAX,
            ..Config::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn agreed_settings_are_listed() {
        let c = Config {
            slice_bytes: 4096,
            ..Config::default()
        };
        let a = c.agreed();
        assert!(a.contains("OXCCL_SLICE_BYTES=4096\n"), "{a}");
        assert!(a.contains("OXCCL_TRANSPORT=auto\n"), "{a}");
        assert!(!a.contains("OXCCL_TIMEOUT"), "{a}");
    }

    fn cerr(pairs: &[(&str, &str)]) -> String {
        Config::from_lookup(&env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn transport_ucx_is_chosen_where_built_and_refused_with_the_reason_elsewhere() {
        #[cfg(feature = "ucx")]
        assert_eq!(
            Config::from_lookup(&env(&[("OXCCL_TRANSPORT", "UCX")]))
                .unwrap()
                .transport,
            Transport::Ucx
        );
        #[cfg(not(feature = "ucx"))]
        {
            let e = cerr(&[("OXCCL_TRANSPORT", "ucx")]);
            assert!(e.contains("build it with feature ucx"), "{e}");
        }
        assert!(cerr(&[("OXCCL_TRANSPORT", "rdma")]).contains("auto, tcp, shm, ucx"));
    }

    fn secret_file(name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("oxccl-secret-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn job_secrets_come_from_the_environment_or_a_private_file() {
        let hexed = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let c = Config::from_lookup(&env(&[("OXCCL_JOB_SECRET", hexed)])).unwrap();
        assert_eq!(c.job_secret, Some(JobSecret::from_text(hexed).unwrap()));
        let c = Config::from_lookup(&env(&[("OXCCL_JOB_SECRET", "a pass phrase")])).unwrap();
        assert_eq!(
            c.job_secret,
            Some(JobSecret::from_text("a pass phrase").unwrap())
        );
        // Never shown: not in Debug, not among the agreed settings.
        assert!(!format!("{c:?}").contains("pass phrase"));
        assert!(!c.agreed().contains("SECRET"));
        c.validate().unwrap();

        // A file of mode 0600 (or stricter) works, and means the same text.
        let ok = secret_file("ok", "a pass phrase\n", 0o600);
        let c =
            Config::from_lookup(&env(&[("OXCCL_JOB_SECRET_FILE", ok.to_str().unwrap())])).unwrap();
        assert_eq!(
            c.job_secret,
            Some(JobSecret::from_text("a pass phrase").unwrap())
        );
        let strict = secret_file("strict", "x", 0o400);
        Config::from_lookup(&env(&[("OXCCL_JOB_SECRET_FILE", strict.to_str().unwrap())])).unwrap();

        // Others may read it: refused, naming the file and its mode.
        let open = secret_file("open", "a pass phrase", 0o644);
        let e = cerr(&[("OXCCL_JOB_SECRET_FILE", open.to_str().unwrap())]);
        assert!(e.starts_with("OXCCL_JOB_SECRET_FILE"), "{e}");
        assert!(e.contains(&open.display().to_string()), "{e}");
        assert!(e.contains("mode 0644"), "{e}");
        assert!(e.contains("0600"), "{e}");
        let group = secret_file("group", "x", 0o640);
        assert!(cerr(&[("OXCCL_JOB_SECRET_FILE", group.to_str().unwrap())]).contains("mode 0640"));

        // Missing, empty, or given twice.
        let e = cerr(&[("OXCCL_JOB_SECRET_FILE", "/nonexistent/oxccl-secret")]);
        assert!(e.contains("/nonexistent/oxccl-secret"), "{e}");
        let empty = secret_file("empty", " \n", 0o600);
        assert!(cerr(&[("OXCCL_JOB_SECRET_FILE", empty.to_str().unwrap())]).contains("is empty"));
        let e = cerr(&[
            ("OXCCL_JOB_SECRET", "x"),
            ("OXCCL_JOB_SECRET_FILE", ok.to_str().unwrap()),
        ]);
        assert!(e.contains("set only one"), "{e}");
        for p in [ok, strict, open, group, empty] {
            let _ = std::fs::remove_dir_all(p.parent().unwrap());
        }
    }

    #[test]
    fn auth_modes() {
        assert_eq!(Config::default().auth, AuthMode::Auto);
        for (v, m) in [
            ("require", AuthMode::Require),
            ("AUTO", AuthMode::Auto),
            ("off", AuthMode::Off),
        ] {
            assert_eq!(
                Config::from_lookup(&env(&[("OXCCL_AUTH", v)]))
                    .unwrap()
                    .auth,
                m
            );
        }
        let e = cerr(&[("OXCCL_AUTH", "maybe")]);
        assert!(e.starts_with("OXCCL_AUTH"), "{e}");
        assert!(e.contains("require, auto, off"), "{e}");

        // require without a secret: an error naming the variables to set.
        let c = Config {
            auth: AuthMode::Require,
            ..Config::default()
        };
        let e = c.secret_in_use(None).unwrap_err().to_string();
        assert!(
            e.contains("OXCCL_AUTH") && e.contains("OXCCL_JOB_SECRET"),
            "{e}"
        );
        // ... which a unique id's secret satisfies.
        let carried = JobSecret::from_text("carried").unwrap();
        assert_eq!(
            c.secret_in_use(Some(carried.clone())).unwrap(),
            Some(carried.clone())
        );
        // auto without one: none (and a warning); off: none even with one.
        assert_eq!(Config::default().secret_in_use(None).unwrap(), None);
        let off = Config {
            auth: AuthMode::Off,
            job_secret: Some(carried.clone()),
            ..Config::default()
        };
        assert_eq!(off.secret_in_use(Some(carried)).unwrap(), None);
    }
}
