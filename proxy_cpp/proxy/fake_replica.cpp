#include "proxy/fake_replica.hpp"

#include <grpcpp/grpcpp.h>

#include <vector>

namespace tokenbus::proxy::testing {

class FakeReplica::Writer final : public grpc::ServerWriteReactor<v1::GenerateChunk> {
 public:
  Writer(FakeReplica& owner, const v1::GenerateRequest& request, const std::string& forced, bool stamp)
      : owner_(owner) {
    const std::string& text = !forced.empty()               ? forced
                              : request.messages_size() > 0 ? request.messages(request.messages_size() - 1).content()
                                                            : request.prompt();
    if (text == "hang") {
      add("first ", 1);
      hang_ = true;
    } else if (text == "silent") {
      hang_ = true;
    } else if (text == "unavailable") {
      end_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "replica unavailable");
    } else if (text == "abort") {
      finish(v1::FINISH_REASON_ABORT, 0);
    } else if (text == "abort-mid") {
      add("one ", 1);
      finish(v1::FINISH_REASON_ABORT, 1);
    } else if (text == "error400") {
      v1::GenerateChunk& last = add("", 0);
      last.set_finish_reason(v1::FINISH_REASON_ERROR);
      last.set_error_code(400);
      last.set_error_message("prompt too long");
    } else if (text == "fail-mid") {
      add("one ", 1);
      add("two ", 1);
      end_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "replica died");
    } else if (text == "big") {
      const std::uint32_t n = request.params().max_tokens() == 0 ? 8 : request.params().max_tokens();
      for (std::uint32_t i = 0; i < n; ++i) add(std::string(kFakeBigChunkBytes, static_cast<char>('a' + i % 26)), 1);
      finish(v1::FINISH_REASON_LENGTH, n);
    } else if (text == "quote") {
      add(kFakeQuoteText, 1);
      finish(v1::FINISH_REASON_STOP, 1);
    } else {
      const std::uint32_t n = request.params().max_tokens() == 0 ? 8 : request.params().max_tokens();
      for (std::uint32_t i = 0; i < n; ++i) add("tok" + std::to_string(i) + " ", 1);
      finish(v1::FINISH_REASON_LENGTH, n);
    }
    if (stamp) stamp_first_text();
    next();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard lock(mutex_);
      writing_ = false;
    }
    if (ok) {
      next();
    } else {
      finish_once(grpc::Status::CANCELLED);
    }
  }

  void OnCancel() override {
    owner_.note_cancelled();
    {
      std::lock_guard lock(mutex_);
      cancelled_ = true;
      if (writing_) return;  // OnWriteDone finishes
    }
    finish_once(grpc::Status::CANCELLED);
  }

  void OnDone() override { delete this; }

 private:
  v1::GenerateChunk& add(std::string text, std::uint32_t tokens) {
    v1::GenerateChunk& chunk = chunks_.emplace_back();
    chunk.set_text(std::move(text));
    chunk.set_tokens(tokens);
    return chunk;
  }

  // Each stamp read after the one before, so they never decrease.
  void stamp_first_text() {
    const auto now_ns = [] {
      return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                            std::chrono::system_clock::now().time_since_epoch())
                                            .count());
    };
    for (v1::GenerateChunk& chunk : chunks_) {
      if (chunk.text().empty()) continue;
      v1::FirstTokenTimes& times = *chunk.mutable_first_token_times();
      times.set_replica_received_ns(now_ns());
      times.set_ring_written_ns(now_ns());
      times.set_engine_produced_ns(now_ns());
      times.set_ring_read_ns(now_ns());
      return;
    }
  }

  void finish(v1::FinishReason reason, std::uint32_t completion_tokens) {
    v1::GenerateChunk& last = add("", 0);
    last.set_finish_reason(reason);
    last.set_prompt_tokens(kFakePromptTokens);
    last.set_completion_tokens(completion_tokens);
  }

  // Decides under the lock, acts outside it: a reaction may run inline in a Start call.
  void next() {
    const v1::GenerateChunk* write = nullptr;
    {
      std::lock_guard lock(mutex_);
      if (finished_) return;
      if (cancelled_) {
        end_status_ = grpc::Status::CANCELLED;
        finished_ = true;
      } else if (next_ < chunks_.size()) {
        write = &chunks_[next_++];
        writing_ = true;
      } else if (hang_) {
        return;
      } else {
        finished_ = true;
      }
    }
    if (write != nullptr) {
      StartWrite(write);
    } else {
      Finish(end_status_);
    }
  }

  void finish_once(const grpc::Status& status) {
    {
      std::lock_guard lock(mutex_);
      if (std::exchange(finished_, true)) return;
    }
    Finish(status);
  }

  FakeReplica& owner_;
  std::vector<v1::GenerateChunk> chunks_;
  std::size_t next_ = 0;
  bool hang_ = false;
  grpc::Status end_status_ = grpc::Status::OK;
  std::mutex mutex_;  // OnCancel and OnWriteDone may run at once
  bool writing_ = false;
  bool cancelled_ = false;
  bool finished_ = false;
};

FakeReplica::FakeReplica(std::string forced) : forced_(std::move(forced)) {
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
  builder.RegisterService(this);
  server_ = builder.BuildAndStart();
}

FakeReplica::~FakeReplica() {
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  // Shutdown returns after every call's last reaction, ordered inside uninstrumented gRPC: taking the mutex that
  // the reactions took shows TSan that order before the members go (a late OnCancel touched them).
  std::lock_guard lock(mutex_);
}

grpc::ServerWriteReactor<v1::GenerateChunk>* FakeReplica::Generate(grpc::CallbackServerContext*,
                                                                  const v1::GenerateRequest* request) {
  {
    std::lock_guard lock(mutex_);
    last_request_ = *request;
    ++calls_;
  }
  return new Writer(*this, *request, forced_, stamp_);
}

int FakeReplica::calls() {
  std::lock_guard lock(mutex_);
  return calls_;
}

v1::GenerateRequest FakeReplica::last_request() {
  std::lock_guard lock(mutex_);
  return last_request_;
}

void FakeReplica::note_cancelled() {
  std::lock_guard lock(mutex_);
  ++cancelled_;
  cancelled_cv_.notify_all();
}

bool FakeReplica::wait_for_cancellations(int count, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  return cancelled_cv_.wait_for(lock, timeout, [&] { return cancelled_ >= count; });
}

}  // namespace tokenbus::proxy::testing
