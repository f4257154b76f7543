#include "actors/attestation/tpm2.hpp"

#include <cstdio>
#include <memory>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>

#include "messages/crypto.hpp"

namespace prov::tpm2 {

namespace {

// Small RAII owners of the OpenSSL objects used here.
struct pkey_free { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
struct pkey_ctx_free { void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); } };
struct cipher_ctx_free { void operator()(EVP_CIPHER_CTX* p) const { EVP_CIPHER_CTX_free(p); } };
struct bn_free { void operator()(BIGNUM* p) const { BN_free(p); } };
struct bld_free { void operator()(OSSL_PARAM_BLD* p) const { OSSL_PARAM_BLD_free(p); } };
struct params_free { void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); } };
using pkey_ptr = std::unique_ptr<EVP_PKEY, pkey_free>;
using pkey_ctx_ptr = std::unique_ptr<EVP_PKEY_CTX, pkey_ctx_free>;
using cipher_ctx_ptr = std::unique_ptr<EVP_CIPHER_CTX, cipher_ctx_free>;
using bn_ptr = std::unique_ptr<BIGNUM, bn_free>;
using bld_ptr = std::unique_ptr<OSSL_PARAM_BLD, bld_free>;
using params_ptr = std::unique_ptr<OSSL_PARAM, params_free>;

/// Reads big-endian fields, never past the end.
class reader {
public:
  explicit reader(std::string_view b) : b_(b) {}
  bool u16(uint16_t& v) {
    if (b_.size() - pos_ < 2)
      return false;
    v = static_cast<uint16_t>((byte(0) << 8) | byte(1));
    pos_ += 2;
    return true;
  }
  bool u32(uint32_t& v) {
    if (b_.size() - pos_ < 4)
      return false;
    v = (static_cast<uint32_t>(byte(0)) << 24) | (static_cast<uint32_t>(byte(1)) << 16)
        | (static_cast<uint32_t>(byte(2)) << 8) | byte(3);
    pos_ += 4;
    return true;
  }
  bool bytes(std::size_t n, std::string_view& v) {
    if (b_.size() - pos_ < n)
      return false;
    v = b_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  std::size_t left() const { return b_.size() - pos_; }

private:
  uint32_t byte(std::size_t i) const { return static_cast<uint8_t>(b_[pos_ + i]); }
  std::string_view b_;
  std::size_t pos_ = 0;
};

std::string hex16(uint16_t v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%04x", v);
  return buf;
}

std::string as_string(const crypto::sha256_digest& d) {
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

std::string tpm2b(std::string_view bytes) {
  std::string out;
  put_2b(out, bytes);
  return out;
}

constexpr std::size_t digest_size = 32; // SHA-256, the only nameAlg accepted

} // namespace

void put_u16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v & 0xff));
}

void put_u32(std::string& out, uint32_t v) {
  put_u16(out, static_cast<uint16_t>(v >> 16));
  put_u16(out, static_cast<uint16_t>(v & 0xffff));
}

void put_2b(std::string& out, std::string_view bytes) {
  put_u16(out, static_cast<uint16_t>(bytes.size()));
  out.append(bytes);
}

std::string rsa_public::name() const {
  std::string n;
  put_u16(n, name_alg);
  n += as_string(crypto::sha256(area));
  return n;
}

std::string parse_rsa_public(std::string_view tpm2b_bytes, std::string_view what_v,
                             rsa_public& out) {
  const std::string what(what_v);
  out = rsa_public{};
  reader r(tpm2b_bytes);
  uint16_t size = 0;
  if (!r.u16(size))
    return what + ": truncated TPM2B_PUBLIC (no size field)";
  if (size != r.left())
    return what + ": TPM2B_PUBLIC size field says " + std::to_string(size) + " bytes but "
           + std::to_string(r.left()) + " follow";
  std::string_view area;
  r.bytes(size, area);
  reader p(area);
  auto truncated = [&](const char* field) {
    return what + ": TPMT_PUBLIC truncated in " + field;
  };
  uint16_t type = 0;
  if (!p.u16(type))
    return truncated("type");
  if (type == alg_ecc)
    // The DPS device SDKs make their EK (and SRK) from the RSA-2048 template,
    // and the challenge's seed is RSA-OAEP-encrypted to it (§2.6).
    return what + " is an ECC key: only RSA 2048 keys are supported (DPS TPM attestation "
                  "uses the RSA-2048 EK of the TCG default template, as the DPS device SDKs "
                  "create it: tpm2_createek -G rsa)";
  if (type != alg_rsa)
    return what + " is not an RSA key (type " + hex16(type) + "; only RSA 2048 is supported)";
  if (!p.u16(out.name_alg))
    return truncated("nameAlg");
  if (out.name_alg != alg_sha256)
    return what + ": nameAlg " + hex16(out.name_alg) + " is not supported (only SHA-256)";
  if (!p.u32(out.attributes))
    return truncated("objectAttributes");
  uint16_t policy_size = 0;
  std::string_view policy;
  if (!p.u16(policy_size))
    return truncated("authPolicy");
  if (policy_size > 64)
    return what + ": authPolicy size " + std::to_string(policy_size)
           + " exceeds the largest digest (64)";
  if (!p.bytes(policy_size, policy))
    return what + ": authPolicy size " + std::to_string(policy_size) + " exceeds the "
           + std::to_string(p.left()) + " bytes left";
  uint16_t sym = 0, sym_mode = 0, scheme = 0;
  if (!p.u16(sym))
    return truncated("symmetric");
  if (sym != alg_aes)
    return what + ": not a storage key: its symmetric algorithm is " + hex16(sym)
           + ", AES (CFB) is required";
  if (!p.u16(out.sym_bits) || !p.u16(sym_mode))
    return truncated("symmetric");
  if (out.sym_bits != 128 && out.sym_bits != 256)
    return what + ": AES key size " + std::to_string(out.sym_bits) + " is not 128 or 256";
  if (sym_mode != alg_cfb)
    return what + ": symmetric mode " + hex16(sym_mode) + " is not CFB";
  if (!p.u16(scheme))
    return truncated("scheme");
  if (scheme != alg_null)
    return what + ": not a storage key: its RSA scheme must be NULL, is " + hex16(scheme);
  if (!p.u16(out.key_bits) || !p.u32(out.exponent))
    return truncated("keyBits/exponent");
  if (out.key_bits != 2048)
    return what + ": RSA key size " + std::to_string(out.key_bits)
           + " is not supported (only 2048)";
  if (out.exponent == 0)
    out.exponent = 65537;
  if (out.exponent < 3 || out.exponent % 2 == 0)
    return what + ": RSA exponent " + std::to_string(out.exponent) + " is not valid";
  uint16_t n_size = 0;
  std::string_view n;
  if (!p.u16(n_size))
    return truncated("unique");
  if (n_size != out.key_bits / 8)
    return what + ": modulus size " + std::to_string(n_size) + " does not match keyBits "
           + std::to_string(out.key_bits);
  if (!p.bytes(n_size, n))
    return what + ": modulus size " + std::to_string(n_size) + " exceeds the "
           + std::to_string(p.left()) + " bytes left";
  if (p.left() != 0)
    return what + ": " + std::to_string(p.left()) + " unexpected bytes after the TPMT_PUBLIC";
  if (static_cast<uint8_t>(n[0]) < 0x80)
    return what + ": the modulus is not 2048 bits";
  const uint32_t storage = attr_restricted | attr_decrypt;
  if ((out.attributes & storage) != storage || (out.attributes & attr_sign) != 0)
    return what + ": not a storage key: the restricted and decrypt attributes are required "
                  "and sign must be clear (attributes 0x"
           + [&] {
               char buf[12];
               std::snprintf(buf, sizeof buf, "%08x", out.attributes);
               return std::string(buf);
             }()
           + ")";
  out.area.assign(area);
  out.modulus.assign(n);
  return {};
}

std::string kdfa_sha256(std::string_view key, std::string_view label, std::string_view context_u,
                        std::string_view context_v, uint32_t bits) {
  const std::size_t bytes = (bits + 7) / 8;
  std::string out;
  std::string msg;
  for (uint32_t i = 1; out.size() < bytes; ++i) {
    msg.clear();
    put_u32(msg, i);
    msg.append(label);
    msg.push_back('\0');
    msg.append(context_u);
    msg.append(context_v);
    put_u32(msg, bits);
    out += as_string(crypto::hmac_sha256(key, msg));
  }
  out.resize(bytes);
  return out;
}

std::string aes_cfb(std::string_view key, std::string_view data, bool encrypt) {
  const EVP_CIPHER* c = key.size() == 16   ? EVP_aes_128_cfb128()
                        : key.size() == 32 ? EVP_aes_256_cfb128()
                                           : nullptr;
  cipher_ctx_ptr ctx(EVP_CIPHER_CTX_new());
  if (c == nullptr || !ctx)
    return {};
  const unsigned char iv[16] = {};
  std::string out(data.size(), '\0');
  int n = 0, m = 0;
  if (EVP_CipherInit_ex(ctx.get(), c, nullptr, reinterpret_cast<const unsigned char*>(key.data()),
                        iv, encrypt ? 1 : 0)
        != 1
      || EVP_CipherUpdate(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &n,
                          reinterpret_cast<const unsigned char*>(data.data()),
                          static_cast<int>(data.size()))
           != 1
      || EVP_CipherFinal_ex(ctx.get(), reinterpret_cast<unsigned char*>(out.data()) + n, &m) != 1)
    return {};
  out.resize(static_cast<std::size_t>(n + m));
  return out;
}

std::string rsa_oaep_encrypt(const rsa_public& key, std::string_view data,
                             std::string_view label) {
  bn_ptr n(BN_bin2bn(reinterpret_cast<const unsigned char*>(key.modulus.data()),
                     static_cast<int>(key.modulus.size()), nullptr));
  bn_ptr e(BN_new());
  bld_ptr bld(OSSL_PARAM_BLD_new());
  if (!n || !e || !bld || BN_set_word(e.get(), key.exponent) != 1
      || OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1
      || OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1)
    return {};
  params_ptr params(OSSL_PARAM_BLD_to_param(bld.get()));
  pkey_ctx_ptr from(EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr));
  EVP_PKEY* raw = nullptr;
  if (!params || !from || EVP_PKEY_fromdata_init(from.get()) != 1
      || EVP_PKEY_fromdata(from.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1)
    return {};
  pkey_ptr pkey(raw);
  pkey_ctx_ptr ctx(EVP_PKEY_CTX_new(pkey.get(), nullptr));
  if (!ctx || EVP_PKEY_encrypt_init(ctx.get()) != 1
      || EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING) != 1
      || EVP_PKEY_CTX_set_rsa_oaep_md(ctx.get(), EVP_sha256()) != 1
      || EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), EVP_sha256()) != 1)
    return {};
  // set0 takes ownership of an OPENSSL_malloc'd copy.
  auto* l = static_cast<unsigned char*>(OPENSSL_memdup(label.data(), label.size()));
  if (l == nullptr || EVP_PKEY_CTX_set0_rsa_oaep_label(ctx.get(), l, static_cast<int>(label.size())) != 1) {
    OPENSSL_free(l);
    return {};
  }
  std::size_t len = 0;
  if (EVP_PKEY_encrypt(ctx.get(), nullptr, &len,
                       reinterpret_cast<const unsigned char*>(data.data()), data.size())
      != 1)
    return {};
  std::string out(len, '\0');
  if (EVP_PKEY_encrypt(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &len,
                       reinterpret_cast<const unsigned char*>(data.data()), data.size())
      != 1)
    return {};
  out.resize(len);
  return out;
}

bool make_credential(const rsa_public& ek, std::string_view credential,
                     std::string_view object_name, std::string_view seed, credential_blob& out) {
  if (credential.empty() || credential.size() > digest_size || seed.size() != digest_size)
    return false;
  // The seed travels to the EK; only its TPM recovers it (label "IDENTITY").
  auto secret = rsa_oaep_encrypt(ek, seed, std::string_view("IDENTITY\0", 9));
  if (secret.empty())
    return false;
  const auto sym = kdfa_sha256(seed, "STORAGE", object_name, {}, ek.sym_bits);
  const auto enc_identity = aes_cfb(sym, tpm2b(credential), true);
  const auto hmac_key = kdfa_sha256(seed, "INTEGRITY", {}, {}, digest_size * 8);
  std::string mac_input = enc_identity;
  mac_input.append(object_name);
  const auto integrity = as_string(crypto::hmac_sha256(hmac_key, mac_input));
  out.id_object = tpm2b(tpm2b(integrity) + enc_identity);
  out.encrypted_secret = tpm2b(secret);
  return !enc_identity.empty();
}

std::string hmac_key_public_area(std::string_view hmac_key, std::string_view obfuscation) {
  std::string a;
  put_u16(a, alg_keyedhash);
  put_u16(a, alg_sha256);
  // Not fixedTPM/fixedParent: it is a duplicate, made outside the TPM.
  put_u32(a, attr_user_with_auth | attr_no_da | attr_sign);
  put_2b(a, {}); // authPolicy
  put_u16(a, alg_hmac);
  put_u16(a, alg_sha256);
  std::string seed_and_key(obfuscation);
  seed_and_key.append(hmac_key);
  put_2b(a, as_string(crypto::sha256(seed_and_key)));
  OPENSSL_cleanse(seed_and_key.data(), seed_and_key.size());
  return a;
}

bool duplicate_hmac_key(const rsa_public& parent, std::string_view hmac_key,
                        std::string_view inner_key, std::string_view obfuscation,
                        std::string_view seed, duplicate& out) {
  if (hmac_key.empty() || hmac_key.size() > 64 || inner_key.size() != 16
      || obfuscation.size() != digest_size || seed.size() != digest_size)
    return false;
  const auto area = hmac_key_public_area(hmac_key, obfuscation);
  std::string name;
  put_u16(name, alg_sha256);
  name += as_string(crypto::sha256(area));
  // TPMT_SENSITIVE: type, authValue (empty), seedValue, the key.
  std::string sensitive;
  put_u16(sensitive, alg_keyedhash);
  put_2b(sensitive, {});
  put_2b(sensitive, obfuscation);
  put_2b(sensitive, hmac_key);
  std::string plain = tpm2b(sensitive);
  OPENSSL_cleanse(sensitive.data(), sensitive.size());
  // Inner wrap (§23.3.2.3): integrity = H(TPM2B_SENSITIVE || name), then
  // CFB over TPM2B_DIGEST(integrity) || TPM2B_SENSITIVE.
  const auto inner_integrity = as_string(crypto::sha256(plain + name));
  plain = tpm2b(inner_integrity) + plain;
  const auto enc_inner = aes_cfb(inner_key, plain, true);
  OPENSSL_cleanse(plain.data(), plain.size());
  // Outer wrap (§23.3.2.4): a seed only the parent recovers (label "DUPLICATE").
  auto secret = rsa_oaep_encrypt(parent, seed, std::string_view("DUPLICATE\0", 10));
  if (secret.empty() || enc_inner.empty())
    return false;
  const auto sym = kdfa_sha256(seed, "STORAGE", name, {}, parent.sym_bits);
  const auto dup = aes_cfb(sym, enc_inner, true);
  const auto hmac_outer = kdfa_sha256(seed, "INTEGRITY", {}, {}, digest_size * 8);
  const auto outer = as_string(crypto::hmac_sha256(hmac_outer, dup + name));
  out.public_area = tpm2b(area);
  out.private_blob = tpm2b(tpm2b(outer) + dup);
  out.encrypted_seed = tpm2b(secret);
  return !dup.empty();
}

std::string activation_blob(const rsa_public& ek, const rsa_public& srk,
                            std::string_view hmac_key, std::string& why) {
  std::string inner_key = crypto::random_bytes(16);
  duplicate dup;
  credential_blob cred;
  const bool ok =
    duplicate_hmac_key(srk, hmac_key, inner_key, crypto::random_bytes(digest_size),
                       crypto::random_bytes(digest_size), dup)
    && make_credential(ek, inner_key, srk.name(), crypto::random_bytes(digest_size), cred);
  OPENSSL_cleanse(inner_key.data(), inner_key.size());
  if (!ok) {
    why = "the endorsement or storage root key could not be used for encryption";
    return {};
  }
  std::string blob = cred.id_object + cred.encrypted_secret + dup.private_blob
                     + dup.encrypted_seed + dup.public_area;
  put_2b(blob, {}); // encUriData: none
  return blob;
}

std::string registration_id_of(std::string_view ek_tpm2b) {
  static constexpr char alphabet[] = "abcdefghijklmnopqrstuvwxyz234567";
  const auto d = crypto::sha256(ek_tpm2b);
  std::string out;
  uint32_t buffer = 0;
  int bits = 0;
  for (uint8_t b : d) {
    buffer = (buffer << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out.push_back(alphabet[(buffer >> (bits - 5)) & 31]);
      bits -= 5;
    }
  }
  if (bits > 0)
    out.push_back(alphabet[(buffer << (5 - bits)) & 31]);
  return out;
}

std::string rsa_storage_public_area(std::string_view modulus, uint32_t attributes,
                                    std::string_view auth_policy) {
  std::string a;
  put_u16(a, alg_rsa);
  put_u16(a, alg_sha256);
  put_u32(a, attributes);
  put_2b(a, auth_policy);
  put_u16(a, alg_aes);
  put_u16(a, 128);
  put_u16(a, alg_cfb);
  put_u16(a, alg_null);
  put_u16(a, 2048);
  put_u32(a, 0);
  put_2b(a, modulus);
  return a;
}

} // namespace prov::tpm2
