#pragma once
// TPM 2.0 structures and the software half of TPM2_MakeCredential and
// TPM2_Duplicate, as DPS needs them for TPM attestation
// (azure-dps-protocol.md §2.6): parse the device's EK and SRK public areas,
// and build the activation blob that only the TPM holding that EK can open,
// importing an HMAC key under that SRK. Pure: no I/O; OpenSSL stays in the
// .cpp. Spec references are to TPM 2.0 Library Part 1 (Architecture).

#include <cstdint>
#include <string>
#include <string_view>

namespace prov::tpm2 {

/// TPM_ALG_ID values used here.
enum alg : uint16_t {
  alg_rsa = 0x0001,
  alg_sha1 = 0x0004,
  alg_hmac = 0x0005,
  alg_aes = 0x0006,
  alg_keyedhash = 0x0008,
  alg_sha256 = 0x000B,
  alg_null = 0x0010,
  alg_ecc = 0x0023,
  alg_cfb = 0x0043,
};

/// TPMA_OBJECT bits used here.
enum attribute : uint32_t {
  attr_fixed_tpm = 1u << 1,
  attr_fixed_parent = 1u << 4,
  attr_user_with_auth = 1u << 6,
  attr_no_da = 1u << 10,
  attr_restricted = 1u << 16,
  attr_decrypt = 1u << 17,
  attr_sign = 1u << 18,
};

/// An RSA storage key's public area (an EK or SRK), parsed from its
/// TPM2B_PUBLIC and checked to be what MakeCredential and Duplicate need:
/// RSA-2048, nameAlg SHA-256, restricted decryption, AES-128/256-CFB.
struct rsa_public {
  std::string area;        ///< the TPMT_PUBLIC bytes (what the name hashes)
  uint16_t name_alg = 0;
  uint32_t attributes = 0;
  uint16_t sym_bits = 0;   ///< its symmetric definition's key size (AES)
  uint16_t key_bits = 0;
  uint32_t exponent = 0;   ///< 65537 when the structure says 0
  std::string modulus;     ///< big-endian, key_bits / 8 bytes

  /// Name = nameAlg (2 bytes, big-endian) || H_nameAlg(TPMT_PUBLIC).
  std::string name() const;
};

/// Parses a TPM2B_PUBLIC (raw bytes). Every size field is checked against
/// what remains; trailing bytes are refused. Returns "" on success, else the
/// reason (for a 400 or 401 message), naming the key as `what`.
std::string parse_rsa_public(std::string_view tpm2b, std::string_view what, rsa_public& out);

/// KDFa (Part 1 §11.4.10.2) with HMAC-SHA-256: `label` is given without its
/// terminating zero (it is added).
std::string kdfa_sha256(std::string_view key, std::string_view label, std::string_view context_u,
                        std::string_view context_v, uint32_t bits);

/// AES-CFB with a zero IV (the TPM's wrapping mode); the key is 16 or 32 bytes.
std::string aes_cfb(std::string_view key, std::string_view data, bool encrypt);

/// RSA-OAEP (SHA-256, MGF1-SHA-256) of `data` to `key`, label as given
/// (the TPM's labels include their terminating zero: "IDENTITY\0").
/// Returns "" when OpenSSL fails.
std::string rsa_oaep_encrypt(const rsa_public& key, std::string_view data,
                             std::string_view label);

/// TPM2_MakeCredential in software (Part 1 §24): `credential` (at most 32
/// bytes) for the object named `object_name`, to be activated by the TPM
/// holding `ek`. `seed`: the 32 random bytes (a parameter so tests can be
/// deterministic). Outputs a TPM2B_ID_OBJECT and a TPM2B_ENCRYPTED_SECRET.
struct credential_blob {
  std::string id_object;        ///< TPM2B_ID_OBJECT
  std::string encrypted_secret; ///< TPM2B_ENCRYPTED_SECRET
};
bool make_credential(const rsa_public& ek, std::string_view credential,
                     std::string_view object_name, std::string_view seed, credential_blob& out);

/// An HMAC-SHA-256 key, duplicated to `parent` (an SRK) with an inner wrap
/// (Part 1 §23.3.2): what TPM2_Import takes.
struct duplicate {
  std::string public_area;      ///< TPM2B_PUBLIC of the KEYEDHASH key
  std::string private_blob;     ///< TPM2B_PRIVATE (outer HMAC, outer- and inner-wrapped sensitive)
  std::string encrypted_seed;   ///< TPM2B_ENCRYPTED_SECRET (outer seed to the parent)
};
/// `hmac_key`: the key's bytes (1..64); `inner_key`: the inner wrap's AES
/// key (16 bytes); `obfuscation`, `seed`: 32 random bytes each.
bool duplicate_hmac_key(const rsa_public& parent, std::string_view hmac_key,
                        std::string_view inner_key, std::string_view obfuscation,
                        std::string_view seed, duplicate& out);

/// The KEYEDHASH public area (TPMT_PUBLIC) of an HMAC-SHA-256 signing key
/// whose sensitive part is `obfuscation` || `hmac_key`: unique is
/// SHA-256(obfuscation || key), as TPM2_Load checks.
std::string hmac_key_public_area(std::string_view hmac_key, std::string_view obfuscation);

/// The DPS activation blob (azure-dps-protocol.md §2.6): credential blob,
/// its secret, the duplicate's private blob, its seed, its public area and
/// an empty TPM2B_DATA, all concatenated. Fresh randomness for every call.
/// Returns "" and sets `why` when a key cannot be used.
std::string activation_blob(const rsa_public& ek, const rsa_public& srk,
                            std::string_view hmac_key, std::string& why);

/// The registration id Node's TpmSecurityClient derives when none is given:
/// lower-case RFC 4648 base32 of SHA-256(EK TPM2B bytes), '=' stripped.
std::string registration_id_of(std::string_view ek_tpm2b);

/// Big-endian marshalling helpers (also used by tests to build structures).
void put_u16(std::string& out, uint16_t v);
void put_u32(std::string& out, uint32_t v);
/// A TPM2B: 2-byte size then the bytes.
void put_2b(std::string& out, std::string_view bytes);

/// An RSA storage key's TPMT_PUBLIC with the standard EK/SRK shape (for
/// tests): SHA-256, AES-128-CFB, NULL scheme, exponent 0.
std::string rsa_storage_public_area(std::string_view modulus, uint32_t attributes,
                                    std::string_view auth_policy = {});

} // namespace prov::tpm2
