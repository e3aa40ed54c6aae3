#include "ring/shm_ring.hpp"

#include <utility>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>

namespace tokenbus::ring {

// The shared header. Only the offsets are the contract (static_asserts below); the atomics are reached
// through std::atomic_ref so the struct stays a plain, zero-initialisable layout in shared memory.
struct RingHeader {
  alignas(64) std::uint64_t write_pos;
  alignas(64) std::uint64_t read_pos;
  alignas(64) std::uint32_t consumer_waiting;
  std::uint32_t producer_waiting;
  std::int32_t producer_pid;
  std::int32_t consumer_pid;
};
static_assert(offsetof(RingHeader, write_pos) == 0);
static_assert(offsetof(RingHeader, read_pos) == 64);
static_assert(offsetof(RingHeader, consumer_waiting) == 128);
static_assert(offsetof(RingHeader, producer_waiting) == 132);
static_assert(offsetof(RingHeader, producer_pid) == 136);
static_assert(offsetof(RingHeader, consumer_pid) == 140);
static_assert(sizeof(RingHeader) <= kHeaderSize);
// Another process shares these words: the atomics must not fall back to a process-local lock.
static_assert(std::atomic_ref<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic_ref<std::uint32_t>::is_always_lock_free);
static_assert(std::atomic_ref<std::int32_t>::is_always_lock_free);
static_assert(std::endian::native == std::endian::little, "record lengths are little-endian");

namespace {

template <class T>
std::atomic_ref<T> atomic(T& word) {
  return std::atomic_ref<T>(word);
}

constexpr std::uint64_t record_bytes(std::size_t payload) { return (4 + payload + 7) & ~std::uint64_t{7}; }

std::uint32_t load_u32(const std::byte* at) {
  std::uint32_t value;
  std::memcpy(&value, at, sizeof(value));
  return value;
}

void store_u32(std::byte* at, std::uint32_t value) { std::memcpy(at, &value, sizeof(value)); }

std::string errno_text(int err) { return std::strerror(err); }

// Our own close-on-exec copy of a descriptor that must be an eventfd.
int dup_eventfd(int fd, const char* what) {
  char link[64];
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(path.c_str(), link, sizeof(link) - 1);
  if (n < 0) throw RingError(std::string(what) + " descriptor " + std::to_string(fd) + " is not open");
  link[n] = '\0';
  if (std::strcmp(link, "anon_inode:[eventfd]") != 0) {
    throw RingError(std::string(what) + " descriptor " + std::to_string(fd) + " is not an eventfd (" + link + ")");
  }
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw RingError(std::string("dup of ") + what + " descriptor: " + errno_text(errno));
  return copy;
}

// A zombie still answers kill(pid, 0); its state letter in /proc/PID/stat tells it apart.
bool process_alive(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;  // gone between the two checks
  const auto paren = line.rfind(')');           // the command name may itself hold ')' or spaces
  if (paren == std::string::npos || paren + 2 >= line.size()) return true;
  const char state = line[paren + 2];
  return state != 'Z' && state != 'X';
}

// The announcing half of the wake-up protocol, for either side: raise our flag, fence, look again. True when the
// caller should sleep: the peer, publishing after our fence, is bound to see the flag and wake us.
template <class Ready>
bool arm_wait(std::uint32_t& waiting_flag, Ready ready) {
  if (ready()) return false;
  auto waiting = atomic(waiting_flag);
  waiting.store(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ready()) {
    waiting.store(0, std::memory_order_relaxed);
    return false;
  }
  return true;
}

// One wait of either side: announce, re-check, sleep on `fd` until woken or the deadline, repeat.
template <class Side>
WaitResult wait_on(Side& side, int fd, std::uint32_t& waiting_flag, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (!side.prepare_wait()) return WaitResult::kReady;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(std::min<std::int64_t>(left.count(), 1 << 30))) > 0) {
      drain_eventfd(fd);
      return WaitResult::kReady;  // woken: by the peer, or by our own side to stop; the caller re-checks
    }
  }
  atomic(waiting_flag).store(0, std::memory_order_relaxed);  // not asleep any more: spare the peer a wake-up
  return side.peer_alive() ? WaitResult::kTimeout : WaitResult::kPeerGone;
}

}  // namespace

std::optional<RingFds> parse_ring_fds(std::string_view text, std::string* error) {
  int values[3];
  std::string_view rest = text;
  for (int i = 0; i < 3; ++i) {
    const auto comma = i < 2 ? rest.find(',') : std::string_view::npos;
    if (i < 2 && comma == std::string_view::npos) break;
    const std::string_view field = rest.substr(0, comma);
    const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), values[i]);
    if (ec != std::errc() || end != field.data() + field.size() || field.empty() || values[i] < 0) break;
    if (i == 2) return RingFds{values[0], values[1], values[2]};
    rest.remove_prefix(comma + 1);
  }
  if (error) *error = "ring descriptors must be MEM,DATA,SPACE (three non-negative integers), got '" +
                      std::string(text) + "'";
  return std::nullopt;
}

const char* wait_result_name(WaitResult result) {
  switch (result) {
    case WaitResult::kReady: return "ready";
    case WaitResult::kTimeout: return "timeout";
    case WaitResult::kPeerGone: return "peer gone";
  }
  return "?";
}

void signal_eventfd(int fd) {
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(fd, &one, sizeof(one));  // EAGAIN: the counter is saturated, still set
}

void drain_eventfd(int fd) {
  std::uint64_t count;
  [[maybe_unused]] const ssize_t n = ::read(fd, &count, sizeof(count));  // EAGAIN: already zero
}

// --- OwnedRingFds ---

OwnedRingFds::OwnedRingFds(std::size_t capacity) {
  fds_.mem_fd = ::memfd_create("tokenbus-ring", MFD_CLOEXEC);
  if (fds_.mem_fd < 0) throw RingError(std::string("memfd_create: ") + errno_text(errno));
  if (::ftruncate(fds_.mem_fd, static_cast<off_t>(kHeaderSize + capacity)) != 0) {
    const int err = errno;
    ::close(fds_.mem_fd);
    throw RingError(std::string("ftruncate of a ring memfd: ") + errno_text(err));
  }
  fds_.data_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  fds_.space_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fds_.data_fd < 0 || fds_.space_fd < 0) {
    const int err = errno;
    for (const int fd : {fds_.mem_fd, fds_.data_fd, fds_.space_fd}) {
      if (fd >= 0) ::close(fd);
    }
    throw RingError(std::string("eventfd: ") + errno_text(err));
  }
}

OwnedRingFds::~OwnedRingFds() {
  for (const int fd : {fds_.mem_fd, fds_.data_fd, fds_.space_fd}) {
    if (fd >= 0) ::close(fd);
  }
}

// --- Region ---

Region::Region(int mem_fd) {
  struct stat st {};
  if (::fstat(mem_fd, &st) != 0) {
    throw RingError("ring memory descriptor " + std::to_string(mem_fd) + ": " + errno_text(errno));
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  const std::size_t capacity = size > kHeaderSize ? size - kHeaderSize : 0;
  if (capacity < kMinCapacity || !std::has_single_bit(capacity)) {
    throw RingError("ring memory descriptor " + std::to_string(mem_fd) + " has size " + std::to_string(size) +
                    ": it must be 256 + a power of two >= 4096");
  }
  base_ = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    throw RingError("mmap of ring memory descriptor " + std::to_string(mem_fd) + ": " + errno_text(errno));
  }
  mapped_size_ = size;
  header_ = static_cast<RingHeader*>(base_);
  data_ = static_cast<std::byte*>(base_) + kHeaderSize;
  capacity_ = capacity;
  max_payload_ = std::min<std::size_t>(capacity / 4, kSkipMarker - 1);

  const std::uint64_t write = atomic(header_->write_pos).load(std::memory_order_acquire);
  const std::uint64_t read = atomic(header_->read_pos).load(std::memory_order_acquire);
  if (write % 8 != 0 || read % 8 != 0 || write - read > capacity) {
    ::munmap(base_, mapped_size_);
    base_ = nullptr;
    throw RingError("ring memory descriptor " + std::to_string(mem_fd) + " holds impossible positions (write " +
                    std::to_string(write) + ", read " + std::to_string(read) + ")");
  }
}

Region::~Region() {
  if (base_) ::munmap(base_, mapped_size_);
}

// --- Endpoint ---

Endpoint::Endpoint(const RingFds& fds, Role role) : region_(fds.mem_fd), role_(role) {
  data_fd_ = dup_eventfd(fds.data_fd, "ring data");
  try {
    space_fd_ = dup_eventfd(fds.space_fd, "ring space");
  } catch (...) {
    ::close(data_fd_);
    throw;
  }
  RingHeader& h = region_.header();
  atomic(role == Role::kProducer ? h.producer_pid : h.consumer_pid).store(::getpid(), std::memory_order_release);
}

Endpoint::~Endpoint() {
  ::close(data_fd_);
  ::close(space_fd_);
}

bool Endpoint::peer_alive() const {
  RingHeader& h = region_.header();
  const pid_t pid = atomic(role_ == Role::kProducer ? h.consumer_pid : h.producer_pid).load(std::memory_order_acquire);
  return pid == 0 || process_alive(pid);
}

// --- Producer ---

Producer::Producer(const RingFds& fds) : Endpoint(fds, Role::kProducer) {
  write_pos_ = atomic(region_.header().write_pos).load(std::memory_order_relaxed);
}

bool Producer::append(const void* payload, std::size_t size) {
  if (!fits(size)) return false;
  RingHeader& h = region_.header();
  const std::uint64_t capacity = region_.capacity();
  const std::uint64_t need = record_bytes(size);
  const std::uint64_t offset = write_pos_ & (capacity - 1);
  const std::uint64_t tail = capacity - offset;  // a multiple of 8, so a skip marker always fits
  const std::uint64_t total = need <= tail ? need : tail + need;
  const std::uint64_t read = atomic(h.read_pos).load(std::memory_order_acquire);
  if (write_pos_ + total - read > capacity) {
    wanted_ = total;
    return false;
  }
  std::byte* at = region_.data() + offset;
  if (need > tail) {
    store_u32(at, kSkipMarker);
    at = region_.data();
  }
  store_u32(at, static_cast<std::uint32_t>(size));
  if (size > 0) std::memcpy(at + 4, payload, size);
  write_pos_ += total;
  wanted_ = 0;
  atomic(h.write_pos).store(write_pos_, std::memory_order_release);
  return true;
}

void Producer::wake_consumer() {
  // Pairs with the consumer's fence in prepare_wait(): either it sees the new write_pos, or we see its flag.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  auto waiting = atomic(region_.header().consumer_waiting);
  if (waiting.load(std::memory_order_relaxed) != 0 && waiting.exchange(0, std::memory_order_relaxed) != 0) {
    signal_eventfd(data_fd_);
  }
}

bool Producer::has_room() const {
  const std::uint64_t read = atomic(region_.header().read_pos).load(std::memory_order_acquire);
  const std::uint64_t free = region_.capacity() - (write_pos_ - read);
  return free >= std::max<std::uint64_t>(wanted_, record_bytes(0));
}

bool Producer::prepare_wait() {
  return arm_wait(region_.header().producer_waiting, [this] { return has_room(); });
}

WaitResult Producer::wait_for_space(std::chrono::milliseconds timeout) {
  return wait_on(*this, space_fd_, region_.header().producer_waiting, timeout);
}

// --- Consumer ---

Consumer::Consumer(const RingFds& fds) : Endpoint(fds, Role::kConsumer) {
  read_pos_ = atomic(region_.header().read_pos).load(std::memory_order_relaxed);
}

bool Consumer::has_data() const {
  return atomic(region_.header().write_pos).load(std::memory_order_acquire) != read_pos_;
}

std::optional<std::span<const std::byte>> Consumer::peek() {
  if (!broken_.empty()) return std::nullopt;
  const std::uint64_t write = atomic(region_.header().write_pos).load(std::memory_order_acquire);
  std::uint64_t pos = read_pos_;
  if (pos == write) return std::nullopt;
  const std::uint64_t capacity = region_.capacity();
  std::uint64_t offset = pos & (capacity - 1);
  std::uint32_t length = load_u32(region_.data() + offset);
  if (length == kSkipMarker) {
    pos += capacity - offset;
    offset = 0;
    length = pos < write ? load_u32(region_.data()) : kSkipMarker;  // a marker is published with its record
  }
  const std::uint64_t need = record_bytes(length);
  if (write - read_pos_ > capacity || length > region_.max_payload() || offset + need > capacity ||
      pos + need > write) {
    broken_ = "record length " + std::to_string(length) + " at position " + std::to_string(pos) +
              " is impossible (write position " + std::to_string(write) + ", capacity " + std::to_string(capacity) +
              ")";
    return std::nullopt;
  }
  next_pos_ = pos + need;
  return std::span<const std::byte>(region_.data() + offset + 4, length);
}

void Consumer::release() {
  if (!next_pos_) return;
  RingHeader& h = region_.header();
  read_pos_ = *std::exchange(next_pos_, std::nullopt);
  atomic(h.read_pos).store(read_pos_, std::memory_order_release);
  // Pairs with the producer's fence in prepare_wait(), as in try_write().
  std::atomic_thread_fence(std::memory_order_seq_cst);
  auto waiting = atomic(h.producer_waiting);
  if (waiting.load(std::memory_order_relaxed) != 0 && waiting.exchange(0, std::memory_order_relaxed) != 0) {
    signal_eventfd(space_fd_);
  }
}

bool Consumer::prepare_wait() {
  return arm_wait(region_.header().consumer_waiting, [this] { return has_data(); });
}

WaitResult Consumer::wait_for_data(std::chrono::milliseconds timeout) {
  return wait_on(*this, data_fd_, region_.header().consumer_waiting, timeout);
}

}  // namespace tokenbus::ring
