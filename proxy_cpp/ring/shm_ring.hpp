#pragma once
// Single-producer single-consumer byte ring in a memfd shared by two processes (schemas/README.md section 3).
//
// Layout: a 256-byte header of atomics, then `capacity` bytes of records. A record is a little-endian
// uint32 length, the payload, and padding to a multiple of 8; a record never wraps (a 0xFFFFFFFF skip
// marker sends the reader back to offset 0). Positions are monotonic byte counts, so `write_pos - read_pos`
// is the fill level and `pos & (capacity - 1)` the offset.
//
// Setup (attach, mapping) throws RingError with a message naming what is wrong; the data path (try_write,
// peek, release, the waits) never throws.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>

namespace tokenbus::ring {

class RingError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The three descriptors of one ring, as passed on command lines ("MEM,DATA,SPACE").
struct RingFds {
  int mem_fd = -1;
  int data_fd = -1;
  int space_fd = -1;
};

// Parses "M,D,S" (three non-negative decimal integers); std::nullopt and `error` set otherwise.
std::optional<RingFds> parse_ring_fds(std::string_view text, std::string* error = nullptr);

inline constexpr std::size_t kHeaderSize = 256;
inline constexpr std::size_t kMinCapacity = 4096;
inline constexpr std::uint32_t kSkipMarker = 0xFFFFFFFFu;

enum class WaitResult { kReady, kTimeout, kPeerGone };

const char* wait_result_name(WaitResult result);

struct RingHeader;  // defined in shm_ring.cpp; only its offsets are part of the contract

// The mapping of a ring's memfd. Owns the mapping, not the descriptor.
class Region {
 public:
  // Maps `mem_fd` read-write; its size (fstat) must be 256 + a power of two >= 4096.
  explicit Region(int mem_fd);
  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  RingHeader& header() const { return *header_; }
  std::byte* data() const { return data_; }
  std::size_t capacity() const { return capacity_; }
  // Largest payload a record may carry: capacity / 4 (and below the skip marker's value).
  std::size_t max_payload() const { return max_payload_; }

 private:
  void* base_ = nullptr;
  std::size_t mapped_size_ = 0;
  RingHeader* header_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t max_payload_ = 0;
};

// One side of a ring: the mapping, its own duplicates of the two eventfds (closed on destruction, so the
// caller may close the descriptors it passed in at any time), and the peer's pid slot.
class Endpoint {
 public:
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  ~Endpoint();

  const Region& region() const { return region_; }
  int data_fd() const { return data_fd_; }
  int space_fd() const { return space_fd_; }
  // False once the peer's process is gone (no such pid, or a zombie). A peer that has not attached
  // yet (pid 0) counts as alive: whoever starts both processes notices if one dies before attaching.
  bool peer_alive() const;

 protected:
  enum class Role { kProducer, kConsumer };
  Endpoint(const RingFds& fds, Role role);

  Region region_;
  int data_fd_ = -1;
  int space_fd_ = -1;
  Role role_;
};

class Producer : public Endpoint {
 public:
  // Attaches as the producer: writes this process's pid to producer_pid.
  explicit Producer(const RingFds& fds);

  // Whether a payload of `size` bytes may ever be written (size <= capacity / 4).
  bool fits(std::size_t size) const { return size <= region_.max_payload(); }
  // Appends one record and wakes the consumer if it sleeps. False when the ring has no room for it now
  // (or when !fits(size): check fits() to tell the two apart).
  bool try_write(const void* payload, std::size_t size) {
    if (!append(payload, size)) return false;
    wake_consumer();
    return true;
  }
  bool try_write(std::span<const std::byte> payload) { return try_write(payload.data(), payload.size()); }
  // Appends one record without the wake-up, so that a burst of records costs the sleeping consumer one
  // wake-up: the caller must call wake_consumer() after the burst (the consumer may sleep through until then).
  bool append(const void* payload, std::size_t size);
  // Wakes the consumer if it announced a sleep: the producer's half of the wake-up protocol.
  void wake_consumer();

  // Announces that the producer is about to sleep on space_fd (sets producer_waiting, seq_cst fence) and
  // re-checks: true when the ring still has no room for the last refused record (or is completely full
  // if none was refused), so the caller should sleep; false (announcement withdrawn) when it has room.
  bool prepare_wait();
  // Blocks (poll on space_fd) until there is room for the last refused record, space_fd fires, the timeout
  // passes, or the consumer is found gone after a timeout. kReady may be spurious (space_fd written by
  // someone else, e.g. to stop this thread): the caller retries its write.
  WaitResult wait_for_space(std::chrono::milliseconds timeout);

 private:
  bool has_room() const;

  std::uint64_t write_pos_ = 0;  // mirror of the shared write_pos (only this side writes it)
  std::uint64_t wanted_ = 0;     // ring bytes the last refused record needs, 0 when none was refused
};

class Consumer : public Endpoint {
 public:
  // Attaches as the consumer: writes this process's pid to consumer_pid.
  explicit Consumer(const RingFds& fds);

  // The next record's payload, in place in shared memory (valid until release()); std::nullopt when the
  // ring is empty or broken. Calling peek() again without release() returns the same record.
  std::optional<std::span<const std::byte>> peek();
  // Frees the record returned by the last peek() and wakes the producer if it waits for space.
  void release();

  // Set when a length in the ring is impossible (a producer bug or a stray write): the ring cannot be
  // resynchronised, peek() returns std::nullopt from then on.
  const std::string& broken() const { return broken_; }

  // The consumer's half of the wake-up protocol: sets consumer_waiting, fences, re-checks; true when the
  // ring is still empty (sleep on data_fd), false (announcement withdrawn) when records arrived.
  bool prepare_wait();
  // Blocks (poll on data_fd) until a record is there, data_fd fires, the timeout passes, or the producer is
  // found gone after a timeout. Records the producer published before it died are still reported kReady.
  // kReady may be spurious (data_fd written by someone else, e.g. to stop this thread): peek() again.
  WaitResult wait_for_data(std::chrono::milliseconds timeout);

 private:
  bool has_data() const;

  std::uint64_t read_pos_ = 0;  // mirror of the shared read_pos (only this side writes it)
  // read_pos after the peeked record, when one is peeked (any value, 0 included: positions wrap at 2^64)
  std::optional<std::uint64_t> next_pos_;
  std::string broken_;
};

// A fresh ring's descriptors, created as the node agent creates them (memfd of 256 + capacity bytes, two
// non-blocking eventfds); for tests and tools. Closes them on destruction.
class OwnedRingFds {
 public:
  explicit OwnedRingFds(std::size_t capacity);
  ~OwnedRingFds();
  OwnedRingFds(const OwnedRingFds&) = delete;
  OwnedRingFds& operator=(const OwnedRingFds&) = delete;
  const RingFds& fds() const { return fds_; }

 private:
  RingFds fds_;
};

// Writes 1 to an eventfd (a wake-up); reads it back to zero. Both ignore EAGAIN: the fds are non-blocking.
void signal_eventfd(int fd);
void drain_eventfd(int fd);

}  // namespace tokenbus::ring
