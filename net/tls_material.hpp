#pragma once
// Local TLS material for the HTTPS endpoints. On first start provisiond makes
// its own CA and a server certificate signed by it, so devices only need to
// trust <dir>/ca.pem. OpenSSL headers stay in tls_material.cpp.
//
//   <dir>/ca.pem      self-signed CA, EC P-256, 10 years, CN "provisiond local CA"
//   <dir>/ca.key      its private key (0600)
//   <dir>/server.pem  server certificate (EC P-256, 2 years) followed by the CA
//   <dir>/server.key  its private key (0600)

#include <string>
#include <vector>

#include "messages/error.hpp"

namespace prov::net {

/// Where the material lives, plus what the last call had to create.
struct tls_paths {
  std::string ca_pem;   ///< CA certificate (what clients trust)
  std::string cert_pem; ///< server certificate chain: leaf, then CA
  std::string key_pem;  ///< server private key
  bool ca_generated = false;     ///< a new CA was made by this call
  bool server_generated = false; ///< a new server certificate was made by this call
};

/// Makes sure the four files exist and fit `sans`. A SAN that parses as an
/// IPv4/IPv6 address (brackets allowed: "[::1]") becomes an IP SAN, anything
/// else a DNS name; an empty list means {"localhost", "127.0.0.1", "::1"}.
/// Creates the CA only when both CA files are missing (a lone ca.pem or
/// ca.key is an error, never overwritten). Re-issues the server certificate
/// from the existing CA when it is missing, unreadable, not issued by that CA,
/// not matching server.key, expiring within 30 days, or lacking a requested
/// SAN. A SAN that is neither is `bad_request`; file and OpenSSL failures are
/// `internal` with a message naming the file.
[[nodiscard]] error ensure_tls_material(const std::string& dir,
                                        const std::vector<std::string>& sans,
                                        tls_paths& out);

/// Reads a whole (PEM) file, at most 1 MiB. Error `internal` naming the path.
[[nodiscard]] error load_pem_file(const std::string& path, std::string& out);

/// The subjectAltName entries of the first certificate in a PEM file: DNS
/// names as written, IP addresses in canonical text form ("127.0.0.1", "::1").
[[nodiscard]] error read_certificate_sans(const std::string& pem_path,
                                          std::vector<std::string>& out);

} // namespace prov::net
