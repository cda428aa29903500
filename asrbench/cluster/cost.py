"""Communication cost model: predicted step time and speedup of each strategy at N workers.

The simulated cluster measures, per strategy, the bytes each worker puts on the wire per step and
the compute time of one worker step; this module turns those measurements into the wall time of
a step on a network described by a preset (conf/network/*.yaml) and into speedup over one worker.
Everything is float arithmetic on plain dicts, so every figure can be checked by hand. The end of
the file reads the model's inputs (a network preset, a compute profile);
:func:`asrbench.cluster.simulated.predict` applies it to a simulated run.

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

Strategies. Each strategy's module states its communication schedule (its spec's ``schedule``,
:mod:`asrbench.strategies.contract`): which collectives, of how many bytes, among which workers
(all n, the g of each group, or the n/g group representatives) and how often (every step, or
once per block of K steps, then divided by K); :func:`comm_parts` prices each entry with the
formulas below. For example sync is one ring all-reduce of the dense gradient among n; GTC an
all-gather of message lengths, an all-gather of messages padded to the largest and the decode of
the n messages (e / r for e elements received); BMUF one all-reduce of the model per block.

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
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import OmegaConf

from asrbench import strategies
from asrbench.errors import ConfigError
from asrbench.strategies.contract import Collective

NETWORK_DIR = Path(__file__).resolve().parents[2] / "conf" / "network"

NETWORK_KEYS = ("latency_s", "bandwidth_Bps", "gpus_per_machine", "intra_latency_s", "intra_bandwidth_Bps")
LENGTH_BYTES = 8  # one int64 message length per worker in an all-gatherv's first all-gather


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
        unknown = sorted(set(overhead) - set(strategies.names()))
        if unknown:
            raise ConfigError(f"{where} names {', '.join(map(str, unknown))}, not a strategy; use keys of "
                              f"{', '.join(strategies.names())}")
        items = dict(overhead)
    else:
        items = {st: overhead for st in strategies.names()}
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

def _spec(strategy: str) -> Any:
    if strategy not in strategies.names():
        raise ValueError(f"strategy={strategy!r} is unknown; use one of {', '.join(strategies.names())}")
    return strategies.spec(strategy)


def price(c: Collective, n: int, net: Mapping[str, Any]) -> float:
    """Seconds per optimizer step of one entry of a strategy's schedule among `n` workers.

    The link: intra-machine when every instance of the collective sits on one machine (consecutive
    groups aligned to machines; the representatives 0, s, 2s, ... on the first), else inter-machine.
    """
    G = net["gpus_per_machine"]
    if c.stride == 1:
        within = groups_within_machines(n, c.workers, G) if n % c.workers == 0 else within_one_machine(0, n - 1, G)
    else:
        within = within_one_machine(0, (c.workers - 1) * c.stride, G)
    alpha, bandwidth = link(net, within_machine=within)
    if c.op == "all_reduce":
        t = ring_allreduce_time(c.nbytes, c.workers, alpha, bandwidth)
    elif c.op == "all_gather":
        t = allgather_time(c.nbytes, c.workers, alpha, bandwidth)
    elif c.op == "broadcast":
        t = broadcast_time(c.nbytes, c.workers, alpha, bandwidth)
    else:
        t = c.seconds
    return c.share * t / c.every


def comm_parts(strategy: str, stats: Mapping[str, Any], n: int, network: Mapping[str, Any]) -> dict[str, float]:
    """Communication seconds per optimizer step, by part, amortised over a block where periodic.

    The parts are the strategy's schedule (its spec's ``schedule``: which collectives, of which
    sizes, among whom, how often), each priced by :func:`price`; `stats` holds the keys of its
    spec's ``stats_keys``.
    """
    entry = _spec(strategy)
    s = entry.read_stats(stats, n)
    net = check_network(network)
    parts: dict[str, float] = {}
    for c in entry.schedule(s, n):
        parts[c.part] = parts.get(c.part, 0.0) + price(c, n, net)
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


def waits(strategy: str, n: int, stats: Mapping[str, Any]) -> tuple[int, int]:
    """(g, K) of a strategy's waiting: who waits for whom every step, and every how many steps all do
    (its spec's ``waiting``; not its ``schedule``, the collectives :func:`comm_parts` prices)."""
    return _spec(strategy).waiting(stats, n)


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
    t_1 = compute_s + step_overhead(network, strategies.BASELINE)
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
