#include "replica/generate_stream.hpp"

#include "replica/request_writer.hpp"

namespace tokenbus::replica {

bool CallRegistry::add(std::uint64_t id, GenerateStream* call) {
  std::lock_guard lock(mutex_);
  if (closed_) return false;
  calls_.emplace(id, call);
  return true;
}

void CallRegistry::remove(std::uint64_t id) {
  std::lock_guard lock(mutex_);
  calls_.erase(id);
}

std::size_t CallRegistry::size() {
  std::lock_guard lock(mutex_);
  return calls_.size();
}

GenerateStream::GenerateStream(CallRegistry& registry, RequestWriter& writer, ReplicaMetrics& metrics, std::uint64_t id,
                           std::uint64_t received_ns)
    : registry_(registry), writer_(writer), metrics_(metrics), id_(id), received_ns_(received_ns) {
  metrics_.call_started();
}

void GenerateStream::fail(grpc::Status status, CallResult result) {
  {
    std::lock_guard lock(mutex_);
    worker_done_ = true;
    finish_called_ = true;
    result_ = result;
  }
  Finish(std::move(status));
}

void GenerateStream::on_tokens(const TokensGroup& tokens, std::uint64_t read_ns) {
  std::unique_lock lock(mutex_);
  if (abandoned_ || final_) return;
  if (!tokens_seen_) {
    tokens_seen_ = true;
    engine_produced_ns_ = tokens.produced_ns;
    ring_read_ns_ = read_ns;
  }
  pending_text_.append(tokens.text);
  pending_tokens_ += tokens.tokens;
  pump(std::move(lock));
}

void GenerateStream::on_finish(const FinishRecord& finish, CallResult result) {
  std::unique_lock lock(mutex_);
  worker_done_ = true;
  if (final_) return;  // a duplicate FINISH changes nothing
  final_ = Final{finish.finish_reason, finish.prompt_tokens,
                 finish.completion_tokens,          finish.error_code,
                 std::string(finish.error_message), result};
  pump(std::move(lock));
}

void GenerateStream::OnWriteDone(bool ok) {
  std::unique_lock lock(mutex_);
  write_in_flight_ = false;
  if (!ok) return abandon(std::move(lock));
  pump(std::move(lock));
}

void GenerateStream::OnCancel() { abandon(std::unique_lock(mutex_)); }

void GenerateStream::OnDone() {
  registry_.remove(id_);  // waits for a reader inside this call to leave
  CallResult result;
  {
    std::lock_guard lock(mutex_);
    result = result_;
  }
  metrics_.call_ended(result);
  delete this;
}

void GenerateStream::abandon(std::unique_lock<std::mutex> lock) {
  abandoned_ = true;
  const bool send_cancel = !worker_done_;
  worker_done_ = true;  // one CANCEL at most
  pump(std::move(lock));
  // After pump() the call may be finished, but OnDone cannot run before this reaction returns.
  if (send_cancel) writer_.cancel(id_);
}

void GenerateStream::pump(std::unique_lock<std::mutex> lock) {
  if (finish_called_ || write_in_flight_) return;
  if (abandoned_) {
    finish_called_ = true;
    result_ = CallResult::kCancelled;
    lock.unlock();
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    return;
  }
  if (!final_ && pending_text_.empty() && pending_tokens_ == 0) return;
  chunk_.Clear();
  chunk_.mutable_text()->swap(pending_text_);  // the old chunk's buffer becomes the next pending one
  pending_text_.clear();
  chunk_.set_tokens(pending_tokens_);
  pending_tokens_ = 0;
  if (!first_token_times_sent_ && !chunk_.text().empty()) {
    first_token_times_sent_ = true;
    auto& times = *chunk_.mutable_first_token_times();
    times.set_replica_received_ns(received_ns_);
    times.set_ring_written_ns(ring_written_ns_.load(std::memory_order_relaxed));
    times.set_engine_produced_ns(engine_produced_ns_);
    times.set_ring_read_ns(ring_read_ns_);
    metrics_.observe_first_token(times);
  }
  if (final_) {
    chunk_.set_finish_reason(final_->finish_reason);
    chunk_.set_prompt_tokens(final_->prompt_tokens);
    chunk_.set_completion_tokens(final_->completion_tokens);
    chunk_.set_error_code(final_->error_code);
    chunk_.set_error_message(final_->error_message);
    finish_called_ = true;
    result_ = final_->result;
    lock.unlock();
    StartWriteAndFinish(&chunk_, grpc::WriteOptions(), grpc::Status::OK);
    return;
  }
  write_in_flight_ = true;
  lock.unlock();
  StartWrite(&chunk_);
}

}  // namespace tokenbus::replica
