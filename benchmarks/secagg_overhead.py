"""Secure vs plain aggregation: round time and bytes per client, as JSON.

One process, ``--clients`` clients (default 10), a ``--params``-value float32 update each
(default 1,000,000). Repetitions of the secure round (for each ``--neighbours`` setting)
and of the plain round are interleaved; medians are reported (and, for the critical path, also the ratio of the fastest
repetitions, ``ratio_critical_path_min``, which other jobs on a shared machine disturb
least).

* plain round: each client serialises its float32 update (``tobytes``) plus its weight; the
  server deserialises and computes the weighted mean (float32 accumulation).
* secure round: the five stages of :mod:`fedrg.secagg` (signed key agreement verified
  against the roster, encrypted Shamir shares, masked quantised upload, signed consistency
  check, unmasking), each client's session serialised between messages as the Flower glue
  keeps it in ``context.state``; each client holds its own copy of the roster.

Two times are reported for each: ``sequential_s`` (all parties one after another in this
process) and ``critical_path_s`` (per stage, the slowest client plus the server: what a
round costs when hospitals compute in parallel on their own machines). Local training and
network latency are not included; ``with_local_training`` shows the ratio a round would have
for a few assumed local-training times (a model, not a measurement).

``pipelined`` (per graph): the same round with each client's masks expanded before its
update exists (:meth:`~fedrg.secagg.client.ClientSession.precompute_masks`, as a hospital
does while it trains in a pipelined round, ``secagg.pipelined``); that expansion is reported
as ``masks_before_training_s`` and is not on the critical path (it overlaps training).
``fastest_repetition`` gives the per-stage times (slowest client, server; stages setup,
share, masked, consistency, unmask, the server's set-up first) of the fastest secure round.

The floor: ``mask_s`` is the fastest time to expand one mask of the vector's length
(AES-CTR keystream) and add it to a ring vector, measured with the same threads, and
``ratio_critical_path_floor`` is ``(plain critical path + masks on the secure critical path
x mask_s) / plain critical path`` (fastest repetitions): the slowest client expands its
self mask and one pairwise mask per neighbour, the server one self mask per survivor. No
implementation of the protocol can go below it on this machine, even if encoding,
signatures, shares, sums and decoding cost nothing (pipelined: the server's masks only).

Also reported (``--scale``, on by default):

* ``shamir_reconstruction``: server time to reconstruct one secret shared among all ``n``
  holders with the default threshold, for ``n`` in 10/20/50/100/1000 (``first_ms``: the
  first secret of a holder set, Lagrange coefficients included; ``per_secret_ms``:
  amortised over ``n`` secrets with the same holders, as the server meets them);
* ``server_round_100``: server time of one whole round with 100 hospitals (default
  graph: SecAgg+), with a 10,000-value update.

Usage: ``python benchmarks/secagg_overhead.py [--clients 10] [--params 1000000] [--reps 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedrg.secagg import (
    ClientSession,
    ClientTrust,
    Roster,
    ServerAggregator,
    crypto,
    default_threshold,
    error_bound,
    neighbour_graph,
    shamir,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from secagg_driver import message_nbytes, run_secure_aggregation, simulated_trusts


def own_rosters(trusts: list[ClientTrust]) -> list[ClientTrust]:
    """Each client its own roster object (no verification shared between clients)."""
    return [ClientTrust(t.identity, Roster(list(t.roster.entries.values())), min_peers=1)
            for t in trusts]


def plain_round(updates: list[np.ndarray], weights: list[float]) -> dict:
    client_s, up = [], []
    payloads = []
    for x, w in zip(updates, weights, strict=True):
        t0 = time.perf_counter()
        blob = np.asarray(x, dtype=np.float32).tobytes()
        client_s.append(time.perf_counter() - t0)
        payloads.append((blob, w))
        up.append(len(blob) + 8)
    t0 = time.perf_counter()
    # The fastest straightforward FedAvg (float32 accumulation), so the ratio is not flattered.
    total = sum(w for _, w in payloads)
    acc = np.zeros(updates[0].size, dtype=np.float32)
    for blob, w in payloads:
        acc += np.float32(w / total) * np.frombuffer(blob, dtype=np.float32)
    mean = acc
    server_s = time.perf_counter() - t0
    return {
        "mean": mean,
        "sequential_s": sum(client_s) + server_s,
        "critical_path_s": max(client_s) + server_s,
        "server_s": server_s,
        "bytes_up_per_client": int(np.mean(up)),
        "bytes_down_per_client": 0,
    }


def secure_round(updates: list[np.ndarray], weights: list[float], *, neighbours: int,
                 max_weight: float, pipelined: bool = False) -> dict:
    n = len(updates)
    ids = list(range(n))
    stage_client_s: list[list[float]] = []
    server_s: list[float] = []
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    state: dict[int, bytes] = {}
    trusts = own_rosters(simulated_trusts(n))

    t0 = time.perf_counter()
    agg = ServerAggregator(ids, vector_length=updates[0].size, neighbours=neighbours,
                           max_weight=max_weight)
    requests = agg.setup_requests()
    server_s.append(time.perf_counter() - t0)

    def stage(requests: dict, act: Callable[..., dict]) -> dict:
        times, replies = [], {}
        for cid, req in requests.items():
            down[cid] += message_nbytes(req)
            t = time.perf_counter()
            sess = (ClientSession.from_bytes(state[cid], trusts[cid]) if cid in state
                    else ClientSession(trusts[cid]))
            reply = act(cid, sess, req)
            state[cid] = sess.to_bytes()
            times.append(time.perf_counter() - t)
            up[cid] += message_nbytes(reply)
            replies[cid] = reply
        stage_client_s.append(times)
        return replies

    def server(fn: Callable[[dict], Any], replies: dict) -> Any:
        t = time.perf_counter()
        out = fn(replies)
        server_s.append(time.perf_counter() - t)
        return out

    requests = server(agg.receive_setup, stage(requests, lambda c, s, r: s.setup(r)))
    requests = server(agg.receive_shares, stage(requests, lambda c, s, r: s.share(r)))
    masks: dict[int, Any] = {}
    before_training: list[float] = []
    if pipelined:  # the masks are expanded while the hospitals train: timed apart
        for cid, req in requests.items():
            t = time.perf_counter()
            masks[cid] = ClientSession.from_bytes(state[cid], trusts[cid]).precompute_masks(req)
            before_training.append(time.perf_counter() - t)
    requests = server(agg.receive_masked, stage(
        requests, lambda c, s, r: s.masked_input(r, updates[c], weights[c], masks=masks.get(c))))
    requests = server(agg.receive_consistency, stage(requests, lambda c, s, r: s.consistency(r)))
    result = server(agg.receive_unmask, stage(requests, lambda c, s, r: s.unmask(r)))
    return {
        "mean": result.mean,
        "total_weight": result.total_weight,
        "sequential_s": sum(sum(t) for t in stage_client_s) + sum(server_s),
        "critical_path_s": sum(max(t) for t in stage_client_s) + sum(server_s),
        "server_s": sum(server_s),
        "client_s_per_stage_max": [max(t) for t in stage_client_s],
        "server_s_per_stage": list(server_s),
        "masks_before_training_s": max(before_training, default=0.0),
        "bytes_up_per_client": int(np.mean(list(up.values()))),
        "bytes_down_per_client": int(np.mean(list(down.values()))),
    }


def mask_time(length: int) -> float:
    """Seconds to expand one mask of ``length`` ring words and add it (one AES-CTR stream)."""
    target = np.zeros(length, dtype=np.uint32)
    t0 = time.perf_counter()
    crypto.apply_masks(target, [bytes(range(32))], [])
    return time.perf_counter() - t0


def masks_on_critical_path(n: int, neighbours: int) -> tuple[int, int]:
    """Masks the slowest client and the server expand in a round without dropouts."""
    graph = neighbour_graph(list(range(1, n + 1)), neighbours, bytes(16))
    return 1 + max(len(v) for v in graph.values()), n


def shamir_timing(n: int, secrets: int | None = None) -> dict:
    """Server reconstruction time per secret with ``n`` holders (complete graph)."""
    t = default_threshold(n, neighbours=0)
    holders = list(range(1, n + 1))
    secrets = secrets or min(n, 200)
    shared = [shamir.split(s + 1, holders, t) for s in range(secrets)]
    shamir.lagrange_coefficients.cache_clear()
    t0 = time.perf_counter()
    shamir.reconstruct(shared[0], t, check=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for sh in shared:
        shamir.reconstruct(sh, t, check=False)
    per = (time.perf_counter() - t0) / len(shared)
    return {"threshold": t, "first_ms": first * 1e3, "per_secret_ms": per * 1e3,
            "secrets_timed": len(shared)}


def server_round(n: int, params: int = 10_000) -> dict:
    """Server-side seconds of one whole secure round with ``n`` hospitals (default graph)."""
    rng = np.random.default_rng(1)
    updates = [rng.normal(scale=0.01, size=params).astype(np.float32) for _ in range(n)]
    weights = [float(w) for w in rng.integers(50, 500, size=n)]
    times: dict[str, float] = {}
    original = {name: getattr(ServerAggregator, name) for name in (
        "setup_requests", "receive_setup", "receive_shares", "receive_masked",
        "receive_consistency", "receive_unmask")}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: ServerAggregator, *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    try:
        for name, fn in original.items():
            setattr(ServerAggregator, name, timed(name, fn))
        t0 = time.perf_counter()
        result = run_secure_aggregation(updates, weights, max_weight=10_000.0,
                                        drop_at={"masked": [3]}, serialize_state=False)
        wall = time.perf_counter() - t0
    finally:
        for name, fn in original.items():
            setattr(ServerAggregator, name, fn)
    return {"hospitals": n, "params": params, "server_s": sum(times.values()),
            "server_s_per_stage": times, "all_parties_s": wall,
            "included": len(result.included)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--neighbours", type=str, default="0,4",
                    help="comma-separated SecAgg+ neighbour counts to measure (0 = everyone)")
    ap.add_argument("--train-s", type=str, default="1,10,60",
                    help="assumed local-training seconds for the modelled round ratio")
    ap.add_argument("--out", type=str, default="", help="also write the JSON to this file")
    ap.add_argument("--scale", type=str, default="10,20,50,100,1000",
                    help="client counts for the Shamir reconstruction timing ('' = skip)")
    ap.add_argument("--server-round-clients", type=int, default=100,
                    help="hospitals in the whole-round server timing (0 = skip)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per party for masks, encoding, sums and decoding "
                    "(0 = automatic: one per CPU, at most 4, for vectors over 1 MiB)")
    args = ap.parse_args(argv)
    from fedrg.secagg import parallel

    parallel.THREADS = args.threads or None

    rng = np.random.default_rng(0)
    updates = [rng.normal(scale=0.01, size=args.params).astype(np.float32)
               for _ in range(args.clients)]
    weights = [float(w) for w in rng.integers(50, 500, size=args.clients)]
    max_weight = 10_000.0
    ks = [int(k) for k in args.neighbours.split(",") if k.strip()]

    runs: dict[str, list[dict]] = {"plain": [], **{f"secure_k{k}": [] for k in ks},
                                   **{f"pipelined_k{k}": [] for k in ks}}
    mask_s = []
    for _ in range(args.reps):  # interleaved
        runs["plain"].append(plain_round(updates, weights))
        mask_s.append(mask_time(args.params + 1))
        for k in ks:
            runs[f"secure_k{k}"].append(secure_round(updates, weights, neighbours=k,
                                                     max_weight=max_weight))
            runs[f"pipelined_k{k}"].append(secure_round(updates, weights, neighbours=k,
                                                        max_weight=max_weight, pipelined=True))

    plain_mean = runs["plain"][0]["mean"].astype(np.float64)
    bound = error_bound(weights, clip_range=8.0, quantization_bits=24, max_weight=max_weight)

    def summary(rs: list[dict]) -> dict:
        out = {key: statistics.median(r[key] for r in rs)
               for key in ("sequential_s", "critical_path_s", "server_s")}
        out["critical_path_min_s"] = min(r["critical_path_s"] for r in rs)
        out["bytes_up_per_client"] = rs[0]["bytes_up_per_client"]
        out["bytes_down_per_client"] = rs[0]["bytes_down_per_client"]
        return out

    plain = summary(runs["plain"])
    report: dict = {
        "clients": args.clients, "params": args.params, "reps": args.reps,
        "threads": args.threads or f"auto ({parallel.threads_for(4 * args.params)})",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0], "machine": platform.machine(),
        "plain": plain, "secure": {},
    }
    train_s = [float(t) for t in args.train_s.split(",") if t.strip()]
    for k in ks:
        rs = runs[f"secure_k{k}"]
        s = summary(rs)
        s["max_abs_error_vs_plain"] = float(np.max(np.abs(rs[0]["mean"] - plain_mean)))
        s["error_bound"] = bound
        s["ratio_sequential"] = s["sequential_s"] / plain["sequential_s"]
        s["ratio_critical_path"] = s["critical_path_s"] / plain["critical_path_s"]
        # fastest repetition of each: the least disturbed by other jobs on a loaded machine
        s["ratio_critical_path_min"] = s["critical_path_min_s"] / plain["critical_path_min_s"]
        s["ratio_bytes_up"] = s["bytes_up_per_client"] / plain["bytes_up_per_client"]
        s["with_local_training"] = {
            f"{t:g}s": (t + s["critical_path_s"]) / (t + plain["critical_path_s"]) for t in train_s
        }
        # local-training time above which the round is within 1.3x of a plain one
        s["train_s_for_1.3x"] = max(0.0, (s["critical_path_s"] - 1.3 * plain["critical_path_s"]) / 0.3)
        s["message_round_trips"] = 5
        client_masks, server_masks = masks_on_critical_path(args.clients, k)
        s["masks_on_critical_path"] = {"client": client_masks, "server": server_masks}
        s["critical_path_floor_s"] = (plain["critical_path_min_s"]
                                      + (client_masks + server_masks) * min(mask_s))
        s["ratio_critical_path_floor"] = s["critical_path_floor_s"] / plain["critical_path_min_s"]
        best = min(rs, key=lambda r: r["critical_path_s"])
        s["fastest_repetition"] = {"client_s_per_stage_max": best["client_s_per_stage_max"],
                                   "server_s_per_stage": best["server_s_per_stage"]}
        pr = runs[f"pipelined_k{k}"]
        q = summary(pr)
        s["pipelined"] = {
            "critical_path_s": q["critical_path_s"],
            "critical_path_min_s": q["critical_path_min_s"],
            "ratio_critical_path": q["critical_path_s"] / plain["critical_path_s"],
            "ratio_critical_path_min": q["critical_path_min_s"] / plain["critical_path_min_s"],
            "masks_before_training_s": statistics.median(r["masks_before_training_s"] for r in pr),
            "max_abs_error_vs_plain": float(np.max(np.abs(pr[0]["mean"] - plain_mean))),
            "ratio_critical_path_floor": (plain["critical_path_min_s"] + server_masks * min(mask_s))
            / plain["critical_path_min_s"],
        }
        report["secure"][f"neighbours={k or 'all'}"] = s
    report["plain"]["message_round_trips"] = 1
    report["mask_s"] = min(mask_s)
    counts = [int(c) for c in args.scale.split(",") if c.strip()]
    if counts:
        report["shamir_reconstruction"] = {str(c): shamir_timing(c) for c in counts}
    if args.server_round_clients:
        report[f"server_round_{args.server_round_clients}"] = server_round(args.server_round_clients)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
