// libFuzzer target: the ring's consumer (ring/shm_ring.cpp Consumer::peek/release) over shared memory that a
// broken or hostile producer filled, and each record it hands out through the response record reader, as the
// replica reads its response ring. Input: write_pos (8 bytes, little-endian), read_pos (8 bytes), then the
// ring's data area (capacity 4096; the rest is zero). The consumer must hand out only records inside the
// ring and below write_pos, or report the ring broken; attaching to impossible positions must be refused.
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "replica/ring_records.hpp"
#include "ring/shm_ring.hpp"

namespace {

constexpr std::size_t kCapacity = tokenbus::ring::kMinCapacity;

struct Ring {
  Ring() : fds(kCapacity) {
    base = static_cast<std::byte*>(::mmap(nullptr, tokenbus::ring::kHeaderSize + kCapacity, PROT_READ | PROT_WRITE,
                                          MAP_SHARED, fds.fds().mem_fd, 0));
    if (base == MAP_FAILED) std::abort();
  }
  tokenbus::ring::OwnedRingFds fds;
  std::byte* base;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Ring ring;  // one memfd for the whole run: creating one per input would dominate the time
  if (size < 16) return 0;
  std::memset(ring.base, 0, tokenbus::ring::kHeaderSize + kCapacity);
  std::memcpy(ring.base, data, 8);        // write_pos at offset 0
  std::memcpy(ring.base + 64, data + 8, 8);  // read_pos at offset 64
  std::memcpy(ring.base + tokenbus::ring::kHeaderSize, data + 16, std::min(size - 16, kCapacity));

  std::optional<tokenbus::ring::Consumer> consumer;
  try {
    consumer.emplace(ring.fds.fds());
  } catch (const tokenbus::ring::RingError&) {
    return 0;  // impossible positions: refused at attach, as they should be
  }
  const std::byte* begin = consumer->region().data();  // the consumer's own mapping of the ring
  // Every record takes at least 8 bytes of the ring, so a consumer that hands out more than capacity / 8
  // records without running dry is going round in circles.
  for (std::size_t n = 0;; ++n) {
    const auto record = consumer->peek();
    if (!record) break;
    if (n > kCapacity / 8 || record->data() < begin || record->data() + record->size() > begin + kCapacity) {
      std::abort();
    }
    (void)tokenbus::replica::decode_response(*record);
    consumer->release();
  }
  return 0;
}
