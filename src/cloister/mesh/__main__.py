"""``python -m cloister.mesh --config FILE.json``: the mesh as its own process.

The agent starts this before it execs the application. SIGTERM and SIGINT stop it (closing
every connection); SIGHUP re-reads the TLS material for new connections. It prints
``cloister-mesh ready ingress=PORT ... egress=PORT ...`` on standard output once every listener
is bound, so that a parent can wait for it, and exits with status 2 on an invalid or unreadable
configuration. Logs go to standard error (level from ``CLOISTER_LOG_LEVEL``, default INFO).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from cloister import errors
from cloister.mesh.config import MeshConfig
from cloister.mesh.proxy import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloister.mesh", description=__doc__)
    parser.add_argument("--config", required=True, help="mesh configuration (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CLOISTER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = MeshConfig.from_file(args.config)
    except (errors.SessionError, OSError) as exc:
        print(f"cloister-mesh: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
