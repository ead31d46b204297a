"""cpc-listen: watch what a cpc-stream daemon publishes, and optionally record it.

    cpc-listen                                   live view: frames/s, gaps, latency, k-step surprise
    cpc-listen --record out.npz --until-eos      record c_t and scores of every stream until they end

Each second it prints one line per stream: frames per second, messages lost (from sequence gaps),
capture-to-receipt latency (p50/p99, same host: both sides read CLOCK_MONOTONIC), and the mean
log-probability per step k = 1..K over that second as a bar per k (full: expected, empty: surprising).
The recording is an .npz with <stream>.c (frames, ctx_dim), <stream>.scores (frames, 2, K),
<stream>.frame_index (frames,) and meta (the daemon's metadata as JSON).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import defaultdict

import numpy as np

from .client import Subscriber
from .errors import UserError, run_cli

BARS = " ▁▂▃▄▅▆▇█"


def bars(logprob: np.ndarray, floor: float = -8.0) -> str:
    """Mean log-probability per k as one character each: █ near 0 (expected), blank at `floor` or below."""
    out = []
    for v in logprob:
        if not np.isfinite(v):
            out.append("·")
        else:
            out.append(BARS[int(round((1 - min(max(v / floor, 0), 1)) * (len(BARS) - 1)))])
    return "".join(out)


class Recorder:
    def __init__(self) -> None:
        self.parts: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))

    def add(self, msg) -> None:
        p = self.parts[msg.stream]
        p[msg.kind].append(msg.data)
        if msg.kind == "c":
            p["frame_index"].append(np.arange(msg.header["frame"], msg.header["frame"] + msg.header["count"]))

    def save(self, path: str, meta: dict | None) -> int:
        arrays = {"meta": np.array(json.dumps(meta or {}))}
        for stream, kinds in self.parts.items():
            for kind, chunks in kinds.items():
                arrays[f"{stream}.{kind}"] = np.concatenate(chunks)
        np.savez(path, **arrays)
        return sum(len(chunk) for kinds in self.parts.values() for chunk in kinds["c"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpc-listen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", default="tcp://127.0.0.1:5556")
    ap.add_argument("--stream", action="append", help="only these streams (default: all)")
    ap.add_argument("--z", action="store_true", help="also receive z_t")
    ap.add_argument("--record", metavar="OUT.npz", help="record everything received to this file on exit")
    ap.add_argument("--until-eos", action="store_true", help="exit once every stream seen has ended")
    ap.add_argument("--duration", type=float, default=0, help="exit after this many seconds (0: never)")
    ap.add_argument("--quiet", action="store_true", help="no live view; print only the summary")
    ap.add_argument("--server-key", help="daemon's public key file (CURVE)")
    ap.add_argument("--client-key", help="this client's key pair file, .key_secret (CURVE)")
    args = ap.parse_args(argv)

    def body() -> int:
        kinds = ("c", "scores", "z") if args.z else ("c", "scores")
        stop = {"flag": False}
        signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
        signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
        rec = Recorder() if args.record else None
        seen, ended = set(), {}
        window: dict[str, dict] = defaultdict(lambda: {"frames": 0, "lat": [], "lp": []})
        total = defaultdict(int)
        start = last_print = time.monotonic()
        with Subscriber(
            args.connect, kinds, args.stream, server_key=args.server_key, client_key=args.client_key
        ) as sub:
            while not stop["flag"]:
                msg = sub.recv(timeout=0.2)
                now = time.monotonic()
                if msg is not None:
                    seen.add(msg.stream)
                    if msg.kind == "eos":
                        ended[msg.stream] = msg.header
                        print(f"cpc-listen: {msg.stream}: end of stream ({msg.header.get('reason')}), "
                              f"{msg.header.get('frames')} frames", file=sys.stderr)  # fmt: skip
                    else:
                        if rec:
                            rec.add(msg)
                        w = window[msg.stream]
                        if msg.kind == "c":
                            w["frames"] += msg.header["count"]
                            total[msg.stream] += msg.header["count"]
                            w["lat"].append(now - msg.header["t_mono"])
                        elif msg.kind == "scores":
                            w["lp"].append(msg.data[:, 1])
                if not args.quiet and now - last_print >= 1.0:
                    for name, w in sorted(window.items()):
                        lat = np.array(w["lat"]) * 1e3 if w["lat"] else np.array([np.nan])
                        with np.errstate(all="ignore"):
                            lp = np.nanmean(np.concatenate(w["lp"]), axis=0) if w["lp"] else np.array([])
                        print(f"{name}: {w['frames'] / (now - last_print):6.1f} frames/s  lost {sub.lost:4d}  "
                              f"latency p50 {np.percentile(lat, 50):6.1f} ms p99 {np.percentile(lat, 99):6.1f} ms  "
                              f"k=1..{len(lp)} [{bars(lp)}]", flush=True)  # fmt: skip
                    window.clear()
                    last_print = now
                if args.until_eos and seen and seen <= set(ended):
                    break
                if args.duration and now - start >= args.duration:
                    break
            meta = sub.meta
            lost, gaps = sub.lost, len(sub.gaps)
        summary = ", ".join(f"{k}: {v} frames" for k, v in sorted(total.items())) or "nothing received"
        print(f"cpc-listen: {summary}; {gaps} gaps, {lost} messages lost", file=sys.stderr)
        if rec:
            try:
                n = rec.save(args.record, meta)
            except OSError as e:
                raise UserError(f"cannot write {args.record}: {e.strerror}") from None
            print(f"cpc-listen: recorded {n} frames to {args.record}", file=sys.stderr)
        return 0

    return run_cli("cpc-listen", body)


if __name__ == "__main__":
    sys.exit(main())
