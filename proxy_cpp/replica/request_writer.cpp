#include "replica/request_writer.hpp"

#include "common/log.hpp"
#include "replica/metrics.hpp"
#include "replica/ring_records.hpp"

namespace tokenbus::replica {

RequestWriter::RequestWriter(const ring::RingFds& fds, ReplicaMetrics& metrics)
    : producer_(fds), metrics_(metrics), flusher_([this] { flush_loop(); }) {}

RequestWriter::~RequestWriter() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  ring::signal_eventfd(producer_.space_fd());  // our own copy: ends a wait_for_space at once
  flusher_.join();
}

RequestWriter::SubmitResult RequestWriter::submit(std::uint64_t id, const tokenbus::v1::GenerateRequest& request,
                                                  std::atomic<std::uint64_t>& written_ns) {
  thread_local std::string record;  // each gRPC thread reuses its buffer
  record.clear();
  encode_submit(record, id, request);
  if (!producer_.fits(record.size())) return SubmitResult::kTooBig;
  std::lock_guard lock(mutex_);
  // Queued CANCELs go first: they free engine capacity, new work can be retried elsewhere.
  if (!pending_.empty()) return SubmitResult::kRingFull;
  written_ns.store(wall_clock_ns(), std::memory_order_relaxed);
  if (!producer_.try_write(record.data(), record.size())) return SubmitResult::kRingFull;
  metrics_.request_ring().count(record.size());
  return SubmitResult::kWritten;
}

void RequestWriter::cancel(std::uint64_t id) {
  std::string record;
  encode_cancel(record, id);
  std::lock_guard lock(mutex_);
  if (pending_.empty() && producer_.try_write(record.data(), record.size())) {
    metrics_.request_ring().count(record.size());
    return;
  }
  pending_.push_back({std::move(record), std::chrono::steady_clock::now()});
  if (pending_.size() == 1) wake_.notify_one();
}

void RequestWriter::flush_loop() {
  std::unique_lock lock(mutex_);
  bool worker_gone_logged = false;
  while (!stopping_) {
    while (!pending_.empty() && producer_.try_write(pending_.front().record.data(), pending_.front().record.size())) {
      metrics_.request_ring().count(pending_.front().record.size());
      metrics_.observe_request_ring_full_wait(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - pending_.front().since).count());
      pending_.pop_front();
    }
    if (pending_.empty()) {
      wake_.wait(lock, [this] { return stopping_ || !pending_.empty(); });
      continue;
    }
    // While pending_ is non-empty nobody else writes to the ring, so waiting unlocked is safe; gRPC threads
    // only append to pending_ meanwhile.
    lock.unlock();
    const auto waited = producer_.wait_for_space(std::chrono::milliseconds(500));
    lock.lock();
    if (waited == ring::WaitResult::kPeerGone && !worker_gone_logged) {
      log(LogLevel::kWarn, "replica", "request ring: model worker gone with %zu CANCEL records unsent",
          pending_.size());
      worker_gone_logged = true;
    }
  }
}

}  // namespace tokenbus::replica
