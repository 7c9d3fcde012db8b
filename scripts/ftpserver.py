#!/usr/bin/env python3
"""FTP server with one user, for fwagent's integration tests (started by test-servers.sh).

    ftpserver.py --host 127.0.0.1 --port P --root DIR --user U --password W --passive LO-HI

The user may read, write, rename and delete under DIR; REST (resume) works for RETR.
Logs every command to stderr.
"""
import argparse
import logging
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--passive", required=True, help="LO-HI, inclusive")
    args = ap.parse_args()

    lo, hi = (int(x) for x in args.passive.split("-"))
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )

    authorizer = DummyAuthorizer()
    authorizer.add_user(args.user, args.password, args.root, perm="elradfmwMT")

    class Handler(FTPHandler):
        pass

    Handler.authorizer = authorizer
    Handler.passive_ports = list(range(lo, hi + 1))
    Handler.masquerade_address = None
    Handler.permit_foreign_addresses = False
    Handler.banner = "fwagent test FTP server ready."
    Handler.timeout = 600

    server = FTPServer((args.host, args.port), Handler)
    server.max_cons = 256
    server.max_cons_per_ip = 0
    server.serve_forever(handle_exit=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
