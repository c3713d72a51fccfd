"""sniff.py IFACE PORT OUT: save the payload of the first IPv4 UDP datagram to PORT seen on IFACE.

The SPA packet the client sends is captured on the wire (before netfilter), so that the very
same bytes can be replayed after the upgrade: the replay cache must refuse them.
"""

import socket
import struct
import sys

iface, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ETH_P_IP = 0x0800
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)) as sock:
    sock.bind((iface, 0))
    sock.settimeout(30)
    while True:
        frame = sock.recv(65535)
        ip = frame[14:]
        if len(ip) < 28 or ip[9] != socket.IPPROTO_UDP:
            continue
        header = (ip[0] & 0x0F) * 4
        dport = struct.unpack("!H", ip[header + 2 : header + 4])[0]
        if dport == port:
            with open(out, "wb") as saved:
                saved.write(ip[header + 8 :])
            break
