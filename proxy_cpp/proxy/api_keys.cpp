#include "proxy/api_keys.hpp"

#include <cstring>
#include <unordered_map>

#include "proxy/bounded_file.hpp"

namespace tokenbus::proxy {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t'; }
bool is_visible(char c) { return c > ' ' && c < 0x7f; }
bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
         c == '-';
}

// The words of a line up to a comment.
std::vector<std::string_view> words_of(std::string_view line) {
  std::vector<std::string_view> words;
  std::size_t at = 0;
  while (at < line.size()) {
    while (at < line.size() && is_space(line[at])) ++at;
    if (at == line.size() || line[at] == '#') break;
    const std::size_t start = at;
    while (at < line.size() && !is_space(line[at])) ++at;
    words.push_back(line.substr(start, at - start));
  }
  return words;
}

}  // namespace

bool parse_api_keys(std::string_view text, std::vector<ApiKeyEntry>& out, std::string& error) {
  out.clear();
  std::unordered_map<std::string_view, std::size_t> lines_of;  // key -> its line, for duplicates
  std::size_t number = 0;
  while (!text.empty()) {
    ++number;
    const std::size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
    const std::string where = "line " + std::to_string(number) + ": ";
    if (line.size() > kMaxApiKeyLineBytes) {
      error = where + "longer than " + std::to_string(kMaxApiKeyLineBytes) + " bytes";
      return false;
    }
    if (line.ends_with('\r')) line.remove_suffix(1);
    const std::vector<std::string_view> words = words_of(line);
    if (words.empty()) continue;
    if (words.size() > 2) {
      error = where + "want KEY [NAME], found " + std::to_string(words.size()) + " words";
      return false;
    }
    const std::string_view key = words[0];
    for (char c : key) {
      if (!is_visible(c)) {
        error = where + "the key has a byte that is not visible ASCII";
        return false;
      }
    }
    if (key.size() < kMinApiKeyBytes || key.size() > kMaxApiKeyBytes) {
      error = where + "the key is " + std::to_string(key.size()) + " bytes long, not " +
              std::to_string(kMinApiKeyBytes) + " to " + std::to_string(kMaxApiKeyBytes);
      return false;
    }
    std::string name = "key-" + std::to_string(number);
    if (words.size() == 2) {
      name = words[1];
      if (name.size() > kMaxApiKeyNameBytes) {
        error = where + "the name is longer than " + std::to_string(kMaxApiKeyNameBytes) + " bytes";
        return false;
      }
      for (char c : name) {
        if (!is_name_char(c)) {
          error = where + "the name may hold only letters, digits, '.', '_' and '-'";
          return false;
        }
      }
    }
    if (const auto [it, fresh] = lines_of.emplace(key, number); !fresh) {
      error = where + "the same key as line " + std::to_string(it->second);
      return false;
    }
    if (out.size() == kMaxApiKeys) {
      error = where + "more than " + std::to_string(kMaxApiKeys) + " keys";
      return false;
    }
    out.push_back({std::string(key), std::move(name)});
  }
  if (out.empty()) {
    error = "no key in the file";
    return false;
  }
  return true;
}

struct ApiKeys::KeySet {
  // Each key zero-padded to the same width, so that every comparison takes the same time.
  std::vector<std::array<unsigned char, kMaxApiKeyBytes>> padded;
  std::vector<std::size_t> lengths;
  std::vector<std::string> names;
};

ApiKeys::ApiKeys() = default;
ApiKeys::~ApiKeys() = default;

bool ApiKeys::load(const std::string& path, std::string& error) {
  std::string text;
  if (!read_bounded_file(path, kMaxApiKeyFileBytes, text, error)) return false;
  std::vector<ApiKeyEntry> entries;
  if (!parse_api_keys(text, entries, error)) {
    error = path + ": " + error;
    return false;
  }
  set(entries);
  return true;
}

void ApiKeys::set(const std::vector<ApiKeyEntry>& entries) {
  auto keys = std::make_shared<KeySet>();
  for (const ApiKeyEntry& e : entries) {
    std::array<unsigned char, kMaxApiKeyBytes>& padded = keys->padded.emplace_back();
    padded.fill(0);
    std::memcpy(padded.data(), e.key.data(), std::min(e.key.size(), kMaxApiKeyBytes));
    keys->lengths.push_back(e.key.size());
    keys->names.push_back(e.name);
  }
  set_.store(std::move(keys));
}

std::size_t ApiKeys::size() const {
  const std::shared_ptr<const KeySet> keys = set_.load();
  return keys ? keys->names.size() : 0;
}

std::shared_ptr<const std::string> ApiKeys::match(std::string_view presented) const {
  const std::shared_ptr<const KeySet> keys = set_.load();
  // Refused on the presented length alone, which the client knows anyway.
  if (!keys || presented.empty() || presented.size() > kMaxApiKeyBytes) return nullptr;
  std::array<unsigned char, kMaxApiKeyBytes> candidate{};
  std::memcpy(candidate.data(), presented.data(), presented.size());
  std::size_t found = keys->names.size();  // none
  for (std::size_t i = 0; i < keys->names.size(); ++i) {
    // Differences are gathered without branching on them: no early exit on the first differing byte or key.
    std::size_t diff = keys->lengths[i] ^ presented.size();
    for (std::size_t j = 0; j < kMaxApiKeyBytes; ++j) diff |= keys->padded[i][j] ^ candidate[j];
    const std::size_t equal = 0 - static_cast<std::size_t>(diff == 0);  // all ones when equal
    found = (found & ~equal) | (i & equal);
  }
  if (found == keys->names.size()) return nullptr;
  return std::shared_ptr<const std::string>(keys, &keys->names[found]);
}

std::string_view bearer_token(std::string_view authorization) {
  constexpr std::string_view kScheme = "bearer";
  if (authorization.size() <= kScheme.size() || !is_space(authorization[kScheme.size()])) return {};
  for (std::size_t i = 0; i < kScheme.size(); ++i) {
    if ((authorization[i] | 0x20) != kScheme[i]) return {};
  }
  std::string_view token = authorization.substr(kScheme.size());
  while (!token.empty() && is_space(token.front())) token.remove_prefix(1);
  while (!token.empty() && is_space(token.back())) token.remove_suffix(1);
  return token;
}

}  // namespace tokenbus::proxy
