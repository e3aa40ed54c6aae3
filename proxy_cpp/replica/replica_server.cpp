#include "replica/replica_server.hpp"

#include <grpcpp/grpcpp.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <variant>

#include "common/log.hpp"
#include "replica/generate_stream.hpp"
#include "replica/metrics.hpp"
#include "replica/metrics_endpoint.hpp"
#include "replica/request_writer.hpp"
#include "replica/ring_records.hpp"
#include "tokenbus.grpc.pb.h"

namespace tokenbus::replica {
namespace {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::chrono::milliseconds since(const std::atomic<std::int64_t>& then_ns) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::nanoseconds(now_ns() - then_ns.load(std::memory_order_relaxed)));
}

}  // namespace

struct ReplicaServer::Impl final : public tokenbus::v1::Replica::CallbackService {
  explicit Impl(ReplicaOptions options)
      : options_(std::move(options)), writer_(options_.request_ring, metrics_), responses_(options_.response_ring) {
    worker_gone_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (worker_gone_fd_ < 0) throw ring::RingError("eventfd for the worker-gone signal failed");
    log(LogLevel::kInfo, "replica", "replica %s attached: request ring %zu bytes, response ring %zu bytes",
        id(), writer_.capacity(), responses_.region().capacity());
  }

  ~Impl() override { ::close(worker_gone_fd_); }

  const char* id() const { return options_.replica_id.c_str(); }

  // --- gRPC ---

  grpc::ServerWriteReactor<tokenbus::v1::GenerateChunk>* Generate(
      grpc::CallbackServerContext* context, const tokenbus::v1::GenerateRequest* request) override {
    const std::uint64_t received_ns = wall_clock_ns();
    const std::uint64_t request_id = next_id_.fetch_add(1, std::memory_order_relaxed);
    auto* call = new GenerateStream(calls_, writer_, metrics_, request_id, received_ns);  // deletes itself in OnDone
    // Registered before SUBMIT is written, so no TOKENS can arrive for an unknown id.
    if (!calls_.add(request_id, call)) {
      call->fail(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model worker is gone"), CallResult::kWorkerGone);
      return call;
    }
    switch (writer_.submit(request_id, *request, call->ring_written_ns())) {
      case RequestWriter::SubmitResult::kWritten:
        break;
      case RequestWriter::SubmitResult::kTooBig:
        log(LogLevel::kWarn, "replica", "replica %s: request %.64s from %s too large for the request ring", id(),
            request->request_id().c_str(), context->peer().c_str());
        call->fail(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                "request too large: its encoding exceeds " + std::to_string(writer_.max_payload()) +
                                    " bytes"),
                   CallResult::kTooLarge);
        break;
      case RequestWriter::SubmitResult::kRingFull:
        call->fail(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "replica busy: its request ring is full"),
                   CallResult::kRingFull);
        break;
    }
    return call;
  }

  grpc::ServerUnaryReactor* Health(grpc::CallbackServerContext* context, const tokenbus::v1::HealthRequest*,
                                   tokenbus::v1::HealthResponse* response) override {
    last_control_call_ns_.store(now_ns(), std::memory_order_relaxed);
    {
      std::lock_guard lock(health_mutex_);
      response->set_serving(serving_);
      response->set_engine(engine_);
      response->set_model(model_);
      response->set_max_model_len(max_model_len_);
    }
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context, const tokenbus::v1::StatsRequest*,
                                  tokenbus::v1::StatsResponse* response) override {
    last_control_call_ns_.store(now_ns(), std::memory_order_relaxed);
    const auto age = since(last_stats_ns_).count();
    response->set_stats_age_ms(static_cast<std::uint32_t>(std::min<std::int64_t>(age, UINT32_MAX)));
    response->set_running(running_.load(std::memory_order_relaxed));
    response->set_waiting(waiting_.load(std::memory_order_relaxed));
    response->set_kv_usage(kv_usage_.load(std::memory_order_relaxed));
    response->set_in_flight(static_cast<std::uint32_t>(calls_.size()));
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  // --- response ring ---

  void read_responses() {
    while (!stopping_.load(std::memory_order_acquire)) {
      const auto record = responses_.peek();
      if (record) {
        metrics_.response_ring().count(record->size());
        dispatch(decode_response(*record));
        responses_.release();
        continue;
      }
      if (!responses_.broken().empty()) return worker_gone("response ring broken: " + responses_.broken());
      const auto sleep_start = std::chrono::steady_clock::now();
      const auto waited = responses_.wait_for_data(options_.peer_check_interval);
      metrics_.add_response_ring_idle(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - sleep_start).count());
      if (waited == ring::WaitResult::kPeerGone) return worker_gone("its process exited");
    }
  }

  void dispatch(const ResponseRecord& record) {
    std::visit([this](const auto& decoded) { handle(decoded); }, record);
  }

  void handle(const TokensRecord& tokens) {
    const std::uint64_t read_ns = wall_clock_ns();  // the ring_read stamp of each call whose first group is here
    tokens.for_each([&](const TokensGroup& group) {
      calls_.with_call(group.id, [&](GenerateStream& call) { call.on_tokens(group, read_ns); });
    });
  }

  void handle(const FinishRecord& finish) {
    calls_.with_call(finish.id,
                     [&](GenerateStream& call) { call.on_finish(finish, result_of_finish(finish.finish_reason)); });
  }

  void handle(const StatsRecord& stats) {
    last_stats_ns_.store(now_ns(), std::memory_order_relaxed);
    running_.store(stats.running, std::memory_order_relaxed);
    waiting_.store(stats.waiting, std::memory_order_relaxed);
    kv_usage_.store(static_cast<float>(stats.kv_usage), std::memory_order_relaxed);
  }

  void handle(const ReadyRecord& ready) {
    {
      std::lock_guard lock(health_mutex_);
      serving_ = true;
      engine_ = ready.engine;
      model_ = ready.model;
      max_model_len_ = ready.max_model_len;
    }
    log(LogLevel::kInfo, "replica", "replica %s: model worker ready (engine %.*s, model %.*s, %u tokens)", id(),
        static_cast<int>(ready.engine.size()), ready.engine.data(), static_cast<int>(ready.model.size()),
        ready.model.data(), ready.max_model_len);
  }

  void handle(const DecodeError& error) {
    log(LogLevel::kWarn, "replica", "replica %s: dropping a malformed record from the model worker: %s", id(),
        error.message.c_str());
  }

  // Fails every open stream (the worker cannot answer them any more) and tells main through worker_gone_fd_.
  void worker_gone(const std::string& why) {
    {
      std::lock_guard lock(health_mutex_);
      serving_ = false;
    }
    const FinishRecord failure{0, tokenbus::v1::FINISH_REASON_ERROR, 0, 0, 500, "the model worker exited"};
    const std::size_t failed =
        calls_.close([&](GenerateStream& call) { call.on_finish(failure, CallResult::kWorkerGone); });
    log(LogLevel::kError, "replica", "replica %s: model worker gone (%s): failed %zu open streams", id(), why.c_str(),
        failed);
    ring::signal_eventfd(worker_gone_fd_);
  }

  ReplicaOptions options_;
  ReplicaMetrics metrics_;  // before writer_, which counts into it
  RequestWriter writer_;
  ring::Consumer responses_;  // only the reader thread touches it after start()
  CallRegistry calls_;
  std::atomic<std::uint64_t> next_id_{1};
  std::atomic<std::uint32_t> running_{0};
  std::atomic<std::uint32_t> waiting_{0};
  std::atomic<float> kv_usage_{0};
  // steady-clock times: the last STATS record from the worker, the last Health/Stats call from an agent
  std::atomic<std::int64_t> last_stats_ns_{now_ns()};
  std::atomic<std::int64_t> last_control_call_ns_{now_ns()};
  std::mutex health_mutex_;
  bool serving_ = false;
  std::string engine_;
  std::string model_;
  std::uint32_t max_model_len_ = 0;
  int worker_gone_fd_ = -1;
  int port_ = 0;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint_;
  std::atomic<bool> stopping_{false};
  std::thread reader_;
  std::unique_ptr<grpc::Server> server_;  // declared last: destroyed first, before the service it serves
  bool shut_down_ = false;
};

ReplicaServer::ReplicaServer(ReplicaOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

ReplicaServer::~ReplicaServer() { shutdown(std::chrono::milliseconds(0)); }

bool ReplicaServer::start(std::string& error) {
  try {
    impl_->metrics_endpoint_ =
        std::make_unique<MetricsEndpoint>(impl_->options_.metrics_bind, impl_->metrics_.registry());
  } catch (const std::exception& e) {
    error = "cannot serve metrics on " + impl_->options_.metrics_bind + " (an IP address and a port): " + e.what();
    return false;
  }
  grpc::ServerBuilder builder;
  builder.AddListeningPort(impl_->options_.listen, grpc::InsecureServerCredentials(), &impl_->port_);
  builder.RegisterService(impl_.get());
  impl_->server_ = builder.BuildAndStart();
  if (!impl_->server_ || impl_->port_ == 0) {
    impl_->server_.reset();
    error = "cannot listen on " + impl_->options_.listen;
    return false;
  }
  impl_->reader_ = std::thread([impl = impl_.get()] { impl->read_responses(); });
  log(LogLevel::kInfo, "replica", "replica %s serving gRPC on port %d (asked for %s)", impl_->id(), impl_->port_,
      impl_->options_.listen.c_str());
  return true;
}

int ReplicaServer::port() const { return impl_->port_; }

int ReplicaServer::metrics_port() const { return impl_->metrics_endpoint_->port(); }

int ReplicaServer::worker_gone_fd() const { return impl_->worker_gone_fd_; }

std::chrono::milliseconds ReplicaServer::since_last_control_call() const {
  return since(impl_->last_control_call_ns_);
}

void ReplicaServer::shutdown(std::chrono::milliseconds grace) {
  Impl& impl = *impl_;
  if (impl.shut_down_) return;
  impl.shut_down_ = true;
  const bool was_serving = impl.server_ != nullptr;
  if (was_serving) {
    log(LogLevel::kInfo, "replica", "replica %s stopping: %zu open streams get up to %lld ms to finish", impl.id(),
        impl.calls_.size(), static_cast<long long>(grace.count()));
    impl.server_->Shutdown(std::chrono::system_clock::now() + grace);  // then cancels what is left
    impl.server_->Wait();
  }
  impl.stopping_.store(true, std::memory_order_release);
  if (impl.reader_.joinable()) {
    ring::signal_eventfd(impl.responses_.data_fd());  // our own copy: ends the reader's wait at once
    impl.reader_.join();
  }
  if (was_serving) log(LogLevel::kInfo, "replica", "replica %s stopped", impl.id());
}

}  // namespace tokenbus::replica
