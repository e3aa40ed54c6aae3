// libFuzzer target: the routing snapshot decoder (common/snapshot.cpp decode_snapshot), which reads what
// arrives on the bus. Besides "no crash, no sanitizer report", a decoded snapshot must survive a round trip:
// what encode_snapshot writes decodes again to the same snapshot.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <string_view>

#include "common/snapshot.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string error;
  const std::optional<tokenbus::Snapshot> snapshot =
      tokenbus::decode_snapshot(std::string_view(reinterpret_cast<const char*>(data), size), error);
  if (!snapshot) return 0;
  const std::string encoded = tokenbus::encode_snapshot(*snapshot);
  const std::optional<tokenbus::Snapshot> again = tokenbus::decode_snapshot(encoded, error);
  if (!again || tokenbus::encode_snapshot(*again) != encoded) {
    std::fprintf(stderr, "snapshot round trip failed: %s\n", again ? "re-encoding differs" : error.c_str());
    std::abort();
  }
  return 0;
}
