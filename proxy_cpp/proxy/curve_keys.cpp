#include "proxy/curve_keys.hpp"

#include <zmq.h>

#include <array>
#include <cstdint>

#include "proxy/bounded_file.hpp"

namespace tokenbus::proxy {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool is_z85_key(std::string_view text) {
  if (text.size() != kZ85KeyChars) return false;
  const std::string z85(text);  // zmq_z85_decode wants a terminated string
  std::array<std::uint8_t, 32> key{};
  return zmq_z85_decode(key.data(), z85.c_str()) != nullptr;
}

bool read_cert(const std::string& path, bool need_secret, CurveCert& cert, std::string& error) {
  std::string text;
  if (!read_bounded_file(path, kMaxCertFileBytes, text, error)) return false;
  if (!parse_curve_cert(text, cert, error)) {
    error = path + ": " + error;
    return false;
  }
  if (need_secret && cert.secret_key.empty()) {
    error = path + ": no secret-key (a public certificate where the secret one is wanted)";
    return false;
  }
  return true;
}

}  // namespace

bool parse_curve_cert(std::string_view text, CurveCert& out, std::string& error) {
  out = {};
  std::size_t number = 0;
  std::size_t public_line = 0;
  std::size_t secret_line = 0;
  while (!text.empty()) {
    ++number;
    const std::size_t end = text.find('\n');
    const std::string_view line = trim(text.substr(0, end));
    text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
    const bool is_public = line.starts_with("public-key");
    if (!is_public && !line.starts_with("secret-key")) continue;
    const std::string where = "line " + std::to_string(number) + ": ";
    std::string_view value = trim(line.substr(std::string_view("public-key").size()));
    if (!value.starts_with('=')) {
      error = where + "want `" + std::string(line.substr(0, 10)) + " = \"Z85\"`";
      return false;
    }
    value = trim(value.substr(1));
    if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') && value.back() == value.front()) {
      value = value.substr(1, value.size() - 2);
    }
    if (!is_z85_key(value)) {
      error = where + "not a CURVE key (" + std::to_string(kZ85KeyChars) + " characters of Z85)";
      return false;
    }
    std::size_t& seen = is_public ? public_line : secret_line;
    if (seen != 0) {
      error = where + "a second " + (is_public ? "public-key" : "secret-key") + " (the first on line " +
              std::to_string(seen) + ")";
      return false;
    }
    seen = number;
    (is_public ? out.public_key : out.secret_key) = std::string(value);
  }
  if (out.public_key.empty()) {
    error = "no public-key line";
    return false;
  }
  if (!out.secret_key.empty()) {
    char derived[kZ85KeyChars + 1] = {};
    if (zmq_curve_public(derived, out.secret_key.c_str()) != 0 || out.public_key != derived) {
      error = "line " + std::to_string(public_line) + ": the public-key is not the secret-key's";
      return false;
    }
  }
  return true;
}

bool load_curve_client_keys(const std::string& dir, const std::string& name, CurveClientKeys& out,
                            std::string& error) {
  CurveCert head;
  CurveCert own;
  if (!read_cert(dir + "/head.key", false, head, error)) return false;
  if (!read_cert(dir + "/" + name + ".key_secret", true, own, error)) return false;
  out = {head.public_key, own.public_key, own.secret_key};
  return true;
}

}  // namespace tokenbus::proxy
