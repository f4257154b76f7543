#include "net/device_tls.hpp"

namespace prov::net {

namespace {

/// TLS accepts any client certificate: the attestation stage judges the
/// chain against the enrollments (and says why it refuses one). The
/// handshake still checks the CertificateVerify signature, so a device that
/// presents a certificate holds its key.
int accept_any_chain(X509_STORE_CTX* store, void*) {
  // A session with a client certificate is never resumed (below): no ticket.
  auto* ssl = static_cast<SSL*>(
    X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  if (ssl != nullptr)
    SSL_set_num_tickets(ssl, 0);
  return 1;
}

/// A resumed session carries the leaf but not the chain a group needs: a
/// device that presented a certificate does a full handshake every time.
/// Other tickets behave as without this callback.
SSL_TICKET_RETURN decrypt_ticket(SSL*, SSL_SESSION* ss, const unsigned char*, size_t,
                                 SSL_TICKET_STATUS status, void*) {
  switch (status) {
  case SSL_TICKET_SUCCESS:
  case SSL_TICKET_SUCCESS_RENEW:
    if (SSL_SESSION_get0_peer(ss) != nullptr)
      return SSL_TICKET_RETURN_IGNORE_RENEW;
    return status == SSL_TICKET_SUCCESS ? SSL_TICKET_RETURN_USE : SSL_TICKET_RETURN_USE_RENEW;
  case SSL_TICKET_NONE:
    return SSL_TICKET_RETURN_IGNORE;
  case SSL_TICKET_EMPTY:
  case SSL_TICKET_NO_DECRYPT:
    return SSL_TICKET_RETURN_IGNORE_RENEW;
  default:
    return SSL_TICKET_RETURN_ABORT;
  }
}

} // namespace

std::shared_ptr<const client_chain> peer_chain(SSL* ssl) {
  X509* leaf = SSL_get0_peer_certificate(ssl);
  if (leaf == nullptr)
    return nullptr;
  auto chain = std::make_shared<client_chain>();
  // The DER is i2d of the parsed certificate (its signed part as received,
  // as before): `der` and `parsed` are the same certificates.
  auto add = [&](X509* c) {
    int n = i2d_X509(c, nullptr);
    if (n <= 0 || X509_up_ref(c) != 1)
      return;
    std::shared_ptr<X509> parsed(c, X509_free);
    std::string der(static_cast<std::size_t>(n), '\0');
    auto* p = reinterpret_cast<unsigned char*>(der.data());
    if (i2d_X509(c, &p) != n)
      return;
    chain->der.push_back(std::move(der));
    chain->parsed.push_back(std::move(parsed));
  };
  add(leaf);
  // On a server the stack holds the intermediates, without the leaf (skip
  // it anyway should a version include it).
  if (STACK_OF(X509)* rest = SSL_get_peer_cert_chain(ssl))
    for (int i = 0; i < sk_X509_num(rest); ++i)
      if (X509* c = sk_X509_value(rest, i); X509_cmp(c, leaf) != 0)
        add(c);
  return chain;
}

error make_device_tls_context(const std::string& cert_chain_file, const std::string& key_file,
                              const std::string& session_id_context, ssl_ctx_ptr& out) {
  ssl_ctx_ptr ctx(SSL_CTX_new(TLS_server_method()));
  if (!ctx)
    return {error_code::unavailable, "cannot create the TLS context: " + openssl_error()};
  SSL_CTX* raw = ctx.get();
  SSL_CTX_set_min_proto_version(raw, TLS1_2_VERSION);
  SSL_CTX_set_max_proto_version(raw, TLS1_3_VERSION);
  SSL_CTX_set_options(raw, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION
                             | SSL_OP_CIPHER_SERVER_PREFERENCE);
  // TLS 1.2: ECDHE with AEAD only (Mozilla "intermediate").
  SSL_CTX_set_cipher_list(raw, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                               "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                               "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305");
  // Resumption through session tickets only (stateless, TLS 1.2 and 1.3).
  // A server-side session cache keeps every new session (up to 20,480,
  // a few MB) and sweeps the whole table every 255 handshakes: measurable
  // CPU when every device opens a new connection, for a resumption path
  // (TLS 1.2 session ids) that ticket-capable clients do not need.
  SSL_CTX_set_session_cache_mode(raw, SSL_SESS_CACHE_OFF);
  // One read per record batch instead of a header read and a body read.
  SSL_CTX_set_read_ahead(raw, 1);
  // Ask for a client certificate (X.509 devices), never require one
  // (symmetric key devices have none): the device's chain is judged by
  // attestation, not here.
  SSL_CTX_set_verify(raw, SSL_VERIFY_PEER, nullptr);
  SSL_CTX_set_cert_verify_callback(raw, accept_any_chain, nullptr);
  // With SSL_VERIFY_PEER, OpenSSL refuses to resume a session without a
  // session id context (a fatal handshake error for ticket holders).
  SSL_CTX_set_session_id_context(raw, reinterpret_cast<const unsigned char*>(session_id_context.data()),
                                 static_cast<unsigned int>(session_id_context.size()));
  SSL_CTX_set_session_ticket_cb(raw, nullptr, decrypt_ticket, nullptr);
  if (SSL_CTX_use_certificate_chain_file(raw, cert_chain_file.c_str()) != 1)
    return {error_code::bad_request,
            "cannot load TLS certificate chain '" + cert_chain_file + "': "
              + openssl_error()};
  if (SSL_CTX_use_PrivateKey_file(raw, key_file.c_str(), SSL_FILETYPE_PEM) != 1)
    return {error_code::bad_request,
            "cannot load TLS private key '" + key_file + "': "
              + openssl_error()};
  out = std::move(ctx);
  return {};
}

} // namespace prov::net
