"""Classify c_t live from a cpc-stream daemon with a trained linear probe (speaker, phone, ...).

    python examples/live_classifier.py --probe speaker_probe.npz [--connect tcp://127.0.0.1:5556]

Prints, per stream, the smoothed decision whenever it changes, with the frame index and its time in the
stream; --jsonl FILE also writes every frame's raw and smoothed decision. Train a probe with
examples/train_speaker_probe.py (or cpc-eval, which saves its probes in the same format).
"""

from __future__ import annotations

import argparse
import json
import sys

from cpc_stream.client import Subscriber
from cpc_stream.errors import UserError, run_cli
from cpc_stream.probe import LinearProbe, Smoother


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", required=True)
    ap.add_argument("--connect", default="tcp://127.0.0.1:5556")
    ap.add_argument("--smooth", type=float, default=0.5, help="smoothing time constant, seconds")
    ap.add_argument("--jsonl", help="write every frame's decisions here")
    ap.add_argument("--until-eos", action="store_true", help="exit when every stream seen has ended")
    args = ap.parse_args(argv)

    def body() -> int:
        probe = LinearProbe.load(args.probe)
        out = open(args.jsonl, "w") if args.jsonl else None  # noqa: SIM115
        smoothers, current, seen, ended = {}, {}, set(), set()
        with Subscriber(args.connect, kinds=("c",)) as sub:
            while True:
                msg = sub.recv(timeout=1.0)
                if msg is None:
                    if sub.meta is not None and sub.silent_for() > 10:  # the daemon's heartbeat stopped
                        raise UserError(f"the daemon at {args.connect} has been silent for 10 s")
                    continue
                run = (msg.stream, msg.run)  # a restarted stream starts a new smoother
                seen.add(msg.stream)
                if msg.kind == "eos":
                    ended.add(msg.stream)
                    listed = set(sub.meta["streams"]) if sub.meta else set()
                    if args.until_eos and seen | listed <= ended:
                        break
                    continue
                lp = probe.log_probs(msg.data)
                sm = smoothers.setdefault(run, Smoother(len(probe.classes), args.smooth))
                decisions = sm.update(lp)
                for i, (raw, dec) in enumerate(zip(lp.argmax(1), decisions, strict=True)):
                    frame = msg.header["frame"] + i
                    if out:
                        out.write(json.dumps({"stream": msg.stream, "frame": frame, "raw": probe.classes[raw],
                                              "smoothed": probe.classes[dec]}) + "\n")  # fmt: skip
                    if current.get(run) != dec:
                        current[run] = dec
                        print(f"{msg.stream} {frame / 100:7.2f} s: {probe.classes[dec]}", flush=True)
        if out:
            out.close()
        return 0

    return run_cli("live_classifier", body)


if __name__ == "__main__":
    sys.exit(main())
