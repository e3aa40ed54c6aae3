#pragma once
// The replica's producer side of the request ring. gRPC threads write SUBMITs directly and fail fast when
// the ring is congested (the caller answers RESOURCE_EXHAUSTED); CANCELs are never dropped: when the ring has
// no room they queue, in order, and a flusher thread writes them as the worker frees space. Nothing spins.
#include <atomic>
#include <chrono>
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

class ReplicaMetrics;

class RequestWriter {
 public:
  enum class SubmitResult { kWritten, kTooBig, kRingFull };

  // Attaches as the request ring's producer (throws ring::RingError) and starts the flusher. Counts the
  // records it writes in `metrics`, which must outlive it.
  RequestWriter(const ring::RingFds& fds, ReplicaMetrics& metrics);
  ~RequestWriter();
  RequestWriter(const RequestWriter&) = delete;
  RequestWriter& operator=(const RequestWriter&) = delete;

  // On kWritten, `written_ns` holds the wall-clock time the record was written: stamped just before it is
  // published, so it is set before the worker can have read the record (and answered it).
  SubmitResult submit(std::uint64_t id, const tokenbus::v1::GenerateRequest& request,
                      std::atomic<std::uint64_t>& written_ns);
  void cancel(std::uint64_t id);

  std::size_t max_payload() const { return producer_.region().max_payload(); }
  std::size_t capacity() const { return producer_.region().capacity(); }

 private:
  void flush_loop();

  struct Pending {
    std::string record;
    std::chrono::steady_clock::time_point since;  // when it found the ring full
  };

  ring::Producer producer_;  // guarded by mutex_, except the flusher's wait (see flush_loop)
  ReplicaMetrics& metrics_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Pending> pending_;  // encoded records the ring had no room for, oldest first
  bool stopping_ = false;
  std::thread flusher_;
};

}  // namespace tokenbus::replica
