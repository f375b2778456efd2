#!/usr/bin/env python3
"""Writes the seed inputs of the decode_validate fuzz target to
fuzz/seeds/decode_validate/: one request of each type, and requests at and just
past every limit of the contract, which the fuzzer is slow to build by itself
(33 map entries, a 1025-byte value). Standard library only.

Each input is one byte choosing the request type (as in
fuzz_targets/decode_validate.rs) followed by the request's protobuf encoding.
Rerun after changing this file: python3 fuzz/seeds/generate.py
"""
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_validate")

CREATE, GET, REVOKE, REVOKE_ALL, COUNT, LIST, RECORD, RESET, RESPONSES = range(9)


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number, payload):
    """A length-delimited field (strings, maps, messages)."""
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def int_field(number, value):
    return varint(number << 3) + varint(value & (2**64 - 1))


def create(user="u", token="t", metadata=(), ttl=None):
    body = field(1, user) + field(2, token)
    for key, value in metadata:
        body += field(3, field(1, key) + field(2, value))
    if ttl is not None:
        seconds, nanos = ttl
        body += field(4, int_field(1, seconds) + int_field(2, nanos))
    return bytes([CREATE]) + body


def entries(count, key_len=3, value_len=0):
    return [(f"k{i:0{key_len - 1}d}"[:key_len].ljust(key_len, "k"), "v" * value_len) for i in range(count)]


SEEDS = {
    "create-min": create(),
    "create-ttl": create(ttl=(1, 500_000_000)),
    "create-ttl-zero": create(ttl=(0, 0)),
    "create-ttl-negative": create(ttl=(-1, 0)),
    "create-32-entries": create(metadata=entries(32)),
    "create-33-entries": create(metadata=entries(33)),
    "create-key-64": create(metadata=[("k" * 64, "v")]),
    "create-key-65": create(metadata=[("k" * 65, "v")]),
    "create-key-empty": create(metadata=[("", "v")]),
    "create-value-1024": create(metadata=[("k", "v" * 1024)]),
    "create-value-1025": create(metadata=[("k", "v" * 1025)]),
    "create-id-256": create(user="a" * 256, token="b" * 256),
    "create-id-257": create(user="a" * 257),
    "create-delimiters": create(user="a}:{b", token="c"),
    "create-unicode": create(user="caf\u00e9", token="t\u00a0"),
    "get-hint": bytes([GET]) + field(1, "t") + field(2, "u"),
    "get-no-hint": bytes([GET]) + field(1, "t"),
    "revoke-hint": bytes([REVOKE]) + field(1, "t") + field(2, "u"),
    "revoke-all": bytes([REVOKE_ALL]) + field(1, "u"),
    "count": bytes([COUNT]) + field(1, "u"),
    "list": bytes([LIST]) + field(1, "u"),
    "record-v4": bytes([RECORD]) + field(1, " 192.0.2.1 "),
    "record-v6": bytes([RECORD]) + field(1, "2001:db8:1:2::1"),
    "record-v4-mapped": bytes([RECORD]) + field(1, "::ffff:192.0.2.1"),
    "record-not-ip": bytes([RECORD]) + field(1, "300.1.1.1"),
    "reset-v6-zone": bytes([RESET]) + field(1, "fe80::1%eth0"),
    "responses-max": bytes([RESPONSES]) + b"\xff" * 32,
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"{len(SEEDS)} seeds in {OUT}")


if __name__ == "__main__":
    main()
