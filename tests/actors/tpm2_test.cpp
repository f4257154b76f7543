// The TPM 2.0 structures and the software MakeCredential/Duplicate
// (actors/attestation/tpm2.*). The EK and SRK below were made by swtpm
// (tpm2_createek -G rsa; tpm2_createprimary -C o -G rsa), their names read
// with tpm2_readpublic -n: a known answer for the name computation. The
// blob itself is proven against swtpm in tests/integration/tpm_test.cpp.

#include <doctest/doctest.h>

#include <memory>
#include <string>

#include <openssl/evp.h>
#include <openssl/rsa.h>

#include "actors/attestation/tpm2.hpp"
#include "messages/crypto.hpp"

using namespace prov;

namespace {

const std::string swtpm_ek_b64 =
  "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAxmrFUdoY1MPm0Rpo"
  "gThkG6Geb31LV3sxI0bjsO3+nwsjfyRhcz55/JkJYdTg0wW5/X/00itnngirrF3G9IpUsjm0goeY5awie0Dmvb4xD5ajTzGc"
  "nTrQqbbHqG1DucxbBdPVZYu1fZKVDLIoDpPxbwFnFpdmId4zkHz55Ko78OLDfq3RzNDLBwsvo1wEhTHdOhbTknLVPrw1ghAe"
  "efgQoVKhznEzCjb8MpsqXkx4p9cbZlfb9+3RoRrkyfvQaORvYqBk1JbkmE2GulFUH6Fs5FPfqqZu4BTjDIxSYndinkM+LKgT"
  "WsM0GvUilF2zn/FoWypQ+UmW/z0dRuEEJsQzIQ==";
const std::string swtpm_ek_name =
  "000bbcb21a0a3bd0803c3de68106d247e96455a53d61592626cc6357380865b28831";
const std::string swtpm_srk_b64 =
  "ARoAAQALAAMAcgAAAAYAgABDABAIAAAAAAABAKQjHxCYhlmqe1ls9pMO/i/PLRKXwRRa+nirOm5Yb9ccnLyzLjcdTC/sebI+"
  "SMCqYmBAAgQlbZIzHhI3o3chdbmX5Fs5BgPQwD2jfOAWstGsTLS85E830vBjQh/YwF5mFunfuLlPldt5di0JD7DBde63n2Ko"
  "qkHsV1RpOSKWl9AvfYHG3tCuXGpezy/WYvP2LHbguaASbx7vtCI7HG5ZAloo6y/n7YXCHLaxNVHCQp6CwuoyXodygihQVRIE"
  "doYRy5fb/mABBYhKodvZsmjKCp0pYJQLadYHgfZgOtY16DW4+Zhb9GiCaAC/awtGhFG/O/A6HmH9sifnmZAguL/yrFU=";
const std::string swtpm_srk_name =
  "000bc3b5d2b847391562a4af74be2e1e991d83b48e55f7ae1c333a60d4dee122a611";

std::string b64d(const std::string& s) { return crypto::base64_decode(s).value(); }

std::string parse_error(const std::string& bytes) {
  tpm2::rsa_public k;
  return tpm2::parse_rsa_public(bytes, "endorsementKey", k);
}

struct pkey_free { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
using pkey_ptr = std::unique_ptr<EVP_PKEY, pkey_free>;

/// A fresh RSA-2048 key pair and its storage-key TPM2B_PUBLIC.
pkey_ptr make_rsa(std::string& tpm2b_public) {
  pkey_ptr k(EVP_RSA_gen(2048));
  REQUIRE(k);
  BIGNUM* n = nullptr;
  REQUIRE(EVP_PKEY_get_bn_param(k.get(), "n", &n) == 1);
  std::string mod(256, '\0');
  REQUIRE(BN_bn2binpad(n, reinterpret_cast<unsigned char*>(mod.data()), 256) == 256);
  BN_free(n);
  tpm2b_public.clear();
  tpm2::put_2b(tpm2b_public, tpm2::rsa_storage_public_area(
                               mod, tpm2::attr_fixed_tpm | tpm2::attr_fixed_parent
                                      | tpm2::attr_restricted | tpm2::attr_decrypt));
  return k;
}

std::string oaep_decrypt(EVP_PKEY* k, const std::string& data, std::string_view label) {
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(k, nullptr);
  REQUIRE(EVP_PKEY_decrypt_init(ctx) == 1);
  EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING);
  EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_sha256());
  EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256());
  auto* l = static_cast<unsigned char*>(OPENSSL_memdup(label.data(), label.size()));
  EVP_PKEY_CTX_set0_rsa_oaep_label(ctx, l, static_cast<int>(label.size()));
  std::string out(512, '\0');
  std::size_t len = out.size();
  const int rc = EVP_PKEY_decrypt(ctx, reinterpret_cast<unsigned char*>(out.data()), &len,
                                  reinterpret_cast<const unsigned char*>(data.data()), data.size());
  EVP_PKEY_CTX_free(ctx);
  if (rc != 1)
    return {};
  out.resize(len);
  return out;
}

uint16_t u16_at(const std::string& b, std::size_t at) {
  return static_cast<uint16_t>((static_cast<uint8_t>(b[at]) << 8) | static_cast<uint8_t>(b[at + 1]));
}

} // namespace

TEST_CASE("tpm2: swtpm's EK and SRK parse, and their names match tpm2_readpublic") {
  tpm2::rsa_public ek, srk;
  REQUIRE(tpm2::parse_rsa_public(b64d(swtpm_ek_b64), "endorsementKey", ek) == "");
  REQUIRE(tpm2::parse_rsa_public(b64d(swtpm_srk_b64), "storageRootKey", srk) == "");
  CHECK(crypto::hex(ek.name()) == swtpm_ek_name);
  CHECK(crypto::hex(srk.name()) == swtpm_srk_name);
  CHECK(ek.key_bits == 2048);
  CHECK(ek.exponent == 65537);
  CHECK(ek.sym_bits == 128);
  CHECK(ek.modulus.size() == 256);
}

TEST_CASE("tpm2: every size field is checked, and ECC or non-storage keys are refused") {
  const std::string ek = b64d(swtpm_ek_b64);
  // Every truncation, at every length, is refused (never read past the end).
  for (std::size_t n = 0; n < ek.size(); ++n) {
    std::string t = ek.substr(0, n);
    CHECK_MESSAGE(parse_error(t) != "", "truncated to ", n);
    if (n >= 2) {
      // ...also with the outer size field patched to what remains.
      t[0] = static_cast<char>((n - 2) >> 8);
      t[1] = static_cast<char>((n - 2) & 0xff);
      CHECK_MESSAGE(parse_error(t) != "", "truncated and resized to ", n);
    }
  }
  CHECK(parse_error(ek + "x").find("size field says 314 bytes but 315 follow") != std::string::npos);
  CHECK(parse_error("").find("truncated") != std::string::npos);

  auto patched = [&](std::size_t at, uint16_t v) {
    std::string t = ek;
    t[at] = static_cast<char>(v >> 8);
    t[at + 1] = static_cast<char>(v & 0xff);
    return parse_error(t);
  };
  CHECK(patched(2, tpm2::alg_ecc).find("is an ECC key: only RSA 2048") != std::string::npos);
  CHECK(patched(2, tpm2::alg_keyedhash).find("is not an RSA key") != std::string::npos);
  CHECK(patched(4, tpm2::alg_sha1).find("only SHA-256") != std::string::npos);
  // authPolicy size (offset 10): larger than a digest, larger than what is left.
  CHECK(patched(10, 65).find("authPolicy size 65") != std::string::npos);
  // objectAttributes (offset 6..9): clear decrypt.
  {
    std::string t = ek;
    t[7] = static_cast<char>(static_cast<uint8_t>(t[7]) & ~0x02);
    CHECK(parse_error(t).find("not a storage key") != std::string::npos);
  }
  // After the 32-byte policy (at 12): symmetric at 44, keyBits 46, mode 48,
  // scheme 50, keyBits 52, exponent 54, unique size 58.
  CHECK(patched(44, tpm2::alg_null).find("AES (CFB) is required") != std::string::npos);
  CHECK(patched(46, 192).find("AES key size 192") != std::string::npos);
  CHECK(patched(50, 0x0017).find("scheme must be NULL") != std::string::npos);
  CHECK(patched(52, 1024).find("RSA key size 1024") != std::string::npos);
  CHECK(patched(58, 255).find("modulus size 255") != std::string::npos);
}

TEST_CASE("tpm2: KDFa follows the spec's layout (counter, label, 0, contexts, bits)") {
  const std::string key = "0123456789abcdef0123456789abcdef";
  // One block: HMAC(key, 00000001 || "STORAGE" 00 || u || v || 00000080), first 16 bytes.
  std::string msg("\0\0\0\1STORAGE\0uuvv\0\0\0\x80", 20);
  const auto mac = crypto::hmac_sha256(key, msg);
  CHECK(tpm2::kdfa_sha256(key, "STORAGE", "uu", "vv", 128)
        == std::string(reinterpret_cast<const char*>(mac.data()), 16));
  // Two blocks for 512 bits; the bits field says 512 in both.
  CHECK(tpm2::kdfa_sha256(key, "INTEGRITY", {}, {}, 512).size() == 64);
  CHECK(tpm2::kdfa_sha256(key, "INTEGRITY", {}, {}, 512).substr(0, 32)
        != tpm2::kdfa_sha256(key, "INTEGRITY", {}, {}, 256));
}

TEST_CASE("tpm2: MakeCredential's seed is OAEP-encrypted with label IDENTITY and the blob opens") {
  std::string pub;
  auto priv = make_rsa(pub);
  tpm2::rsa_public ek;
  REQUIRE(tpm2::parse_rsa_public(pub, "endorsementKey", ek) == "");
  const std::string seed = crypto::random_bytes(32);
  const std::string credential = crypto::random_bytes(16);
  const std::string object_name = b64d(swtpm_srk_b64).substr(0, 34); // any 34 bytes
  tpm2::credential_blob blob;
  REQUIRE(tpm2::make_credential(ek, credential, object_name, seed, blob));

  // TPM2B_ENCRYPTED_SECRET: 256 bytes, the seed under "IDENTITY\0" only.
  REQUIRE(blob.encrypted_secret.size() == 258);
  CHECK(u16_at(blob.encrypted_secret, 0) == 256);
  const std::string secret = blob.encrypted_secret.substr(2);
  CHECK(oaep_decrypt(priv.get(), secret, std::string_view("IDENTITY\0", 9)) == seed);
  CHECK(oaep_decrypt(priv.get(), secret, std::string_view("DUPLICATE\0", 10)).empty());

  // TPM2B_ID_OBJECT: size, TPM2B_DIGEST integrity (32), encIdentity (2 + 16).
  REQUIRE(blob.id_object.size() == 2 + 2 + 32 + 18);
  CHECK(u16_at(blob.id_object, 0) == blob.id_object.size() - 2);
  CHECK(u16_at(blob.id_object, 2) == 32);
  const std::string integrity = blob.id_object.substr(4, 32);
  const std::string enc_identity = blob.id_object.substr(36);
  const auto hmac_key = tpm2::kdfa_sha256(seed, "INTEGRITY", {}, {}, 256);
  const auto mac = crypto::hmac_sha256(hmac_key, enc_identity + object_name);
  CHECK(integrity == std::string(reinterpret_cast<const char*>(mac.data()), mac.size()));
  const auto sym = tpm2::kdfa_sha256(seed, "STORAGE", object_name, {}, 128);
  const auto plain = tpm2::aes_cfb(sym, enc_identity, false);
  CHECK(u16_at(plain, 0) == 16);
  CHECK(plain.substr(2) == credential);
}

TEST_CASE("tpm2: the duplicate's seed uses label DUPLICATE; both wraps open to the key") {
  std::string pub;
  auto priv = make_rsa(pub);
  tpm2::rsa_public srk;
  REQUIRE(tpm2::parse_rsa_public(pub, "storageRootKey", srk) == "");
  const std::string key = crypto::random_bytes(32), inner = crypto::random_bytes(16),
                    obf = crypto::random_bytes(32), seed = crypto::random_bytes(32);
  tpm2::duplicate d;
  REQUIRE(tpm2::duplicate_hmac_key(srk, key, inner, obf, seed, d));
  CHECK(oaep_decrypt(priv.get(), d.encrypted_seed.substr(2), std::string_view("DUPLICATE\0", 10))
        == seed);
  // Public: KEYEDHASH, SHA-256, HMAC-SHA-256 scheme, unique = H(obf || key).
  const std::string area = d.public_area.substr(2);
  CHECK(u16_at(area, 0) == tpm2::alg_keyedhash);
  CHECK(u16_at(area, 2) == tpm2::alg_sha256);
  const auto unique = crypto::sha256(obf + key);
  CHECK(area.substr(area.size() - 32) == std::string(reinterpret_cast<const char*>(unique.data()), 32));
  std::string name;
  tpm2::put_u16(name, tpm2::alg_sha256);
  const auto h = crypto::sha256(area);
  name.append(reinterpret_cast<const char*>(h.data()), h.size());
  // Outer: TPM2B_PRIVATE = size || TPM2B_DIGEST(HMAC(dup || name)) || dup.
  const std::string priv_body = d.private_blob.substr(2);
  CHECK(u16_at(d.private_blob, 0) == priv_body.size());
  const std::string dup = priv_body.substr(34);
  const auto mac = crypto::hmac_sha256(tpm2::kdfa_sha256(seed, "INTEGRITY", {}, {}, 256), dup + name);
  CHECK(priv_body.substr(2, 32) == std::string(reinterpret_cast<const char*>(mac.data()), 32));
  const auto inner_enc = tpm2::aes_cfb(tpm2::kdfa_sha256(seed, "STORAGE", name, {}, 128), dup, false);
  const auto plain = tpm2::aes_cfb(inner, inner_enc, false);
  // TPM2B_DIGEST(H(TPM2B_SENSITIVE || name)) || TPM2B_SENSITIVE.
  REQUIRE(u16_at(plain, 0) == 32);
  const std::string sensitive2b = plain.substr(34);
  const auto ii = crypto::sha256(sensitive2b + name);
  CHECK(plain.substr(2, 32) == std::string(reinterpret_cast<const char*>(ii.data()), 32));
  std::string expect;
  tpm2::put_u16(expect, 2 + 2 + 34 + 34);
  tpm2::put_u16(expect, tpm2::alg_keyedhash);
  tpm2::put_2b(expect, {});
  tpm2::put_2b(expect, obf);
  tpm2::put_2b(expect, key);
  CHECK(sensitive2b == expect);
}

TEST_CASE("tpm2: the activation blob has the six parts in DPS's order") {
  tpm2::rsa_public ek, srk;
  REQUIRE(tpm2::parse_rsa_public(b64d(swtpm_ek_b64), "endorsementKey", ek) == "");
  REQUIRE(tpm2::parse_rsa_public(b64d(swtpm_srk_b64), "storageRootKey", srk) == "");
  std::string why;
  const auto blob = tpm2::activation_blob(ek, srk, crypto::random_bytes(32), why);
  REQUIRE_MESSAGE(!blob.empty(), why);
  std::size_t at = 0;
  std::size_t sizes[6];
  for (auto& s : sizes) {
    REQUIRE(at + 2 <= blob.size());
    s = u16_at(blob, at);
    at += 2 + s;
  }
  CHECK(at == blob.size());
  CHECK(sizes[0] == 2 + 32 + 18); // TPM2B_ID_OBJECT
  CHECK(sizes[1] == 256);         // seed to the EK
  CHECK(sizes[3] == 256);         // seed to the SRK
  CHECK(sizes[5] == 0);           // no encUriData
}

TEST_CASE("tpm2: registration id of an EK is lower-case base32 of its SHA-256, unpadded") {
  // SHA-256("") = e3b0c442...; its base32 (RFC 4648) starts 4OYMIQUY.
  const auto id = tpm2::registration_id_of("");
  CHECK(id == "4oymiquy7qobjgx36tejs35zeqt24qpemsnzgtfeswmrw6csxbkq");
  CHECK(id.size() == 52);
}

TEST_CASE("tpm2: known answers for KDFa, MakeCredential and Duplicate (fixed seeds)") {
  // Expected bytes from tests/actors/tpm2_kat.py: NIST SP 800-108 KBKDF and
  // AES-CFB from python3-cryptography, the structures from TPM 2.0 Part 1
  // §24 and §23.3.2 — none of it this code. The RSA-OAEP parts are random
  // by design (their sizes are checked; swtpm opens them in tpm_test.cpp).
  auto bytes = [](std::string_view hex) {
    std::string out;
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2)
      out.push_back(static_cast<char>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
    return out;
  };
  auto range = [](int from, int to) {
    std::string out;
    for (int c = from; c < to; ++c)
      out.push_back(static_cast<char>(c));
    return out;
  };
  const auto srk_name = bytes(swtpm_srk_name);
  const auto seed = range(0x40, 0x60);
  CHECK(crypto::hex(tpm2::kdfa_sha256(seed, "STORAGE", srk_name, {}, 128))
        == "7a2f490d94a077d42b1240e7c88083c4");
  CHECK(crypto::hex(tpm2::kdfa_sha256(seed, "INTEGRITY", {}, {}, 256))
        == "01927eb72a10a617a5f9166fc789e6a5acbac94d27180042441cada7147483e2");
  // Three HMAC blocks, cut to 65 bytes; the contexts concatenated.
  CHECK(crypto::hex(tpm2::kdfa_sha256(seed, "XYZ", "u", "v", 520))
        == "533951df0ad03591786f39aeb99614c3963f81ecab391489eaffe1b70d2ef04a1694746a1d2281698ff5"
           "0663fd5303215c95af87d44862b26ed3632ccf4970a61e");

  tpm2::rsa_public ek, srk;
  REQUIRE(tpm2::parse_rsa_public(b64d(swtpm_ek_b64), "ek", ek).empty());
  REQUIRE(tpm2::parse_rsa_public(b64d(swtpm_srk_b64), "srk", srk).empty());
  tpm2::credential_blob cred;
  REQUIRE(tpm2::make_credential(ek, range(0x10, 0x20), srk_name, seed, cred));
  CHECK(crypto::hex(cred.id_object)
        == "0034002022f5a3cb7feb9dc7a10b6beb7062c84de3c097a89172e5e688261d8e00ed4ae0079f5b9357e1"
           "616633f3b2c25ea2f0035fcb");
  CHECK(cred.encrypted_secret.size() == 2 + 256);

  tpm2::duplicate dup;
  REQUIRE(tpm2::duplicate_hmac_key(srk, range(0xa0, 0xc0), range(0x70, 0x80),
                                   range(0xc0, 0xe0), range(0x20, 0x40), dup));
  CHECK(crypto::hex(dup.public_area)
        == "00300008000b0004044000000005000b002052a99494101a15fdcdd865dd0025781bb6db7b8311f22f7e"
           "9332538950c55d2a");
  CHECK(crypto::hex(dup.private_blob)
        == "008e0020c830fceac77a23bd3c82b6955c3a61383868ae16e9134b68cefbc688b1eac7fa92e17c4ef8d2"
           "b38413ac3185f25be7b9f538f6f572f91a8c3a057b433efb45193566f47deaf091a769c8dd8bbcd64a1c"
           "47c3c23373874707f8f4f44973c51c17dccafaed67963bf03b1e0123f92f0b4eed70f5814b0eea504084"
           "4668b8a2ffcd19a0f751b9035645996fbf1d");
  CHECK(dup.encrypted_seed.size() == 2 + 256);
}
