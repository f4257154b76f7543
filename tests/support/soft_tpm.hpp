#pragma once
// A device's TPM for tests: swtpm (started on a free loopback port) driven
// by tpm2-tools, doing what the DPS SDKs do with a TPM challenge
// (ActivateCredential, Import, Load, HMAC). Used by the TPM integration tests.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "tests/support/server_process.hpp"

namespace prov::test::tpm_device {

inline bool have_tools() {
  return std::system("command -v swtpm >/dev/null 2>&1 && command -v tpm2_createek >/dev/null 2>&1"
                     " && command -v tpm2_activatecredential >/dev/null 2>&1") == 0;
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

inline void write_file(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  f << data;
}

/// A TCP port p on loopback with p + 1 free too (swtpm's control port).
inline int free_port_pair() {
  for (int attempt = 0; attempt < 50; ++attempt) {
    int a = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof addr;
    if (::bind(a, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0
        || ::getsockname(a, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ::close(a);
      continue;
    }
    const int p = ntohs(addr.sin_port);
    int b = ::socket(AF_INET, SOCK_STREAM, 0);
    addr.sin_port = htons(static_cast<uint16_t>(p + 1));
    const bool ok = p < 65535 && ::bind(b, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(a);
    ::close(b);
    if (ok)
      return p;
  }
  return 0;
}

inline bool can_connect(int port) {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(s);
  return ok;
}

/// The six TPM2B parts of an activation blob, each with its size field.
inline std::vector<std::string> split_blob(const std::string& blob) {
  std::vector<std::string> parts;
  std::size_t at = 0;
  while (at + 2 <= blob.size()) {
    const std::size_t n = (static_cast<uint8_t>(blob[at]) << 8) | static_cast<uint8_t>(blob[at + 1]);
    REQUIRE(at + 2 + n <= blob.size());
    parts.push_back(blob.substr(at, 2 + n));
    at += 2 + n;
  }
  CHECK(at == blob.size());
  return parts;
}

/// swtpm plus tpm2-tools: a device's TPM, with its EK (0x81010001) and SRK
/// (0x81000001) persisted as the DPS SDKs expect them.
class soft_tpm {
public:
  soft_tpm() {
    dir_ = make_temp_dir("provisiond-swtpm");
    port_ = free_port_pair();
    REQUIRE(port_ != 0);
    ::mkdir((dir_ + "/state").c_str(), 0700);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      const std::string server = "type=tcp,port=" + std::to_string(port_) + ",bindaddr=127.0.0.1";
      const std::string ctrl = "type=tcp,port=" + std::to_string(port_ + 1) + ",bindaddr=127.0.0.1";
      const std::string state = "dir=" + dir_ + "/state";
      const std::string log = "file=" + dir_ + "/swtpm.log";
      ::execlp("swtpm", "swtpm", "socket", "--tpm2", "--server", server.c_str(), "--ctrl",
               ctrl.c_str(), "--flags", "not-need-init,startup-clear", "--tpmstate",
               state.c_str(), "--log", log.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    for (int i = 0; i < 200 && !can_connect(port_); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    REQUIRE_MESSAGE(can_connect(port_), "swtpm did not listen: " << read_file(dir_ + "/swtpm.log"));
    REQUIRE_MESSAGE(run("tpm2_createek -c 0x81010001 -G rsa -u ek.pub"), log());
    REQUIRE_MESSAGE(run("tpm2_createprimary -C o -g sha256 -G rsa -c srk.ctx"), log());
    REQUIRE_MESSAGE(run("tpm2_evictcontrol -C o -c srk.ctx 0x81000001"), log());
    REQUIRE_MESSAGE(run("tpm2_flushcontext -t"), log());
    REQUIRE_MESSAGE(run("tpm2_readpublic -c 0x81000001 -o srk.pub"), log());
    ek_b64 = crypto::base64_encode(read_file(dir_ + "/ek.pub"));
    srk_b64 = crypto::base64_encode(read_file(dir_ + "/srk.pub"));
  }
  ~soft_tpm() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int st = 0;
      ::waitpid(pid_, &st, 0);
    }
    remove_tree(dir_);
  }
  soft_tpm(const soft_tpm&) = delete;
  soft_tpm& operator=(const soft_tpm&) = delete;

  /// Runs a tpm2-tools command line in the TPM's dir, against this swtpm.
  bool run(const std::string& cmd) const {
    const std::string line = "cd '" + dir_ + "' && TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port="
                             + std::to_string(port_) + " " + cmd + " >>tools.log 2>&1";
    return std::system(line.c_str()) == 0;
  }
  std::string log() const { return read_file(dir_ + "/tools.log"); }

  /// What the SDKs do with the 401's authenticationKey: ActivateCredential
  /// (EK policy session) for the inner wrap key, Import under the SRK, Load.
  /// False when the TPM refuses the blob.
  bool activate(const std::string& blob_b64, const std::string& tamper = {}) const {
    auto blob = crypto::base64_decode(blob_b64);
    REQUIRE(blob);
    auto parts = split_blob(*blob);
    REQUIRE(parts.size() == 6);
    if (tamper == "credential") // flip a bit of encIdentity: its HMAC must catch it
      parts[0].back() = static_cast<char>(parts[0].back() ^ 1);
    if (tamper == "duplicate")
      parts[2].back() = static_cast<char>(parts[2].back() ^ 1);
    // tpm2_makecredential's file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    write_file(dir_ + "/cred.blob", std::string("\xBA\xDC\xC0\xDE\x00\x00\x00\x01", 8) + parts[0]
                                      + parts[1]);
    write_file(dir_ + "/dup.priv", parts[2]);
    write_file(dir_ + "/dup.seed", parts[3]);
    write_file(dir_ + "/dup.pub", parts[4]);
    const bool activated =
      run("tpm2_startauthsession --policy-session -S session.ctx")
      && run("tpm2_policysecret -S session.ctx -c e")
      && run("tpm2_activatecredential -c 0x81000001 -C 0x81010001 -i cred.blob -o inner.key"
             " -P session:session.ctx");
    run("tpm2_flushcontext session.ctx");
    run("tpm2_flushcontext -t");
    if (!activated)
      return false;
    const bool ok = run("tpm2_import -C 0x81000001 -u dup.pub -i dup.priv -s dup.seed -k inner.key"
                        " -r key.priv")
                    && run("tpm2_flushcontext -t")
                    && run("tpm2_load -C 0x81000001 -u dup.pub -r key.priv -c key.ctx");
    run("tpm2_flushcontext -t");
    return ok;
  }

  /// HMAC-SHA256 inside the TPM with the imported key.
  std::string hmac(const std::string& msg) const {
    write_file(dir_ + "/msg", msg);
    std::remove((dir_ + "/sig").c_str());
    REQUIRE_MESSAGE(run("tpm2_hmac -c key.ctx -g sha256 -o sig msg"), log());
    run("tpm2_flushcontext -t");
    auto sig = read_file(dir_ + "/sig");
    REQUIRE(sig.size() == 32);
    return sig;
  }

  /// A device SAS for `id`, signed in the TPM (C SDK style: sr URL-encoded).
  std::string sas(const server_process& s, const std::string& id,
                  int64_t lifetime_s = 3600) const {
    const std::string sr = crypto::url_encode(s.id_scope() + "/registrations/" + id);
    const std::string se = std::to_string(now_ms() / 1000 + lifetime_s);
    return "SharedAccessSignature sr=" + sr + "&sig="
           + crypto::url_encode(crypto::base64_encode(hmac(sr + "\n" + se))) + "&se=" + se
           + "&skn=registration";
  }

  /// This TPM's ECC (NIST P-256) EK, TPM2B_PUBLIC in base64: made, not
  /// persisted (the RSA EK stays the device's).
  std::string ecc_ek_b64() const {
    REQUIRE_MESSAGE(run("tpm2_createek -c ecc_ek.ctx -G ecc -u ecc_ek.pub"), log());
    run("tpm2_flushcontext -t");
    return crypto::base64_encode(read_file(dir_ + "/ecc_ek.pub"));
  }

  std::string ek_b64, srk_b64;

private:
  std::string dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

} // namespace prov::test::tpm_device
