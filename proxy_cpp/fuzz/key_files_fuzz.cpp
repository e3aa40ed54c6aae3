// libFuzzer target: the key file parsers (proxy/api_keys.cpp parse_api_keys, proxy/curve_keys.cpp
// parse_curve_cert) on any bytes a file may hold. What they accept must hold to their limits.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "proxy/api_keys.hpp"
#include "proxy/curve_keys.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace tokenbus::proxy;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::string error;
  std::vector<ApiKeyEntry> keys;
  if (parse_api_keys(text, keys, error)) {
    if (keys.empty() || keys.size() > kMaxApiKeys) std::abort();
    ApiKeys set;
    set.set(keys);
    for (const ApiKeyEntry& k : keys) {
      if (k.key.size() < kMinApiKeyBytes || k.key.size() > kMaxApiKeyBytes) std::abort();
      if (k.name.empty() || k.name.size() > kMaxApiKeyNameBytes) std::abort();
      if (!set.match(k.key)) std::abort();
    }
  } else if (error.empty()) {
    std::abort();
  }
  CurveCert cert;
  if (parse_curve_cert(text, cert, error)) {
    if (cert.public_key.size() != kZ85KeyChars) std::abort();
    if (!cert.secret_key.empty() && cert.secret_key.size() != kZ85KeyChars) std::abort();
  }
  return 0;
}
