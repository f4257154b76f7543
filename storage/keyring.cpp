#include "storage/keyring.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "messages/crypto.hpp"

namespace prov::storage {

namespace {

// Envelope: magic, id length, id, 12-byte nonce, ciphertext, 16-byte tag.
// The magic's first byte is neither '{' (JSON documents) nor 0xB7 (binary
// records), so a plaintext value left by an older version is told apart.
constexpr std::string_view magic = "\xE5PS1";
constexpr std::size_t nonce_len = 12;
constexpr std::size_t tag_len = 16;
constexpr std::size_t key_len = 32;

/// EVP_CIPHER_CTX behind RAII: freed on every path out.
struct cipher_ctx {
  EVP_CIPHER_CTX* p = EVP_CIPHER_CTX_new();
  ~cipher_ctx() { EVP_CIPHER_CTX_free(p); }
  cipher_ctx() = default;
  cipher_ctx(const cipher_ctx&) = delete;
  cipher_ctx& operator=(const cipher_ctx&) = delete;
};

std::string key_id(std::string_view key_bytes) {
  std::string input = "provisiond-kek-id\n";
  input.append(key_bytes);
  auto d = crypto::sha256(input);
  keyring::wipe(input);
  return crypto::hex({reinterpret_cast<const char*>(d.data()), 8});
}

bool valid_id(std::string_view id) noexcept {
  if (id.size() != 16) return false;
  for (char c : id)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

/// An id as it may appear in a message: a valid one as is, anything else
/// (bytes of a damaged envelope, not UTF-8) hex-escaped, so messages stay
/// printable and JSON-serialisable.
std::string printable_id(std::string_view id) {
  if (valid_id(id)) return std::string(id);
  static constexpr char digits[] = "0123456789abcdef";
  std::string out = "(invalid id 0x";
  for (unsigned char c : id.substr(0, 32)) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  if (id.size() > 32) out += "...";
  return out + ")";
}

error file_error(const std::string& path, const std::string& why) {
  return {error_code::storage_failure, "secrets: key file '" + path + "': " + why};
}

std::string render(const std::vector<keyring::key>& keys) {
  std::string out =
    "# provisiond key-encryption keys (docs/security.md). The last line is the active key;\n"
    "# keep older lines while any data dir, backup or Kafka record may still use them.\n";
  for (const auto& k : keys) out += k.id + " " + crypto::base64_encode(k.bytes) + "\n";
  return out;
}

/// fsyncs the directory holding `path`, so a link or rename in it survives a
/// power loss (the file's own fsync does not cover its directory entry).
error sync_parent(const std::string& path) {
  auto slash = path.find_last_of('/');
  std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return file_error(path, "cannot open its directory to sync it: " +
                                        std::string(std::strerror(errno)));
  int rc = ::fsync(fd);
  int saved = errno;
  ::close(fd);
  if (rc != 0)
    return file_error(path, "cannot sync its directory: " + std::string(std::strerror(saved)));
  return {};
}

/// Writes `text` to `path` with mode 0600 so that `path` is never seen
/// half-written: the text goes to `path`.tmp (O_EXCL|O_NOFOLLOW: never
/// through a planted link), is fsync'd, then linked to `path` (`replace`
/// false: refuses an existing file) or renamed over it, and the directory is
/// fsync'd. Only after that may anything be sealed under a key in `text`. A
/// .tmp left by a crash never held a key anything was sealed under: removed.
error write_private(const std::string& path, const std::string& text, bool replace) {
  const std::string tmp = path + ".tmp";
  if (::unlink(tmp.c_str()) != 0 && errno != ENOENT)
    return file_error(tmp, std::string("cannot remove a stale copy: ") + std::strerror(errno));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return file_error(tmp, std::string("cannot create: ") + std::strerror(errno));
  std::size_t off = 0;
  bool ok = true;
  while (off < text.size()) {
    auto n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) { ok = false; break; }
    off += static_cast<std::size_t>(n);
  }
  int saved = errno;
  ok = ok && ::fchmod(fd, 0600) == 0 && ::fsync(fd) == 0;
  if (!ok) saved = errno;
  ::close(fd);
  if (!ok) {
    ::unlink(tmp.c_str());
    return file_error(tmp, std::string("cannot write: ") + std::strerror(saved));
  }
  if (replace) {
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      saved = errno;
      ::unlink(tmp.c_str());
      return file_error(path, std::string("cannot replace: ") + std::strerror(saved));
    }
  } else {
    int rc = ::link(tmp.c_str(), path.c_str());
    saved = errno;
    ::unlink(tmp.c_str());
    if (rc != 0) return file_error(path, std::string("cannot create: ") + std::strerror(saved));
  }
  return sync_parent(path);
}

/// The next blank-separated field of `line` (advanced past it).
std::string_view next_field(std::string_view& line) {
  auto blank = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!line.empty() && blank(line.front())) line.remove_prefix(1);
  std::size_t n = 0;
  while (n < line.size() && !blank(line[n])) ++n;
  auto field = line.substr(0, n);
  line.remove_prefix(n);
  return field;
}

/// Key file lines into `keys`; `fail` turns a reason into the error. Works
/// on views of `text`, so no copy of a key is left behind (the decoded keys
/// are wiped by ~keyring, a rejected one here). Messages never quote a line:
/// with its fields swapped or mangled, any of them may be key text.
template <class Fail>
error parse_lines(std::string_view text, std::vector<keyring::key>& keys, Fail&& fail) {
  int line_no = 0;
  while (!text.empty()) {
    const auto eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
    ++line_no;
    if (line.empty() || line[0] == '#') continue;
    const auto id = next_field(line);
    const auto b64 = next_field(line);
    const auto rest = next_field(line);
    if (id.empty() && b64.empty()) continue; // blank
    auto where = "line " + std::to_string(line_no) + ": ";
    if (id.empty() || b64.empty() || !rest.empty())
      return fail(where + "expected \"<key id> <base64 key>\"");
    if (!valid_id(id))
      return fail(where + "the key id is not 16 lower-case hex digits (expected \"<key id> "
                          "<base64 key>\")");
    auto bytes = crypto::base64_decode(b64);
    if (!bytes || bytes->size() != key_len) {
      if (bytes) keyring::wipe(*bytes);
      return fail(where + "the key is not base64 of 32 bytes");
    }
    if (key_id(*bytes) != id) {
      keyring::wipe(*bytes);
      return fail(where + "key id " + std::string(id) +
                  " does not match its key (the line is damaged)");
    }
    keys.push_back({std::string(id), std::move(*bytes)});
  }
  if (keys.empty()) return fail("holds no key");
  return {};
}

keyring::key fresh_key() {
  keyring::key k;
  k.bytes = crypto::random_bytes(key_len);
  k.id = key_id(k.bytes);
  return k;
}

} // namespace

void keyring::wipe(void* p, std::size_t n) noexcept {
  if (p != nullptr && n > 0) OPENSSL_cleanse(p, n);
}

void keyring::wipe(std::string& s) noexcept {
  wipe(s.data(), s.size());
  s.clear();
}

keyring::~keyring() {
  for (auto& k : keys_) OPENSSL_cleanse(k.bytes.data(), k.bytes.size());
}

error keyring::load(const std::string& path, std::shared_ptr<const keyring>& out) {
  out.reset();
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return file_error(path, std::string("cannot read: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return file_error(path, "not a regular file");
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return file_error(path, std::string("mode ") + mode +
                              " lets other users read the keys; run chmod 600 on it");
  }
  std::ifstream in(path);
  if (!in) return file_error(path, "cannot open");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::shared_ptr<keyring> r(new keyring());
  r->path_ = path;
  r->source_ = "key file '" + path + "'";
  auto err = parse_lines(text, r->keys_, [&](const std::string& why) {
    return file_error(path, why);
  });
  OPENSSL_cleanse(text.data(), text.size());
  if (err) return err;
  out = std::move(r);
  return {};
}

error keyring::from_env(const std::string& name, std::string_view value,
                        std::shared_ptr<const keyring>& out) {
  out.reset();
  auto env_error = [&](const std::string& why) {
    return error{error_code::storage_failure, "secrets: environment variable " + name + ": " + why};
  };
  std::shared_ptr<keyring> r(new keyring());
  r->source_ = "environment variable " + name;
  // One key alone: base64 of 32 bytes, surrounding blanks ignored.
  std::string_view v = value;
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.front()))) v.remove_prefix(1);
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.remove_suffix(1);
  if (v.find_first_of(" \t\n") == std::string_view::npos) {
    if (v.empty()) return env_error("is set but empty");
    auto bytes = crypto::base64_decode(v);
    if (!bytes || bytes->size() != key_len) {
      if (bytes) wipe(*bytes);
      return env_error("expected base64 of 32 bytes, or key file lines \"<key id> <base64 key>\"");
    }
    r->keys_.push_back({key_id(*bytes), std::move(*bytes)});
  } else if (auto err = parse_lines(value, r->keys_, env_error)) {
    return err;
  }
  out = std::move(r);
  return {};
}

error keyring::create(const std::string& path, std::shared_ptr<const keyring>& out) {
  out.reset();
  std::shared_ptr<keyring> r(new keyring());
  r->path_ = path;
  r->source_ = "key file '" + path + "'";
  r->keys_.push_back(fresh_key());
  if (auto err = write_private(path, render(r->keys_), /*replace=*/false)) return err;
  out = std::move(r);
  return {};
}

error keyring::add_key(const std::string& path, std::shared_ptr<const keyring>& out) {
  out.reset();
  std::shared_ptr<const keyring> old;
  if (auto err = load(path, old)) return err;
  std::shared_ptr<keyring> r(new keyring());
  r->path_ = path;
  r->source_ = old->source_;
  r->keys_ = old->keys_;
  r->keys_.push_back(fresh_key());
  if (auto err = write_private(path, render(r->keys_), /*replace=*/true)) return err;
  out = std::move(r);
  return {};
}

std::vector<std::string> keyring::ids() const {
  std::vector<std::string> v;
  for (const auto& k : keys_) v.push_back(k.id);
  return v;
}

const keyring::key* keyring::find(std::string_view id) const noexcept {
  for (const auto& k : keys_)
    if (k.id == id) return &k;
  return nullptr;
}

bool keyring::is_sealed(std::string_view value) noexcept {
  return value.substr(0, magic.size()) == magic;
}

std::string keyring::key_id_of(std::string_view value) {
  if (!is_sealed(value) || value.size() < magic.size() + 1) return {};
  auto n = static_cast<unsigned char>(value[magic.size()]);
  if (value.size() < magic.size() + 1 + n) return {};
  return printable_id(value.substr(magic.size() + 1, n));
}

std::string keyring::seal(std::string_view plain, std::string_view aad) const {
  const key& k = keys_.back();
  std::string nonce = crypto::random_bytes(nonce_len);
  std::string out;
  out.reserve(magic.size() + 1 + k.id.size() + nonce_len + plain.size() + tag_len);
  out += magic;
  out += static_cast<char>(k.id.size());
  out += k.id;
  out += nonce;
  const std::size_t ct_at = out.size();
  out.resize(ct_at + plain.size() + tag_len);
  auto* ct = reinterpret_cast<unsigned char*>(out.data() + ct_at);

  cipher_ctx c;
  int n = 0, fin = 0;
  bool ok = c.p &&
            EVP_EncryptInit_ex(c.p, EVP_aes_256_gcm(), nullptr,
                               reinterpret_cast<const unsigned char*>(k.bytes.data()),
                               reinterpret_cast<const unsigned char*>(nonce.data())) == 1 &&
            EVP_EncryptUpdate(c.p, nullptr, &n, reinterpret_cast<const unsigned char*>(aad.data()),
                              static_cast<int>(aad.size())) == 1 &&
            EVP_EncryptUpdate(c.p, ct, &n, reinterpret_cast<const unsigned char*>(plain.data()),
                              static_cast<int>(plain.size())) == 1 &&
            EVP_EncryptFinal_ex(c.p, ct + n, &fin) == 1 &&
            EVP_CIPHER_CTX_ctrl(c.p, EVP_CTRL_GCM_GET_TAG, static_cast<int>(tag_len),
                                ct + plain.size()) == 1;
  // Encryption of in-memory bytes fails only on allocation failure: the
  // store turns the exception into an error, nothing is written unsealed.
  if (!ok) throw std::runtime_error("AES-256-GCM encryption failed");
  return out;
}

error keyring::open(std::string_view sealed, std::string_view aad, std::string& out) const {
  out.clear();
  auto malformed = [&] {
    return error{error_code::storage_failure, "secrets: a sealed value is malformed (truncated?)"};
  };
  if (!is_sealed(sealed) || sealed.size() < magic.size() + 1) return malformed();
  const std::size_t id_len = static_cast<unsigned char>(sealed[magic.size()]);
  const std::size_t head = magic.size() + 1 + id_len + nonce_len;
  if (sealed.size() < head + tag_len) return malformed();
  std::string_view id = sealed.substr(magic.size() + 1, id_len);
  // Only ids this code writes: a damaged id byte is "malformed", and never
  // copied raw into a message (it may not be UTF-8; JSON dumps throw on it).
  if (!valid_id(id))
    return {error_code::storage_failure,
            "secrets: a sealed value is malformed: its key id " + printable_id(id) +
              " is not 16 hex digits"};
  const key* k = find(id);
  if (!k)
    return {error_code::storage_failure,
            "secrets: a value is sealed under key id " + std::string(id) + ", which " + source_ +
              " does not hold (wrong key file, or an older key removed from it)"};
  auto nonce = sealed.substr(magic.size() + 1 + id_len, nonce_len);
  auto ct = sealed.substr(head, sealed.size() - head - tag_len);
  std::string tag(sealed.substr(sealed.size() - tag_len));
  out.resize(ct.size());
  cipher_ctx c;
  int n = 0, fin = 0;
  bool ok = c.p &&
            EVP_DecryptInit_ex(c.p, EVP_aes_256_gcm(), nullptr,
                               reinterpret_cast<const unsigned char*>(k->bytes.data()),
                               reinterpret_cast<const unsigned char*>(nonce.data())) == 1 &&
            EVP_DecryptUpdate(c.p, nullptr, &n, reinterpret_cast<const unsigned char*>(aad.data()),
                              static_cast<int>(aad.size())) == 1 &&
            EVP_DecryptUpdate(c.p, reinterpret_cast<unsigned char*>(out.data()), &n,
                              reinterpret_cast<const unsigned char*>(ct.data()),
                              static_cast<int>(ct.size())) == 1 &&
            EVP_CIPHER_CTX_ctrl(c.p, EVP_CTRL_GCM_SET_TAG, static_cast<int>(tag_len),
                                tag.data()) == 1 &&
            EVP_DecryptFinal_ex(c.p, reinterpret_cast<unsigned char*>(out.data()) + n, &fin) == 1;
  if (!ok) {
    OPENSSL_cleanse(out.data(), out.size());
    out.clear();
    return {error_code::storage_failure,
            "secrets: a value sealed under key id " + std::string(id) +
              " failed authentication (AES-GCM tag): it was altered, damaged or moved"};
  }
  return {};
}

} // namespace prov::storage
