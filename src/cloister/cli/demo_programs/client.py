"""Demo client: calls the demo server over mutual TLS with the certificate it was given."""

import os
import socket
import ssl
import sys

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(os.environ["CLIENT_CERT"], os.environ["CLIENT_KEY"])
ctx.load_verify_locations(os.environ["CA_CERT"])

with socket.create_connection(("127.0.0.1", int(os.environ["SERVER_PORT"])), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="server.demo") as tls:
        tls.sendall(f"password={os.environ['DB_PASSWORD']}\n".encode())
        answer = tls.recv(1024).decode().strip()
print(f"client: {answer}")
sys.exit(0 if answer.endswith("password accepted") else 1)
