"""cpc-listen: watch what a cpc-stream daemon publishes, and optionally record it.

    cpc-listen                                   live view: frames/s, gaps, latency, k-step surprise
    cpc-listen --record out.npz --until-eos      record c_t and scores of every stream until they end

Each second it prints one line per stream: frames per second, messages lost (from sequence gaps),
capture-to-receipt latency (p50/p99, same host: both sides read CLOCK_MONOTONIC), and the mean
log-probability per step k = 1..K over that second as a bar per k (full: expected, empty: surprising).

The recording is an .npz, written atomically when cpc-listen exits (the --record path is checked at
start). Per run of a stream: <key>.c (frames, ctx_dim), <key>.scores (frames, 2, K), <key>.frame_index
(frames,), where the key is the stream's name for its first run and <name>@1, <name>@2, ... for later
runs (the daemon restarted, or the stream started over): runs are never merged. `runs` (JSON) lists each
key with its stream, daemon instance, epoch, frames, messages lost and how it ended (its eos reason, or
null when no end of stream came: the daemon was killed or fell silent); `meta` (JSON) is the daemon's
last metadata.

--until-eos waits for the daemon and for a first stream (and for each --stream named) to appear, then
exits once every stream of the daemon (its metadata's list) and every stream seen has ended, or once the
daemon says it is exiting. If the daemon falls silent
(no message, not even its periodic metadata, for --silence seconds) cpc-listen says so, keeps what it
received and exits 1.
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
from .files import atomic_write, check_writable
from .protocol import Message

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
    """Frames of each run of each stream, kept apart."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, tuple[str, int]], str] = {}  # (stream, run) -> key in the .npz
        self.parts: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.skipped = 0  # messages whose shape differs from the run's first (never expected)

    def key(self, msg: Message) -> str:
        k = (msg.stream, msg.run)
        if k not in self.keys:
            later = sum(1 for stream, _ in self.keys if stream == msg.stream)
            self.keys[k] = msg.stream if later == 0 else f"{msg.stream}@{later}"
        return self.keys[k]

    def add(self, msg: Message) -> None:
        p = self.parts[self.key(msg)]
        if p[msg.kind] and p[msg.kind][0].shape[1:] != msg.data.shape[1:]:
            self.skipped += 1
            return
        p[msg.kind].append(msg.data)
        if msg.kind == "c":
            p["frame_index"].append(np.arange(msg.header["frame"], msg.header["frame"] + msg.header["count"]))

    def frames(self, key: str) -> int:
        return sum(len(chunk) for chunk in self.parts[key]["c"])

    def save(self, path: str, meta: dict | None, lost: dict[str, int], ended: dict) -> int:
        """Write the .npz (atomically); `ended` maps (stream, run) to its eos header, where one came."""
        runs = [
            {"key": key, "stream": stream, "instance": run[0], "epoch": run[1], "frames": self.frames(key),
             "lost": lost.get(key, 0), "ended": ended[stream, run]["reason"] if (stream, run) in ended else None}
            for (stream, run), key in self.keys.items()
        ]  # fmt: skip
        arrays = {"meta": np.array(json.dumps(meta or {})), "runs": np.array(json.dumps(runs))}
        for key, kinds in self.parts.items():
            for kind, chunks in kinds.items():
                if chunks:
                    arrays[f"{key}.{kind}"] = np.concatenate(chunks)
        with atomic_write(path) as f:
            np.savez(f, **arrays)
        return sum(r["frames"] for r in runs)


def superseded(run_key: tuple[str, tuple[str, int]], runs: set, meta: dict | None) -> bool:
    """Whether a run can no longer end: its daemon was replaced (the latest metadata is another
    instance's), or its stream started over in a later epoch."""
    stream, (instance, epoch) = run_key
    if meta is not None and instance != meta["instance"]:
        return True
    return any(s == stream and i == instance and e > epoch for s, (i, e) in runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpc-listen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", default="tcp://127.0.0.1:5556")
    ap.add_argument("--stream", action="append", help="only this stream (exact name; repeatable)")
    ap.add_argument("--z", action="store_true", help="also receive z_t")
    ap.add_argument("--record", metavar="OUT.npz", help="record everything received to this file on exit")
    ap.add_argument("--until-eos", action="store_true", help="exit once every stream has ended")
    ap.add_argument("--duration", type=float, default=0, help="exit after this many seconds (0: never)")
    ap.add_argument("--silence", type=float, default=10.0,
                    help="seconds without a message (the daemon sends metadata every second) before the "
                         "daemon counts as gone (default 10)")  # fmt: skip
    ap.add_argument("--quiet", action="store_true", help="no live view; print only the summary")
    ap.add_argument("--server-key", help="daemon's public key file (CURVE)")
    ap.add_argument("--client-key", help="this client's key pair file, .key_secret (CURVE)")
    args = ap.parse_args(argv)

    def body() -> int:
        if args.record:
            check_writable(args.record, "--record")
        if not args.duration >= 0 or not args.silence > 0:
            raise UserError("--duration must be >= 0 and --silence > 0")
        kinds = ("c", "scores", "z") if args.z else ("c", "scores")
        stop = {"flag": False}
        signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
        signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
        rec = Recorder()
        ended: dict[tuple[str, tuple[str, int]], dict] = {}  # (stream, run) -> eos header
        seen: set[tuple[str, tuple[str, int]]] = set()
        window: dict[str, dict] = defaultdict(lambda: {"frames": 0, "lat": [], "lp": []})
        lost_by_run: dict[tuple[str, tuple[str, int]], int] = defaultdict(int)
        daemon_exiting, silent, status = False, False, 0
        start = last_print = time.monotonic()
        with Subscriber(
            args.connect,
            kinds,
            args.stream,
            stats=True,
            server_key=args.server_key,
            client_key=args.client_key,
        ) as sub:
            while not stop["flag"]:
                lost_before = sub.lost
                msg = sub.recv(timeout=0.2)
                now = time.monotonic()
                if msg is not None and msg.kind == "stats":
                    daemon_exiting = msg.header.get("final") is True
                elif msg is not None:
                    run_key = (msg.stream, msg.run)
                    seen.add(run_key)
                    lost_by_run[run_key] += sub.lost - lost_before
                    if msg.kind == "eos":
                        ended[run_key] = msg.header
                        print(f"cpc-listen: {msg.stream}: end of stream ({msg.header['reason']}), "
                              f"{msg.header['frames']} frames", file=sys.stderr)  # fmt: skip
                    else:
                        rec.add(msg)
                        w = window[rec.key(msg)]
                        if msg.kind == "c":
                            w["frames"] += msg.header["count"]
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
                if args.until_eos:
                    meta = sub.meta
                    listed = (
                        {(s, (meta["instance"], meta["epochs"].get(s, 0))) for s in meta["streams"]
                         if not args.stream or s in args.stream}
                        if meta else set()
                    )  # fmt: skip
                    known = listed | {k for k in seen if not args.stream or k[0] in args.stream}
                    running = {k for k in known if k not in ended and not superseded(k, known, meta)}
                    named = {k[0] for k in known}
                    # Wait for a first stream (a --listen daemon may have none yet), and for every --stream.
                    if known and not running and (not args.stream or set(args.stream) <= named):
                        break
                    if daemon_exiting:  # its last message: everything it sent came before
                        break
                    if (meta or seen) and sub.silent_for() > args.silence:  # heard once, then gone
                        silent, status = True, 1
                        break
                if args.duration and now - start >= args.duration:
                    break
            meta, gaps, lost = sub.meta, len(sub.gaps), sub.lost
            malformed, restarts = sum(sub.malformed.values()), len(sub.restarts)
        runs = ", ".join(
            f"{rec.keys[k]}: {rec.frames(rec.keys[k])} frames" + ("" if k in ended else " (no end of stream)")
            for k in rec.keys
        )
        print(f"cpc-listen: {runs or 'nothing received'}; {gaps} gaps, {lost} messages lost"
              + (f"; {malformed} malformed messages skipped" if malformed else "")
              + (f"; {restarts} restarts (recorded as separate runs)" if restarts else ""), file=sys.stderr)  # fmt: skip
        if silent:
            print(f"cpc-listen: error: the daemon at {args.connect} has been silent for {args.silence:g} s "
                  "before every stream ended; keeping what arrived", file=sys.stderr)  # fmt: skip
        elif meta is None and not seen:
            status = 1
            print(f"cpc-listen: error: nothing came from {args.connect}: no daemon there, or it refuses this "
                  "client (CURVE: --server-key and --client-key, and the client's key in its allowed folder)",
                  file=sys.stderr)  # fmt: skip
        if args.record:
            try:
                n = rec.save(
                    args.record,
                    meta,
                    {rec.keys[k]: v for k, v in lost_by_run.items() if k in rec.keys},
                    ended,
                )
            except OSError as e:
                raise UserError(f"cannot write {args.record}: {e.strerror}") from None
            print(f"cpc-listen: recorded {n} frames to {args.record}", file=sys.stderr)
        return status

    return run_cli("cpc-listen", body)


if __name__ == "__main__":
    sys.exit(main())
