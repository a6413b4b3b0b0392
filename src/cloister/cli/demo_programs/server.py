"""Demo server: an unmodified program that reads its configuration from files and environment.

It serves one mutual-TLS 1.3 endpoint and answers a client that presents a certificate from
the session's CA. It knows nothing about attestation.
"""

import os
import socket
import ssl
import sys

conf = dict(
    line.split("=", 1)
    for line in open(os.environ["DEMO_CONFIG"]).read().splitlines()
    if "=" in line
)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(conf["cert"], conf["key"])
ctx.load_verify_locations(conf["ca"])
ctx.verify_mode = ssl.CERT_REQUIRED

with socket.create_server(("127.0.0.1", int(os.environ["PORT"]))) as srv:
    print("server: listening with its attested certificate", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            # A caller without a certificate from the session's CA never gets past here.
            print(f"server: refused a connection: {exc.__class__.__name__}", flush=True)
            conn.close()
            continue
        with tls:
            peer = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
            request = tls.recv(1024).decode()
            ok = request.strip() == f"password={os.environ['DB_PASSWORD']}"
            tls.sendall(f"hello {peer}, password {'accepted' if ok else 'REJECTED'}\n".encode())
            print(f"server: served {peer} over mutual TLS", flush=True)
        sys.exit(0)
