// SHA256_Init/Update/Final: see hmac_state.
#define OPENSSL_SUPPRESS_DEPRECATED
#include "messages/crypto.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

namespace prov::crypto {

namespace {

constexpr char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
constexpr char hex_lower[] = "0123456789abcdef";
constexpr char hex_upper[] = "0123456789ABCDEF";

/// 0..63 for a base64 alphabet character, -1 otherwise ('=' included).
int b64_value(unsigned char c) noexcept {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

int hex_value(unsigned char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/// A failing libcrypto primitive means a broken process (allocation failure or
/// a missing default provider). Returning a predictable digest or "random"
/// bytes would be a security hole, and exceptions may not escape, so stop.
[[noreturn]] void crypto_failure(const char* what) noexcept {
  std::fprintf(stderr, "provisiond: fatal libcrypto failure in %s\n", what);
  std::abort();
}

} // namespace

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const uint32_t v = (uint32_t{p[i]} << 16) | (uint32_t{p[i + 1]} << 8) | p[i + 2];
    out += b64_alphabet[(v >> 18) & 63];
    out += b64_alphabet[(v >> 12) & 63];
    out += b64_alphabet[(v >> 6) & 63];
    out += b64_alphabet[v & 63];
  }
  const std::size_t rest = bytes.size() - i;
  if (rest == 1) {
    const uint32_t v = uint32_t{p[i]} << 16;
    out += b64_alphabet[(v >> 18) & 63];
    out += b64_alphabet[(v >> 12) & 63];
    out += "==";
  } else if (rest == 2) {
    const uint32_t v = (uint32_t{p[i]} << 16) | (uint32_t{p[i + 1]} << 8);
    out += b64_alphabet[(v >> 18) & 63];
    out += b64_alphabet[(v >> 12) & 63];
    out += b64_alphabet[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::optional<std::string> base64_decode(std::string_view text) {
  // Strict: length a multiple of 4, no whitespace, '=' only as the final one
  // or two characters, and the unused bits of the last symbol zero (so every
  // byte string has exactly one accepted encoding).
  if (text.size() % 4 != 0) return std::nullopt;
  std::size_t pad = 0;
  if (!text.empty() && text.back() == '=') {
    pad = 1;
    if (text[text.size() - 2] == '=') pad = 2;
  }
  const std::size_t body = text.size() - pad;
  // Written through a pointer into a presized buffer: a push_back per byte
  // was most of the cost (it runs several times per device registration).
  std::string out(body * 6 / 8, '\0');
  char* w = out.data();
  uint32_t acc = 0;
  int bits = 0;
  for (std::size_t i = 0; i < body; ++i) {
    const int v = b64_value(static_cast<unsigned char>(text[i]));
    if (v < 0) return std::nullopt; // includes a '=' before the padding
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      *w++ = static_cast<char>((acc >> bits) & 0xFF);
    }
  }
  // Leftover bits (2 with "==", 4 with "=") must be zero.
  if (bits > 0 && (acc & ((1u << bits) - 1)) != 0) return std::nullopt;
  return out;
}

namespace {

// HMAC on the low-level SHA-256 API (deprecated in OpenSSL 3, present in
// every 3.x build): for the short messages here, EVP's dispatch cost about
// as much as the hashing (a fresh EVP_MAC context per call even ~25k
// instructions), and a SHA256_CTX is a plain struct, so a key's padded
// blocks can be absorbed once and the state copied (hmac_state).
struct hmac_state {
  SHA256_CTX inner; ///< after (K ^ ipad)
  SHA256_CTX outer; ///< after (K ^ opad)
  ~hmac_state() { OPENSSL_cleanse(this, sizeof(*this)); }
};

void hmac_init(hmac_state& st, std::string_view key) {
  constexpr std::size_t block = 64;
  unsigned char k[block] = {};
  if (key.size() > block) {
    auto hk = sha256(key);
    std::copy(hk.begin(), hk.end(), k);
    OPENSSL_cleanse(hk.data(), hk.size());
  } else {
    std::copy(key.begin(), key.end(), k);
  }
  unsigned char pad[block];
  for (std::size_t i = 0; i < block; ++i) pad[i] = k[i] ^ 0x36;
  bool ok = SHA256_Init(&st.inner) == 1 && SHA256_Update(&st.inner, pad, block) == 1;
  for (std::size_t i = 0; i < block; ++i) pad[i] = k[i] ^ 0x5c;
  ok = ok && SHA256_Init(&st.outer) == 1 && SHA256_Update(&st.outer, pad, block) == 1;
  OPENSSL_cleanse(k, sizeof(k));
  OPENSSL_cleanse(pad, sizeof(pad));
  if (!ok) crypto_failure("HMAC-SHA256");
}

sha256_digest hmac_finish(const hmac_state& st, std::string_view msg) {
  SHA256_CTX c = st.inner;
  unsigned char inner[32];
  sha256_digest out{};
  bool ok = SHA256_Update(&c, msg.data(), msg.size()) == 1 && SHA256_Final(inner, &c) == 1;
  c = st.outer;
  ok = ok && SHA256_Update(&c, inner, sizeof(inner)) == 1 && SHA256_Final(out.data(), &c) == 1;
  OPENSSL_cleanse(inner, sizeof(inner));
  OPENSSL_cleanse(&c, sizeof(c));
  if (!ok) crypto_failure("HMAC-SHA256");
  return out;
}

} // namespace

// HMAC (RFC 2104) over SHA-256: H((K ^ opad) || H((K ^ ipad) || msg)).
sha256_digest hmac_sha256(std::string_view key, std::string_view msg) {
  hmac_state st;
  hmac_init(st, key);
  return hmac_finish(st, msg);
}

sha256_digest sha256(std::string_view data) {
  sha256_digest out{};
  if (SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), out.data())
      == nullptr)
    crypto_failure("SHA-256");
  return out;
}

bool equal_constant_time(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  if (a.empty()) return true;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string random_bytes(std::size_t n) {
  std::string out(n, '\0');
  // RAND_bytes takes an int; fill in chunks for absurdly large requests.
  std::size_t done = 0;
  while (done < n) {
    const std::size_t chunk = std::min<std::size_t>(n - done, 1u << 20);
    if (RAND_bytes(reinterpret_cast<unsigned char*>(&out[done]),
                   static_cast<int>(chunk)) != 1)
      crypto_failure("RAND_bytes");
    done += chunk;
  }
  return out;
}

std::string hex(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out += hex_lower[c >> 4];
    out += hex_lower[c & 15];
  }
  return out;
}

namespace {

std::mt19937_64& uuid_generator() {
  // Request ids, operation ids and etags need uniqueness, not secrecy, and
  // RAND_bytes per request cost ~15k instructions (callgrind). A per-thread
  // 64-bit generator seeded from RAND_bytes gives 122 random bits per id.
  thread_local std::mt19937_64 gen = [] {
    std::string seed = random_bytes(32);
    std::seed_seq seq(seed.begin(), seed.end());
    return std::mt19937_64(seq);
  }();
  return gen;
}

std::string uuid_text(const unsigned char (&b)[16]) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(36, '-');
  std::size_t o = 0;
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10)
      ++o; // keep the '-'
    out[o++] = digits[b[i] >> 4];
    out[o++] = digits[b[i] & 15];
  }
  return out;
}

} // namespace

std::string uuid4() {
  auto& gen = uuid_generator();
  uint64_t hi = gen(), lo = gen();
  unsigned char b[16];
  for (int i = 0; i < 8; ++i) {
    b[i] = static_cast<unsigned char>(hi >> (8 * i));
    b[8 + i] = static_cast<unsigned char>(lo >> (8 * i));
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0F) | 0x40); // version 4
  b[8] = static_cast<unsigned char>((b[8] & 0x3F) | 0x80); // RFC 4122 variant
  return uuid_text(b);
}

std::string uuid7(int64_t unix_ms) {
  auto& gen = uuid_generator();
  uint64_t hi = gen(), lo = gen();
  unsigned char b[16];
  auto ms = static_cast<uint64_t>(unix_ms);
  for (int i = 0; i < 6; ++i)
    b[i] = static_cast<unsigned char>(ms >> (8 * (5 - i))); // 48-bit big-endian time
  for (int i = 6; i < 8; ++i)
    b[i] = static_cast<unsigned char>(hi >> (8 * i));
  for (int i = 0; i < 8; ++i)
    b[8 + i] = static_cast<unsigned char>(lo >> (8 * i));
  b[6] = static_cast<unsigned char>((b[6] & 0x0F) | 0x70); // version 7
  b[8] = static_cast<unsigned char>((b[8] & 0x3F) | 0x80); // RFC 4122 variant
  return uuid_text(b);
}

int64_t uuid7_time_ms(std::string_view uuid) {
  if (uuid.size() != 36 || uuid[8] != '-' || uuid[13] != '-' || uuid[14] != '7'
      || uuid[18] != '-' || uuid[23] != '-')
    return 0;
  uint64_t ms = 0;
  for (std::size_t i : {0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12}) {
    char c = uuid[i];
    int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (v < 0)
      return 0;
    ms = (ms << 4) | static_cast<uint64_t>(v);
  }
  return static_cast<int64_t>(ms);
}

std::string url_encode(std::string_view s) {
  std::string out;
  out.reserve(s.size() * 3);
  for (unsigned char c : s) {
    const bool unreserved = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                            (c >= '0' && c <= '9') || c == '-' || c == '.' ||
                            c == '_' || c == '~';
    if (unreserved) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex_upper[c >> 4];
      out += hex_upper[c & 15];
    }
  }
  return out;
}

std::optional<std::string> url_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    // Copy the run up to the next escape at once.
    auto pct = s.find('%', i);
    if (pct == std::string_view::npos) {
      out.append(s.data() + i, s.size() - i);
      break;
    }
    out.append(s.data() + i, pct - i);
    if (pct + 2 >= s.size()) return std::nullopt;
    const int hi = hex_value(static_cast<unsigned char>(s[pct + 1]));
    const int lo = hex_value(static_cast<unsigned char>(s[pct + 2]));
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>((hi << 4) | lo);
    i = pct + 3;
  }
  return out;
}

std::optional<std::string> derive_device_key(std::string_view group_key_b64,
                                             std::string_view registration_id) {
  auto d = derive_device_key_raw(group_key_b64, registration_id);
  if (!d) return std::nullopt;
  auto out = base64_encode(std::string_view(reinterpret_cast<const char*>(d->data()), d->size()));
  OPENSSL_cleanse(d->data(), d->size());
  return out;
}

std::optional<sha256_digest> derive_device_key_raw(std::string_view group_key_b64,
                                                   std::string_view registration_id) {
  // A group key derives the keys of all its devices: each thread keeps the
  // absorbed state of the last few keys (groups are few), which spares the
  // base64 decode and two of the four SHA-256 blocks per device. A deleted
  // or rotated key stays in a slot until four others replace it (or the
  // thread ends); the process holds the live keys in memory anyway.
  struct cached_key {
    std::string b64;
    hmac_state st;
    ~cached_key() { OPENSSL_cleanse(b64.data(), b64.size()); }
  };
  constexpr std::size_t slots = 4;
  thread_local cached_key cache[slots];
  thread_local std::size_t next = 0;
  if (group_key_b64.empty()) // valid base64, but "" marks a free slot
    return hmac_sha256("", registration_id);
  const hmac_state* st = nullptr;
  for (const auto& c : cache)
    if (c.b64 == group_key_b64) {
      st = &c.st;
      break;
    }
  if (st == nullptr) {
    auto key = base64_decode(group_key_b64);
    if (!key) return std::nullopt;
    auto& slot = cache[next++ % slots];
    OPENSSL_cleanse(slot.b64.data(), slot.b64.size());
    slot.b64.assign(group_key_b64);
    hmac_init(slot.st, *key);
    OPENSSL_cleanse(key->data(), key->size());
    st = &slot.st;
  }
  return hmac_finish(*st, registration_id);
}

std::string generate_key() {
  std::string raw = random_bytes(64);
  std::string out = base64_encode(raw);
  OPENSSL_cleanse(raw.data(), raw.size());
  return out;
}

} // namespace prov::crypto
