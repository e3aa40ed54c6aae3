#pragma once
// The proxy's API keys (--api-keys FILE): the key file's parser, the set of keys held, swapped whole on a
// reload (SIGHUP) while the I/O threads look keys up, and the check of a request's `Authorization` header.
// Keys are compared in constant time and never logged: errors name the file and line, not the key.
#include <array>
#include <atomic>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace tokenbus::proxy {

// Limits of a key file, stated once.
inline constexpr std::size_t kMaxApiKeyFileBytes = 1024 * 1024;
inline constexpr std::size_t kMaxApiKeyLineBytes = 1024;
inline constexpr std::size_t kMaxApiKeys = 1024;
inline constexpr std::size_t kMinApiKeyBytes = 16;  // a guessable key is no key
inline constexpr std::size_t kMaxApiKeyBytes = 128;
inline constexpr std::size_t kMaxApiKeyNameBytes = 64;  // a metric label value

struct ApiKeyEntry {
  std::string key;
  std::string name;
};

// Parses a key file: one `KEY [NAME]` per line, blank lines and `#` comments (a word starting with `#` begins
// one) allowed. A key is visible ASCII, kMinApiKeyBytes to kMaxApiKeyBytes long, and appears once; a name is
// letters, digits, `.`, `_` and `-` (several keys may share one); a key without one is named `key-LINENO`.
// False with `error` ("line N: why") on the first bad line, on a file over the limits or with no key.
bool parse_api_keys(std::string_view text, std::vector<ApiKeyEntry>& out, std::string& error);

class ApiKeys {
 public:
  ApiKeys();
  ~ApiKeys();
  ApiKeys(const ApiKeys&) = delete;
  ApiKeys& operator=(const ApiKeys&) = delete;

  // Reads `path` and, when it is valid, holds its keys instead of the ones held. Otherwise the keys held stay
  // and `error` says why ("PATH: line N: why"). Not for the I/O threads: it reads a file.
  bool load(const std::string& path, std::string& error);
  // Replaces the keys held (tests; load() once the file is parsed).
  void set(const std::vector<ApiKeyEntry>& entries);
  std::size_t size() const;

  // The name of the key `presented` is, or null. Every key held is compared over kMaxApiKeyBytes whatever
  // matches, so the time taken says nothing of the keys. Safe from any thread; the name stays valid while held.
  std::shared_ptr<const std::string> match(std::string_view presented) const;

 private:
  struct KeySet;
  std::atomic<std::shared_ptr<const KeySet>> set_;
};

// Who must present a key: every /v1/ route when `keys` is set, and /metrics too with `metrics`.
struct AccessPolicy {
  const ApiKeys* keys = nullptr;
  bool metrics = false;
};

// The key in an `Authorization: Bearer KEY` header's value (the scheme in any case); empty if there is none.
std::string_view bearer_token(std::string_view authorization);

}  // namespace tokenbus::proxy
