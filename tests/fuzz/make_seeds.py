#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target (corpus/<target>/) and the client-certificate
fixtures (fixtures/): protobuf encoded by hand from opamp.proto's field numbers, gzip bodies,
tokens with real CRCs, config TOML, and an agent CA with one agent certificate (openssl).
Re-running it replaces the seeds; the fixtures are kept unless missing (new keys would
invalidate the committed certificate seeds)."""

import base64, gzip, os, shutil, subprocess, tempfile, urllib.parse, zlib

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
FIXTURES = os.path.join(HERE, "fixtures")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# --- protobuf by hand --------------------------------------------------------------------

def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(field, payload):  # length-delimited field
    payload = payload.encode() if isinstance(payload, str) else payload
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def vi(field, v):  # varint field
    return varint(field << 3) + varint(v)


def kv(key, value=b""):  # KeyValue{1 key, 2 AnyValue}
    return ld(1, key) + (ld(2, value) if value is not None else b"")


def s(v):  # AnyValue.string_value
    return ld(1, v)


def entry(key, value):  # a map entry {1 key, 2 value}
    return ld(1, key) + ld(2, value)


UID = bytes(range(1, 17))
head = ld(1, UID) + vi(2, 7) + vi(4, 0x2007)
description = ld(3, b"".join([
    ld(1, kv("service.name", s("io.opentelemetry.collector"))),
    ld(1, kv("service.instance.id", s("4f6b2c1e"))),
    ld(2, kv("os.type", s("linux"))),
    ld(2, kv("k8s", ld(6, ld(1, kv("pod", s("p-1"))) + ld(1, kv("ns", s("default")))))),
    ld(2, kv("ports", ld(5, ld(1, vi(3, 4317)) + ld(1, vi(3, 4318))))),
]))
health = ld(5, vi(1, 1) + ld(4, "StatusOK") + ld(6, entry("pipeline:traces", vi(1, 1) + ld(
    6, entry("receiver:otlp", vi(1, 1) + ld(7, kv("err", s("none"))))))))
effective = ld(6, ld(1, ld(1, entry("collector.yaml", ld(1, "receivers: {}\n") + ld(2, "text/yaml")))
                       + ld(1, entry("extra.yaml", ld(1, "")))))
components = ld(14, ld(1, entry("receivers", ld(1, kv("stability", s("beta"))) + ld(
    2, entry("otlp", ld(1, kv("version", s("0.1"))))))) + ld(2, b"\x01\x02"))
custom = ld(12, ld(1, "io.example.cap") + ld(1, "io.example.other"))
disconnect = ld(9, b"")

minimal = head
full = head + description + health + effective + components + custom

ws = "ws_frame"
write(ws, "empty", b"")
write(ws, "header-only", b"\x00")
write(ws, "minimal", b"\x00" + minimal)
write(ws, "full", b"\x00" + full)
write(ws, "disconnect", b"\x00" + head + disconnect)
write(ws, "legacy-headerless", full)
write(ws, "bad-header", varint(5) + minimal)
write(ws, "bad-header-10-bytes", b"\xff" * 9 + b"\x01" + minimal)
write(ws, "too-many-attributes", b"\x00" + ld(1, UID) + ld(3, ld(1, kv("")) * 65))
deep = b""
for _ in range(70):
    deep = ld(5, ld(1, deep))  # AnyValue.array_value{values: [deep]}
write(ws, "deep-nesting", b"\x00" + ld(3, ld(1, kv("deep", deep))))
write(ws, "truncated", b"\x00" + full[:-3])
write(ws, "group", b"\x00" + minimal + varint(100 << 3 | 3) + varint(100 << 3 | 4))
write(ws, "unknown-fields", b"\x00" + minimal + vi(100, 1) + ld(101, b"x"))

# --- HTTP bodies: flags (bit 0 gzip), limit (u16 big-endian), body ---------------------------

def body(gz, limit, data):
    return bytes([1 if gz else 0]) + limit.to_bytes(2, "big") + data


hb = "http_body"
write(hb, "identity", body(False, 4096, full))
write(hb, "identity-over-limit", body(False, 16, full))
write(hb, "gzip", body(True, 4096, gzip.compress(full, mtime=0)))
write(hb, "gzip-at-limit", body(True, len(full), gzip.compress(full, mtime=0)))
write(hb, "gzip-one-over-limit", body(True, len(full) - 1, gzip.compress(full, mtime=0)))
write(hb, "gzip-two-members", body(True, 4096, gzip.compress(minimal, mtime=0) * 2))
write(hb, "gzip-truncated", body(True, 4096, gzip.compress(full, mtime=0)[:-6]))
write(hb, "gzip-empty", body(True, 0, gzip.compress(b"", mtime=0)))
# 8 MiB of zeros in about 8 KiB: must be refused after the limit, never inflated.
write(hb, "gzip-bomb", body(True, 65535, gzip.compress(bytes(8 << 20), compresslevel=9, mtime=0)))
write(hb, "not-gzip", body(True, 4096, b"not gzip at all"))

# --- tokens -------------------------------------------------------------------------------

def token(secret):
    b = "amp-bs." + secret
    return "%s.%08x" % (b, zlib.crc32(b.encode()))


secret = base64.b32encode(bytes(range(20))).decode().lower().rstrip("=")
good = token(secret)
tk = "bootstrap_token"
write(tk, "valid", good)
write(tk, "valid-short-secret", token("goodgood"))
write(tk, "truncated", good[:-1])
write(tk, "wrong-crc", good[:-1] + ("0" if good[-1] != "0" else "1"))
write(tk, "no-crc", "amp-bs." + secret)
write(tk, "uppercase-secret", token(secret.upper()))
write(tk, "api", "amp-api." + secret)
write(tk, "api-empty", "amp-api.")
write(tk, "bearer", "Bearer x")
write(tk, "non-ascii", "amp-bs.é€.12345678")

dk = "download_token"
write(dk, "wellformed", "amp-dl.00112233445566778899aabbccddeeff." + "0011223344556677" * 4 + ".1000." + "0" * 64)
write(dk, "prefix", "amp-dl.")
write(dk, "bearer", "Bearer amp-dl.x.y.z.w")
write(dk, "bytes", bytes(range(18)))

# --- config TOML --------------------------------------------------------------------------

cf = "config_loader"
write(cf, "empty", "")
write(cf, "minimal", '[server]\nlisten = "127.0.0.1:4320"\n')
with open(os.path.join(HERE, "..", "..", "README.md")) as f:
    readme = f.read()
start = readme.index("```toml", readme.index("## Configuration")) + len("```toml\n")
write(cf, "full", readme[start:readme.index("```", start)])
write(cf, "operator-guide-spelling", "[OpAmp]\nBootstrapPlaintextAllowed = true\nmax-frame-bytes = 2048\n")
write(cf, "errors", '[server]\nlisten = 4320\n[nope]\nx = 1\n[opamp]\nmax_frame_bytes = 1\n')
write(cf, "proxies", '[tls]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\nclient_cert_header = "X-Cert"\n')
write(cf, "not-a-section", 'listen = "0.0.0.0:1"\n')

# --- client certificate header ------------------------------------------------------------

def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


os.makedirs(FIXTURES, exist_ok=True)
ca_pem = os.path.join(FIXTURES, "agent-ca.pem")
uid_file = os.path.join(FIXTURES, "agent-uid.txt")
leaf_file = os.path.join(FIXTURES, "agent.pem")
if not all(os.path.exists(p) for p in (ca_pem, uid_file, leaf_file)):
    uid = "0193a5c4-7d2e-7f00-8a1b-2c3d4e5f6071"
    with tempfile.TemporaryDirectory() as t:
        with open(os.path.join(t, "ca.ext"), "w") as f:
            f.write("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
        with open(os.path.join(t, "leaf.ext"), "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=clientAuth\nsubjectAltName=URI:urn:uuid:%s\n" % uid)
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=t)
        openssl("req", "-new", "-x509", "-key", "ca.key", "-subj", "/CN=fuzz agent CA",
                "-days", "36500", "-sha256", "-extensions", "v3_ca", "-out", "ca.pem", cwd=t)
        # A self-signed certificate carries openssl's default extensions; re-sign with ours.
        openssl("x509", "-in", "ca.pem", "-signkey", "ca.key", "-extfile", "ca.ext",
                "-days", "36500", "-sha256", "-out", "ca.pem", cwd=t)
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "leaf.key", cwd=t)
        openssl("req", "-new", "-key", "leaf.key", "-subj", "/CN=" + uid, "-out", "leaf.csr", cwd=t)
        openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "36500", "-sha256", "-extfile", "leaf.ext",
                "-out", "leaf.pem", cwd=t)
        shutil.copy(os.path.join(t, "ca.pem"), ca_pem)
        shutil.copy(os.path.join(t, "leaf.pem"), leaf_file)
    with open(uid_file, "w") as f:
        f.write(uid + "\n")

leaf = open(leaf_file).read()
ca = open(ca_pem).read()
quote = lambda t: urllib.parse.quote(t, safe="")
cc = "client_cert_header"
write(cc, "leaf-urlencoded", quote(leaf))
write(cc, "chain-urlencoded", quote(leaf + ca))
write(cc, "ca-only-urlencoded", quote(ca))
write(cc, "leaf-nginx-style", quote(leaf).replace("%2B", "+"))
write(cc, "leaf-tab-folded", leaf.replace("\n", "\t").strip())
write(cc, "truncated", quote(leaf)[:400])
write(cc, "garbage", "-----BEGIN CERTIFICATE-----%0AAAAA%0A-----END CERTIFICATE-----%0A")
write(cc, "empty", "")
