"""The few DER encodings the SGX PCK extension needs (dcap-test-pki.md §5). Nothing else in keybroker writes ASN.1
by hand; certificates and CRLs come from ``cryptography``."""

from __future__ import annotations


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _length(len(value)) + value


def sequence(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        rest = part
        chunk = [rest & 0x7F]
        rest >>= 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


def integer(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return tlv(0x02, body)


def enumerated(value: int) -> bytes:
    return tlv(0x0A, integer(value)[2:])


def octet_string(value: bytes) -> bytes:
    return tlv(0x04, value)


def boolean(value: bool) -> bytes:
    return tlv(0x01, b"\xff" if value else b"\x00")
