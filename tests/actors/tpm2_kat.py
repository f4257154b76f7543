#!/usr/bin/env python3
"""Expected bytes for tests/actors/tpm2_test.cpp's known-answer test, made
without provisiond's code: KDFa is NIST SP 800-108 counter mode with
HMAC-SHA-256 (cryptography's KBKDFHMAC: a 32-bit counter before the fixed
data label || 0x00 || context || [bits]32), AES-CFB is cryptography's, and the
structures follow TPM 2.0 Library Part 1 §24 (MakeCredential) and §23.3.2
(Duplicate: inner and outer wrap). Debian 12: python3-cryptography.
Run: python3 tests/actors/tpm2_kat.py"""
import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFHMAC, Mode


def kdfa(key, label, context, bits):
    return KBKDFHMAC(algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=bits // 8,
                     rlen=4, llen=4, location=CounterLocation.BeforeFixed, label=label,
                     context=context, fixed=None).derive(key)


def cfb(key, data):
    e = Cipher(algorithms.AES(key), modes.CFB(b"\0" * 16)).encryptor()
    return e.update(data) + e.finalize()


def tpm2b(b):
    return struct.pack(">H", len(b)) + b


def sha256(b):
    return hashlib.sha256(b).digest()


def hmac256(k, m):
    return hmac.new(k, m, hashlib.sha256).digest()


SRK_NAME = bytes.fromhex("000bc3b5d2b847391562a4af74be2e1e991d83b48e55f7ae1c333a60d4dee122a611")
SEED = bytes(range(0x40, 0x60))
CREDENTIAL = bytes(range(0x10, 0x20))
DUP_SEED = bytes(range(0x20, 0x40))
INNER_KEY = bytes(range(0x70, 0x80))
OBFUSCATION = bytes(range(0xC0, 0xE0))
HMAC_KEY = bytes(range(0xA0, 0xC0))

print("kdfa STORAGE 128:", kdfa(SEED, b"STORAGE", SRK_NAME, 128).hex())
print("kdfa INTEGRITY 256:", kdfa(SEED, b"INTEGRITY", b"", 256).hex())
print("kdfa XYZ 520:", kdfa(SEED, b"XYZ", b"uv", 520).hex())

# MakeCredential for the object named SRK_NAME, to an EK with AES-128.
sym = kdfa(SEED, b"STORAGE", SRK_NAME, 128)
enc_identity = cfb(sym, tpm2b(CREDENTIAL))
outer = hmac256(kdfa(SEED, b"INTEGRITY", b"", 256), enc_identity + SRK_NAME)
print("id_object:", tpm2b(tpm2b(outer) + enc_identity).hex())

# Duplicate of an HMAC-SHA-256 key (KEYEDHASH, userWithAuth|noDA|sign) to a
# parent with AES-128, inner wrap with INNER_KEY.
area = (struct.pack(">HHI", 0x0008, 0x000B, (1 << 6) | (1 << 10) | (1 << 18)) + tpm2b(b"")
        + struct.pack(">HH", 0x0005, 0x000B) + tpm2b(sha256(OBFUSCATION + HMAC_KEY)))
name = struct.pack(">H", 0x000B) + sha256(area)
sensitive = tpm2b(struct.pack(">H", 0x0008) + tpm2b(b"") + tpm2b(OBFUSCATION) + tpm2b(HMAC_KEY))
enc_inner = cfb(INNER_KEY, tpm2b(sha256(sensitive + name)) + sensitive)
dup = cfb(kdfa(DUP_SEED, b"STORAGE", name, 128), enc_inner)
outer = hmac256(kdfa(DUP_SEED, b"INTEGRITY", b"", 256), dup + name)
print("public_area:", tpm2b(area).hex())
print("private_blob:", tpm2b(tpm2b(outer) + dup).hex())
