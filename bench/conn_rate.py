"""New-connection rate helper, run inside a namespace:
conn_rate.py serve PORT            accept and close, forever
conn_rate.py connect HOST PORT S   connect/close as fast as possible for S seconds; print count
"""

import socket
import sys
import time


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), backlog=4096)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.close()


def connect(host: str, port: int, seconds: float) -> None:
    count, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.settimeout(2)
        sock.connect((host, port))
        sock.close()
        count += 1
    print(count, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        connect(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
