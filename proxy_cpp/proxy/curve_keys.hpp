#pragma once
// The keys the proxy connects to the head with over ZeroMQ CURVE (--keys DIR, --key-name NAME), read from the
// certificate files `tokenbus keys gen` writes (pyzmq's zmq.auth, ZeroMQ's cert text format).
#include <cstddef>
#include <string>
#include <string_view>

namespace tokenbus::proxy {

// Limits of a certificate file, stated once: a cert is a few hundred bytes.
inline constexpr std::size_t kMaxCertFileBytes = 8 * 1024;
inline constexpr std::size_t kZ85KeyChars = 40;  // a 32-byte CURVE key in Z85

// Z85 text of each key; `secret_key` empty when the file has none (a public certificate).
struct CurveCert {
  std::string public_key;
  std::string secret_key;
};

// Parses a certificate's text: the lines `public-key = "Z85"` and `secret-key = "Z85"` (quoted or not); other
// lines (comments, `metadata`, `curve`) are skipped. False with `error` ("line N: why") when a key is not 40
// characters of Z85, appears twice, the public key is missing or does not belong to the secret key.
bool parse_curve_cert(std::string_view text, CurveCert& out, std::string& error);

// What a CURVE client sets on its sockets before connecting.
struct CurveClientKeys {
  std::string server_public;  // the head's public key
  std::string public_key;
  std::string secret_key;
};

// Reads DIR/head.key (the head's public key) and DIR/NAME.key_secret (this client's pair). False with `error`
// naming the file and what is wrong with it.
bool load_curve_client_keys(const std::string& dir, const std::string& name, CurveClientKeys& out,
                            std::string& error);

}  // namespace tokenbus::proxy
