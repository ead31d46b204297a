"""cpc-keygen: create CURVE key pairs for the daemon and its remote subscribers (pyzmq's zmq.auth format).

    cpc-keygen keys server laptop     -> keys/server.key (public), keys/server.key_secret, keys/laptop.key, ...

Give the daemon `stream.curve_secret_key: keys/server.key_secret` and copy each allowed client's public
`.key` file into the folder named by `stream.curve_allowed_keys`. A client needs its own `.key_secret`
and the daemon's public `server.key`. Secret key files are written mode 0600 (the daemon refuses one that
other users can read), and an existing pair is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError, run_cli
from .security import write_key_pair


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpc-keygen", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("names", nargs="+")
    args = ap.parse_args(argv)

    def body() -> int:
        folder = Path(args.folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {folder}: {e.strerror}") from None
        for name in args.names:
            if not name or "/" in name or name.startswith("."):
                raise UserError(f"key name {name!r}: expected a plain file name")
            public, secret = write_key_pair(folder, name)
            print(f"cpc-keygen: {public} (public), {secret} (secret)")
        return 0

    return run_cli("cpc-keygen", body)


if __name__ == "__main__":
    sys.exit(main())
