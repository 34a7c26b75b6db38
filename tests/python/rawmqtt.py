"""MQTT encoded by hand for raw-socket tests: what a misbehaving device sends, byte for byte,
independent of the broker's codec and of paho."""

import struct


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def split(buf):
    """The first whole packet of `buf` as (first byte, body, bytes it took), or None."""
    n, shift, i = 0, 0, 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        n |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            break
    if len(buf) < i + n:
        return None
    return buf[0], bytes(buf[i:i + n]), i + n
