#pragma once
// The replica's producer side of the request ring. gRPC threads write SUBMITs directly and fail fast when
// the ring is congested (the caller answers RESOURCE_EXHAUSTED); CANCELs are never dropped: when the ring has
// no room they queue, in order, and a flusher thread writes them as the worker frees space. Nothing spins.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

#include "ring/shm_ring.hpp"

namespace tokenbus::v1 {
class GenerateRequest;
}

namespace tokenbus::replica {

class RequestWriter {
 public:
  enum class SubmitResult { kWritten, kTooBig, kRingFull };

  // Attaches as the request ring's producer (throws ring::RingError) and starts the flusher.
  explicit RequestWriter(const ring::RingFds& fds);
  ~RequestWriter();
  RequestWriter(const RequestWriter&) = delete;
  RequestWriter& operator=(const RequestWriter&) = delete;

  SubmitResult submit(std::uint64_t id, const tokenbus::v1::GenerateRequest& request);
  void cancel(std::uint64_t id);

  std::size_t max_payload() const { return producer_.region().max_payload(); }
  std::size_t capacity() const { return producer_.region().capacity(); }

 private:
  void flush_loop();

  ring::Producer producer_;  // guarded by mutex_, except the flusher's wait (see flush_loop)
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::string> pending_;  // encoded records the ring had no room for, oldest first
  bool stopping_ = false;
  std::thread flusher_;
};

}  // namespace tokenbus::replica
