#include "replica/generate_call.hpp"

#include "replica/request_writer.hpp"

namespace tokenbus::replica {

bool CallRegistry::add(std::uint64_t id, GenerateCall* call) {
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

GenerateCall::GenerateCall(CallRegistry& registry, RequestWriter& writer, std::uint64_t id)
    : registry_(registry), writer_(writer), id_(id) {}

void GenerateCall::fail(grpc::Status status) {
  {
    std::lock_guard lock(mutex_);
    worker_done_ = true;
    finish_called_ = true;
  }
  Finish(std::move(status));
}

void GenerateCall::on_tokens(std::string_view text, std::uint32_t tokens) {
  std::unique_lock lock(mutex_);
  if (abandoned_ || final_) return;
  pending_text_.append(text);
  pending_tokens_ += tokens;
  pump(std::move(lock));
}

void GenerateCall::on_finish(const FinishRecord& finish) {
  std::unique_lock lock(mutex_);
  worker_done_ = true;
  if (final_) return;  // a duplicate FINISH changes nothing
  final_ = Final{std::string(finish.finish_reason), finish.prompt_tokens, finish.completion_tokens, finish.error_code,
                 std::string(finish.error_message)};
  pump(std::move(lock));
}

void GenerateCall::OnWriteDone(bool ok) {
  std::unique_lock lock(mutex_);
  write_in_flight_ = false;
  if (!ok) return abandon(std::move(lock));
  pump(std::move(lock));
}

void GenerateCall::OnCancel() { abandon(std::unique_lock(mutex_)); }

void GenerateCall::OnDone() {
  registry_.remove(id_);  // waits for a reader inside this call to leave
  delete this;
}

void GenerateCall::abandon(std::unique_lock<std::mutex> lock) {
  abandoned_ = true;
  const bool send_cancel = !worker_done_;
  worker_done_ = true;  // one CANCEL at most
  pump(std::move(lock));
  // After pump() the call may be finished, but OnDone cannot run before this reaction returns.
  if (send_cancel) writer_.cancel(id_);
}

void GenerateCall::pump(std::unique_lock<std::mutex> lock) {
  if (finish_called_ || write_in_flight_) return;
  if (abandoned_) {
    finish_called_ = true;
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
  if (final_) {
    chunk_.set_finish_reason(final_->finish_reason);
    chunk_.set_prompt_tokens(final_->prompt_tokens);
    chunk_.set_completion_tokens(final_->completion_tokens);
    chunk_.set_error_code(final_->error_code);
    chunk_.set_error_message(final_->error_message);
    finish_called_ = true;
    lock.unlock();
    StartWriteAndFinish(&chunk_, grpc::WriteOptions(), grpc::Status::OK);
    return;
  }
  write_in_flight_ = true;
  lock.unlock();
  StartWrite(&chunk_);
}

}  // namespace tokenbus::replica
