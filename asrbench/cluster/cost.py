"""Communication cost model: predicted step time and speedup of each strategy at N workers.

The simulated cluster measures, per strategy, the bytes each worker puts on the wire per step and
the compute time of one worker step; this module turns those measurements into the wall time of
a step on a network described by a preset (conf/network/*.yaml) and into speedup over one worker.
Everything is float arithmetic on plain dicts, so every figure can be checked by hand. The end of
the file reads the model's inputs (a network preset, a compute profile) and applies it to a
simulated run (:func:`predict`).

Model
-----
Point-to-point messages follow the alpha-beta (Hockney) model: sending m bytes costs
alpha + m beta. Collectives are the bandwidth-optimal ring algorithms analysed by Thakur,
Rabenseifner & Gropp (2005), "Optimization of collective communication operations in MPICH",
IJHPCA 19(1), and by Patarasuk & Yuan (2009), "Bandwidth optimal all-reduce algorithms for
clusters of workstations", JPDC 69(2); broadcast is the pipelined chain (Johnsson & Ho 1989,
"Optimum broadcasting and personalized communication in hypercubes", IEEE TC 38(9)).

Symbols

    =========  ====================  ==================================================
    alpha      ``latency_s``         seconds per message (start-up cost)
    beta       1 / ``bandwidth_Bps`` seconds per byte on one link
    n                                workers taking part in one collective (Thakur's p)
    m                                bytes each worker contributes (``nbytes``)
    G          ``gpus_per_machine``  workers on one machine
    g          ``group_size``        workers per GTC group in GTC-BMUF
    K          ``block_size``        optimizer steps per BMUF block
    r          ``decode_rate``       GTC decode (scatter-add) rate, elements per second
    =========  ====================  ==================================================

Placement and links. Worker i sits on machine floor(i / G) (workers packed onto machines in
rank order, as torchrun and SLURM place them). A collective whose workers all sit on one
machine runs at the intra-machine figures (``intra_latency_s``, ``intra_bandwidth_Bps``:
NVLink or PCIe); one that spans machines is charged the inter-machine figures for every step
of the ring. A ring is synchronous, so each of its steps lasts as long as its slowest hop, and
with workers packed in rank order each machine's network link carries exactly one ring flow,
so the slowest hop is one inter-machine link at full bandwidth. This is the simplification: a
hierarchical (two-level) all-reduce has the same bandwidth term 2 (M-1)/M m beta_inter over M
machines but only 2 (M-1) inter-machine latencies instead of 2 (n-1), plus intra-machine
steps; the flat ring therefore over-estimates the latency term of a collective that spans
machines and is exact in its bandwidth term. Reduction arithmetic (Thakur's gamma) and
contention from several collectives sharing a link are left out.

Strategies, per optimizer step (``comm_parts``):

    ========  ==========================================================================
    single    0
    sync      ring all-reduce of the dense gradient among n
    gtc       all-gather of message lengths + all-gather of messages padded to the
              largest (what our GTC sends) among n + decode of the n messages,
              n e / r for e elements per message (padding is not decoded)
    bmuf      ring all-reduce of the model among n once per block, / K
    gtc_bmuf  gtc among the g workers of each group, every step; once per block, / K:
              all-reduce of the model among the n/g group representatives + pipelined
              broadcast of the result within each group
    ========  ==========================================================================

Stragglers. A worker's compute grows with the frames of its batch (the LSTM runs over every
padded frame), so workers of one synchronous step finish at different times and the step waits
for the slowest. With f[t][i] the padded frames of worker i at step t, a schedule of groups of g
workers that synchronise every step and of blocks of K steps closed by a collective over all
groups costs, per block b, max over groups of sum over t in b of max over i in the group of
f[t][i] frames; ``straggler_factor`` (:func:`straggler_factor`) is that over all blocks divided
by the frames of the mean worker, sum over t of mean over i of f[t][i]. sync and gtc are g = n,
K = 1 (the slowest worker of each step); bmuf is g = 1 (the slowest worker's block); gtc_bmuf
is the slowest group's block, each of its steps the slowest member's. ``step_time`` charges the
per-worker compute at this factor; T_1 stays the mean worker's compute, so the speedup falls by
exactly the waiting.

Per-step software overhead (optional, a network file's ``step_overhead_s``): what a real
training loop spends each step outside the model's forward, backward and optimizer and outside
the bytes on the wire: the trainer's own loop, DDP's reducer, a communication hook's Python and
its collectives' launches. It is a constant per strategy, in seconds, measured on the machine
the network file describes (conf/network/loopback_gloo_checks.json: fitted at N = 2 and checked
at N = 4); ``step_time`` adds it to T_N and ``predict`` adds the ``single`` entry to T_1. A file
without it charges none, which is what the paper-scale presets do: nothing measured it there.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import to_absolute_path
from omegaconf import OmegaConf

from asrbench.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the cost model itself needs nothing of the cluster
    from asrbench.cluster.simulated import SimulatedCluster

NETWORK_DIR = Path(__file__).resolve().parents[2] / "conf" / "network"

STRATEGIES = ("single", "sync", "gtc", "bmuf", "gtc_bmuf")
NETWORK_KEYS = ("latency_s", "bandwidth_Bps", "gpus_per_machine", "intra_latency_s", "intra_bandwidth_Bps")
LENGTH_BYTES = 8  # one int64 message length per worker in GTC's first all-gather

# Keys of `stats` each strategy reads (all per worker, per optimizer step unless noted):
#   dense_bytes_per_worker_per_step  bytes of the dense gradient all-reduced by sync
#   gtc_msg_bytes_mean               mean bytes of one worker's GTC message (unpadded)
#   gtc_msg_bytes_max                largest worker's GTC message bytes (the padded size)
#   elements_sent_per_step           mean gradient elements in one worker's GTC message
#   decode_rate                      GTC decode rate r, elements per second (measured)
#   model_bytes                      bytes all-reduced at a block end (flat parameters,
#                                    plus optimizer state when BMUF averages it)
#   block_size                       K, optimizer steps per BMUF block
#   group_size                       g, workers per GTC group (divides n)
#   gtc_dense_step_fraction          optional (0 if absent): fraction of GTC's steps all-reduced dense
#                                    (strategy.dense_warmup_steps); these then read
#                                    dense_bytes_per_worker_per_step, the GTC_KEYS the other steps
#   straggler_factor                 optional (1 if absent): compute of the slowest worker (group,
#                                    block) over the mean worker's, >= 1 (:func:`straggler_factor`)
_GTC_KEYS = ("gtc_msg_bytes_mean", "gtc_msg_bytes_max", "elements_sent_per_step", "decode_rate")
_BMUF_KEYS = ("model_bytes", "block_size")
STATS_KEYS: dict[str, tuple[str, ...]] = {
    "single": (),
    "sync": ("dense_bytes_per_worker_per_step",),
    "gtc": _GTC_KEYS,
    "bmuf": _BMUF_KEYS,
    "gtc_bmuf": (*_GTC_KEYS, *_BMUF_KEYS, "group_size"),
}


# --- network presets and placement -------------------------------------------------------------

def check_network(network: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of a network preset: floats for the figures, an int for G."""
    name = network.get("name", "?")
    out: dict[str, Any] = {"name": name, "notes": network.get("notes", "")}
    for key in NETWORK_KEYS:
        value = network.get(key)
        if value is None:
            raise ConfigError(f"network={name}: key `{key}` is missing; add it to conf/network/{name}.yaml")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"network={name}: `{key}` must be a number (got {value!r}); "
                              f"fix it in conf/network/{name}.yaml") from None
        if key.endswith("latency_s"):
            valid, wanted = 0.0 <= value < math.inf, "a number >= 0 (seconds)"
        elif key == "gpus_per_machine":
            valid, wanted = 1 <= value < math.inf and value == int(value), "a whole number >= 1"
        else:
            valid, wanted = 0.0 < value < math.inf, "a positive number (bytes/s)"
        if not valid:
            raise ConfigError(f"network={name}: `{key}` must be {wanted} (got {value}); "
                              f"fix it in conf/network/{name}.yaml")
        out[key] = value
    out["gpus_per_machine"] = int(out["gpus_per_machine"])
    overhead = network.get("step_overhead_s")
    if overhead is not None:
        out["step_overhead_s"] = _check_overhead(name, overhead)
    return out


def _check_overhead(name: str, overhead: Any) -> dict[str, float]:
    """``step_overhead_s`` as {strategy: seconds}: one number for every strategy, or a mapping."""
    where = f"network={name}: `step_overhead_s`"
    if isinstance(overhead, Mapping):
        unknown = sorted(set(overhead) - set(STRATEGIES))
        if unknown:
            raise ConfigError(f"{where} names {', '.join(map(str, unknown))}, not a strategy; use keys of "
                              f"{', '.join(STRATEGIES)}")
        items = dict(overhead)
    else:
        items = {st: overhead for st in STRATEGIES}
    out = {}
    for st, value in items.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
            raise ConfigError(f"{where}[{st}] must be a number of seconds >= 0 (got {value!r}); "
                              f"fix it in conf/network/{name}.yaml")
        out[str(st)] = float(value)
    return out


def step_overhead(network: Mapping[str, Any], strategy: str) -> float:
    """Seconds of per-step software overhead of `strategy` on this network's machine (0 if not measured)."""
    return float((network.get("step_overhead_s") or {}).get(strategy, 0.0))


def link(network: Mapping[str, Any], *, within_machine: bool) -> tuple[float, float]:
    """(alpha, bandwidth in bytes/s) of the link a collective runs at."""
    if within_machine:
        return float(network["intra_latency_s"]), float(network["intra_bandwidth_Bps"])
    return float(network["latency_s"]), float(network["bandwidth_Bps"])


def within_one_machine(first: int, last: int, gpus_per_machine: int) -> bool:
    """Whether workers first..last (ranks, packed G per machine) all sit on one machine."""
    return first // gpus_per_machine == last // gpus_per_machine


def groups_within_machines(n: int, group_size: int, gpus_per_machine: int) -> bool:
    """Whether every group of g consecutive ranks sits on one machine (groups aligned to machines).

    The groups run concurrently and synchronously, so a single group that straddles two
    machines makes the whole step pay the inter-machine figures.
    """
    return all(within_one_machine(k * group_size, (k + 1) * group_size - 1, gpus_per_machine)
               for k in range(n // group_size))


# --- collectives (alpha-beta model) ------------------------------------------------------------

def _check_collective(nbytes: float, n: int, latency_s: float, bandwidth_Bps: float) -> None:
    if n < 1 or n != int(n):
        raise ValueError(f"Arg `n` (workers) must be a positive whole number (got {n})")
    if nbytes < 0:
        raise ValueError(f"Arg `nbytes` must be >= 0 (got {nbytes})")
    if latency_s < 0:
        raise ValueError(f"Arg `latency_s` must be >= 0 (got {latency_s})")
    if not bandwidth_Bps > 0:
        raise ValueError(f"Arg `bandwidth_Bps` must be positive (got {bandwidth_Bps})")


def ring_allreduce_time(nbytes: float, n: int, latency_s: float, bandwidth_Bps: float) -> float:
    """Ring all-reduce of m bytes among n workers: T = 2 (n-1) (alpha + m / (n B)).

    Reduce-scatter then all-gather, each n-1 steps moving one m/n chunk per worker
    (Patarasuk & Yuan 2009). Its bandwidth term 2 (n-1)/n m beta is the lower bound that
    Thakur et al. 2005 also reach with Rabenseifner's algorithm; the (n-1)/n m gamma reduction
    term is dropped. B = 1/beta. n = 1 costs 0.
    """
    _check_collective(nbytes, n, latency_s, bandwidth_Bps)
    return 2 * (n - 1) * (latency_s + nbytes / (n * bandwidth_Bps))


def allgather_time(nbytes_per_worker: float, n: int, latency_s: float, bandwidth_Bps: float) -> float:
    """Ring all-gather of equal pieces of m bytes: T = (n-1) (alpha + m / B).

    Thakur et al. 2005, ring all-gather: (p-1) alpha + (p-1)/p N beta with N = p m bytes in all.
    """
    _check_collective(nbytes_per_worker, n, latency_s, bandwidth_Bps)
    return (n - 1) * (latency_s + nbytes_per_worker / bandwidth_Bps)


def allgatherv_time(mean_bytes: float, max_bytes: float, n: int, latency_s: float, bandwidth_Bps: float,
                    *, padded: bool = True, length_bytes: float = LENGTH_BYTES) -> float:
    """All-gather of variable-size messages (GTC): lengths first, then the messages.

    padded=True (what our GTC sends): T = allgather(length_bytes) + allgather(m_max), every
    message padded to the largest, m_max = ``max_bytes``. A ring all-gatherv without padding
    costs the same, since at every ring step each piece is in flight on some link and the step
    lasts as long as the largest. padded=False gives the lower bound of a perfectly pipelined
    exchange, T = allgather(length_bytes) + (n-1) (alpha + m_mean / B), m_mean = ``mean_bytes``:
    each worker must receive the other n-1 messages, (n-1) m_mean bytes on its one inbound link.
    """
    if max_bytes < mean_bytes:
        raise ValueError(f"Arg `max_bytes` ({max_bytes}) must be >= `mean_bytes` ({mean_bytes})")
    lengths = allgather_time(length_bytes, n, latency_s, bandwidth_Bps)
    return lengths + allgather_time(max_bytes if padded else mean_bytes, n, latency_s, bandwidth_Bps)


def broadcast_time(nbytes: float, n: int, latency_s: float, bandwidth_Bps: float) -> float:
    """Pipelined chain (ring) broadcast of m bytes from one worker, as NCCL runs it.

    The message is cut into S segments that flow down the chain of n workers:
    T(S) = (n - 2 + S) (alpha + m beta / S). The best S is sqrt((n-2) m beta / alpha), giving
    T = (sqrt((n-2) alpha) + sqrt(m beta))^2 (the classical pipelined-chain optimum, Johnsson &
    Ho 1989); S is taken continuous and at least 1, so n = 2 or a tiny message costs
    (n-1) (alpha + m beta), and alpha = 0 costs m beta. Each worker receives m bytes once, the
    convention of `asrbench.strategies.accounting`. n = 1 costs 0.
    """
    _check_collective(nbytes, n, latency_s, bandwidth_Bps)
    if n == 1:
        return 0.0
    transfer = nbytes / bandwidth_Bps  # m beta
    if latency_s == 0:
        return transfer
    segments = max(1.0, math.sqrt((n - 2) * transfer / latency_s))
    return (n - 2 + segments) * (latency_s + transfer / segments)


def decode_time(elements_received: float, decode_rate_elems_per_s: float) -> float:
    """GTC decode (scatter-add of the received (index, value) pairs): T = e / r, r measured."""
    if elements_received < 0:
        raise ValueError(f"Arg `elements_received` must be >= 0 (got {elements_received})")
    if not decode_rate_elems_per_s > 0:
        raise ValueError(f"Arg `decode_rate_elems_per_s` must be positive (got {decode_rate_elems_per_s}); "
                         "measure it with the GTC decoder on the target device")
    return elements_received / decode_rate_elems_per_s


# --- strategies --------------------------------------------------------------------------------

def _stats(strategy: str, stats: Mapping[str, Any], n: int) -> dict[str, float]:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if n < 1 or n != int(n):
        raise ValueError(f"Arg `n` (workers) must be a positive whole number (got {n})")
    out: dict[str, float] = {}
    for key in STATS_KEYS[strategy]:
        if stats.get(key) is None:
            raise ValueError(f"stats[{key!r}] is missing; strategy={strategy} needs "
                             f"{', '.join(STATS_KEYS[strategy])}")
        out[key] = float(stats[key])
        if out[key] < 0:
            raise ValueError(f"stats[{key!r}] must be >= 0 (got {out[key]})")
    for key in ("block_size", "group_size"):
        if key in out and (out[key] < 1 or out[key] != int(out[key])):
            raise ValueError(f"stats[{key!r}] must be a positive whole number (got {out[key]})")
    if "gtc_msg_bytes_max" in out and out["gtc_msg_bytes_max"] < out["gtc_msg_bytes_mean"]:
        raise ValueError(f"stats['gtc_msg_bytes_max'] ({out['gtc_msg_bytes_max']}) must be >= "
                         f"stats['gtc_msg_bytes_mean'] ({out['gtc_msg_bytes_mean']})")
    if strategy in ("gtc", "gtc_bmuf") and stats.get("gtc_dense_step_fraction"):
        out["gtc_dense_step_fraction"] = float(stats["gtc_dense_step_fraction"])
        if not 0 <= out["gtc_dense_step_fraction"] <= 1:
            raise ValueError(f"stats['gtc_dense_step_fraction'] must be in [0, 1] (got {out['gtc_dense_step_fraction']})")
        if stats.get("dense_bytes_per_worker_per_step") is None:
            raise ValueError("stats['dense_bytes_per_worker_per_step'] is missing; GTC's dense steps "
                             "(gtc_dense_step_fraction > 0) need it")
        out["dense_bytes_per_worker_per_step"] = float(stats["dense_bytes_per_worker_per_step"])
    if "group_size" in out and n % int(out["group_size"]):
        raise ValueError(f"stats['group_size']={int(out['group_size'])} must divide the {n} workers")
    return out


def _gtc_parts(s: Mapping[str, float], workers: int, alpha: float, bandwidth: float) -> dict[str, float]:
    """GTC among `workers`: lengths all-gather, padded message all-gather, decode of the messages;
    on the fraction f of steps sent dense (a warm-up), a ring all-reduce of the gradient instead.

    A lone worker applies its own update: no exchange and no decode.
    """
    if workers == 1:
        return {"gtc_lengths": 0.0, "gtc_messages": 0.0, "gtc_decode": 0.0}
    f = s.get("gtc_dense_step_fraction", 0.0)
    parts = {
        "gtc_lengths": (1 - f) * allgather_time(LENGTH_BYTES, workers, alpha, bandwidth),
        "gtc_messages": (1 - f) * allgather_time(s["gtc_msg_bytes_max"], workers, alpha, bandwidth),
        "gtc_decode": (1 - f) * decode_time(workers * s["elements_sent_per_step"], s["decode_rate"]),
    }
    if f > 0:
        parts["gtc_dense_allreduce"] = f * ring_allreduce_time(s["dense_bytes_per_worker_per_step"], workers, alpha,
                                                               bandwidth)
    return parts


def comm_parts(strategy: str, stats: Mapping[str, Any], n: int, network: Mapping[str, Any]) -> dict[str, float]:
    """Communication seconds per optimizer step, by part, amortised over a block where periodic.

    See the module docstring for what each strategy exchanges and `STATS_KEYS` for the keys of
    `stats` it reads. BMUF parts are the cost of one block-end exchange divided by K.
    """
    s = _stats(strategy, stats, n)
    net = check_network(network)
    G = net["gpus_per_machine"]
    alpha, bandwidth = link(net, within_machine=within_one_machine(0, n - 1, G))
    if strategy == "single":
        return {}
    if strategy == "sync":
        return {"allreduce": ring_allreduce_time(s["dense_bytes_per_worker_per_step"], n, alpha, bandwidth)}
    if strategy == "gtc":
        return _gtc_parts(s, n, alpha, bandwidth)
    K = s["block_size"]
    if strategy == "bmuf":
        return {"block_allreduce": ring_allreduce_time(s["model_bytes"], n, alpha, bandwidth) / K}
    g = int(s["group_size"])
    group_alpha, group_bandwidth = link(net, within_machine=groups_within_machines(n, g, G))
    rep_alpha, rep_bandwidth = link(net, within_machine=within_one_machine(0, n - g, G))
    parts = _gtc_parts(s, g, group_alpha, group_bandwidth)
    parts["block_allreduce"] = ring_allreduce_time(s["model_bytes"], n // g, rep_alpha, rep_bandwidth) / K
    parts["block_broadcast"] = broadcast_time(s["model_bytes"], g, group_alpha, group_bandwidth) / K
    return parts


def straggler_factor(frames: Sequence[Sequence[float]], group_size: int, block_size: int = 1) -> float:
    """Compute of the slowest worker, group and block over the mean worker's (module docstring).

    `frames[t][i]` is the work of worker i at step t (padded frames); groups are g consecutive
    workers that wait for each other every step, blocks K consecutive steps (the last may be
    partial) after which every group waits for the slowest. Returns 1.0 when nothing was done.
    """
    if group_size < 1 or block_size < 1:
        raise ValueError(f"Args `group_size` and `block_size` must be positive (got {group_size}, {block_size})")
    mean_work, slowest = 0.0, 0.0
    for start in range(0, len(frames), block_size):
        block = frames[start:start + block_size]
        workers = len(block[0])
        if workers % group_size:
            raise ValueError(f"Arg `group_size`={group_size} must divide the {workers} workers")
        per_group = [0.0] * (workers // group_size)
        for step in block:
            assert len(step) == workers, "every step needs the frames of every worker"
            mean_work += sum(step) / workers
            for k in range(len(per_group)):
                per_group[k] += max(step[k * group_size:(k + 1) * group_size])
        slowest += max(per_group)
    return slowest / mean_work if mean_work > 0 else 1.0


def schedule(strategy: str, n: int, stats: Mapping[str, Any]) -> tuple[int, int]:
    """(g, K) of a strategy's waiting: who waits for whom every step, and every how many steps all do."""
    if strategy in ("sync", "gtc"):
        return n, 1
    if strategy == "bmuf":
        return 1, int(stats["block_size"])
    if strategy == "gtc_bmuf":
        return int(stats["group_size"]), int(stats["block_size"])
    return 1, 1


def step_time(strategy: str, compute_s: float, stats: Mapping[str, Any], n: int, network: Mapping[str, Any],
              *, overlap: float = 0.0) -> dict[str, float]:
    """Predicted wall time of one optimizer step: {compute_s, straggler_s, comm_s, total_s} in seconds.

    T_step = s T_compute + T_comm - min(overlap T_comm, s T_compute) + T_overhead, where s is
    ``stats["straggler_factor"]`` (1 if absent: every worker as fast as the mean one),
    T_compute the mean worker's compute, T_comm the sum of `comm_parts` and ``overlap`` in
    [0, 1] the fraction of communication hidden behind compute (bucketed all-reduce during the
    backward pass). The default 0 assumes none is hidden, which is what a BMUF block end or a
    GTC exchange after the backward pass does. ``straggler_s`` = (s - 1) T_compute is the
    waiting for the slowest worker; ``overhead_s`` = T_overhead the network file's per-step software
    overhead of this strategy (:func:`step_overhead`, 0 when it has none).
    """
    if compute_s < 0:
        raise ValueError(f"Arg `compute_s` must be >= 0 (got {compute_s})")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"Arg `overlap` must be in [0, 1] (got {overlap}); 0 = no communication hidden")
    factor = float(stats.get("straggler_factor") or 1.0)
    if factor < 1.0:
        raise ValueError(f"stats['straggler_factor'] must be >= 1 (got {factor}): the slowest worker is never "
                         f"faster than the mean one")
    comm = sum(comm_parts(strategy, stats, n, network).values())
    busy = factor * compute_s
    overhead = step_overhead(network, strategy)
    total = busy + comm - min(overlap * comm, busy) + overhead
    return {"compute_s": float(compute_s), "straggler_s": busy - compute_s, "comm_s": comm,
            "overhead_s": overhead, "total_s": total}


def speedup(n: int, t_step_n: float, t_step_1: float, samples_per_step_per_worker: float = 1.0) -> float:
    """Throughput with n workers over throughput with one, same per-worker batch b.

    S(n) = (n b / T_n) / (b / T_1) = n T_1 / T_n.
    """
    if not (t_step_n > 0 and t_step_1 > 0 and samples_per_step_per_worker > 0):
        raise ValueError(f"step times and samples per step must be positive "
                         f"(got t_step_n={t_step_n}, t_step_1={t_step_1}, "
                         f"samples_per_step_per_worker={samples_per_step_per_worker})")
    throughput_n = n * samples_per_step_per_worker / t_step_n
    throughput_1 = samples_per_step_per_worker / t_step_1
    return throughput_n / throughput_1


def scaling(strategy: str, compute_s: float, stats: Mapping[str, Any], ns: Sequence[int],
            network: Mapping[str, Any], *, overlap: float = 0.0) -> list[dict[str, float]]:
    """Step time and speedup over one worker (T_1 = compute_s + the single-worker overhead) for each n in `ns`.

    The same measured `stats` are used at every n: message sizes and decode rate measured at one
    scale stand for all of them.
    """
    rows = []
    t_1 = compute_s + step_overhead(network, "single")
    for n in ns:
        row = step_time(strategy, compute_s, stats, n, network, overlap=overlap)
        rows.append({"n": n, **row, "speedup": speedup(n, row["total_s"], t_1)})
    return rows


# --- inputs: network preset and compute profile ------------------------------------------------

def load_network(spec: Any) -> dict[str, Any]:
    """A network preset by name (conf/network/<name>.yaml), by path, or given inline as a mapping."""
    if isinstance(spec, Mapping):
        return check_network(spec)
    if not spec:
        raise ConfigError("cluster.network is empty; name a preset of conf/network/ (e.g. cluster.network=paper)")
    path = Path(str(spec))
    if path.suffix not in (".yaml", ".yml"):
        path = NETWORK_DIR / f"{spec}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in NETWORK_DIR.glob("*.yaml")))
        raise ConfigError(f"cluster.network={spec} is not a preset; use one of {presets} or a path to a yaml file")
    return check_network(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def load_compute_profile(path: str | Path | None) -> dict[str, Any] | None:
    """A yaml/json file with ``compute_s_per_worker_step`` (seconds of one worker's step on the target
    device); optional ``decode_rate`` (GTC decode, elements/s) and ``gtc_encode_s_per_worker_step``."""
    if not path:
        return None
    file = Path(to_absolute_path(str(path)))
    if not file.is_file():
        raise ConfigError(f"cluster.compute_profile={path}: no such file; give a yaml/json file with "
                          f"compute_s_per_worker_step")
    profile = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    value = profile.get("compute_s_per_worker_step") if isinstance(profile, Mapping) else None
    if not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"cluster.compute_profile={path}: needs compute_s_per_worker_step, a positive number "
                          f"of seconds (got {value!r})")
    return dict(profile) | {"path": str(file)}


# --- a simulated run's prediction --------------------------------------------------------------

def predict(cluster: SimulatedCluster, network: Mapping[str, Any], *, profile: Mapping[str, Any] | None = None,
            overlap: float = 0.0, frames_per_worker_step: float | None = None) -> dict[str, Any]:
    """The cost model's step time and speedup for this run's strategy, N and measured statistics.

    T_1 = compute + the network file's single-worker overhead (one worker, no communication);
    T_N = s (compute + GTC encode) + communication + this strategy's overhead (:func:`step_time`),
    s the run's straggler factor (measured from every worker's batches); speedup = N T_1 / T_N
    (:func:`speedup`). The ``*_without_stragglers`` figures take s = 1.
    """
    kind = cluster.kind
    stats = cluster.cost_stats()
    measured = cluster.compute_s_per_worker_step()
    compute = float(profile["compute_s_per_worker_step"]) if profile else measured
    encode_s = (float(profile.get("gtc_encode_s_per_worker_step", 0.0)) if profile
                else cluster.encode_s_per_worker_step())
    if profile and profile.get("decode_rate") and "decode_rate" in stats:
        stats["decode_rate"] = float(profile["decode_rate"])
    if compute <= 0:
        raise ConfigError("no worker step was measured (the run trained 0 steps); train at least one step")
    t_1 = compute + step_overhead(network, "single")  # one worker: its own loop's overhead, no communication
    step = step_time(kind, compute + encode_s, stats, cluster.nodes, network, overlap=overlap)
    even = step_time(kind, compute + encode_s, stats | {"straggler_factor": 1.0}, cluster.nodes, network,
                     overlap=overlap)
    out = {
        "simulated": True,
        "network": network["name"],
        "compute_source": profile["path"] if profile else "measured",
        "compute_s_per_worker_step": compute,
        "measured_compute_s_per_worker_step": measured,
        "gtc_encode_s_per_worker_step": encode_s,
        "predicted_step_s": step["total_s"],
        "predicted_comm_s": step["comm_s"],
        "predicted_comm_parts": comm_parts(kind, stats, cluster.nodes, network),
        "predicted_speedup": speedup(cluster.nodes, step["total_s"], t_1),
        "predicted_overhead_s": step["overhead_s"],
        "straggler_factor": stats.get("straggler_factor", 1.0),
        "predicted_straggler_s": step["straggler_s"],
        "predicted_step_s_without_stragglers": even["total_s"],
        "predicted_speedup_without_stragglers": speedup(cluster.nodes, even["total_s"], t_1),
        "cost_model": {"strategy": kind, "n": cluster.nodes, "overlap": overlap, "stats": stats,
                       "network": dict(network)},
    }
    if frames_per_worker_step:
        out["predicted_train_frames_per_s"] = cluster.nodes * frames_per_worker_step / step["total_s"]
    return out
