#pragma once
// The TLS side of a device listener, shared by the HTTPS server and the MQTT
// listener: one way to build the server context (versions, ciphers, tickets,
// the optional client certificate) and to read a device's certificate chain.
// Include it only from .cpp files: it pulls in OpenSSL's headers.

#include <memory>
#include <string>
#include <vector>

#include "net/openssl_handles.hpp"
#include "messages/credential.hpp"
#include "messages/error.hpp"

namespace prov::net {

/// A server context for a device listener: TLS 1.2 and 1.3, ECDHE with AEAD,
/// stateless tickets only, the certificate chain and key from PEM files, and
/// a client certificate asked for (X.509 devices) but never required and
/// never judged here (attestation does). `session_id_context` keeps tickets
/// of one listener from resuming on another.
[[nodiscard]] error make_device_tls_context(const std::string& cert_chain_file,
                                            const std::string& key_file,
                                            const std::string& session_id_context,
                                            ssl_ctx_ptr& out);

/// The client certificate chain a device presented, leaf first: DER, and
/// the handshake's parsed certificates (referenced, not copied), so
/// attestation need not decode them again. Null when it presented none (the
/// common, symmetric-key case: nothing is copied). Read once per
/// connection, after the handshake.
std::shared_ptr<const client_chain> peer_chain(SSL* ssl);

} // namespace prov::net
